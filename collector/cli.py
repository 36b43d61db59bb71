"""Subcommands of the collector package: ``osad replay`` (benchmark data, ``replay.py``) and
``osad collect`` (eBPF, or /proc where eBPF cannot run).

``osad collect`` here is the shell around the sampling loop: its options come from
:class:`~osad.collector.config.CollectorConfig`; it checks the targets and the output, starts the
loop (``loop.py``), serves /metrics and /healthz, and stops a --command it started. The loop, the
backends and the sinks are imported only when collection starts, so ``osad --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess

from osad.runtime.config import setup_logging

from .config import CollectorConfig
from .replay import register_replay
from .targets import TargetError

log = logging.getLogger("osad.collector")


def register(sub) -> None:
    register_replay(sub)
    register_collect(sub)


def register_collect(sub) -> None:
    CollectorConfig.add_command(
        sub,
        "collect",
        run_collect,
        exclude=("group",),
        epilog="Metrics are documented in docs/metrics.md. Examples: osad collect --command 'make -j2' "
        "--follow-children --output jsonl:build.jsonl; osad collect --all --max-processes 50.",
    )


def run_collect(args: argparse.Namespace) -> int:
    from .ebpf_backend import EbpfUnavailable
    from .loop import Collector
    from .sinks import SinkError, open_sink, parse_output

    cfg = CollectorConfig.from_args(args)
    setup_logging(cfg.service.log_level)
    try:
        spec = cfg.targets.spec()
        parse_output(cfg.output)
    except (TargetError, SinkError) as e:
        log.error("%s", e)
        return 2
    if spec.follow_children and not spec.kernel_filter:
        log.warning("--follow-children applies to --pid/--command only; ignored")
    c = Collector(cfg, spec)
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
        c.sink = open_sink(cfg.output, bootstrap=cfg.kafka.bootstrap, prefix=cfg.kafka.topic_prefix,
                           metric_names=c.metric_names, security=cfg.kafka.security, buffer_mb=cfg.buffer_mb)
        if cfg.service.metrics_port:
            status = _serve_status(c, cfg.service)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, c.stop)
        c.prime()  # opening the output (a broker connection) took time: the first interval starts now
        if spec.command:
            c.spawn(spec.command)
        log.info("collecting %s with %s every %g s -> %s", spec.describe(), c.backend.describe(), cfg.interval_s,
                 cfg.output)
        c.run(cfg.duration_s)
    except Exception as e:
        log.error("collector failed: %s", e)
        return 1
    finally:
        _stop_children(c)
        if status is not None:
            status.stop()
        try:
            c.close()
        except Exception as e:  # a broker gone at shutdown must not hide the summary
            log.error("closing the output failed: %s", e)
        log.info("%s", c.summary())
        if c.sink is not None and c.sink.name == "kafka":
            n = c.sink.counts
            log.info("samples delivered to Kafka: %d; dropped: %d (buffer full), %d (refused by the broker), %d "
                     "(undelivered at exit)", n["sent"], n["dropped_buffer_full"], n["dropped_rejected"],
                     n["dropped_at_exit"])
    return 0


def _stop_children(c) -> None:
    """A --command still running when collection stops is stopped too."""
    for ch in c.children:
        if ch.poll() is None:
            ch.terminate()
            try:
                ch.wait(5)
            except subprocess.TimeoutExpired:
                ch.kill()


def _serve_status(c, service):
    """/metrics (Samples published, kernel events per interval) and /healthz on the service's metrics port."""
    from osad.runtime.http import StatusServer
    from osad.runtime.metrics import ServiceMetrics

    m = ServiceMetrics("collector")
    samples = m.counter("osad_collector_samples", "Samples made (handed to the output)")
    events = m.gauge("osad_collector_kernel_events_per_interval", "Kernel events handled in the last interval")
    sender = getattr(c.sink, "sender", None)  # --output kafka
    if sender is not None:
        delivered = m.counter("osad_collector_samples_delivered", "Samples the broker acknowledged")
        dropped = m.counter("osad_collector_samples_dropped", "Samples lost: buffer_full (the broker was away too "
                            "long for --buffer-mb), rejected (refused by the broker), at_exit", ("reason",))
        buffered = m.gauge("osad_collector_buffered_samples", "Samples waiting for the broker's acknowledgement")
        buffered_bytes = m.gauge("osad_collector_buffered_bytes", "Memory those Samples take")
        outage = m.gauge("osad_collector_broker_outage_seconds", "How long the oldest waiting Sample has waited, "
                         "once over 5 s (0: the broker acknowledges)")
        for reason in ("buffer_full", "rejected", "at_exit"):
            dropped.labels(reason)
    seen: dict[str, float] = {}

    def export() -> None:
        if sender is None:
            return
        for key, metric in (("sent", delivered), ("dropped_buffer_full", dropped.labels("buffer_full")),
                            ("dropped_rejected", dropped.labels("rejected")),
                            ("dropped_at_exit", dropped.labels("at_exit"))):
            d = sender.counts[key] - seen.get(key, 0)
            if d:
                metric.inc(d)
                seen[key] = sender.counts[key]
        buffered.set(sender.buffered)
        buffered_bytes.set(sender.buffered_bytes)
        outage.set(sender.outage_s)

    def on_interval(out):
        samples.inc(len(out))
        events.set(c.last_events)
        export()

    c.on_interval = on_interval

    def health():
        info = {"service": "collector", "status": "ok", "backend": c.backend.name, "intervals": c.intervals,
                "samples": c.samples_out, "fallback_reason": c.fallback_reason}
        if sender is not None:  # collecting goes on during an outage: healthy, and says what waits
            info.update(buffered=sender.buffered, broker_outage_s=round(sender.outage_s, 1),
                        dropped=sum(v for k, v in sender.counts.items() if k.startswith("dropped")))
        return True, info

    return StatusServer(service.metrics_port, m, health, span=service.metrics_port_span,
                        port_file=service.metrics_port_file or None).start()
