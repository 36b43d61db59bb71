"""Family "proc" (proc.c): forks, execs, signals, thread count, and birth/exit records."""

from __future__ import annotations

from ..core import Birth, ExitRecord
from .family import Family, read_map


class Proc(Family):
    name = "proc"
    c_file = "proc.c"
    counters = ("forks", "execs", "signals_received")

    def read_exits(self) -> list[ExitRecord]:
        out = []
        for k, v in read_map(self.bpf[b"exits"], delete=True):
            out.append(ExitRecord(int(k.id), int(k.ts), int(v.tgid), bool(v.group_dead), int(v.birth_ns),
                                  bytes(v.comm).split(b"\0", 1)[0].decode(errors="replace")))
        out.sort(key=lambda e: e.ts)
        return out

    def read_births(self) -> dict[int, Birth]:
        """{tgid: Birth} of processes created since the collector started and still alive
        (with --threads also {tid: Birth} of such threads)."""
        out = {int(k): Birth(int(v.boot_ns), int(v.ppid)) for k, v in read_map(self.bpf[b"births"])}
        if self.settings.per_thread:
            for k, v in read_map(self.bpf[b"thread_births"]):
                out.setdefault(int(k), Birth(int(v.boot_ns), int(v.ppid)))
        return out

    def read_threads(self) -> dict[int, int]:
        return {int(k): max(0, int(v)) for k, v in read_map(self.bpf[b"nthreads"])}

    def seed_threads(self, tgid: int, n: int) -> None:
        """Start the kernel's live thread count of a process that existed before the collector."""
        t = self.bpf[b"nthreads"]
        key = t.Key(tgid)
        if t.get(key) is None:
            t[key] = t.Leaf(n)
