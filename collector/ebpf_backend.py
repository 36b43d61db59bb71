"""The eBPF backend: the BPF metric families (``bpf/``), their kernel maps drained every interval
into a :class:`~osad.collector.core.Tracker`. bcc itself is imported only when a family loads."""

from __future__ import annotations

import logging
import os

from .backend import Backend, BackendUnavailable
from .bpf import BpfSettings, FamilyLoadError, has_group_dead, load_families, unavailable_reason
from .bpf.mem import RSS_KINDS
from .core import Entity, Report, Snapshot, Tracker
from .procfs import ProcReader, list_pids
from .targets import TargetSpec

log = logging.getLogger("osad.collector")


class EbpfUnavailable(BackendUnavailable):
    """eBPF collection cannot run here; the text says why, in one line."""


class EbpfBackend(Backend):
    """The BPF metric families, drained into a Tracker.

    ``targets`` says whether the kernel aggregates only watched processes (--pid/--command) and
    follows their children; ``per_thread`` keys counters by thread; ``probes`` are the --probe
    functions (``bpf.uprobes.ProbeSpec``)."""

    name = "ebpf"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason()

    def __init__(self, targets: TargetSpec, *, host: str, per_thread: bool = False, probes=(), heap: bool = False,
                 traces=(), trace_rate: int = 100):
        reason = self.unavailable_reason()
        if reason:
            raise EbpfUnavailable(reason)
        settings = BpfSettings(filter=targets.kernel_filter, follow=targets.follow_children,
                               per_thread=per_thread, self_tgid=os.getpid(),
                               have_group_dead=has_group_dead(), probes=list(probes), heap=heap,
                               traces=list(traces), trace_rate=trace_rate)
        try:
            self.families, self.warnings = load_families(settings)
        except FamilyLoadError as e:
            raise EbpfUnavailable(f"the BPF programs did not load: {e}") from None
        self.settings = settings
        self._warned: set[str] = set()
        self.by_name = {f.name: f for f in self.families}
        self.proc = self.by_name["proc"]
        self.mem = self.by_name.get("mem")
        counters = [n for f in self.families for n in f.counters]
        gauges = (list(RSS_KINDS) if self.mem else []) + ["threads"]
        derived = [p.mean_name() for p in self.by_name["uprobes"].probes] if "uprobes" in self.by_name else []
        if "heap" in self.by_name:
            gauges.append("heap_outstanding_bytes")  # collector/loop.py sums it
        self.metric_names = counters + gauges + derived
        self.reader = ProcReader()
        self.tracker = Tracker(host, per_thread=per_thread, counter_names=counters,
                               report_idle=settings.filter, reader=self.reader,
                               derive=[f.derive for f in self.families], on_new_process=self._seed)
        if not settings.filter:
            for pid in list_pids():  # know every process now, so one that exits soon is still identified
                if pid != os.getpid():
                    self.tracker.register(pid)

    def _seed(self, e: Entity, ps) -> None:
        self.proc.seed_threads(e.pid, ps.num_threads)

    def describe(self) -> str:
        return f"eBPF ({', '.join(f.name for f in self.families)})"

    def add_target(self, pid: int) -> Entity | None:
        for f in self.families:
            f.add_target(pid)
        return self.tracker.register(pid)

    def snapshot(self) -> Snapshot:
        """One drain of every family's maps, in the order the Tracker expects."""
        snap = Snapshot()
        snap.exits = self.proc.read_exits()  # first: every family handled these exits already
        snap.births = self.proc.read_births()
        for f in self.families:
            snap.dead[f.name] = f.read_dead()
            snap.live[f.name] = f.read_live()
        snap.rss = self.mem.read_rss() if self.mem else None
        snap.threads = self.proc.read_threads()
        return snap

    def poll(self) -> list[Report]:
        snap = self.snapshot()
        self._check_capacity(snap)
        reports, orphans, rss_orphans = self.tracker.ingest(snap)
        for name, keys in orphans.items():
            self.by_name[name].delete_keys(keys)
        if rss_orphans and self.mem:
            self.mem.delete_rss(rss_orphans)
        return reports

    def _check_capacity(self, snap: Snapshot) -> None:
        """Say once when a map is nearly full (new entities would go uncounted)."""
        s = self.settings
        worst = max([len(v) for v in snap.live.values()] + [0])
        dead = max([len(v) for v in snap.dead.values()] + [len(snap.exits)])
        for what, n, cap in (("entities", worst, s.max_keys), ("exits per interval", dead, s.max_dead)):
            if n >= 0.9 * cap and what not in self._warned:
                self._warned.add(what)
                log.warning("kernel maps are %d%% full (%d of %d %s): further ones may go uncounted; watch "
                            "fewer processes (--pid/--comm), or shorten --interval", 100 * n // cap, n, cap, what)

    def events_since_last(self) -> int:
        return sum(f.events_since_last() for f in self.families)

    def watching(self) -> bool:
        """Target mode: some target is still alive (kernel targets map, or known to the tracker)."""
        return bool(self.proc.targets()) or bool(self.tracker.alive())

    def drain_traces(self):
        """The --trace events since the last call, and the counts lost so far (see bpf/traces.py)."""
        t = self.by_name.get("traces")
        return t.drain() if t is not None else ([], 0, 0)

    def describe_entity(self, r: Report) -> None:
        e = r.entity
        if e.described and not r.metrics.get("execs"):
            return
        comm = self.reader.comm(e.pid, e.tid)
        if comm:
            e.comm = comm
        if not e.described and e.tid is None and not e.exited:
            e.cgroup, e.container_id = self.reader.cgroup(e.pid)
            if self.mem is not None:
                for k, v in self.reader.rss(e.pid).items():  # kinds the kernel has not reported yet
                    if k not in e.gauges:
                        e.gauges[k] = v
                        r.metrics[k] = v
        e.described = True

    def close(self) -> None:
        for f in self.families:
            f.close()
