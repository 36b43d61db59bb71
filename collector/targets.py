"""What to watch: --pid, --command, --comm, --all; and starting a command so that it is watched
from its first instruction."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .procfs import read_stat


class TargetError(ValueError):
    """The target options are wrong; the text says which and what to do."""


@dataclass
class TargetSpec:
    pids: list[int] = field(default_factory=list)
    command: list[str] | None = None
    comm: re.Pattern | None = None
    all: bool = False
    follow_children: bool = False
    only_added: bool = False  # watch only what Collector.watch()/spawn() add (embedding, tests)

    @property
    def kernel_filter(self) -> bool:
        """Aggregate only the targets in kernel (--pid/--command); --comm and --all watch every process."""
        return bool(self.pids or self.command or self.only_added)

    def describe(self) -> str:
        if self.command:
            what = f"command {shlex.join(self.command)!r}"
        elif self.pids:
            what = "pid " + ",".join(map(str, self.pids))
        elif self.only_added:
            what = "the processes added"
        elif self.comm is not None:
            what = f"processes whose comm matches {self.comm.pattern!r}"
        else:
            what = "all processes"
        return what + (" and their descendants" if self.follow_children and self.kernel_filter else "")


def parse_pids(values: list[str] | None) -> list[int]:
    out: list[int] = []
    for v in values or []:
        for part in str(v).replace(" ", "").split(","):
            if not part:
                continue
            try:
                pid = int(part)
            except ValueError:
                raise TargetError(f"--pid {part!r} is not a process id (give integers, e.g. --pid 1234,5678)") from None
            if pid <= 0:
                raise TargetError(f"--pid {pid}: process ids are positive")
            out.append(pid)
    return out


def build(pids=None, command: str | None = None, comm: str | None = None, all_: bool = False,
          follow_children: bool = False) -> TargetSpec:
    """Validate the target options (exactly one kind) and check that --pid processes exist."""
    pid_list = parse_pids(pids)
    given = [n for n, v in (("--pid", pid_list), ("--command", command), ("--comm", comm), ("--all", all_)) if v]
    if len(given) != 1:
        raise TargetError("choose what to watch with exactly one of --pid, --command, --comm or --all"
                          + (f" (got {', '.join(given)})" if given else ""))
    spec = TargetSpec(pids=pid_list, follow_children=follow_children, all=bool(all_))
    if command is not None:
        argv = shlex.split(command)
        if not argv:
            raise TargetError("--command is empty; give the program and its arguments, e.g. --command 'sleep 5'")
        spec.command = argv
    if comm is not None:
        try:
            spec.comm = re.compile(comm)
        except re.error as e:
            raise TargetError(f"--comm {comm!r} is not a valid regular expression: {e}") from None
    for pid in pid_list:
        if read_stat(pid) is None:
            raise TargetError(f"--pid {pid}: no such process (check `ps -p {pid}`)")
    return spec


_GATE = 'kill -STOP $$; exec "$0" "$@"'


class GatedProcess:
    """A command started held at a gate (a shell that stops itself), so the collector can start
    watching its pid before it runs; ``release()`` lets it exec the command (same pid)."""

    def __init__(self, argv: list[str], *, gate_timeout_s: float = 10.0, **popen_kw):
        self.popen = subprocess.Popen(["/bin/sh", "-c", _GATE, *argv], **popen_kw)
        self.pid = self.popen.pid
        deadline = time.monotonic() + gate_timeout_s
        while True:
            st = read_stat(self.pid)
            if st is None or st.state in ("T", "t", "Z", "X"):
                break
            if time.monotonic() > deadline:
                self.popen.kill()
                raise TargetError(f"the command {argv[0]!r} did not reach its start gate within {gate_timeout_s} s")
            time.sleep(0.001)

    def release(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
