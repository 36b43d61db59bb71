"""Child processes that run osad's services: started with their output in a log file, stopped
together (SIGTERM first, so each finishes its batch and commits; SIGKILL only after a deadline),
and never left behind when their parent dies.

Used by ``osad up``, ``osad agreement`` and the benchmarks, which all run the services as separate
OS processes, as a deployment would.

No child outlives its parent, however the parent dies (SIGKILL, a crash), by two means:

* **parent-death signal** (Linux): every child is started through a tiny wrapper that asks the
  kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), checks that the parent is
  still the one that started it (it may have died before the request), then becomes the command
  (``exec``: same pid, same arguments as seen by ``ps``). The kernel sends that signal when the
  *thread* that forked the child ends, not the process: a child started from a thread that
  finishes would be killed early. So the wrapper is used only from the main thread (whose end is
  the process's end); a child started from another thread relies on the lifeline alone.
* **a lifeline** (:class:`Lifeline`, any POSIX system): a small watcher process that the parent
  tells about each child it starts (and each one it has reaped) over a pipe. The parent alone
  holds the pipe's write end, so the watcher reads end-of-file exactly when the parent is gone;
  it then sends SIGTERM to the process group of each child still running and SIGKILL to those
  still there after a grace period. This also covers what the signal cannot: a child that ignores
  or hangs in SIGTERM, the children's own children (their process group), a child that exec'd a
  set-uid program (which clears the parent-death signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# the wrapper every child starts as (see the module's docstring); run with -I -S: it needs nothing but the
# standard library, and restores the signals Python ignores (SIGPIPE, SIGXFSZ) to their default before the exec
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.stderr.write("osad: prctl(PR_SET_PDEATHSIG) failed: %s\\n" % os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the parent died before the request: nothing to run for
for s in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("osad: cannot run %s: %s\\n" % (sys.argv[2], e))
    os._exit(127)
"""


def die_with_parent(cmd: Sequence[str]) -> list[str]:
    """``cmd`` started through the parent-death wrapper, where that is safe: on Linux, from the main thread
    (the kernel signals the child when the *thread* that forked it ends). Otherwise ``cmd`` unchanged."""
    cmd = list(cmd)
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return cmd
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def start_logged(cmd: Sequence[str], log: Path | str, env: dict | None = None,
                 cwd: Path | str | None = None, *, orphan_proof: bool = True) -> subprocess.Popen:
    """Run ``cmd`` with stdout and stderr appended to ``log``, in a session of its own: a Ctrl-C in
    the terminal reaches only the parent, which then stops it (:func:`stop_all`). With ``orphan_proof``
    it gets SIGTERM when this process dies (:func:`die_with_parent`); its pid is its own all the same."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(die_with_parent(cmd) if orphan_proof else list(cmd), stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


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


# -- the lifeline -----------------------------------------------------------------------------------

class Lifeline:
    """A watcher process that stops this process's children if it dies without stopping them.

    ``watch(pid, name)`` after starting a child, ``forget(pid)`` once it has been reaped, ``close()`` at
    the end (after stopping the children). Telling the watcher never raises: should it be gone, the
    children still have their parent-death signal.

    The watcher runs in a session of its own (a Ctrl-C in the terminal does not reach it) and writes
    what it does to ``stderr`` (default: this process's), prefixed with ``label``.
    """

    def __init__(self, grace_s: float = 5.0, label: str = "osad", stderr=None):
        self.grace_s = grace_s
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from osad.runtime.procs import _lifeline_main; _lifeline_main()",
             f"{grace_s:g}", str(os.getpid()), label],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        self._lock = threading.Lock()

    def _tell(self, line: str) -> bool:
        with self._lock:
            try:
                if self.proc.stdin is None or self.proc.stdin.closed:
                    return False
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()
                return True
            except (OSError, ValueError):  # the watcher is gone (EPIPE)
                return False

    def watch(self, pid: int, name: str) -> bool:
        return self._tell(f"+ {pid} {name}")

    def forget(self, pid: int) -> bool:
        return self._tell(f"- {pid}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the watcher go: it stops whatever it was not told was reaped (nothing, after a clean stop)."""
        with self._lock:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(max(timeout_s, self.grace_s + 1.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell it from a later process given the same pid), "" where
    there is no /proc, None when it has ended (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            try:
                os.kill(pid, 0)
                return ""
            except ProcessLookupError:
                return None
            except PermissionError:
                return ""
        return None
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ..., starttime is field 22
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _lifeline_main() -> int:
    """The watcher (``python -c ... GRACE_S PARENT_PID LABEL``): reads ``+ PID NAME`` / ``- PID`` lines from
    stdin until end-of-file, then stops the children it still knows of (their process groups)."""
    grace_s, parent, label = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)

    def say(msg: str) -> None:
        try:
            sys.stderr.write(f"{label}: {msg}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # nobody reads (a closed pipe, a closed terminal): carry on
            pass

    watched: dict[int, tuple[str, str | None]] = {}  # pid -> (name, start time), in start order
    for raw in sys.stdin.buffer:
        parts = raw.decode(errors="replace").split(maxsplit=2)
        try:
            if len(parts) >= 2 and parts[0] == "+":
                pid = int(parts[1])
                watched[pid] = (parts[2].strip() if len(parts) > 2 else str(pid), _start_time(pid))
            elif len(parts) >= 2 and parts[0] == "-":
                watched.pop(int(parts[1]), None)
        except ValueError:
            continue
    running = {pid: name for pid, (name, t0) in watched.items() if t0 is not None and _start_time(pid) == t0}
    if not running:
        return 0
    wait = time.monotonic() + 0.5  # the kernel closes a dying process's files before it hands its children on
    while os.getppid() == parent and time.monotonic() < wait:
        time.sleep(0.02)
    how = f"pid {parent} is gone" if os.getppid() != parent else f"pid {parent} let go of its lifeline"
    say(f"{how} without stopping {', '.join(running.values())}: stopping them (SIGTERM, SIGKILL after {grace_s:g} s)")
    for pid in reversed(list(running)):  # in reverse start order, as a clean stop does
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        running = {pid: n for pid, n in running.items() if _start_time(pid) == watched[pid][1]}
        time.sleep(0.05)
    for pid, name in running.items():
        say(f"{name} (pid {pid}) did not stop within {grace_s:g} s; killing it")
        _signal_group(pid, signal.SIGKILL)
    return 0


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads (a child started in a session of its own), else the process."""
    try:
        os.killpg(pid, sig)
        return
    except ProcessLookupError:
        pass
    except PermissionError:
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_text(code: int) -> str:
    """How a child ended, from its return code.

    >>> exit_text(-9), exit_text(1)
    ('killed by SIGKILL', 'exited with code 1')
    """
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
