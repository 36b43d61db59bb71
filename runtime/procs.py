"""Child processes that run osad's services: started with their output in a log file, stopped
together (SIGTERM first, so each finishes its batch and commits; SIGKILL only after a deadline).

Used by ``osad up``, ``osad agreement`` and the benchmarks, which all run the services as separate
OS processes, as a deployment would.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def start_logged(cmd: Sequence[str], log: Path | str, env: dict | None = None,
                 cwd: Path | str | None = None) -> subprocess.Popen:
    """Run ``cmd`` with stdout and stderr appended to ``log``, in a session of its own: a Ctrl-C in
    the terminal reaches only the parent, which then stops it (:func:`stop_all`)."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop_all(procs: Iterable[subprocess.Popen], timeout_s: float = 20.0, sig: int = signal.SIGTERM,
             on_kill: Callable[[subprocess.Popen], None] | None = None) -> None:
    """Send ``sig`` to every process still running, in the order given, then wait for all of them
    together for ``timeout_s``; one still running then is killed (``on_kill(proc)`` is told first)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(p)
            p.kill()
            p.wait()
