"""The collector's sampling loop: targets -> backend -> Samples -> sink, once per interval.

:class:`Collector` picks the backend (eBPF, or /proc where eBPF cannot run), adds the targets,
and every ``interval_s`` drains the backend, chooses what to report (``core.select``) and writes
one Sample per entity to its sink. It reads its settings from a :class:`CollectorConfig`.

Example (embedding; ``start`` loads the BPF programs, or falls back to /proc)::

    >>> from osad.collector.sinks import MemorySink
    >>> c = Collector(CollectorConfig(), TargetSpec(only_added=True), sink=MemorySink())  # doctest: +SKIP
    >>> proc = c.start().spawn(["sleep", "1"]); samples = c.collect_once()               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import time

from osad.runtime.sinks import Sink
from osad.schemas import Sample

from .backend import Backend
from .config import CollectorConfig
from .core import Entity, select
from .ebpf_backend import EbpfBackend, EbpfUnavailable
from .procfs import PROCESS_GAUGES, descendants, host_name, read_process_gauges
from .procfs_backend import ProcfsBackend
from .targets import GatedProcess, TargetError, TargetSpec

log = logging.getLogger("osad.collector")


class Collector:
    """Drains a backend every interval and writes Samples to a sink.

    ``targets``: what to watch (``TargetConfig.spec()``, or ``TargetSpec(only_added=True)`` to watch
    only what :meth:`watch` and :meth:`spawn` add). ``on_interval``, if set, is called after each
    interval with its Samples."""

    def __init__(self, cfg: CollectorConfig, targets: TargetSpec, sink: Sink | None = None):
        self.cfg = cfg
        self.targets = targets
        self.host = cfg.host or host_name()
        self.sink = sink
        self.backend: Backend | None = None
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
        self.on_interval = None
        self.traces = None  # a TraceWriter with --trace

    # ---- setup ----------------------------------------------------------------------------
    def start(self) -> "Collector":
        """Open the backend, watch the --pid targets (and their children), start the first interval.
        Raises EbpfUnavailable (with --require-ebpf) or TargetError (a --pid exited meanwhile)."""
        self.backend = self._open_backend()
        if self.cfg.traces and hasattr(self.backend, "drain_traces"):
            from .traces import TraceWriter

            self.traces = TraceWriter(self.cfg.trace_output.partition(":")[2], self.cfg.traces, self.host)
        for w in self.backend.warnings:
            log.warning("%s", w)
        for pid in self.targets.pids:
            if self.backend.add_target(pid) is None:
                raise TargetError(f"--pid {pid}: the process exited before it could be watched")
        if self.targets.follow_children:  # children that exist already (new ones are followed as they fork)
            for pid in descendants(self.targets.pids):
                self.backend.add_target(pid)
        self.prime()
        return self

    def _open_backend(self) -> Backend:
        cfg = self.cfg
        try:
            return EbpfBackend(self.targets, host=self.host, per_thread=cfg.per_thread, probes=cfg.probes,
                               heap=cfg.heap, traces=cfg.traces, trace_rate=cfg.trace_rate)
        except EbpfUnavailable as e:
            self.fallback_reason = str(e)
            if cfg.require_ebpf:
                raise
            log.warning("eBPF unavailable: %s; falling back to /proc sampling (syscall, socket, fork/exec, "
                        "signal and probe metrics are absent)", e)
            if cfg.probes:
                log.warning("--probe needs eBPF; no probe metrics will be collected")
            if cfg.heap:
                log.warning("--heap needs eBPF; no heap metrics will be collected")
            if cfg.traces:
                log.warning("--trace needs eBPF; no trace messages will be written")
            return ProcfsBackend(self.targets, host=self.host, per_thread=cfg.per_thread)

    def prime(self) -> None:
        """Start the first interval now: counting began when the first program was attached (or
        setup took a while), so drain and drop what was counted until now."""
        self.backend.poll()
        self._last = self._t0 = time.monotonic()
        self._cpu0 = _own_cpu()
        self.backend.events_since_last()

    @property
    def metric_names(self) -> list[str]:
        return list(self.backend.metric_names) + list(PROCESS_GAUGES)

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
    def collect_once(self) -> list[Sample]:
        """Drain the backend now: the Samples of the interval that just ended (also written to the sink)."""
        now = time.monotonic()
        interval, self._last = max(now - self._last, 1e-6), now
        ts = time.time()
        reports = self.backend.poll()
        if self.traces is not None:
            self.traces.write(*self.backend.drain_traces())
        self.drain += 1
        self.intervals += 1
        self.last_events = self.backend.events_since_last()
        self.events_total += self.last_events
        for r in reports:  # every report, chosen or not, so that the sum misses no interval
            if "heap_alloc_bytes" in r.metrics:
                e = r.entity
                e.heap_outstanding += r.metrics["heap_alloc_bytes"] - r.metrics["heap_free_bytes"]
                r.metrics["heap_outstanding_bytes"] = float(e.heap_outstanding)
        comm = self.targets.comm
        if comm is not None:
            for r in reports:
                if r.entity.tid is None:
                    self.backend.describe_entity(r)
        chosen = select(reports, max_entities=self.cfg.max_processes, comm_filter=comm)
        samples = []
        for r in chosen:
            self.backend.describe_entity(r)
            e = r.entity
            if e.tid is None:
                _process_gauges(r)
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
        return self.targets.kernel_filter and not self.backend.watching()

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
        if self.traces is not None:
            self.traces.write(*self.backend.drain_traces())
            self.traces.close()
        if self.backend is not None:
            self.backend.close()
        if self.sink is not None:
            self.sink.close()


def _process_gauges(r) -> None:
    """Add the /proc gauges of a process Sample (procfs.read_process_gauges); an exited process keeps its last."""
    e = r.entity
    got = None if r.final else read_process_gauges(e.pid)
    if got is not None:
        e.proc_gauges = got
    r.metrics.update(e.proc_gauges or {})


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system
