"""docker-compose.yml on the real Docker engine: images built, the stack up and healthy, a host process
watched by the collector container with eBPF, its fault read as an anomaly from the host by a plain
kafka-python consumer, three detector replicas sharing the partitions and together scoring every
window, an alerter restart that loses no anomaly, and `down` within the grace period.

The override tests/compose/docker-compose.test.yml changes only what this machine needs (the broker:
apache/kafka cannot be pulled here; host networking; short calibrations; the pids to watch). Progress
goes to the terminal as `[compose] ...` lines, so CI's log shows each step with its time.

Needs root, a Docker engine (scripts/docker-images.sh starts one) and eBPF; skipped, saying why, when
one is missing. OSAD_COMPOSE=0 skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from kafka import KafkaConsumer

from osad.runtime.broker import broker_binary, free_port, port_open
from osad.schemas import ANOMALIES, SCORES, SIGNATURES
from tests.conftest import ROOT, wait_until
from tests.kafkautil import Proc, TopicReader, health, metric

pytestmark = [
    pytest.mark.slow, pytest.mark.ebpf, pytest.mark.timeout(2400),
    pytest.mark.skipif(os.environ.get("OSAD_COMPOSE") == "0", reason="compose test skipped: OSAD_COMPOSE=0"),
]

OVERRIDE = ROOT / "tests" / "compose" / "docker-compose.test.yml"
SERVICES = ("kafka", "collector", "featurizer", "detector", "alerter")
GRACE_S = 20
T0 = time.monotonic()


_CAPTURE = []  # the test's capsys: say() suspends pytest's capture to reach the terminal


def say(msg: str) -> None:
    """Progress on the terminal even while pytest captures output (CI's log shows each step)."""
    line = f"[compose +{time.monotonic() - T0:5.0f} s] {msg}\n"
    if _CAPTURE:
        with _CAPTURE[0].disabled():
            sys.stderr.write(line)
            sys.stderr.flush()
    else:
        sys.__stderr__.write(line)


def _prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.skip("the compose test needs root (it starts dockerd; CI runs as root)")
    for tool in ("dockerd", "docker", "docker-compose"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs docker-compose and docker.io)")
    from osad.collector.bpf import unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"eBPF cannot load on this host, so the collector container could not either: {why}")


class Stack:
    """One compose project (a unique name) over docker-compose.yml + the test override.

    docker-compose 1.29 merges an override's lists into the base's and has no way to drop one, while host
    networking refuses published ports; so the project runs the merged file (`docker-compose config` of
    the two) with the one thing host networking forbids taken out: the production broker's `ports`."""

    def __init__(self, env: dict, folder):
        self.project = "osadtest" + uuid.uuid4().hex[:6]
        self.env = dict(os.environ, **env)
        merged = self._run(["-f", str(ROOT / "docker-compose.yml"), "-f", str(OVERRIDE), "config"]).stdout
        spec = yaml.safe_load(merged)
        base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        assert set(spec["services"]) == set(base["services"])  # the override adds no service and drops none
        for name, svc in spec["services"].items():
            if svc.get("network_mode") == "host":
                svc.pop("ports", None)
        self.file = folder / "docker-compose.merged.yml"
        self.file.write_text(yaml.safe_dump(spec, sort_keys=False))

    def _run(self, args, timeout_s: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker-compose", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                           timeout=timeout_s)
        if r.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}")
        return r

    def compose(self, *args: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker-compose", "-p", self.project, "-f", str(self.file), *args]
        r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def containers(self, service: str, all_: bool = False) -> list[str]:
        args = ["ps", "-q"] + (["-a"] if all_ else []) + [service]
        return [c for c in self.compose(*args, check=False).stdout.split() if c]

    def inspect(self, cid: str) -> dict:
        r = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True)
        return json.loads(r.stdout)[0] if r.returncode == 0 else {}

    def health_of(self, service: str) -> list[str]:
        return [self.inspect(c).get("State", {}).get("Health", {}).get("Status", "none") for c in self.containers(service)]

    def port_of(self, cid: str) -> int | None:
        """The metrics port a replica really serves (it writes it to OSAD_METRICS_PORT_FILE)."""
        r = subprocess.run(["docker", "exec", cid, "cat", "/tmp/osad-metrics.port"], capture_output=True, text=True)
        return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else None

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", service, check=False).stdout


