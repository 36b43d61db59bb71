"""What the alerter remembers: per stream, per entity and per host, and the form it is persisted in.

A *stream* is one (entity, model) pair (:class:`Stream`: its calibration and runs over/under
threshold); an entity (:class:`EntityState`) holds its streams, its open :class:`Incident` and
the recent root-cause profile host-wide events compare; a host (:class:`HostState`) its open
host-wide event. ``to_dict`` / ``from_dict`` are the JSON the store keeps (``STATE_VERSION``), so
a restarted alerter resumes without re-calibrating and without forgetting an open incident.
:class:`Memory` holds the states an engine works on, loads them when first needed, and hands
over those that changed, to be persisted.

Example::

    >>> ent = EntityState("h/1@2", streams={"cs:x": Stream("cs:x", last_seq=7, threshold=1.5)})
    >>> EntityState.from_dict(ent.to_dict()) == ent
    True
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Iterator

from osad.core.thresholds import StreamThreshold
from osad.schemas import Score

STATE_VERSION = 2  # 2: each stream's threshold is a StreamThreshold (1: calib, threshold, method; still read)
#: what an entity's Scores say about it, copied into its anomalies
REF_FIELDS = ("host", "pid", "comm", "cgroup", "container_id")


@dataclass
class Evidence:
    """One score over threshold: what it adds to an incident."""

    seq: int
    end_ts: float
    start_ts: float
    ratio: float
    score: float
    threshold: float
    model_id: str
    weights: dict[str, float]  # feature -> normalised contribution * ratio


@dataclass
class Stream:
    model_id: str
    last_seq: int | None = None
    gap: int = 1
    # the stream's own threshold through its life (osad.core.thresholds.StreamThreshold: arming, provisional,
    # calibrated, adapting); None while a static or the model's own threshold judges it
    tracker: StreamThreshold | None = None
    threshold: float | None = None  # the tracker's value (None while arming)
    method: str = ""  # the tracker's method: provisional, pot, sigma or dspot
    judged_threshold: float | None = None  # the threshold of the last judged score (any source)
    over_run: int = 0
    under_run: int = 0
    pending: list[Evidence] = field(default_factory=list)  # the current over-run, before an incident opens

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("pending", "tracker")}
        d["pending"] = [asdict(e) for e in self.pending]
        d["tracker"] = None if self.tracker is None else self.tracker.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, version: int = STATE_VERSION) -> "Stream":
        d = dict(d)
        d["pending"] = [Evidence(**e) for e in d.get("pending", [])]
        if version == 1:  # before trackers: the calibration scores so far, or a frozen threshold
            calib = d.pop("calib", [])
            tr = None
            if calib or d.get("threshold") is not None:
                tr = StreamThreshold(calibration=max(len(calib) + 1, 2), arm=0)
                tr.calib, tr.value, tr.method = list(calib), d.get("threshold"), d.get("method") or ""
            d["tracker"] = tr
        else:
            d["tracker"] = StreamThreshold.from_dict(d["tracker"]) if d.get("tracker") else None
        return cls(**d)


@dataclass
class Incident:
    anomaly_id: str
    first_seq: int
    start_ts: float
    last_seq: int
    last_ts: float
    last_over_seq: int
    last_over_ts: float
    max_ratio: float = 0.0
    best_score: float = 0.0
    best_threshold: float = 0.0
    models: list[str] = field(default_factory=list)
    evidence: dict[str, float] = field(default_factory=dict)
    windows_over: int = 0
    recent_over_seqs: list[int] = field(default_factory=list)
    revision: int = -1
    published_seq: int = -1
    published_ratio: float = 0.0
    published_top: list[str] = field(default_factory=list)
    published_severity: str = ""
    published_models: list[str] = field(default_factory=list)
    affected: list[str] = field(default_factory=list)  # entity ids of the processes this one's fault slowed
    published_affected: list[str] = field(default_factory=list)


@dataclass
class EntityState:
    entity_id: str
    ref: dict = field(default_factory=dict)  # host, pid, comm, cgroup, container_id
    streams: dict[str, Stream] = field(default_factory=dict)
    incident: Incident | None = None
    max_seq: int = -1
    last_closed_seq: int = -1
    last_ts: float = 0.0  # window_end_ts of the newest score
    last_over_ts: float = -math.inf  # window_end_ts of the newest score over threshold
    recent: list = field(default_factory=list)  # [window_end_ts, weights] of recent scores over threshold
    recent_top: list = field(default_factory=list)  # [window_end_ts, top feature] of recent scores
    top_freq: dict = field(default_factory=dict)  # feature -> how often it leads the contributions when not over
    top_n: int = 0  # windows counted in top_freq
    host_event: str | None = None  # anomaly_id of the host-wide event this entity's windows are part of
    # culprit and victims (osad.alerter.contention): the usual level of each feature, learnt from windows under
    # threshold, and how far the newest window is from it (in spreads)
    # (compact: arrays of doubles in the order of ``level_features``, one tuple shared by every entity with
    # the same features: about 1 KB per entity for 35 features, where dicts took 15 KB)
    level_features: tuple = ()
    level_mean: array = field(default_factory=lambda: array("d"))
    level_var: array = field(default_factory=lambda: array("d"))
    level_n: int = 0
    level_seq: int = -1  # window_end_seq of the newest window learnt or measured
    change: array = field(default_factory=lambda: array("d"))  # (level - usual) / spread of the newest window
    victim_ts: float = -math.inf  # window_end_ts of the newest window judged a victim of contention
    affected_by: str | None = None  # entity id of the culprit whose incident this entity's windows joined
    last_seen: float = 0.0  # wall clock of the last score (not persisted: a reload counts as seen)

    def to_dict(self) -> dict:
        d = asdict(replace(self, streams={}))
        d["streams"] = {k: st.to_dict() for k, st in self.streams.items()}
        d.pop("last_seen")
        for k in ("level_features", "level_mean", "level_var", "change"):
            d[k] = list(d[k])
        for k in ("last_over_ts", "victim_ts"):
            if not math.isfinite(d[k]):
                d[k] = None  # JSON has no -inf
        d["v"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EntityState":
        if d.get("v") not in (1, STATE_VERSION):
            raise ValueError(f"alerter state version {d.get('v')} is not {STATE_VERSION}")
        streams = {k: Stream.from_dict(s, d["v"]) for k, s in d["streams"].items()}
        inc = Incident(**d["incident"]) if d.get("incident") else None
        last_over, victim = d.get("last_over_ts"), d.get("victim_ts")
        return cls(entity_id=d["entity_id"], ref=dict(d.get("ref") or {}), streams=streams, incident=inc,
                   max_seq=d.get("max_seq", -1), last_closed_seq=d.get("last_closed_seq", -1),
                   last_ts=d.get("last_ts", 0.0), last_over_ts=-math.inf if last_over is None else last_over,
                   recent=list(d.get("recent") or []), recent_top=list(d.get("recent_top") or []),
                   top_freq=dict(d.get("top_freq") or {}), top_n=d.get("top_n", 0), host_event=d.get("host_event"),
                   level_features=shared_features(d.get("level_features") or ()),
                   level_mean=array("d", d.get("level_mean") or ()), level_var=array("d", d.get("level_var") or ()),
                   level_n=d.get("level_n", 0), level_seq=d.get("level_seq", -1),
                   change=array("d", d.get("change") or ()),
                   victim_ts=-math.inf if victim is None else victim, affected_by=d.get("affected_by"))


@dataclass
class HostState:
    """Host-wide events of one host: at most one open at a time. Its times ("seqs") are window end
    times in milliseconds, as windows of different processes have unrelated sequence numbers."""

    host: str
    incident: Incident | None = None
    members: list[str] = field(default_factory=list)  # entity ids folded into the open event
    last_closed_seq: int = -1
    last_seen: float = 0.0  # wall clock (not persisted)

    @property
    def key(self) -> str:
        return host_key(self.host)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("last_seen")
        d.update(kind="host", v=STATE_VERSION, entity_id=self.key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HostState":
        if d.get("v") not in (1, STATE_VERSION) or d.get("kind") != "host":
            raise ValueError(f"not a host state of version {STATE_VERSION}: {d.get('kind')!r} v{d.get('v')}")
        inc = Incident(**d["incident"]) if d.get("incident") else None
        return cls(host=d["host"], incident=inc, members=list(d.get("members") or []),
                   last_closed_seq=d.get("last_closed_seq", -1))


_SHARED_FEATURES: dict[tuple, tuple] = {}
_FEATURE_INDEX: dict[tuple, dict[str, int]] = {}


def shared_features(features) -> tuple:
    """One tuple object per distinct feature list (every entity of a kind holds the same one)."""
    t = tuple(features)
    if t not in _SHARED_FEATURES:
        if len(_SHARED_FEATURES) > 4096:  # feature sets are few; never grow without bound
            _SHARED_FEATURES.clear()
            _FEATURE_INDEX.clear()
        _SHARED_FEATURES[t] = t
    return _SHARED_FEATURES[t]


def feature_index(features: tuple) -> dict[str, int]:
    """feature -> position in ``features`` (cached per feature tuple)."""
    idx = _FEATURE_INDEX.get(features)
    if idx is None:
        idx = _FEATURE_INDEX[features] = {f: i for i, f in enumerate(features)}
    return idx


def host_key(host: str) -> str:
    """The entity_id of a host's host-wide events (and the key of its state)."""
    return f"host:{host}"


