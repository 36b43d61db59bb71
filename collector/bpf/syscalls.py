"""Family "syscalls" (syscalls.c): syscalls, failed syscalls, time in syscalls, bytes read/written."""

from __future__ import annotations

import platform

from .family import Family

# Syscall numbers of the read and write families, per architecture (native ABI only).
_IO_NRS = {
    # read, pread64, readv, preadv, preadv2 / write, pwrite64, writev, pwritev, pwritev2
    "x86_64": ((0, 17, 19, 295, 327), (1, 18, 20, 296, 328)),
    "aarch64": ((63, 67, 65, 69, 286), (64, 68, 66, 70, 287)),
}


def _expr(nrs) -> str:
    return "(" + " || ".join(f"(nr) == {n}" for n in nrs) + ")"


class Syscalls(Family):
    name = "syscalls"
    c_file = "syscalls.c"

    def __init__(self, settings):
        super().__init__(settings)
        self.io = _IO_NRS.get(platform.machine())
        base = ("syscalls", "syscalls_failed", "syscall_time_ns")
        # Where this architecture's numbers are not known, bytes read/written are absent.
        self.counters = base + (("read_bytes", "write_bytes") if self.io else ())

    def read_live(self):
        live = super().read_live()
        self._note_syscalls(sum(v["syscalls"] for _, v in live.values()), final=False)
        return live

    def read_dead(self):
        dead = super().read_dead()
        self._note_syscalls(sum(v["syscalls"] for _, _, _, v in dead), final=True)
        return dead

    # The syscall programs do not count their runs (the hottest path; a per-CPU counter costs
    # ~10 ns per syscall): each syscall counted in the maps is two events, entry and exit.
    _cum_live = 0
    _dead_total = 0

    def _note_syscalls(self, n: int, final: bool) -> None:
        if final:
            self._dead_total += n
        else:
            self._cum_live = n

    def events_since_last(self) -> int:
        other = super().events_since_last()  # task creation and exit
        total = 2 * (self._cum_live + self._dead_total)
        d = max(0, total - getattr(self, "_sc_seen", 0))
        self._sc_seen = total
        return other + d

    def extra_defines(self) -> dict[str, str]:
        if not self.io:
            return {"OSAD_IO_BYTES": "0"}
        return {"OSAD_IO_BYTES": "1", "OSAD_IS_READ(nr)": _expr(self.io[0]),
                "OSAD_IS_WRITE(nr)": _expr(self.io[1])}
