"""Prometheus metrics of one service, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        lab = {"service": service}
        self.messages_in = Counter("osad_messages_in", "Input messages read", ["service"],
                                   registry=self.registry).labels(**lab)
        self.messages_out = _Bound(Counter("osad_messages_out", "Output messages produced", ["service", "topic"],
                                           registry=self.registry), lab)
        self.errors = _Bound(Counter("osad_errors", "Errors by kind (decode, process, publish)", ["service", "kind"],
                                     registry=self.registry), lab)
        self.dead_letters = Counter("osad_dead_letters", "Messages sent to the dead-letter topic", ["service"],
                                    registry=self.registry).labels(**lab)
        self.commits = Counter("osad_offset_commits", "Offset commits", ["service"], registry=self.registry).labels(**lab)
        self.latency = Histogram("osad_processing_seconds", "Processing time per input message (one observation per poll: batch time / batch size)", ["service"],
                                 buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10),
                                 registry=self.registry).labels(**lab)
        self.lag = _Bound(Gauge("osad_consumer_lag", "Messages behind the partition's high watermark",
                                ["service", "partition"], registry=self.registry), lab)
        self.assigned = Gauge("osad_assigned_partitions", "Input partitions assigned to this replica", ["service"],
                              registry=self.registry).labels(**lab)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        c = Counter(name, doc, ["service", *labels], registry=self.registry)
        return _Bound(c, {"service": self.service}) if labels else c.labels(service=self.service)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        g = Gauge(name, doc, ["service", *labels], registry=self.registry)
        return _Bound(g, {"service": self.service}) if labels else g.labels(service=self.service)

    def histogram(self, name: str, doc: str, buckets, labels: tuple[str, ...] = ()):
        h = Histogram(name, doc, ["service", *labels], buckets=buckets, registry=self.registry)
        return _Bound(h, {"service": self.service}) if labels else h.labels(service=self.service)

    def add_collector(self, collector) -> None:
        """Register a custom collector (``collect()`` yields metric families, e.g. rendered from a transform's
        state at scrape time, so a series exists exactly as long as the state it shows)."""
        self.registry.register(collector)


class _Bound:
    """A labelled metric with the service label already filled in."""

    def __init__(self, metric, fixed: dict):
        self.metric, self.fixed = metric, fixed
        self._extra = [n for n in metric._labelnames if n not in fixed]

    def labels(self, *values, **kw):
        kw.update(zip(self._extra, values))
        return self.metric.labels(**self.fixed, **kw)

    def remove_if_present(self, *values):
        try:
            self.metric.remove(*self.fixed.values(), *values)
        except KeyError:
            pass
