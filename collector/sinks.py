"""Where Samples go: the samples topic (default), or a JSONL or CSV file for recording without Kafka.

``--output kafka`` | ``jsonl:PATH`` | ``csv:PATH`` (PATH ``-`` is standard output). Every sink is
an :class:`osad.runtime.sinks.Sink` (``write`` a list of Samples, ``flush``, ``close``, ``counts``);
JSONL is the shared :class:`~osad.runtime.sinks.JsonlSink` (one encoded Sample per line).
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Iterable

from osad.runtime.sinks import FileSink, JsonlSink, Sink, SinkError

log = logging.getLogger("osad.collector")

CSV_BASE = ("entity_id", "host", "pid", "comm", "cgroup", "container_id", "ts", "interval_s", "seq")

__all__ = ["CSV_BASE", "CsvSink", "JsonlSink", "KafkaSink", "MemorySink", "Sink", "SinkError", "open_sink",
           "parse_output", "read_csv"]


def parse_output(spec: str) -> tuple[str, str | None]:
    """``(kind, path)`` of an --output value; SinkError saying the accepted forms if it is none."""
    kind, sep, path = spec.partition(":")
    if kind == "kafka" and not sep:
        return "kafka", None
    if kind in ("jsonl", "csv") and sep and path:
        return kind, path
    raise SinkError(f"--output {spec!r}: use kafka, jsonl:PATH or csv:PATH (PATH - for standard output)")


class KafkaSink(Sink):
    """Publishes to the samples topic, keyed by entity id, from a sender thread
    (:class:`~osad.runtime.kafka.BufferedSender`): sampling never waits for Kafka. While the broker is
    unreachable (or not up yet) Samples wait in memory, in order, up to ``buffer_mb``; past that the oldest are
    dropped and counted. ``counts``: ``sent`` (acknowledged), ``dropped_buffer_full``, ``dropped_at_exit``,
    ``dropped_rejected``."""

    name = "kafka"

    def __init__(self, bootstrap: str, client_id: str = "osad-collector", prefix: str = "", security=None,
                 buffer_mb: float = 64.0, sender=None):
        from osad.runtime.kafka import BufferedSender, ensure_topics  # kafka stays out of `osad --help`
        from osad.schemas import SAMPLES

        super().__init__()
        self.topic = SAMPLES
        self.sender = sender or BufferedSender(
            bootstrap, client_id, SAMPLES.full_name(prefix), security=security, buffer_bytes=int(buffer_mb * 2**20),
            ensure=lambda: ensure_topics(bootstrap, (SAMPLES,), prefix=prefix, security=security,
                                         connect_timeout_s=5.0))
        self.counts = self.sender.counts  # one set of counts: the sender's

    def write(self, samples: list) -> None:
        from osad.schemas import encode

        for s in samples:
            self.sender.send(s.entity_id.encode(), encode(s))

    def flush(self) -> None:
        """Nothing to wait for: the sender thread delivers (see :meth:`wait_delivered`)."""

    def wait_delivered(self, timeout_s: float = 30.0) -> bool:
        """Wait until every Sample written so far is acknowledged by the broker; False on timeout."""
        return self.sender.wait_empty(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.sender.close(timeout_s)


class CsvSink(FileSink):
    """One row per Sample; a column per metric (empty where a metric is absent)."""

    def __init__(self, path: str, metric_names: Iterable[str]):
        super().__init__(path, "csv", binary=False, newline="", what="--output csv:")
        self.metrics = list(dict.fromkeys(metric_names))
        self.w = csv.writer(self.fh)
        self.w.writerow(list(CSV_BASE) + self.metrics)
        self._warned: set[str] = set()

    def write(self, samples: list) -> None:
        for s in samples:
            extra = set(s.metrics) - set(self.metrics) - self._warned
            if extra:
                log.warning("csv output: metrics %s were not known when the header was written; not recorded",
                            ", ".join(sorted(extra)))
                self._warned |= extra
            row = [s.entity_id, s.host, s.pid, s.comm, s.cgroup or "", s.container_id or "",
                   f"{s.ts:.6f}", f"{s.interval_s:.6f}", s.seq]
            row += [_num(s.metrics[m]) if m in s.metrics else "" for m in self.metrics]
            self.w.writerow(row)
        self.counts["sent"] += len(samples)



def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def open_sink(spec: str, *, bootstrap: str = "", prefix: str = "", metric_names: Iterable[str] = (),
              security=None, buffer_mb: float = 64.0) -> Sink:
    """The sink an --output value names (``metric_names``: the CSV columns; ``security``: the Kafka
    connection's TLS / SASL, a ``KafkaSecurity``)."""
    kind, path = parse_output(spec)
    if kind == "kafka":
        return KafkaSink(bootstrap, prefix=prefix, security=security, buffer_mb=buffer_mb)
    if kind == "jsonl":
        return JsonlSink(path)
    return CsvSink(path, metric_names)


def read_csv(text: str) -> list[dict]:
    """Rows of a CSV recording as dicts (for tests and quick looks)."""
    return list(csv.DictReader(io.StringIO(text)))


class MemorySink(Sink):
    """Keeps Samples in a list (for embedding the collector, and for tests)."""

    name = "memory"

    def __init__(self):
        super().__init__()
        self.samples: list = []

    def write(self, samples: list) -> None:
        self.samples.extend(samples)
        self.counts["sent"] += len(samples)