def _free_prefix() -> str:
    """Three digits P such that the ports P01..P20 are free (each service's metrics port is P + 2 digits)."""
    for p in range(394, 650, 7):
        if not any(port_open("127.0.0.1", int(f"{p}{i:02d}")) for i in range(1, 21)):
            return str(p)
    raise AssertionError("no free block of metrics ports")


def _anomaly_consumer(bootstrap: str, prefix: str) -> KafkaConsumer:
    """What a user would run on the host: a plain kafka-python consumer of the anomalies topic."""
    return KafkaConsumer(ANOMALIES.full_name(prefix), bootstrap_servers=bootstrap, group_id="osad-compose-test-user",
                         auto_offset_reset="earliest", enable_auto_commit=True, consumer_timeout_ms=500,
                         value_deserializer=lambda v: json.loads(v))


def test_compose_stack_on_the_real_engine(tmp_path, capsys):
    _prerequisites()
    _CAPTURE[:] = [capsys]
    global T0
    T0 = time.monotonic()
    # 1. images: engine, base image, docker-compose build (scripts/docker-images.sh)
    shutil.copy(broker_binary(), ROOT / "tests" / "compose" / "broker" / "tansu")
    say("building the images (scripts/docker-images.sh)")
    r = subprocess.run([str(ROOT / "scripts" / "docker-images.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"image build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    for line in r.stdout.splitlines():
        if "[docker-images]" in line or line.startswith("  osad"):
            say(line.strip())
    images = subprocess.run(["docker", "images", "--format", "{{.Repository}}"], capture_output=True,
                            text=True).stdout.split()
    assert {"osad-collector", "osad-featurizer", "osad-detector", "osad-alerter", "osad-test-broker"} <= set(images)

    # the collector image without its capabilities says which one is missing (and, with --require-ebpf, exits)
    ro = [a for m in ("/lib/modules", "/usr/src", "/sys/kernel/tracing") for a in ("-v", f"{m}:{m}:ro")]
    r = subprocess.run(["docker", "run", "--rm", "--network", "host", "--pid", "host", *ro, "osad-collector",
                        "--pid", "1", "--require-ebpf", "--output", "jsonl:-"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "without CAP_SYS_ADMIN" in r.stderr and "cap_add" in r.stderr, r.stderr[-2000:]
    line = next(x for x in r.stderr.splitlines() if "CAP_SYS_ADMIN" in x)
    say("collector without capabilities: " + line[line.find("eBPF"):][:200])

    # host processes to watch: the fault one, a second one that faults during the alerter's restart, two quiet
    modes, workloads = {}, []
    consumer = stack = None
    try:
        for name in ("fault", "second", "quiet1", "quiet2"):
            ctl = tmp_path / f"{name}.mode"
            ctl.write_text("normal")
            w = Proc(["workload", "--control", str(ctl)], tmp_path / f"workload-{name}.log")
            workloads.append(w)
            modes[name] = (w.p.pid, ctl)
        bport, mprefix = free_port(), _free_prefix()
        bootstrap = f"127.0.0.1:{bport}"
        stack = Stack({"OSAD_TEST_BROKER_PORT": str(bport), "OSAD_TEST_METRICS_BASE": mprefix,
                       "OSAD_TEST_PIDS": ",".join(str(p) for p, _ in modes.values())}, tmp_path)
        port = {"collector": int(mprefix + "01"), "featurizer": int(mprefix + "02"), "alerter": int(mprefix + "03")}
        # 2. up: every service healthy
        say(f"docker-compose up -d (project {stack.project}, broker {bootstrap})")
        stack.compose("up", "-d")
        def all_healthy():
            states = {s: stack.health_of(s) for s in SERVICES}
            return states if all(v and all(x == "healthy" for x in v) for v in states.values()) else None
        try:
            states = wait_until(all_healthy, timeout_s=300, every_s=2, what="every service healthy")
        except AssertionError:
            raise AssertionError("not every service became healthy: " + json.dumps({s: stack.health_of(s) for s in SERVICES})
                                 + "\n" + "\n".join(stack.logs(s) for s in SERVICES)) from None
        topics_exit = [stack.inspect(c)["State"]["ExitCode"] for c in stack.containers("topics", all_=True)]
        assert topics_exit == [0], f"the topics job exited {topics_exit}:\n{stack.logs('topics')}"
        say(f"services healthy: {states}")

        # the collector container watches the host's processes with eBPF, not the /proc fallback
        h = health(port["collector"])
        assert h and h["backend"] == "ebpf" and not h["fallback_reason"], h
        say(f"collector: backend {h['backend']}, {h['samples']} samples so far")

        # 3. a fault -> an anomaly on osad.anomalies, read from the host by a plain kafka-python consumer
        consumer = _anomaly_consumer(bootstrap, "")
        seen: list[dict] = []

        def poll_anomalies():
            for m in consumer:
                seen.append(m.value)
            return seen

        scores = TopicReader(bootstrap, SCORES)
        # armed: the alerter has calibrated a threshold for every watched process (its events say so)
        wait_until(lambda: (metric(port["alerter"], "osad_alerter_events_total", event="calibrated") or 0) >= len(modes),
                   timeout_s=900, every_s=2, what="the alerter calibrated on every process")
        say("alerter calibrated on every watched process")
        fault_pid, ctl = modes["fault"]
        ctl.write_text("cpu")
        t_fault = time.time()
        say(f"pid {fault_pid} turned to a CPU hog")
        # an incident opened by the fault, or (on a loaded machine an incident may already be open for the
        # process, e.g. its run-queue wait) the fault's windows reported on it
        def fault_anomaly():
            return [a for a in poll_anomalies() if a["pid"] == fault_pid and a["status"] in ("open", "update")
                    and a["last_ts"] >= t_fault + 2]
        try:
            opened = wait_until(fault_anomaly, timeout_s=240, every_s=0.5,
                                what="an anomaly of the faulted process on osad.anomalies")[0]
        except AssertionError:
            raise AssertionError(
                "no anomaly of the faulted process: anomalies seen "
                + json.dumps([{k: a.get(k) for k in ("pid", "status", "start_ts", "last_ts", "severity")} for a in seen])
                + f" (fault at {t_fault:.0f})\n" + "\n".join(stack.logs(s) for s in ("detector", "alerter"))) from None
        say(f"anomaly read from the host: {opened['anomaly_id']} ({opened['status']}) pid {opened['pid']} "
            f"severity {opened['severity']}, "
            f"top feature {opened['root_causes'][0]['feature'] if opened['root_causes'] else '-'}, "
            f"{time.time() - t_fault:.0f} s after the fault")
        ctl.write_text("normal")

        # 4. three detector replicas share the partitions and together score every window
        say("docker-compose up -d --scale detector=3")
        stack.compose("up", "-d", "--no-recreate", "--scale", "detector=3")
        wait_until(lambda: len(stack.containers("detector")) == 3 and all(x == "healthy" for x in stack.health_of("detector")),
                   timeout_s=300, every_s=2, what="three healthy detector replicas")

        def split():
            ports = [stack.port_of(c) for c in stack.containers("detector")]
            if None in ports:
                return None
            owned = [set((health(p) or {}).get("assigned_partitions") or []) for p in ports]
            if not all(owned) or sum(map(len, owned)) != len(set().union(*owned)) or len(set().union(*owned)) != 12:
                return None
            return dict(zip(ports, owned))
        owned = wait_until(split, timeout_s=180, every_s=1, what="three replicas owning disjoint partitions, all 12")
        say("detector replicas (metrics port: partitions): "
            + "; ".join(f"{p}: {sorted(o)}" for p, o in owned.items()))
        windows = TopicReader(bootstrap, SIGNATURES)
        windows.read_until(lambda recs: recs, timeout_s=60, what="signature windows")
        t_split = time.time()
        wait_until(lambda: (windows.poll(), [w for w in windows.messages() if w.window_end_ts > t_split + 30])[1],
                   timeout_s=120, every_s=0.2, what="windows cut 30 s after the split")
        want = {(w.entity_id, w.window_end_seq) for w in windows.messages() if w.window_end_ts > t_split}

        # every window gets a compressed-sensing score, and from the calibration made before the split: the
        # replicas share the detector-state volume, so none that takes over a process calibrates it again
        def all_scored():
            scores.poll()
            got = {(s.entity_id, s.window_end_seq) for s in scores.messages() if s.model_id.startswith("cs")}
            return want <= got
        wait_until(all_scored, timeout_s=120, every_s=0.2, what="a compressed-sensing score for every window cut "
                   "after the split")
        per_model: dict = {}
        for s in scores.messages():
            if (s.entity_id, s.window_end_seq) in want:
                per_model[s.model_id] = per_model.get(s.model_id, 0) + 1
        say(f"every one of {len(want)} windows cut after the split was scored by the three replicas "
            f"(scores per model: {per_model})")
        assert per_model and all(m.startswith("cs-calibrated:") for m in per_model), \
            f"a replica that took over a process calibrated it again instead of using the shared calibration: {per_model}"

        # 5. the alerter restarts (stop, a fault while it is down, start): no anomaly lost
        n_before = len(poll_anomalies())
        say("docker-compose stop alerter; pid "
            f"{modes['second'][0]} leaks memory while it is down; docker-compose start alerter")
        stack.compose("stop", "-t", str(GRACE_S), "alerter")
        pid2, ctl2 = modes["second"]
        ctl2.write_text("leak")
        t_leak = time.time()
        wait_until(lambda: (scores.poll(), [s for s in scores.messages() if s.pid == pid2 and s.window_end_ts > t_leak + 20])[1],
                   timeout_s=120, every_s=0.2, what="scores of the leaking process while the alerter is down")
        stack.compose("start", "alerter")
        got = wait_until(lambda: [a for a in poll_anomalies()[n_before:] if a["pid"] == pid2
                                  and a["status"] in ("open", "update") and a["last_ts"] >= t_leak + 2],
                         timeout_s=180, every_s=0.5, what="the incident of the process that leaked while the alerter was down")
        say(f"after the restart: {got[0]['anomaly_id']} ({got[0]['status']}, pid {pid2}; its first window over "
            f"threshold ended {got[0]['start_ts'] - t_leak:+.0f} s from the leak's start, while the alerter was down)")
        ctl2.write_text("normal")

        # 6. down within the grace period: every service stops on SIGTERM, none is killed
        t = time.monotonic()
        stack.compose("stop", "-t", str(GRACE_S))
        took = time.monotonic() - t
        codes = {s: [stack.inspect(c)["State"]["ExitCode"] for c in stack.containers(s, all_=True)] for s in SERVICES}
        killed = {s: c for s, c in codes.items() if 137 in c}
        assert not killed, f"killed after the {GRACE_S} s grace period: {killed}"
        say(f"stop took {took:.1f} s (grace {GRACE_S} s); exit codes {codes}")
    finally:
        if consumer is not None:
            consumer.close()
        for w in workloads:  # SIGTERM (it stops its helpers), SIGKILL if it does not; never an assertion here
            w.p.terminate()
            try:
                w.p.wait(30)
            except subprocess.TimeoutExpired:
                w.p.kill()
            w.fh.close()
        if stack is not None:
            stack.compose("down", "-v", "-t", str(GRACE_S), check=False)
            say("docker-compose down -v")