class Memory:
    """The entities (least recently seen first, at most ``max_entities``) and hosts in memory.

    ``load(key)`` returns a persisted state (``to_dict``) or None; it is asked the first time an
    entity or host is needed. A state marked ``dirty`` is handed over by :meth:`take_dirty`; one
    that leaves memory before that is kept until then (``evicted``). ``counters`` counts
    ``loaded`` and ``evicted_cap``.
    """

    def __init__(self, max_entities: int, load: Callable[[str], dict | None] | None, counters: Counter):
        self.max_entities = max_entities
        self._load = load
        self.counters = counters
        self.entities: OrderedDict[str, EntityState] = OrderedDict()
        self.hosts: dict[str, HostState] = {}
        self.by_host: dict[str, set[str]] = {}  # host -> entity ids in memory
        self.dirty: set[str] = set()
        self.evicted: dict[str, dict] = {}  # dropped from memory, not yet handed over for persisting

    def _snapshot(self, key: str) -> dict | None:
        snap = self.evicted.pop(key, None)
        if snap is None and self._load is not None:
            snap = self._load(key)
        return snap

    def entity(self, s: Score, now: float) -> EntityState:
        """The state of the entity Score ``s`` is about (loaded or new), as seen ``now``."""
        eid = s.entity_id
        ent = self.entities.get(eid)
        if ent is None:
            snap = self._snapshot(eid)
            if snap is not None:
                ent = EntityState.from_dict(snap)
                self.counters["loaded"] += 1
            else:
                ent = EntityState(eid)
            self.entities[eid] = ent
            self._evict_over_cap()
        self.entities.move_to_end(eid)
        ent.last_seen = now
        ent.ref = {k: getattr(s, k) for k in REF_FIELDS}
        self.by_host.setdefault(s.host, set()).add(eid)
        return ent

    def host(self, host: str, now: float) -> HostState:
        """The state of ``host`` (loaded or new), as seen ``now``."""
        hs = self.hosts.get(host)
        if hs is None:
            snap = self._snapshot(host_key(host))
            hs = self.hosts[host] = HostState.from_dict(snap) if snap is not None else HostState(host)
        hs.last_seen = now
        return hs

    def name(self, eid: str) -> str:
        """How an anomaly calls entity ``eid``: "comm (pid)" when known, else its id."""
        ref = self.entities[eid].ref if eid in self.entities else {}
        return f"{ref['comm']} ({ref['pid']})" if ref.get("comm") and ref.get("pid") is not None else eid

    def peers(self, host: str) -> Iterator[EntityState]:
        """The entities of ``host`` in memory, by entity id."""
        return (p for p in (self.entities.get(e) for e in sorted(self.by_host.get(host, ()))) if p is not None)

    def _evict_over_cap(self) -> None:
        while len(self.entities) > self.max_entities:
            eid, ent = next(iter(self.entities.items()))
            self.forget(eid, ent)
            self.counters["evicted_cap"] += 1

    def forget(self, eid: str, ent: EntityState) -> None:
        """Drop an entity from memory (its unsaved state is kept for :meth:`take_dirty`)."""
        del self.entities[eid]
        self.by_host.get(ent.ref.get("host"), set()).discard(eid)
        if eid in self.dirty:
            self.dirty.discard(eid)
            self.hand_over(eid, ent.to_dict())

    def forget_host(self, hs: HostState) -> None:
        del self.hosts[hs.host]
        if hs.key in self.dirty:
            self.dirty.discard(hs.key)
            self.hand_over(hs.key, hs.to_dict())

    def hand_over(self, key: str, state: dict) -> None:
        """Persist ``state`` of ``key`` (not in memory) with the next :meth:`take_dirty`."""
        self.evicted[key] = state

    def drop(self, entity_ids) -> dict[str, dict]:
        """Forget these entities (e.g. their partitions moved); returns their states to persist."""
        out = {}
        for eid in entity_ids:
            ent = self.entities.pop(eid, None)
            self.dirty.discard(eid)
            if ent is not None:
                self.by_host.get(ent.ref.get("host"), set()).discard(eid)
            snap = self.evicted.pop(eid, None)
            if ent is not None:
                out[eid] = ent.to_dict()
            elif snap is not None:
                out[eid] = snap
        return out

    def take_dirty(self) -> dict[str, dict]:
        """States changed since the last call (entity id or host key -> state dict), to persist."""
        out = dict(self.evicted)
        self.evicted.clear()
        hosts = {hs.key: hs for hs in self.hosts.values()}
        for eid in self.dirty:
            ent = self.entities.get(eid)
            if ent is not None:
                out[eid] = ent.to_dict()
            elif eid in hosts:
                out[eid] = hosts[eid].to_dict()
        self.dirty.clear()
        return out

    def open_incidents(self) -> int:
        return (sum(1 for e in self.entities.values() if e.incident is not None)
                + sum(1 for h in self.hosts.values() if h.incident is not None))
