"""From drained kernel maps to per-entity, per-interval metrics: plain data in, plain data out.

Nothing here imports bcc or Kafka; tests drive it with made-up snapshots.

The kernel keeps cumulative counters per *key* (a tgid, or a tid with --threads) and, when an
entity exits, moves its counters to a ``dead`` map keyed by (key, exit time); the proc family
records the exit itself, and the birth time of every process created while the collector runs.
A key can therefore stand for several *incarnations* (a pid reused by a later process). The
:class:`Tracker` keeps, per key, the incarnations it knows (oldest first) and assigns:

* a dead entry of family F to the oldest incarnation that F has not closed yet;
* an exit record to the incarnation with the same birth time (or the oldest still running);
* a live entry to the newest incarnation, unless that one exited or F is closed for it (a few
  counts written after the exit: an *orphan*, dropped, and deleted from the map once stable);
* a birth that matches no incarnation starts a new one.

Per-interval values are differences of cumulative counters; gauges are the latest values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .procfs import NS_PER_TICK, ProcReader, ProcStat


@dataclass(frozen=True)
class Birth:
    boot_ns: int  # CLOCK_BOOTTIME ns when the task was created
    ppid: int     # creator's tgid


@dataclass(frozen=True)
class ExitRecord:
    key: int         # tgid (process mode) or tid (--threads)
    ts: int          # CLOCK_BOOTTIME ns of the exit
    tgid: int
    group_dead: bool
    birth_ns: int    # 0: born before the collector started
    comm: str = ""


DeadEntry = tuple[int, int, int, dict]   # (key, exit ts, tgid, final cumulative counters)
LiveEntry = tuple[int, dict]             # (tgid, cumulative counters)


@dataclass
class Snapshot:
    """One drain of every map, read in this order: exits, births, then per family dead and live."""

    exits: list[ExitRecord] = field(default_factory=list)
    births: dict[int, Birth] = field(default_factory=dict)
    dead: dict[str, list[DeadEntry]] = field(default_factory=dict)
    live: dict[str, dict[int, LiveEntry]] = field(default_factory=dict)
    rss: dict[int, dict[str, int]] | None = None   # tgid -> {rss_*_bytes}; None: not measured
    threads: dict[int, int] | None = None          # tgid -> live threads; None: not measured


@dataclass(eq=False)
class Entity:
    """A process (tid None) or a thread, as it appears in Samples."""

    host: str
    pid: int
    start_ticks: int               # the process's start time (/proc/<pid>/stat field 22)
    tid: int | None = None
    parent: "Entity | None" = None  # a thread's process
    comm: str = ""
    cgroup: str | None = None
    container_id: str | None = None
    birth_ns: int | None = None    # kernel birth time if created while the collector runs
    own_ticks: int | None = None   # a thread's own start ticks (for matching births)
    exited: bool = False
    active: bool = False           # has had counters in some family
    described: bool = False        # comm/cgroup/RSS seeds read from /proc
    first_drain: int | None = None  # drain number of its first Sample (seq = drain - first_drain)
    acc: dict[str, float] = field(default_factory=dict)     # counter deltas this interval
    gauges: dict[str, float] = field(default_factory=dict)  # latest gauge values
    heap_outstanding: int = 0  # --heap: bytes allocated and not freed since first watched (loop.py)
    proc_gauges: dict[str, int] | None = None  # latest /proc gauges (loop.py), for its last Sample after it exits

    @property
    def entity_id(self) -> str:
        base = f"{self.host}/{self.pid}@{self.start_ticks}"
        return base if self.tid is None else f"{base}/t{self.tid}"

    @property
    def match_ticks(self) -> int:
        return self.own_ticks if self.own_ticks is not None else self.start_ticks


@dataclass(eq=False)
class Inc:
    """One incarnation of a kernel key."""

    key: int
    entity: Entity
    closed: set[str] = field(default_factory=set)        # families whose dead entry was consumed
    exiting: bool = False                                # exit record seen this drain
    prev: dict[str, dict[str, int]] = field(default_factory=dict)  # family -> last cumulative


@dataclass
class Report:
    entity: Entity
    metrics: dict[str, float]
    final: bool  # the entity exited during this interval: its last Sample


def _sub(cur: dict[str, int], prev: dict[str, int] | None) -> dict[str, int]:
    if prev is None:
        return dict(cur)
    if any(cur.get(k, 0) < v for k, v in prev.items()):
        return dict(cur)  # the entry was recreated: count from zero
    return {k: v - prev.get(k, 0) for k, v in cur.items()}


def _matches(e: Entity, b: Birth) -> bool:
    if e.birth_ns is not None:
        return e.birth_ns == b.boot_ns
    return abs(e.match_ticks - b.boot_ns // NS_PER_TICK) <= 1


class Tracker:
    """Keeps entities apart across drains and turns cumulative counters into interval deltas.

    ``counter_names``: every counter metric of the loaded families (reported as 0 when an
    entity had no event of that kind: the family was watching). ``report_idle``: report known
    entities with no counters yet (the watched targets of --pid/--command). ``derive``:
    functions adding metrics computed from an entity's interval values.
    """

    TOMBSTONE_DRAINS = 3

    def __init__(self, host: str, *, per_thread: bool = False, counter_names: Iterable[str] = (),
                 report_idle: bool = False, reader: ProcReader | None = None,
                 derive: Iterable[Callable[[dict], None]] = (),
                 on_new_process: Callable[[Entity, ProcStat | None], None] | None = None):
        self.host = host
        self.per_thread = per_thread
        self.counter_names = tuple(counter_names)
        self.report_idle = report_idle
        self.reader = reader or ProcReader()
        self.derive = tuple(derive)
        self.on_new_process = on_new_process
        self.incs: dict[int, list[Inc]] = {}
        self.procs: dict[int, list[Entity]] = {}   # thread mode: tgid -> process entities
        self.tombstones: dict[int, int] = {}       # key -> drain number of its exit
        self.drain = -1
        self._orphan_prev: dict[tuple[str, int], dict] = {}
        self._rss_orphan_prev: dict[int, dict] = {}

    # ---- identity -------------------------------------------------------------------------
    def _new_process(self, tgid: int, birth: Birth | None, *, allow_zombie: bool = False) -> Entity | None:
        ps = self.reader.stat(tgid)
        if birth is not None:
            bt = birth.boot_ns // NS_PER_TICK
            if ps is not None and abs(ps.start_ticks - bt) > 1:
                ps = None  # /proc shows another incarnation
            ticks = ps.start_ticks if ps is not None else bt
        else:
            if ps is None or (ps.state in ("Z", "X") and not allow_zombie):
                return None
            ticks = ps.start_ticks
        e = Entity(self.host, tgid, ticks, comm=ps.comm if ps else "",
                   birth_ns=birth.boot_ns if birth else None)
        if self.on_new_process is not None and ps is not None and birth is None and ps.state not in ("Z", "X"):
            self.on_new_process(e, ps)
        return e

    def _process_for(self, tgid: int, births: dict[int, Birth], *, create: bool = True) -> Entity | None:
        """Thread mode: the current process entity of a tgid."""
        lst = self.procs.setdefault(tgid, [])
        cur = next((e for e in reversed(lst) if not e.exited), None)
        b = births.get(tgid)
        if cur is not None and (b is None or _matches(cur, b)):
            if b is not None and cur.birth_ns is None:
                cur.birth_ns = b.boot_ns
            return cur
        if not create:
            return None
        e = self._new_process(tgid, b)
        if e is not None:
            lst.append(e)
        elif not lst:
            del self.procs[tgid]
        return e

    def _make(self, key: int, tgid: int, birth: Birth | None, births: dict[int, Birth],
              *, allow_zombie: bool = False) -> Entity | None:
        if not self.per_thread:
            return self._new_process(key, birth, allow_zombie=allow_zombie)
        parent = self._process_for(tgid, births)
        if parent is None:
            return None
        ps = self.reader.stat(tgid, key)
        if birth is not None and ps is not None and abs(ps.start_ticks - birth.boot_ns // NS_PER_TICK) > 1:
            ps = None
        if birth is None and (ps is None or (ps.state in ("Z", "X") and not allow_zombie)):
            return None
        own = ps.start_ticks if ps is not None else birth.boot_ns // NS_PER_TICK
        return Entity(self.host, tgid, parent.start_ticks, tid=key, parent=parent, comm=ps.comm if ps else "",
                      birth_ns=birth.boot_ns if birth else None, own_ticks=own)

    def _current(self, key: int, tgid: int, births: dict[int, Birth], *, create: bool = True) -> Inc | None:
        """The incarnation live counters under ``key`` belong to (None: an orphan)."""
        lst = self.incs.get(key)
        cur = lst[-1] if lst else None
        b = births.get(key)
        if cur is not None:
            if b is not None and _matches(cur.entity, b):
                if cur.entity.birth_ns is None:
                    cur.entity.birth_ns = b.boot_ns
                b = None
            if b is None:
                return None if cur.exiting else cur
        elif b is None and key in self.tombstones:
            return None
        if not create:
            return None
        e = self._make(key, tgid, b, births)
        if e is None:
            return None
        inc = Inc(key, e)
        self.incs.setdefault(key, []).append(inc)
        self.tombstones.pop(key, None)
        return inc

    def _older(self, key: int, tgid: int, birth: Birth | None, births: dict[int, Birth]) -> Inc | None:
        """An incarnation that exited before any we know under ``key`` (inserted first)."""
        e = self._make(key, tgid, birth, births, allow_zombie=True)
        if e is None:
            return None
        inc = Inc(key, e)
        self.incs.setdefault(key, []).insert(0, inc)
        return inc

    def register(self, pid: int) -> Entity | None:
        """Start tracking a process that exists now (a --pid target, a spawned command)."""
        ps = self.reader.stat(pid)
        if ps is None or ps.state in ("Z", "X"):
            return None
        if self.per_thread:
            cur = next((e for e in reversed(self.procs.get(pid, ())) if not e.exited), None)
            if cur is not None and cur.start_ticks == ps.start_ticks:
                return cur
            e = self._new_process(pid, None)
            if e is not None:
                self.procs.setdefault(pid, []).append(e)
            return e
        lst = self.incs.get(pid)
        if lst and not lst[-1].exiting and lst[-1].entity.start_ticks == ps.start_ticks:
            return lst[-1].entity
        # a new process (or a pid reused since the last drain: the older one's exit is still to come)
        e = self._new_process(pid, None)
        if e is None:
            return None
        self.incs.setdefault(pid, []).append(Inc(pid, e))
        self.tombstones.pop(pid, None)
        return e

    # ---- one drain ------------------------------------------------------------------------
    def ingest(self, snap: Snapshot) -> tuple[list[Report], dict[str, list[int]], list[int]]:
        """Apply one drain. Returns (reports, orphan keys to delete per family, orphan RSS tgids)."""
        self.drain += 1
        births = snap.births

        for r in snap.exits:
            self._exit(r, births)

        for fam, entries in snap.dead.items():
            for key, ts, tgid, vals in sorted(entries, key=lambda d: d[1]):
                inc = next((i for i in self.incs.get(key, ())
                            if fam not in i.closed and (i.entity.birth_ns is None or i.entity.birth_ns <= ts)), None)
                if inc is None:
                    b = births.get(key)
                    if b is not None and b.boot_ns > ts:
                        b = None  # that birth is of a later incarnation
                    inc = self._older(key, tgid, b, births)
                if inc is None:
                    continue
                self._add(inc, fam, vals)
                inc.closed.add(fam)
                inc.prev.pop(fam, None)

        orphans: dict[str, list[int]] = {}
        seen_orphans: set[tuple[str, int]] = set()
        for fam, entries in snap.live.items():
            for key, (tgid, vals) in entries.items():
                inc = self._current(key, tgid, births)
                if inc is None or fam in inc.closed:
                    k = (fam, key)
                    seen_orphans.add(k)
                    if self._orphan_prev.get(k) == vals:  # unchanged for a whole interval: stale
                        orphans.setdefault(fam, []).append(key)
                    self._orphan_prev[k] = vals
                    continue
                self._add(inc, fam, vals)
                inc.prev[fam] = vals
        self._orphan_prev = {k: v for k, v in self._orphan_prev.items() if k in seen_orphans}

        rss_orphans: list[int] = []
        if snap.rss is not None:
            seen = set()
            for tgid, kinds in snap.rss.items():
                p = self._process_now(tgid)
                if p is not None:
                    p.gauges.update(kinds)
                else:
                    seen.add(tgid)
                    if self._rss_orphan_prev.get(tgid) == kinds:
                        rss_orphans.append(tgid)
                    self._rss_orphan_prev[tgid] = kinds
            self._rss_orphan_prev = {k: v for k, v in self._rss_orphan_prev.items() if k in seen}
        if snap.threads is not None:
            for tgid, n in snap.threads.items():
                p = self._process_now(tgid)
                if p is not None:
                    p.gauges["threads"] = n

        reports = self._reports()
        self._cleanup()
        return reports, orphans, rss_orphans

    def _exit(self, r: ExitRecord, births: dict[int, Birth]) -> None:
        cands = [i for i in self.incs.get(r.key, ()) if not i.exiting]
        inc = None
        if r.birth_ns:
            inc = next((i for i in cands if _matches(i.entity, Birth(r.birth_ns, 0))), None)
        else:
            inc = next((i for i in cands if i.entity.birth_ns is None), None)
        if inc is None:
            inc = self._older(r.key, r.tgid, Birth(r.birth_ns, 0) if r.birth_ns else None, births)
        self.tombstones[r.key] = self.drain
        if inc is not None:
            inc.exiting = True
            inc.entity.exited = True
            inc.entity.active = True
            if r.comm:  # its name when it exited (after any exec)
                inc.entity.comm = r.comm
        if self.per_thread and r.group_dead:
            p = inc.entity.parent if inc is not None else self._process_for(r.tgid, births, create=False)
            if p is not None:
                p.exited = True
                p.active = True

    def _process_now(self, tgid: int) -> Entity | None:
        if self.per_thread:
            return next((e for e in reversed(self.procs.get(tgid, ())) if not e.exited), None)
        lst = self.incs.get(tgid)
        return lst[-1].entity if lst and not lst[-1].exiting else None

    def _add(self, inc: Inc, fam: str, vals: dict[str, int]) -> None:
        d = _sub(vals, inc.prev.get(fam))
        targets = [inc.entity] + ([inc.entity.parent] if inc.entity.parent is not None else [])
        for e in targets:
            e.active = True
            acc = e.acc
            for k, v in d.items():
                acc[k] = acc.get(k, 0) + v

    def _entities(self) -> list[Entity]:
        out = []
        if self.per_thread:
            for lst in self.procs.values():
                out.extend(lst)
        for lst in self.incs.values():
            for inc in lst:
                out.append(inc.entity)
        return out

    def _reports(self) -> list[Report]:
        out = []
        for e in self._entities():
            if not (e.active or self.report_idle):
                continue
            m: dict[str, float] = {n: 0 for n in self.counter_names}
            m.update(e.acc)
            if e.tid is None:
                m.update(e.gauges)
            for fn in self.derive:
                fn(m)
            out.append(Report(e, m, final=e.exited))
            e.acc = {}
        return out

    def _cleanup(self) -> None:
        for key in list(self.incs):
            lst = [i for i in self.incs[key] if not i.exiting]
            if lst:
                self.incs[key] = lst
            else:
                del self.incs[key]
        if self.per_thread:
            for tgid in list(self.procs):
                lst = [e for e in self.procs[tgid] if not e.exited]
                if lst:
                    self.procs[tgid] = lst
                else:
                    del self.procs[tgid]
        self.tombstones = {k: d for k, d in self.tombstones.items() if self.drain - d <= self.TOMBSTONE_DRAINS}

    # ---- queries --------------------------------------------------------------------------
    def alive(self) -> list[Entity]:
        """Process entities still running."""
        if self.per_thread:
            return [e for lst in self.procs.values() for e in lst if not e.exited]
        return [i.entity for lst in self.incs.values() for i in lst if not i.exiting]


# --------------------------------------------------------------------------------------------
# Choosing what to report.

def select(reports: list[Report], *, max_entities: int | None, comm_filter=None) -> list[Report]:
    """Reports to publish this interval: processes matching ``comm_filter`` (a compiled regex),
    at most ``max_entities`` of them, those with most on-CPU time first; then the thread reports
    of the chosen processes, at most ``max_entities`` of those too, also by on-CPU time."""

    def busiest(rs: list[Report]) -> list[Report]:
        if max_entities is None or len(rs) <= max_entities:
            return rs
        rs = sorted(rs, key=lambda r: (r.metrics.get("on_cpu_ns", 0), r.metrics.get("syscalls", 0)), reverse=True)
        return rs[:max_entities]

    procs = [r for r in reports if r.entity.tid is None]
    if comm_filter is not None:
        procs = [r for r in procs if comm_filter.search(r.entity.comm or "")]
    procs = busiest(procs)
    chosen = {id(r.entity) for r in procs}
    threads = busiest([r for r in reports if r.entity.tid is not None and id(r.entity.parent) in chosen])
    return procs + threads
