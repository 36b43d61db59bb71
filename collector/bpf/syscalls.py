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

    def extra_defines(self) -> dict[str, str]:
        if not self.io:
            return {"OSAD_IO_BYTES": "0"}
        return {"OSAD_IO_BYTES": "1", "OSAD_IS_READ(nr)": _expr(self.io[0]),
                "OSAD_IS_WRITE(nr)": _expr(self.io[1])}
