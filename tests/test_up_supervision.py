"""`osad up` supervision, with real processes: no child outlives it however it dies, a crashed service is
restarted (and reported), each run's logs are its own."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from osad.live import LiveView, Watched, error_lines, probe, read_tail, OUT
from osad.runtime.broker import free_port, port_open
from osad.runtime.procs import Lifeline
from osad.up import Child, UpConfig, _supervise
from tests.conftest import wait_until
from tests.kafkautil import health


def _up(tmp_path: Path, *args: str, log: Path | None = None, stdout=None) -> tuple[subprocess.Popen, int, int]:
    """``osad up --no-view`` on free ports, its output to ``log`` (or ``stdout``)."""
    bport, mport = free_port(), free_port()
    out = open(log or tmp_path / "up.log", "ab") if stdout is None else stdout
    p = subprocess.Popen(
        [sys.executable, "-m", "osad", "up", "--no-view", "--broker-port", str(bport), "--metrics-base-port", str(mport),
         "--log-dir", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "state"), *args],
        stdout=out, stderr=subprocess.STDOUT, env=_env())
    if stdout is None:
        out.close()
    return p, bport, mport


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OSAD_TOPIC_PREFIX", None)
    return env


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: it only waits for its new parent to reap it)."""
    out = []
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
        except psutil.NoSuchProcess:
            pass
    return out


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for q in procs:
        try:
            out.append(f"{q.pid} {' '.join(q.cmdline())[:100]}")
        except psutil.Error:
            out.append(str(q.pid))
    return out


def _children_when_healthy(p: subprocess.Popen, ports: dict[str, int], log: Path) -> list[psutil.Process]:
    for name, port in ports.items():
        wait_until(lambda: p.poll() is None and (health(port) or {}).get("status") == "ok"
                   or _fail_if_exited(p, log), 120, what=f"{name} healthy")
    return psutil.Process(p.pid).children(recursive=True)


