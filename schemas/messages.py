"""Pydantic v2 models for every message that crosses a topic.

Each message carries ``schema_version``; a consumer rejects (dead-letters) a message whose
major version it does not know. Field names say what and in which unit.

Entity ids: ``entity_id`` is stable for one process for its whole life and never reused by
another process that later gets the same pid. The collector builds it as
``{host}/{pid}@{start_time_ticks}`` (start time from /proc/<pid>/stat, which differs for a
reused pid); replayed benchmark data uses ``{dataset}/{entity}``. Every topic is keyed by
``entity_id`` so one entity's messages stay ordered on one partition.
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .triangles import pack_symmetric, unpack_symmetric

SCHEMA_VERSION = 1


#: An anomaly's severity, least to most severe (the alerter maps score/threshold ratios onto it).
Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[str, ...] = typing.get_args(Severity)


def severity_rank(severity: str) -> int:
    """0 for low ... 3 for critical.

    >>> severity_rank("low"), severity_rank("critical")
    (0, 3)
    """
    return SEVERITIES.index(severity)


class _Msg(BaseModel):
    # allow_inf_nan=False: NaN and infinity are rejected in every float field (JSON has no such numbers;
    # pydantic would otherwise accept the NaN/Infinity tokens and write them back as null)
    model_config = ConfigDict(extra="forbid", frozen=False, arbitrary_types_allowed=True, allow_inf_nan=False)
    schema_version: int = Field(SCHEMA_VERSION, description="Message schema version.")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported by this osad (speaks {SCHEMA_VERSION}); "
                "upgrade the consumer or the producer so both speak the same version"
            )
        return v


class EntityRef(_Msg):
    """Who a message is about."""

    entity_id: str = Field(..., min_length=1, max_length=512, description="Stable entity id (message key).")
    host: str = Field(..., min_length=1, max_length=255)
    pid: int | None = Field(None, ge=0, description="Process id; None for replayed data.")
    comm: str = Field("", max_length=255, description="Command name (/proc/<pid>/comm).")
    cgroup: str | None = Field(None, max_length=1024)
    container_id: str | None = Field(None, max_length=128)


class Sample(EntityRef):
    """One process's metrics over one interval: the collector's (and replay's) output."""

    kind: Literal["sample"] = "sample"
    ts: float = Field(..., description="End of the interval, Unix seconds.")
    interval_s: float = Field(..., gt=0, description="Length of the interval in seconds.")
    seq: int = Field(..., ge=0, description="Per-entity sample number: consecutive intervals differ by 1.")
    metrics: dict[str, float] = Field(
        ..., description="Metric name (with unit, e.g. on_cpu_ns, rss_anon_bytes) -> value. "
        "A metric that could not be measured is absent, never a fake zero."
    )

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for name, x in v.items():
            if not math.isfinite(x):
                raise ValueError(f"metric {name!r} is {x}; leave a metric out instead of sending NaN/inf")
        return v


class WindowHeader(EntityRef):
    """Every field of a SignatureWindow except its arrays (the JSON header of its binary frame)."""

    kind: Literal["signature_window"] = "signature_window"
    window_end_ts: float
    window_end_seq: int = Field(..., ge=0)
    interval_s: float = Field(..., gt=0)
    gap: int = Field(..., ge=1)
    scales: list[Annotated[int, Field(ge=1)]] = Field(..., min_length=1)
    features: list[str] = Field(..., min_length=1, description="Feature names, in matrix order.")
    scaling_id: str = Field("", description="Id of the min-max ranges used, for matching checkpoints.")


class SignatureWindow(WindowHeader):
    """MSCRED's input for one entity at one time: ``step`` signature tensors plus the raw window.

    ``signatures[k, s]`` is the N x N signature matrix at scale ``scales[s]`` ending at
    sample ``window_end_seq - (step - 1 - k) * gap``: M_ij = (1/w) sum_{d<w} x_i(t-d) x_j(t-d)
    over min-max scaled values. The matrices are symmetric, so the message holds their upper
    triangles (diagonal included, numpy.triu_indices order) in ``tri``; ``signatures`` gives the
    full matrices. ``values`` is the last ``max(scales)`` scaled samples (rows oldest first), for
    scorers that work on the series itself (compressed sensing). A window may be built from full
    matrices too: ``SignatureWindow(..., signatures=full, values=...)``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    tri: np.ndarray = Field(..., description="float32 [step, S, N(N+1)/2]: upper triangles of the signature matrices.")
    values: np.ndarray = Field(..., description="float32 [max(scales), N], scaled, oldest row first.")

    @property
    def step(self) -> int:
        return int(self.tri.shape[0])

    @property
    def signatures(self) -> np.ndarray:
        """float32 [step, S, N, N], the full symmetric matrices."""
        return unpack_symmetric(self.tri, len(self.features))

    @model_validator(mode="before")
    @classmethod
    def _from_full(cls, data):
        if isinstance(data, dict) and "signatures" in data and "tri" not in data:
            data = dict(data)
            full = np.asarray(data.pop("signatures"), dtype=np.float32)
            if full.ndim != 4 or full.shape[-1] != full.shape[-2]:
                raise ValueError(f"signatures has shape {full.shape}, expected [step, S, N, N]")
            data["tri"] = pack_symmetric(full)
        return data

    @model_validator(mode="after")
    def _shapes(self) -> "SignatureWindow":
        n, s = len(self.features), len(self.scales)
        tri = np.asarray(self.tri, dtype=np.float32)
        val = np.asarray(self.values, dtype=np.float32)
        if tri.ndim != 3 or tri.shape[1:] != (s, n * (n + 1) // 2):
            raise ValueError(f"tri has shape {tri.shape}, expected [step, {s}, {n * (n + 1) // 2}] for {n} features")
        if val.shape != (max(self.scales), n):
            raise ValueError(f"values has shape {val.shape}, expected [{max(self.scales)}, {n}]")
        if not (np.isfinite(tri).all() and np.isfinite(val).all()):
            raise ValueError("tri and values must be finite (no NaN or infinity)")
        object.__setattr__(self, "tri", tri)
        object.__setattr__(self, "values", val)
        return self


class Score(EntityRef):
    """One model's verdict on one SignatureWindow."""

    kind: Literal["score"] = "score"
    window_end_ts: float
    window_end_seq: int = Field(..., ge=0)
    interval_s: float = Field(..., gt=0)
    gap: int = Field(..., ge=1, description="Samples between consecutive windows (what one score covers).")
    model_id: str = Field(..., min_length=1, description="e.g. 'cs' or 'mscred:<checkpoint hash>'.")
    score: float = Field(..., description="Higher is more anomalous; comparable only within one model_id.")
    threshold: float | None = Field(None, description="The model's own calibrated threshold, if it has one.")
    features: list[str]
    contributions: list[float] = Field(..., description="Per-feature contribution, same order as features: non-negative, larger means more responsible (consumers normalise them into shares).")
    detail: dict[str, float] = Field(default_factory=dict, description="Model-specific extras (e.g. broken_w10).")
    # Optional (added with culprit and victims; older producers leave it out):
    levels: list[float] | None = Field(
        None, description="Per-feature level of the window's newest ``gap`` samples (their mean, in the featurizer's "
        "scaled units), same order as features: lets a consumer tell a metric that rose from one that fell.")

    @model_validator(mode="after")
    def _lengths(self) -> "Score":
        for name in ("contributions", "levels"):
            got = getattr(self, name)
            if got is not None and len(got) != len(self.features):
                raise ValueError(f"{name} has {len(got)} values for {len(self.features)} features")
        return self


class RootCause(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    feature: str
    contribution: float


class Anomaly(EntityRef):
    """An incident: opened, updated while it lasts, closed. JSON on the wire, for any Kafka client.

    ``anomaly_id`` is deterministic (entity, first anomalous window) so a re-delivered Score
    can never create a second anomaly; ``revision`` grows with every update of one incident.
    """

    kind: Literal["anomaly"] = "anomaly"
    anomaly_id: str
    revision: int = Field(0, ge=0)
    status: Literal["open", "update", "closed"]
    severity: Severity
    start_ts: float
    last_ts: float
    end_ts: float | None = None
    score: float
    threshold: float
    models: list[str]
    root_causes: list[RootCause] = Field(default_factory=list)
    summary: str = ""
    # Optional (added with the alerter; older producers leave them out):
    max_ratio: float | None = Field(None, description="Largest score / threshold over the incident (sets severity).")
    first_window_seq: int | None = Field(
        None, ge=0, description="window_end_seq of the incident's first anomalous window (anomaly_id hashes it).")
    windows_over: int | None = Field(None, ge=0, description="Windows in which some model was over its threshold.")
    # Optional (added with host-wide events):
    scope: Literal["entity", "host"] = Field(
        "entity", description="'entity': one process (or replayed entity) misbehaves. 'host': several processes of "
        "``host`` went over their thresholds together with the same root-cause profile (a common cause such as CPU "
        "contention); ``entity_id`` is then 'host:<host>', ``pid`` is None and ``members`` lists the processes.")
    members: list[str] = Field(
        default_factory=list, description="scope 'host': entity_ids of the processes whose windows make up the event.")
    # Optional (added with culprit and victims):
    affected: list[str] = Field(
        default_factory=list, description="scope 'entity': entity_ids of the processes of the same host this one "
        "slowed while its CPU use rose (their run-queue wait rose, their own CPU use did not); their deviations "
        "join this incident instead of incidents of their own.")


class DeadLetterInfo(BaseModel):
    """What a dead-letter record says about the message it carries (as Kafka headers)."""

    model_config = ConfigDict(extra="forbid")
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    service: str


MessageModel = Sample | SignatureWindow | Score | Anomaly
