"""``osad collect``: watch processes with eBPF (or /proc when eBPF cannot load) and publish one
Sample per process per interval.

Top to bottom: the options, the two backends (eBPF families, /proc fallback), the
:class:`Collector` that drains a backend every interval and writes Samples to a sink, and the
command's entry point. Heavy modules (bcc, kafka, pydantic schemas) are imported only when
collection starts, so ``osad --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from osad.runtime.config import add_kafka_options, non_negative, option, positive

from .core import Entity, Report, Tracker, select
from .procfs import (CLK_TCK, FALLBACK_COUNTERS, FALLBACK_GAUGES, ProcReader, list_pids, list_tids, read_cgroup,
                     read_counters, read_stat, read_status)
from .targets import GatedProcess, TargetError, TargetSpec

log = logging.getLogger("osad.collector")


# --------------------------------------------------------------------------------------------
# Options

def descendants(pids) -> list[int]:
    """Every living descendant of ``pids`` (from /proc parent links)."""
    children: dict[int, list[int]] = {}
    for p in list_pids():
        st = read_stat(p)
        if st is not None:
            children.setdefault(st.ppid, []).append(p)
    out, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def host_name() -> str:
    """The machine's name. In a container that shares the host's pid namespace (docker-compose.yml),
    /proc/1 is the host's init, so its root's /etc/hostname names the host rather than the container."""
    try:
        if os.stat("/proc/1/ns/uts").st_ino != os.stat("/proc/self/ns/uts").st_ino:
            name = Path("/proc/1/root/etc/hostname").read_text().strip()
            if name:
                return name
    except OSError:
        pass
    return socket.gethostname()


def register_collect(sub) -> None:
    p = sub.add_parser(
        "collect", help="watch processes with eBPF and publish per-process Samples",
        description="Watch processes with eBPF (tracepoints and uprobes, aggregated in kernel maps, drained "
        "every interval) and publish one Sample per process per interval to the samples topic, or record "
        "them to a file. Without eBPF (not root, no bcc, no kernel headers) it samples /proc instead.",
        epilog="Metrics are documented in docs/metrics.md. Examples: osad collect --command 'make -j2' "
        "--follow-children --output jsonl:build.jsonl; osad collect --all --max-processes 50.")
    g = p.add_argument_group("what to watch (exactly one)")
    g.add_argument("--pid", action="append", metavar="PID[,PID...]",
                   help="watch these running processes (repeat, or comma-separate)")
    g.add_argument("--command", metavar='"PROG ARGS"',
                   help="start this command and watch it from its first instruction; stop when it (and, with "
                   "--follow-children, its descendants) has exited")
    g.add_argument("--comm", metavar="REGEX", help="watch every process whose command name (comm) matches REGEX")
    g.add_argument("--all", action="store_true",
                   help="watch every process; each interval reports the --max-processes with most on-CPU time")
    p.add_argument("--follow-children", action="store_true",
                   help="with --pid/--command: also watch processes they start, and theirs")
    p.add_argument("--threads", action="store_true",
                   help="also report each thread (entity id .../t<tid>) with its own counters")
    p.add_argument("--probe", action="append", metavar="BINARY:FUNCTION", default=[],
                   help="count calls of FUNCTION in BINARY (a path, or a library name such as c) and time "
                   "inside it, per process (uprobe + uretprobe); repeatable")
    option(p, "--interval", type=float, default=1.0, check=positive, help="seconds per Sample")
    option(p, "--max-processes", type=int, default=100, check=positive,
           help="at most this many processes per interval (those with most on-CPU time first); with "
           "--threads, at most this many thread Samples too")
    option(p, "--output", default="kafka",
           help="where Samples go: kafka (the samples topic), jsonl:PATH or csv:PATH (PATH - for stdout)")
    option(p, "--duration", type=float, default=0.0, check=non_negative,
           help="stop after this many seconds (0: until interrupted, or until the watched command exits); "
           "a --command still running then is terminated")
    option(p, "--host", default="", help="host name used in entity ids (empty: this host's name; in a container "
           "with the host's pid namespace, the host's, not the container's)")
    p.add_argument("--require-ebpf", action="store_true",
                   help="fail instead of falling back to /proc sampling when eBPF cannot be used")
    add_kafka_options(p)
    p.set_defaults(func=run_collect)


# --------------------------------------------------------------------------------------------
# Configuration and backends

@dataclass
class CollectorConfig:
    targets: TargetSpec
    interval_s: float = 1.0
    per_thread: bool = False
    probes: list = field(default_factory=list)     # [collector.bpf.uprobes.ProbeSpec]
    max_processes: int | None = 100
    require_ebpf: bool = False
    host: str = field(default_factory=socket.gethostname)
    tick_hz: int = 49


class EbpfUnavailable(RuntimeError):
    """eBPF collection cannot run here; the text says why, in one line."""


class EbpfBackend:
    """The BPF metric families, drained into a Tracker."""

    name = "ebpf"

    def __init__(self, cfg: CollectorConfig):
        from .bpf import BpfSettings, FamilyLoadError, has_group_dead, load_families, unavailable_reason
        from .bpf.mem import RSS_KINDS

        reason = unavailable_reason()
        if reason:
            raise EbpfUnavailable(reason)
        settings = BpfSettings(filter=cfg.targets.kernel_filter, follow=cfg.targets.follow_children,
                               per_thread=cfg.per_thread, self_tgid=os.getpid(), tick_hz=cfg.tick_hz,
                               have_group_dead=has_group_dead(), probes=list(cfg.probes))
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
        self.metric_names = counters + gauges + derived
        self.reader = ProcReader()
        self.tracker = Tracker(cfg.host, per_thread=cfg.per_thread, counter_names=counters,
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

    def snapshot(self):
        from .core import Snapshot

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

    def _check_capacity(self, snap) -> None:
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


@dataclass(eq=False)
class _ProcEnt:
    entity: Entity
    prev: dict | None


class ProcfsBackend:
    """The fallback: cumulative counters read from /proc each interval."""

    name = "procfs"

    def __init__(self, cfg: CollectorConfig):
        self.cfg = cfg
        self.metric_names = list(FALLBACK_COUNTERS) + list(FALLBACK_GAUGES)
        self.targets: set[int] = set()
        self.known: dict[tuple[int, int | None], _ProcEnt] = {}
        self.start_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)
        self.self_pid = os.getpid()
        if not cfg.targets.kernel_filter:
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
                e = Entity(self.cfg.host, pid, st.start_ticks, comm=st.comm)
                e.cgroup, e.container_id = read_cgroup(pid)
            else:
                e = Entity(self.cfg.host, pid, parent.start_ticks, tid=tid, parent=parent, comm=st.comm,
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
        spec = self.cfg.targets
        if not spec.kernel_filter:
            return [p for p in list_pids() if p != self.self_pid]
        watched = {p for p in self.targets if read_stat(p) is not None}
        if spec.follow_children:
            children: dict[int, list[int]] = {}
            for p in list_pids():
                st = read_stat(p)
                if st is not None:
                    children.setdefault(st.ppid, []).append(p)
            todo = list(watched)
            while todo:
                for c in children.get(todo.pop(), ()):
                    if c not in watched:
                        watched.add(c)
                        todo.append(c)
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
            if self.cfg.per_thread:
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

    def events_since_last(self) -> int:
        return 0

    def watching(self) -> bool:
        return bool(self.targets)

    def describe_entity(self, r: Report) -> None:
        r.entity.described = True

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The collector

class Collector:
    """Drains a backend every interval and writes Samples to a sink.

    >>> # c = Collector(CollectorConfig(targets=TargetSpec(all=True)), sink=MemorySink()); c.start()
    >>> # samples = c.collect_once()
    """

    def __init__(self, cfg: CollectorConfig, sink=None):
        self.cfg = cfg
        self.sink = sink
        self.backend = None
        self.fallback_reason: str | None = None
        self.drain = -1
        self.intervals = 0
        self.samples_out = 0
        self.events_total = 0
        self.last_events = 0
        self._last = 0.0
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._stop = threading.Event()
        self.children: list = []
        self.on_interval = None  # called after each interval with the Samples

    # ---- setup ----------------------------------------------------------------------------
    def start(self) -> "Collector":
        try:
            self.backend = EbpfBackend(self.cfg)
            for w in self.backend.warnings:
                log.warning("%s", w)
        except EbpfUnavailable as e:
            self.fallback_reason = str(e)
            if self.cfg.require_ebpf:
                raise
            log.warning("eBPF unavailable: %s; falling back to /proc sampling (syscall, socket, fork/exec, "
                        "signal and probe metrics are absent)", e)
            if self.cfg.probes:
                log.warning("--probe needs eBPF; no probe metrics will be collected")
            self.backend = ProcfsBackend(self.cfg)
        for pid in self.cfg.targets.pids:
            if self.backend.add_target(pid) is None:
                raise TargetError(f"--pid {pid}: the process exited before it could be watched")
        if self.cfg.targets.follow_children:  # children that exist already (new ones are followed as they fork)
            for pid in descendants(self.cfg.targets.pids):
                self.backend.add_target(pid)
        self.prime()
        return self

    def prime(self) -> None:
        """Start the first interval now: counting began when the first program was attached (or
        setup took a while), so drain and drop what was counted until now."""
        self.backend.poll()
        self._last = self._t0 = time.monotonic()
        self._cpu0 = _own_cpu()
        self.backend.events_since_last()

    @property
    def metric_names(self) -> list[str]:
        return list(self.backend.metric_names)

    def spawn(self, argv: list[str], **popen_kw):
        """Start ``argv`` and watch it from its first instruction; returns its Popen."""
        gp = GatedProcess(argv, **popen_kw)
        try:
            self.backend.add_target(gp.pid)
        finally:
            gp.release()
        self.children.append(gp.popen)
        return gp.popen

    def watch(self, pid: int) -> Entity | None:
        return self.backend.add_target(pid)

    # ---- one interval ---------------------------------------------------------------------
    def collect_once(self) -> list:
        """Drain the backend now: the Samples of the interval that just ended (also written to the sink)."""
        from osad.schemas import Sample

        now = time.monotonic()
        interval, self._last = max(now - self._last, 1e-6), now
        ts = time.time()
        reports = self.backend.poll()
        self.drain += 1
        self.intervals += 1
        self.last_events = self.backend.events_since_last()
        self.events_total += self.last_events
        spec = self.cfg.targets
        if spec.comm is not None:
            for r in reports:
                if r.entity.tid is None:
                    self.backend.describe_entity(r)
        chosen = select(reports, max_entities=self.cfg.max_processes, comm_filter=spec.comm)
        samples = []
        for r in chosen:
            self.backend.describe_entity(r)
            e = r.entity
            if e.first_drain is None:
                e.first_drain = self.drain
            samples.append(Sample(
                entity_id=e.entity_id, host=e.host, pid=e.pid, comm=(e.comm or "")[:255],
                cgroup=e.cgroup, container_id=e.container_id, ts=ts, interval_s=interval,
                seq=self.drain - e.first_drain, metrics={k: float(v) for k, v in r.metrics.items()}))
        if self.sink is not None and samples:
            self.sink.write(samples)
            self.sink.flush()
        self.samples_out += len(samples)
        if self.on_interval is not None:
            self.on_interval(samples)
        log.debug("interval %d: %d reports, %d samples, %d kernel events", self.drain, len(reports),
                  len(samples), self.last_events)
        return samples

    def done(self) -> bool:
        """Target mode: every watched process has exited (and been reported)."""
        for c in self.children:
            c.poll()  # reap
        return self.cfg.targets.kernel_filter and not self.backend.watching()

    def stop(self, *_a) -> None:
        self._stop.set()

    def run(self, duration_s: float = 0.0) -> None:
        """Collect every interval until stopped, past ``duration_s`` (0: no limit), or, watching
        targets, until all of them have exited."""
        iv = self.cfg.interval_s
        deadline = self._t0 + duration_s if duration_s else None
        next_t = self._last + iv
        while True:
            wake = next_t if deadline is None else min(next_t, deadline)
            self._stop.wait(max(0.0, wake - time.monotonic()))
            self.collect_once()
            now = time.monotonic()
            next_t += iv
            if next_t <= now:
                next_t = now + iv
            if self._stop.is_set() or (deadline is not None and now >= deadline - 1e-3) or self.done():
                break

    def summary(self) -> str:
        wall = max(time.monotonic() - self._t0, 1e-9)
        cpu = _own_cpu() - self._cpu0
        rate = f", {self.events_total} kernel events ({self.events_total / wall:.0f}/s)" \
            if self.backend and self.backend.name == "ebpf" else ""
        return (f"collector stopped: {self.intervals} intervals in {wall:.1f} s, {self.samples_out} samples"
                f"{rate}, own CPU {cpu:.2f} s ({100 * cpu / wall:.2f}% of one CPU)")

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        if self.sink is not None:
            self.sink.close()


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------------
# Entry point

def run_collect(args: argparse.Namespace) -> int:
    from osad.runtime.config import apply_common

    from . import targets as tmod
    from .sinks import SinkError, open_sink, parse_output

    apply_common(args)
    try:
        spec = tmod.build(pids=args.pid, command=args.command, comm=args.comm, all_=args.all,
                          follow_children=args.follow_children)
        parse_output(args.output)
        probes = _parse_probes(args.probe)
    except (TargetError, SinkError, ValueError) as e:
        log.error("%s", e)
        return 2
    if args.follow_children and not spec.kernel_filter:
        log.warning("--follow-children applies to --pid/--command only; ignored")
    cfg = CollectorConfig(targets=spec, interval_s=args.interval, per_thread=args.threads, probes=probes,
                          max_processes=args.max_processes, require_ebpf=args.require_ebpf, host=args.host or host_name())
    c = Collector(cfg)
    try:
        c.start()
    except EbpfUnavailable as e:
        log.error("eBPF unavailable: %s (--require-ebpf given, so not falling back to /proc)", e)
        return 1
    except TargetError as e:
        log.error("%s", e)
        c.close()
        return 2
    status = None
    try:
        c.sink = open_sink(args.output, bootstrap=args.bootstrap, prefix=args.topic_prefix, metric_names=c.metric_names)
        if args.metrics_port:
            status = _serve_status(c, args.metrics_port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, c.stop)
        c.prime()  # opening the output (a broker connection) took time: the first interval starts now
        if spec.command:
            c.spawn(spec.command)
        log.info("collecting %s with %s every %g s -> %s", spec.describe(), c.backend.describe(), cfg.interval_s,
                 args.output)
        c.run(args.duration)
    except Exception as e:
        log.error("collector failed: %s", e)
        return 1
    finally:
        for ch in c.children:  # a --command still running when collection stops is stopped too
            if ch.poll() is None:
                ch.terminate()
                try:
                    ch.wait(5)
                except subprocess.TimeoutExpired:
                    ch.kill()
        log.info("%s", c.summary())
        if status is not None:
            status.stop()
        try:
            c.close()
        except Exception as e:  # a broker gone at shutdown must not hide the summary
            log.error("closing the output failed: %s", e)
    return 0


def _parse_probes(values: list[str]) -> list:
    if not values:
        return []
    from .bpf.uprobes import ProbeSpec

    return [ProbeSpec.parse(v) for v in values]


def _serve_status(c: Collector, port: int):
    from osad.runtime.http import StatusServer
    from osad.runtime.metrics import ServiceMetrics

    m = ServiceMetrics("collector")
    samples = m.counter("osad_collector_samples", "Samples published")
    events = m.gauge("osad_collector_kernel_events_per_interval", "Kernel events handled in the last interval")

    def on_interval(out):
        samples.inc(len(out))
        events.set(c.last_events)

    c.on_interval = on_interval

    def health():
        return True, {"service": "collector", "status": "ok", "backend": c.backend.name, "intervals": c.intervals, "samples": c.samples_out,
                      "fallback_reason": c.fallback_reason}

    srv = StatusServer(port, m, health).start()
    return srv
