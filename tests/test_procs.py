"""runtime.procs: services as child processes, logged to a file, stopped together."""

import os
import signal
import sys

from osad.runtime.procs import start_logged, stop_all
from tests.conftest import wait_until

# prints "ready" once its SIGTERM handler is set, then waits; on SIGTERM says so and exits 3 (or ignores it)
CHILD = """
import signal, sys, time
mode = sys.argv[1]
def term(*_):
    if mode == "obey":
        print("got SIGTERM", flush=True)
        sys.exit(3)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_children_log_to_their_file_and_stop_on_sigterm_or_are_killed(tmp_path):
    logs = [tmp_path / "obey.log", tmp_path / "stubborn.log"]
    obey = start_logged([sys.executable, "-c", CHILD, "obey"], logs[0])
    stubborn = start_logged([sys.executable, "-c", CHILD, "ignore"], logs[1])
    wait_until(lambda: all("ready" in p.read_text() for p in logs), 30, what="both children ready")
    killed = []
    stop_all([obey, stubborn], timeout_s=1.0, on_kill=killed.append)
    assert obey.returncode == 3 and "got SIGTERM" in logs[0].read_text()  # stopped by SIGTERM, cleanly
    assert killed == [stubborn] and stubborn.returncode == -signal.SIGKILL
    stop_all([obey, stubborn])  # stopping what has stopped is harmless


def test_children_run_in_their_own_session(tmp_path):
    """A Ctrl-C in the terminal (SIGINT to the foreground process group) must reach only the parent,
    which stops its children in order."""
    log = tmp_path / "c.log"
    p = start_logged([sys.executable, "-c", CHILD, "obey"], log)
    try:
        wait_until(lambda: "ready" in log.read_text(), 30, what="child ready")
        assert os.getsid(p.pid) == p.pid != os.getsid(0)
    finally:
        stop_all([p], timeout_s=10.0)
    assert p.returncode == 3
