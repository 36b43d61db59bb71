"""The fallback backend: cumulative counters read from /proc every interval, where eBPF cannot run.

Its metrics, and what /proc cannot give, are listed in ``procfs.py``. A process's last partial
interval is lost (it cannot be read after the process exits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .backend import Backend
from .core import Entity, Report
from .procfs import (CLK_TCK, FALLBACK_COUNTERS, FALLBACK_GAUGES, descendants, list_pids, list_tids, read_cgroup,
                     read_counters, read_stat, read_status)
from .targets import TargetSpec


@dataclass(eq=False)
class _ProcEnt:
    entity: Entity
    prev: dict | None  # the last cumulative counters (None: not read yet, no delta to give)


class ProcfsBackend(Backend):
    """Every watched process (or every process) read from /proc each interval; deltas of its counters."""

    name = "procfs"

    def __init__(self, targets: TargetSpec, *, host: str, per_thread: bool = False):
        self.spec = targets
        self.host = host
        self.per_thread = per_thread
        self.warnings: list[str] = []
        self.metric_names = list(FALLBACK_COUNTERS) + list(FALLBACK_GAUGES)
        self.targets: set[int] = set()
        self.known: dict[tuple[int, int | None], _ProcEnt] = {}
        self.start_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)
        self.self_pid = os.getpid()
        if not targets.kernel_filter:
            for pid in list_pids():
                self._read(pid, None)  # baselines, so the first interval has deltas

    def describe(self) -> str:
        return "/proc sampling"

    def add_target(self, pid: int) -> Entity | None:
        self.targets.add(pid)
        got = self._read(pid, None)
        return got[0].entity if got else None

    def _read(self, pid: int, tid: int | None, parent: Entity | None = None):
        """(entry, counters delta or None, gauges) of one process or thread; None if it is gone."""
        st = read_stat(pid, tid)
        if st is None or st.state in ("Z", "X"):
            return None
        status = read_status(pid, tid) or {}
        cur = read_counters(pid, tid, st, status)
        gauges: dict[str, int] = {}
        if tid is None:
            gauges = {k: v for k, v in status.items() if k.startswith("rss_")}
            gauges["threads"] = st.num_threads
        ent = self.known.get((pid, tid))
        if ent is None or ent.entity.match_ticks != st.start_ticks:
            if tid is None:
                e = Entity(self.host, pid, st.start_ticks, comm=st.comm)
                e.cgroup, e.container_id = read_cgroup(pid)
            else:
                e = Entity(self.host, pid, parent.start_ticks, tid=tid, parent=parent, comm=st.comm,
                           own_ticks=st.start_ticks)
            born_during_run = st.start_ticks >= self.start_ticks
            ent = _ProcEnt(e, {} if born_during_run else None)
            self.known[(pid, tid)] = ent
        delta = None
        if ent.prev is not None:
            delta = {k: v - ent.prev.get(k, 0) for k, v in cur.items()}
        ent.prev = cur
        ent.entity.comm = st.comm
        return ent, delta, gauges

    def _pids(self) -> list[int]:
        if not self.spec.kernel_filter:
            return [p for p in list_pids() if p != self.self_pid]
        watched = {p for p in self.targets if read_stat(p) is not None}
        if self.spec.follow_children:
            watched.update(descendants(watched))
            self.targets |= watched
        return sorted(watched)

    def poll(self) -> list[Report]:
        reports = []
        seen: set[tuple[int, int | None]] = set()
        for pid in self._pids():
            got = self._read(pid, None)
            if got is None:
                continue
            ent, delta, gauges = got
            seen.add((pid, None))
            if delta is None:
                continue
            m: dict[str, float] = dict(delta)
            m.update(gauges)
            reports.append(Report(ent.entity, m, final=False))
            if self.per_thread:
                for tid in list_tids(pid):
                    t = self._read(pid, tid, parent=ent.entity)
                    if t is None:
                        continue
                    seen.add((pid, tid))
                    if t[1] is not None:
                        reports.append(Report(t[0].entity, dict(t[1]), final=False))
        for k in [k for k in self.known if k not in seen]:
            del self.known[k]  # gone: its last partial interval cannot be read any more
        self.targets = {p for p in self.targets if (p, None) in seen or read_stat(p) is not None}
        return reports

    def watching(self) -> bool:
        return bool(self.targets)
