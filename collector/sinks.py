"""Where Samples go: the samples topic (default), or a JSONL or CSV file for recording without Kafka.

``--output kafka`` | ``jsonl:PATH`` | ``csv:PATH`` (PATH ``-`` is standard output).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from typing import Iterable

log = logging.getLogger("osad.collector")

CSV_BASE = ("entity_id", "host", "pid", "comm", "cgroup", "container_id", "ts", "interval_s", "seq")


class SinkError(ValueError):
    """The --output value is wrong."""


def parse_output(spec: str) -> tuple[str, str | None]:
    kind, sep, path = spec.partition(":")
    if kind == "kafka" and not sep:
        return "kafka", None
    if kind in ("jsonl", "csv") and sep and path:
        return kind, path
    raise SinkError(f"--output {spec!r}: use kafka, jsonl:PATH or csv:PATH (PATH - for standard output)")


class Sink:
    def write(self, samples: list) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class KafkaSink(Sink):
    """Publishes to the samples topic, keyed by entity id; flush() waits for the broker's acks."""

    def __init__(self, bootstrap: str, client_id: str = "osad-collector", publisher=None, prefix: str = ""):
        from osad.runtime.kafka import Publisher, ensure_topics
        from osad.schemas import SAMPLES

        self.topic = SAMPLES
        if publisher is None:
            ensure_topics(bootstrap, (SAMPLES,), prefix=prefix)
            publisher = Publisher(bootstrap, client_id, prefix=prefix)
        self.pub = publisher

    def write(self, samples: list) -> None:
        for s in samples:
            self.pub.publish(self.topic, s)

    def flush(self) -> None:
        self.pub.flush()

    def close(self) -> None:
        self.pub.close()


class _FileSink(Sink):
    def __init__(self, path: str, newline: str | None = None):
        if path == "-":
            self.f, self._own = sys.stdout, False
        else:
            self.f, self._own = open(path, "w", encoding="utf-8", newline=newline), True

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        if self._own:
            self.f.close()


class JsonlSink(_FileSink):
    """One Sample per line, as on the wire (schemas.encode)."""

    def write(self, samples: list) -> None:
        from osad.schemas import encode

        for s in samples:
            self.f.write(encode(s).decode())
            self.f.write("\n")


class CsvSink(_FileSink):
    """One row per Sample; a column per metric (empty where a metric is absent)."""

    def __init__(self, path: str, metric_names: Iterable[str]):
        super().__init__(path, newline="")
        self.metrics = list(dict.fromkeys(metric_names))
        self.w = csv.writer(self.f)
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


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def open_sink(spec: str, *, bootstrap: str = "", prefix: str = "", metric_names: Iterable[str] = ()) -> Sink:
    kind, path = parse_output(spec)
    if kind == "kafka":
        return KafkaSink(bootstrap, prefix=prefix)
    if kind == "jsonl":
        return JsonlSink(path)
    return CsvSink(path, metric_names)


def read_csv(text: str) -> list[dict]:
    """Rows of a CSV recording as dicts (for tests and quick looks)."""
    return list(csv.DictReader(io.StringIO(text)))


class MemorySink(Sink):
    """Keeps Samples in a list (for embedding the collector, and for tests)."""

    def __init__(self):
        self.samples: list = []

    def write(self, samples: list) -> None:
        self.samples.extend(samples)