def _fail_if_exited(p: subprocess.Popen, log: Path) -> bool:
    if p.poll() is not None:
        raise AssertionError(f"osad up exited with {p.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
    return False


def _kill_everything(procs: list[psutil.Process]) -> None:
    """A failed test must not leave its processes behind either."""
    for q in _alive(procs):
        try:
            q.kill()
        except psutil.Error:
            pass


def _ports(mport: int, only: list[str] | None = None) -> dict[str, int]:
    from osad.cli import available_commands
    from osad.pipeline import PIPELINE, metrics_ports

    have = available_commands()
    return metrics_ports([s for s in PIPELINE if s.command in have and (not only or s.name in only)], mport)


# -- no orphans ----------------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.slow
def test_sigkill_of_osad_up_leaves_no_child_running(tmp_path):
    """The whole pipeline (every service this installation has, the embedded broker, the lifeline); osad up
    is SIGKILLed: within 5 s nothing it started runs any more, and the broker's port is free again."""
    p, bport, mport = _up(tmp_path, "--collect-args", "--all --interval 1")
    children: list[psutil.Process] = []
    try:
        ports = _ports(mport)
        assert {"featurizer", "detector", "alerter"} <= set(ports)
        children = _children_when_healthy(p, ports, tmp_path / "up.log")
        cmdlines = [" ".join(q.cmdline()) for q in children]
        assert any("tansu" in c and str(bport) in c for c in cmdlines), cmdlines  # the broker, by its own command
        for name in ports:
            assert any(f"-m osad {_command(name)}" in c for c in cmdlines), (name, cmdlines)
        assert any("_lifeline_main" in c for c in cmdlines), cmdlines
        t0 = time.monotonic()
        p.kill()
        p.wait(10)
        left = _wait_gone(children, 5.0)
        gone_after = time.monotonic() - t0
        assert not left, f"still running 5 s after osad up was SIGKILLed: {_describe(left)}"
        assert not port_open("127.0.0.1", bport), "the broker's port is still taken"
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert f"pid {p.pid} is gone without stopping broker" in text, text[-2000:]
        print(f"\nall {len(children)} children gone {gone_after:.2f} s after SIGKILL of osad up")
    finally:
        if p.poll() is None:
            p.kill()
        _kill_everything(children)


def _command(service: str) -> str:
    from osad.pipeline import by_name

    return by_name(service).command


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Poll (every 50 ms) until none of ``procs`` runs, at most ``timeout_s``; those still running then."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = _alive(procs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.broker
@pytest.mark.slow
def test_ctrl_c_with_output_into_a_closed_pipe_stops_everything_cleanly(tmp_path):
    """``osad up 2>&1 | tee log`` and Ctrl-C: tee is gone before osad up writes "stopping services"; the
    broken pipe must not keep osad up from stopping its children with SIGTERM (they stop cleanly)."""
    r, w = os.pipe()
    p, bport, mport = _up(tmp_path, "--only", "featurizer,alerter", stdout=w)
    os.close(w)
    children: list[psutil.Process] = []
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"Ctrl-C stops everything" not in seen:  # what tee would have shown: the banner
            assert time.monotonic() < deadline and p.poll() is None, seen.decode(errors="replace")
            if select.select([r], [], [], 0.5)[0]:
                seen += os.read(r, 65536)
        children = _children_when_healthy(p, _ports(mport, ["featurizer", "alerter"]), tmp_path / "none")
        os.close(r)  # the reader goes away (tee, ended by the same Ctrl-C)
        r = -1
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
        left = _wait_gone(children, 5.0)
        assert not left, f"left running after Ctrl-C into a closed pipe: {_describe(left)}"
        # exit 0: no traceback (1) and no broken pipe at exit (Python's 120)
        assert rc == 0, f"osad up exited with {rc}"
        for name in ("featurizer", "alerter"):
            assert "stopped cleanly" in (tmp_path / "logs" / f"{name}.log").read_text(), name  # SIGTERM: committed
        assert not port_open("127.0.0.1", bport)
    finally:
        if r >= 0:
            os.close(r)
        if p.poll() is None:
            p.kill()
        _kill_everything(children)


# -- restarts --------------------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.slow
def test_a_killed_service_is_restarted_reported_and_the_pipeline_goes_on(tmp_path, datasets_dir):
    """SIGKILL of the featurizer under a running osad up (a replay feeding it): osad up says so, restarts it
    after the first backoff, and the new process serves its port and publishes windows again."""
    log = tmp_path / "up.log"
    p, bport, mport = _up(tmp_path, "--only", "featurizer", "--replay", str(datasets_dir / "SMD"),
                          "--replay-args", "--entity machine-1-6 --split test --rate 50", log=log)
    children: list[psutil.Process] = []
    try:
        port = _ports(mport, ["featurizer"])["featurizer"]
        children = _children_when_healthy(p, {"featurizer": port}, log)
        old = next(q for q in children if "-m osad featurizer" in " ".join(q.cmdline()))
        wait_until(lambda: (probe(port).metrics or {}).get(OUT, 0) > 0 or _fail_if_exited(p, log), 120,
                   what="the featurizer publishing windows")
        t_kill = time.monotonic()
        old.kill()
        text = wait_until(lambda: _text_with(log, "featurizer restarted (pid ") or _fail_if_exited(p, log), 60,
                          what="the restart reported")
        assert f"featurizer (pid {old.pid}) killed by SIGKILL after" in text, text[-2000:]
        assert "restarting it in 1 s (exit 1 in a row; at most 5)" in text, text[-2000:]
        new_pid = int(text.split("featurizer restarted (pid ", 1)[1].split(",", 1)[0])
        assert new_pid != old.pid and psutil.pid_exists(new_pid)
        assert psutil.Process(new_pid).ppid() == p.pid
        flog = (tmp_path / "logs" / "featurizer.log").read_text(errors="replace")
        assert "killed by SIGKILL" in flog and "featurizer restarted" in flog  # and in the service's own log
        # the new process: healthy on the same port, and its own (fresh) counter of windows published grows
        wait_until(lambda: (health(port) or {}).get("status") == "ok" and
                   (probe(port).metrics or {}).get(OUT, 0) > 0 or _fail_if_exited(p, log), 120,
                   what="the restarted featurizer publishing windows")
        print(f"\nrestarted featurizer publishing again {time.monotonic() - t_kill:.1f} s after SIGKILL")
        assert p.poll() is None
        children = psutil.Process(p.pid).children(recursive=True)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        _kill_everything(children)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert not _wait_gone(children, 5.0)


def _text_with(path: Path, needle: str) -> str | None:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if needle in text else None


def test_quick_crashes_in_a_row_back_off_then_give_up_and_a_stable_run_starts_afresh(tmp_path):
    """The supervisor's decisions on real processes: a child that exits at once is restarted after 0.2, 0.4 s,
    then given up on (--restart-limit 2), saying so in its log; one that ran longer than --restart-stable-s
    starts afresh (its next wait is the first one again)."""
    cfg = UpConfig(restart_limit=2, restart_backoff_s=0.2, restart_backoff_max_s=10.0, restart_stable_s=1.0)
    lifeline = Lifeline(grace_s=1.0, label="test")
    events: list[str] = []
    try:
        crash = Child("crasher", [sys.executable, "-c", "import sys; sys.exit(1)"], tmp_path / "crasher.log", None)
        from osad.up import _start

        env = _env()
        _start(crash, env, lifeline)
        waits = []
        while True:
            ok = _supervise(crash, cfg, env, lifeline, events)
            if not ok:
                break
            if crash.restart_at is not None and len(waits) < crash.crashes:
                waits.append(round(crash.restart_at - time.monotonic(), 1))
                assert "restart in" in crash.state()
            time.sleep(0.02)
        assert waits == [0.2, 0.4], waits
        assert crash.gave_up and crash.restarts == 2 and crash.state() == "failed: exited with code 1"
        text = (tmp_path / "crasher.log").read_text()
        assert "3 exits in a row, each within 1 s of its start (--restart-limit 2); giving up" in text, text
        assert len(events) == 5 and "giving up" in events[-1]  # exit, restart, exit, restart, give up

        # ran 1.2 s (> --restart-stable-s): its exit counts as the first in a row again
        steady = Child("steady", [sys.executable, "-c", "import time; time.sleep(1.2)"], tmp_path / "steady.log", None)
        steady.crashes = 2  # two quick exits before this run
        _start(steady, env, lifeline)
        wait_until(lambda: steady.proc.poll() is not None, 30, what="the steady child's end")
        assert _supervise(steady, cfg, env, lifeline, events)
        assert steady.crashes == 1 and 0.0 < steady.restart_at - time.monotonic() <= 0.2
        # a configuration error (exit 2) is not restarted
        bad = Child("bad", [sys.executable, "-c", "import sys; sys.exit(2)"], tmp_path / "bad.log", None)
        _start(bad, env, lifeline)
        wait_until(lambda: bad.proc.poll() is not None, 30, what="the misconfigured child's end")
        assert not _supervise(bad, cfg, env, lifeline, events) and bad.gave_up
        assert "a configuration error; restarting cannot help" in (tmp_path / "bad.log").read_text()
    finally:
        for c in (locals().get("crash"), locals().get("steady"), locals().get("bad")):
            if c is not None and c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        lifeline.close()


def test_the_view_shows_restarts():
    """The state column says a service is being (or was) restarted, in yellow; the supervision lines list
    what happened."""
    from rich.console import Console

    states = {"featurizer": "killed by SIGKILL; restart in 1s", "detector": "up (restarted 2x)"}
    watched = [Watched(n, lambda: 7, lambda n=n: states[n]) for n in states]
    v = LiveView("127.0.0.1:9092", watched, events=lambda: ["12:00:01 featurizer (pid 7) killed by SIGKILL after "
                                                           "30 s; restarting it in 1 s (exit 1 in a row; at most 5)"])
    out = io.StringIO()
    Console(file=out, width=220).print(v.render())
    text = out.getvalue()
    for want in ("killed by SIGKILL; restart in 1s", "up (restarted 2x)", "supervision",
                 "featurizer (pid 7) killed by SIGKILL after 30 s; restarting it in 1 s"):
        assert want in text, (want, text)


# -- each run's logs --------------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.slow
def test_a_second_run_has_logs_of_its_own(tmp_path):
    """Run 1: the featurizer fails (its --state-dir cannot be made) and osad up gives up, saying why. Run 2,
    same --log-dir: its logs hold none of run 1's lines (run 1's are in NAME.log.1), so the error the live view
    would draw from featurizer.log is gone."""
    (tmp_path / "not-a-dir").write_text("")
    logs = tmp_path / "logs"
    bport1 = free_port()
    bad = subprocess.run(
        [sys.executable, "-m", "osad", "up", "--no-view", "--only", "featurizer", "--broker-port", str(bport1),
         "--metrics-base-port", str(free_port()), "--log-dir", str(logs), "--state-dir", str(tmp_path / "not-a-dir")],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "a configuration error; restarting cannot help, giving up" in bad.stderr, bad.stderr[-3000:]
    first = {f.name: f.read_text(errors="replace") for f in logs.glob("*.log")}
    assert "configuration error" in first["featurizer.log"] and str(bport1) in first["broker.log"]
    assert error_lines(read_tail(logs / "featurizer.log"))  # what the view showed in run 1

    p, bport, mport = _up(tmp_path, "--only", "featurizer", log=tmp_path / "up2.log")
    children: list[psutil.Process] = []
    try:
        children = _children_when_healthy(p, _ports(mport, ["featurizer"]), tmp_path / "up2.log")
        for name in ("featurizer.log", "broker.log"):
            text = (logs / name).read_text(errors="replace")
            assert str(bport) in text and str(bport1) not in text, (name, text[-2000:])  # run 2's, not run 1's
            assert (logs / (name + ".1")).read_text(errors="replace") == first[name]  # run 1's, kept once
        lines = set((logs / "featurizer.log").read_text(errors="replace").splitlines())
        assert not lines & set(first["featurizer.log"].splitlines())
        assert error_lines(read_tail(logs / "featurizer.log")) == []  # the view has no error to show now
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        _kill_everything(children)
    assert rc == 0
