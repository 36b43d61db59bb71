"""End to end on the real kernel: osad's own workload program, watched by the eBPF collector, runs
normally, then misbehaves; the whole pipeline (collector -> featurizer -> detector -> alerter over
the embedded broker) must open one incident per misbehaving process within 30 s, naming a fitting
top feature, and none during a normal stretch of three minutes. Before the others, the cpu workload
turns into a CPU hog alone: exactly one incident opens, the hog's, and the neighbours it slows join
it instead of opening incidents of their own (culprit and victims, docs/alerter.md).

Seven workloads run at once, one per fault, so the test costs one calibration and one normal
stretch. Timeline (sample interval 0.5 s, a window every 5 samples; every calibration count at its
default): featurizer calibration (120 samples), the jump-start score and the alerter's provisional
threshold after 16 windows (each workload must be judged within 5 minutes), the detector's per-process
compressed sensing (30 windows), alerter calibration (100 windows per model), three minutes of normal behaviour, then every workload switches to its
fault. An incident opens after 3 consecutive windows over threshold (7.5 s): a few seconds of
run-queue waiting caused by other load on the machine is not an incident.

Load from outside: for 40 s of the normal stretch two unwatched processes spin on the CPUs (this
machine has two), so every workload waits for a CPU. That, like steal time on a VM (which once made
every workload cross its threshold at once here), is the host's doing: it may make a host-wide
event (scope 'host'), never an incident of a workload.
"""

import os
import time

import pytest

from osad.runtime.broker import free_port
from osad.schemas import ANOMALIES, SCORES
from tests.conftest import wait_until
from tests.kafkautil import Proc, TopicReader, health, http_get

pytestmark = [
    # a 10-minute run; OSAD_E2E_DUMP=FILE keeps the Scores and Anomalies it saw, to study offline
    pytest.mark.broker, pytest.mark.ebpf, pytest.mark.slow, pytest.mark.timeout(1500),
    # OSAD_E2E=0 skips it (e.g. for a quick local run of the whole suite)
    pytest.mark.skipif(os.environ.get("OSAD_E2E") == "0", reason="end-to-end fault run skipped: OSAD_E2E=0"),
]

# fault -> metrics that fittingly explain it (the anomaly's top root-cause feature must be one)
# (the syscall classes name the kind of call: the syscalls mode loops over getppid ("proc") and stat ("fd"); a
# stall stops every kind of call the normal activity makes: sleeps "time", socket calls "net", reads "rw", ...)
FAULTS = {
    "cpu": {"on_cpu_ns", "runq_wait_ns", "ctx_switches_involuntary"},
    "leak": {"rss_anon_bytes", "page_faults_user", "vm_size_bytes", "vm_data_bytes", "syscalls_mmap"},
    "syscalls": {"syscalls", "syscall_time_ns", "syscalls_proc", "syscalls_fd"},  # getppid and stat
    "forks": {"forks", "on_cpu_ns", "page_faults_user", "syscalls", "syscall_time_ns", "syscalls_proc",
              "syscalls_mmap"},
    "io": {"write_bytes", "syscall_time_ns", "syscalls", "block_write_bytes", "syscalls_rw", "syscalls_fd"},
    "net": {"net_tx_bytes", "net_rx_bytes", "syscall_time_ns", "syscalls", "syscalls_net", "syscalls_rw"},
    "stall": {"on_cpu_ns", "ctx_switches_voluntary", "syscalls", "syscall_time_ns", "net_tx_bytes", "net_rx_bytes",
              "read_bytes", "syscalls_failed", "page_faults_user", "syscalls_time", "syscalls_net", "syscalls_rw",
              "syscalls_fd", "syscalls_sync", "syscalls_mmap", "syscalls_other"},
}
NORMAL_STRETCH_S = 180
DETECT_WITHIN_S = 30
HOG_AT_S, HOG_FOR_S = 60, 40  # outside CPU load within the normal stretch
HOG_LINGER_S = 20  # the cpu workload alone, after its incident opened: time for its neighbours to cross or not
ALERTER_CALIBRATION = 100  # the alerter's --calibration-scores default: the normal stretch starts after POT


def _bpf_or_skip():
    if os.geteuid() != 0:
        pytest.skip("eBPF needs root (CI runs as root)")
    from osad.collector.bpf import unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"eBPF cannot load here: {why}")


