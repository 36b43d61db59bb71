"""`osad up`: broker and every service as processes, healthy, and stopped cleanly by Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from osad.runtime.broker import free_port
from osad.schemas import SIGNATURES
from tests.conftest import wait_until
from tests.kafkautil import TopicReader, health

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_up_runs_the_pipeline_and_ctrl_c_stops_everything(tmp_path, datasets_dir, monkeypatch):
    monkeypatch.delenv("OSAD_TOPIC_PREFIX", raising=False)
    bport, mport = free_port(), free_port()
    from osad.cli import available_commands
    from osad.pipeline import PIPELINE, metrics_ports

    have = available_commands()
    expected = [s for s in PIPELINE if s.command in have]
    assert "featurizer" in [s.name for s in expected]
    log = open(tmp_path / "up.log", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "osad", "up", "--broker-port", str(bport), "--metrics-base-port", str(mport),
         "--log-dir", str(tmp_path / "logs"), "--collect-args", "--all --interval 1",
         "--replay", str(datasets_dir / "SMD"), "--replay-args", "--entity machine-1-6 --split test --limit 300",
         "--state-dir", str(tmp_path / "state")],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        ports = metrics_ports(expected, mport)
        for name, port in ports.items():
            wait_until(lambda: (health(port) or {}).get("status") == "ok", 120, what=f"{name} healthy")
        # the replayed entity flows through the featurizer: 300 rows -> its windows
        r = TopicReader(f"127.0.0.1:{bport}", SIGNATURES)
        r.read_until(lambda recs: any(m.key == b"SMD/machine-1-6" for m in recs), 120, "a window of the replay")
        text = (tmp_path / "up.log").read_text()
        assert "osad is up" in text and f"127.0.0.1:{bport}" in text
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) >= len(expected) + 1  # services + broker
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running after Ctrl-C: {alive}"
    assert "osad up: stopped" in (tmp_path / "up.log").read_text()


def test_free_ports_are_outside_the_ephemeral_range_so_polling_cannot_self_connect():
    """CI once read back its own "GET /healthz" as the status line: the health poll, sent before the
    service listened on an ephemeral port, connected to itself."""
    from osad.runtime.broker import _ephemeral_range, free_port

    lo, hi = _ephemeral_range()
    for _ in range(50):
        p = free_port()
        assert not lo <= p <= hi, (p, lo, hi)
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # and nothing holds it
