"""Topic names and which message type each carries: declared once, here.

Names can be prefixed (``--topic-prefix``) so several osad installations share one cluster; the prefix
is passed explicitly to whatever names a topic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from .messages import Anomaly, Sample, Score, SignatureWindow


@dataclass(frozen=True)
class Topic:
    name: str
    model: type[BaseModel] | None  # None: raw bytes (dead letters)
    default_partitions: int
    doc: str

    def full_name(self, prefix: str = "") -> str:
        return (prefix or "") + self.name


SAMPLES = Topic("osad.samples", Sample, 12, "One Sample per process per interval (collector, replay).")
SIGNATURES = Topic("osad.signatures", SignatureWindow, 12, "SignatureWindows (featurizer).")
SCORES = Topic("osad.scores", Score, 12, "One Score per window per model (detector).")
ANOMALIES = Topic("osad.anomalies", Anomaly, 6, "Incidents, JSON (alerter). Subscribe here.")
DEADLETTER = Topic(
    "osad.deadletter", None, 1,
    "Messages a service could not decode, validate or process: the original key and bytes, with "
    "headers osad.reason, osad.source_topic, osad.source_partition, osad.source_offset, osad.service.",
)

ALL = (SAMPLES, SIGNATURES, SCORES, ANOMALIES, DEADLETTER)


def by_name(name: str, prefix: str = "") -> Topic:
    for t in ALL:
        if t.name == name or t.full_name(prefix) == name:
            return t
    raise KeyError(f"unknown topic {name!r}; known: {', '.join(t.name for t in ALL)}")