def test_every_fault_opens_one_incident_and_normal_opens_none(broker, topic_prefix, tmp_path):
    _bpf_or_skip()
    procs = []
    try:
        workloads = {}
        for fault in FAULTS:
            ctl = tmp_path / f"{fault}.mode"
            ctl.write_text("normal")
            w = Proc(["workload", "--control", str(ctl)], tmp_path / f"workload-{fault}.log")
            procs.append(w)
            workloads[w.p.pid] = (fault, ctl)
        bs = broker.bootstrap
        # every calibration at its default count (ranges 120 samples, compressed sensing 30 windows, alerter
        # armed at 16 scores, POT at 100); only the cadence is faster than the defaults (0.5 s, a window every 5)
        procs.append(Proc(["featurizer", "--bootstrap", bs, "--gap", "5",
                           "--state-dir", str(tmp_path / "state")], tmp_path / "featurizer.log"))
        dport = free_port()
        procs.append(Proc(["detect", "--bootstrap", bs, "--models", str(tmp_path / "models"), "--max-wait-ms", "100",
                           "--metrics-port", str(dport)], tmp_path / "detector.log"))
        aport = free_port()
        alerter = Proc(["alert", "--bootstrap", bs, "--store", f"sqlite:///{tmp_path / 'anomalies.db'}",
                        "--open-after", "3", "--close-after", "3",
                        "--metrics-port", str(aport)], tmp_path / "alerter.log")
        procs.append(alerter)
        for port in (dport, aport):
            wait_until(lambda: (health(port) or {}).get("status") == "ok", 120, what="services healthy")
        pids = ",".join(str(p) for p in workloads)
        procs.append(Proc(["collect", "--pid", pids, "--interval", "0.5", "--bootstrap", bs],
                          tmp_path / "collector.log"))
        t_collect = time.monotonic()
        armed_at = {}  # pid -> seconds after the collector started when the alerter first judged it

        def note_armed():
            code, text = http_get(aport, "/metrics")
            for line in text.splitlines() if code == 200 else ():
                if line.startswith("osad_alerter_threshold{"):
                    pid = int(line.split('entity="', 1)[1].split("/", 1)[1].split("@", 1)[0])
                    armed_at.setdefault(pid, time.monotonic() - t_collect)

        scores = TopicReader(bs, SCORES, prefix=topic_prefix)
        anomalies = TopicReader(bs, ANOMALIES, prefix=topic_prefix)

        def per_pid_scores():
            n = {}
            for s in scores.messages():
                if s.model_id.startswith("cs-calibrated"):
                    n[s.pid] = n.get(s.pid, 0) + 1
            return n
        # calibration: the featurizer's ranges, the detector's per-entity compressed sensing (30 windows),
        # then the alerter's scores of that model per entity (plus margin)
        scores.read_until(lambda r: note_armed() or (len(per_pid_scores()) == len(workloads)
                          and min(per_pid_scores().values()) >= ALERTER_CALIBRATION + 5), 900,
                          "alerter calibration on every workload")
        # armed (judged by a provisional threshold) within 5 minutes of the first Sample, at the default counts
        # (the windows come twice as fast as at the defaults here, so this is the looser bound)
        print(f"armed after (s, per workload): {sorted(round(v) for v in armed_at.values())}")
        assert set(workloads) <= set(armed_at) and max(armed_at[p] for p in workloads) <= 300, armed_at
        # a normal stretch, with load from outside for a while: no incident of a workload
        t_normal = time.monotonic()
        hogs = []
        while time.monotonic() - t_normal < NORMAL_STRETCH_S:
            anomalies.poll(500)
            scores.poll(200)
            if not hogs and time.monotonic() - t_normal >= HOG_AT_S:
                hog_ctl = tmp_path / "hog.mode"
                hog_ctl.write_text("cpu")
                hogs = [Proc(["workload", "--control", str(hog_ctl), "--duration-s", str(HOG_FOR_S)],
                             tmp_path / f"hog{i}.log") for i in range(2)]
                procs += hogs
        failures = []  # every condition is checked, then all failures are reported together
        opened = [a for a in anomalies.messages() if a.status == "open"]
        for a in opened:
            if a.scope == "host":
                print(f"host-wide event during the normal stretch: {a.summary}")
        mine = [a for a in opened if a.scope != "host"]
        if mine:
            failures.append(f"incidents during normal behaviour: {[(a.pid, a.summary) for a in mine]}")
        normal_ids = {a.anomaly_id for a in opened}

        seen: dict[int, float] = {}

        def watch(pids, t0, until):
            """Poll until every one of ``pids`` opened an incident (noted in ``seen``, seconds after ``t0``)
            or ``until``."""
            while time.monotonic() < until and not set(pids) <= set(seen):
                anomalies.poll(300)
                scores.poll(100)
                for a in anomalies.messages():
                    if a.status == "open" and a.pid in pids and a.pid not in seen and a.anomaly_id not in normal_ids:
                        seen[a.pid] = time.monotonic() - t0

        # culprit and victims: the cpu workload alone turns into a CPU hog beside six normal neighbours;
        # exactly one incident opens, the hog's; the neighbours it slowed join it (it names them)
        hog_pid = next(p for p, (f, _) in workloads.items() if f == "cpu")
        t_hog = time.monotonic()
        workloads[hog_pid][1].write_text("cpu")
        watch([hog_pid], t_hog, t_hog + DETECT_WITHIN_S)
        t_end = time.monotonic() + HOG_LINGER_S
        while time.monotonic() < t_end:
            anomalies.poll(300)
            scores.poll(100)
        alone = [a for a in anomalies.messages() if a.anomaly_id not in normal_ids]
        others = sorted({a.pid for a in alone if a.status == "open" and a.pid != hog_pid})
        if hog_pid not in seen:
            failures.append(f"cpu alone: no incident within {DETECT_WITHIN_S} s")
        else:
            latest = max((a for a in alone if a.pid == hog_pid), key=lambda a: a.revision)
            print(f"cpu alone: opened {seen[hog_pid]:.1f} s after the change, top {latest.root_causes[0].feature}, "
                  f"affected {len(latest.affected)} of {len(workloads) - 1} neighbours: {latest.summary}")
            stray = set(latest.affected) - {a.entity_id for a in scores.messages() if a.pid in workloads}
            if stray:
                failures.append(f"cpu alone: names processes that are not watched workloads: {stray}")
        if others:
            failures.append(f"cpu alone: incidents of neighbours too: "
                            f"{[(a.pid, a.scope, a.summary) for a in alone if a.status == 'open' and a.pid != hog_pid]}")

        # every other workload misbehaves now (the hog goes on: still its one incident)
        t_fault = time.monotonic()
        for pid, (fault, ctl) in workloads.items():
            ctl.write_text(fault)
        rest = [p for p in workloads if p != hog_pid]
        watch(rest, t_fault, t_fault + DETECT_WITHIN_S)
        missing = {workloads[p][0] for p in workloads if p not in seen}
        if missing:
            failures.append(f"no incident within {DETECT_WITHIN_S} s for: {sorted(missing)}; found {seen}")
        # let the incidents run a little: still one incident per process, and a fitting top feature
        t_end = time.monotonic() + 15
        while time.monotonic() < t_end:
            anomalies.poll(300)
            scores.poll(100)
        for pid, (fault, _) in workloads.items():
            mine = [a for a in anomalies.messages() if a.pid == pid and a.anomaly_id not in normal_ids]
            ids = {a.anomaly_id for a in mine}
            if len(ids) != 1:
                failures.append(f"{fault}: {len(ids)} incidents instead of one")
                continue
            latest = max(mine, key=lambda a: a.revision)
            top = latest.root_causes[0].feature
            print(f"{fault:9s} pid {pid}: opened {seen.get(pid, float('nan')):.1f} s after the change, "
                  f"{latest.severity}, {latest.max_ratio:.1f}x, top "
                  + ", ".join(f"{r.feature} {r.contribution:.2f}" for r in latest.root_causes[:3]))
            if top not in FAULTS[fault]:
                failures.append(f"{fault}: top feature {top} ({[r.feature for r in latest.root_causes]})")
        if failures:  # the thresholds each process got explain most failures
            failures += [ln for ln in alerter.text().splitlines() if "threshold for cs-calibrated" in ln]
        assert not failures, "\n".join(failures)
    finally:
        for p in reversed(procs):
            p.terminate()
        dump = os.environ.get("OSAD_E2E_DUMP")  # keep what was seen, to study thresholds offline
        if dump and "scores" in locals():
            from osad.schemas import encode

            with open(dump, "wb") as fh:
                for m in scores.messages() + anomalies.messages():
                    fh.write(encode(m) + b"\n")
