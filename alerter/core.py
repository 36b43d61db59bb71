"""The alerter's logic, pure: Scores in, Anomalies out, no Kafka and no database.

A *stream* is one (entity, model) pair. Each stream gets a threshold without labels:

1. a static override ``--threshold FAMILY=VALUE`` (family = model_id before ':'; an exact model_id
   also matches), else
2. the model's own calibrated ``Score.threshold`` (MSCRED carries one), unless disabled, else
3. POT (:func:`core.thresholds.pot_threshold`, probability ``q``) fitted on the stream's first
   ``calibration_scores`` scores, which are assumed normal and not judged, leaving out gross
   outliers above ``Q3 + calibration_fence * IQR`` (at most 5% of them; so a one-off spike in
   calibration cannot lift the threshold out of reach; 0 disables). POT falls back to
   mean + 3 std when it cannot fit.

A score is *over* when ``score > threshold``; its *ratio* is ``score / threshold``.

Incidents, one per entity at a time (OR across models):

* **open**: some model of the entity has ``open_after`` consecutive windows over its threshold;
* **update**: while open, at most once per window, when the top root-cause features, the severity,
  the set of models over threshold change, or the max ratio grew by more than ``update_min_change``
  (relative) since the last published state;
* **closed**: every judged model of the entity has had ``close_after`` consecutive windows under its
  threshold (a model that has not reported for ``stale_windows`` windows does not hold it open), or
  the entity sent nothing for ``idle_timeout_s``.

Severity from the incident's max ratio: low < 1.5 <= medium < 3 <= high < 10 <= critical.

Root cause: for every score over threshold in the incident (including the windows of the run that
opened it), the model's non-negative contributions are normalised to sum 1 and weighted by its
ratio; these are summed per feature over the incident's windows. The top ``top_k`` features are
reported with their share of that total (shares of all features sum to 1; averaging over windows
would divide every feature by the same count, so ranking and shares are the same).

Idempotency: ``anomaly_id`` hashes (entity_id, window_end_seq of the incident's first anomalous
window); a Score whose window_end_seq is not after the stream's last one is a duplicate and ignored.

Example::

    >>> from schemas import Score
    >>> eng = Engine(AlerterConfig(calibration_scores=20))
    >>> def score(seq, value, contrib=(1.0, 1.0)):
    ...     return Score(entity_id="h/1@2", host="h", window_end_ts=float(seq), window_end_seq=seq, interval_s=1.0,
    ...                  gap=1, model_id="cs-jumpstarter:x", score=value, features=["cpu", "mem"],
    ...                  contributions=list(contrib))
    >>> out = [a for i in range(20) for a in eng.observe(score(i, 1.0 + 0.01 * (i % 7)), now=0.0)]
    >>> out += eng.observe(score(20, 5.0, (0.1, 0.9)), now=0.0) + eng.observe(score(21, 6.0, (0.1, 0.9)), now=0.0)
    >>> [(a.status, a.severity, a.root_causes[0].feature) for a in out]
    [('open', 'high', 'mem')]
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

from core.thresholds import DEFAULT_FENCE_K, pot_threshold
from schemas import Anomaly, RootCause, Score

log = logging.getLogger("osad.alerter")

SEVERITIES = ("low", "medium", "high", "critical")
#: ratio bounds between consecutive severities: low < 1.5 <= medium < 3 <= high < 10 <= critical
SEVERITY_BOUNDS = (1.5, 3.0, 10.0)
#: a chosen threshold is never below this (a constant calibration period would give 0)
MIN_THRESHOLD = 1e-9
STATE_VERSION = 1


def severity_of(ratio: float) -> str:
    """Severity of an incident whose largest score / threshold is ``ratio``.

    >>> [severity_of(r) for r in (1.2, 1.5, 2.9, 3.0, 9.9, 10.0)]
    ['low', 'medium', 'medium', 'high', 'high', 'critical']
    """
    for name, bound in zip(SEVERITIES, SEVERITY_BOUNDS):
        if ratio < bound:
            return name
    return SEVERITIES[-1]


def severity_rank(name: str) -> int:
    return SEVERITIES.index(name)


def model_family(model_id: str) -> str:
    """The part of a model_id before ':'.

    >>> model_family("mscred:ab12"), model_family("cs")
    ('mscred', 'cs')
    """
    return model_id.split(":", 1)[0]


def anomaly_id_for(entity_id: str, first_seq: int) -> str:
    """Deterministic id of the incident whose first anomalous window ends at ``first_seq``."""
    return hashlib.sha256(f"{entity_id}\x00{first_seq}".encode()).hexdigest()[:32]


def parse_threshold_override(text: str) -> tuple[str, float]:
    """``FAMILY=VALUE`` -> (family, value); ValueError says what is wrong.

    >>> parse_threshold_override("mscred=12.5")
    ('mscred', 12.5)
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{text!r}: write MODEL_FAMILY=VALUE, e.g. mscred=20 or cs-jumpstarter=0.8 "
                         "(the family is the model_id before ':')")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number; write MODEL_FAMILY=VALUE, e.g. mscred=20") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{text!r}: the threshold must be a finite number greater than 0")
    return name, v


@dataclass(frozen=True)
class AlerterConfig:
    calibration_scores: int = 100
    q: float = 1e-3
    calibration_fence: float = DEFAULT_FENCE_K
    use_model_threshold: bool = True
    static_thresholds: Mapping[str, float] = field(default_factory=dict)
    open_after: int = 2
    close_after: int = 3
    top_k: int = 5
    update_min_change: float = 0.1
    stale_windows: int = 30
    idle_timeout_s: float = 600.0
    max_entities: int = 10_000

    def __post_init__(self):
        checks = [
            (self.calibration_scores >= 2, "calibration_scores must be at least 2"),
            (0 < self.q < 1, f"q must be a probability in (0, 1), got {self.q}"),
            (self.calibration_fence >= 0, "calibration_fence must be 0 (off) or more"),
            (self.open_after >= 1, "open_after must be at least 1"),
            (self.close_after >= 1, "close_after must be at least 1"),
            (self.top_k >= 1, "top_k must be at least 1"),
            (self.update_min_change >= 0, "update_min_change must be 0 or more"),
            (self.stale_windows >= 1, "stale_windows must be at least 1"),
            (self.idle_timeout_s > 0, "idle_timeout_s must be greater than 0"),
            (self.max_entities >= 1, "max_entities must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for k, v in self.static_thresholds.items():
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"static threshold for {k!r} must be a finite number greater than 0, got {v}")


# -- state ---------------------------------------------------------------------------------------

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
    calib: list[float] = field(default_factory=list)
    threshold: float | None = None  # from calibration
    method: str = ""
    judged_threshold: float | None = None  # the threshold of the last judged score (any source)
    over_run: int = 0
    under_run: int = 0
    pending: list[Evidence] = field(default_factory=list)  # the current over-run, before an incident opens


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


@dataclass
class EntityState:
    entity_id: str
    ref: dict = field(default_factory=dict)  # host, pid, comm, cgroup, container_id
    streams: dict[str, Stream] = field(default_factory=dict)
    incident: Incident | None = None
    max_seq: int = -1
    last_closed_seq: int = -1
    last_seen: float = 0.0  # wall clock of the last score (not persisted: a reload counts as seen)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("last_seen")
        d["v"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EntityState":
        if d.get("v") != STATE_VERSION:
            raise ValueError(f"alerter state version {d.get('v')} is not {STATE_VERSION}")
        streams = {}
        for k, s in d["streams"].items():
            s = dict(s)
            s["pending"] = [Evidence(**e) for e in s.get("pending", [])]
            streams[k] = Stream(**s)
        inc = Incident(**d["incident"]) if d.get("incident") else None
        return cls(entity_id=d["entity_id"], ref=dict(d.get("ref") or {}), streams=streams, incident=inc,
                   max_seq=d.get("max_seq", -1), last_closed_seq=d.get("last_closed_seq", -1))


_REF_FIELDS = ("host", "pid", "comm", "cgroup", "container_id")


# -- engine --------------------------------------------------------------------------------------

class Engine:
    """Per-entity incidents over a stream of Scores.

    ``load(entity_id)`` returns a persisted state (:meth:`EntityState.to_dict`) or None; it is asked
    the first time an entity is seen. :meth:`take_dirty` hands over the states to persist.
    ``counters`` counts events (duplicate, calibrated, opened, updated, closed, closed_idle,
    evicted_idle, evicted_cap, loaded).
    """

    def __init__(self, cfg: AlerterConfig | None = None, load: Callable[[str], dict | None] | None = None):
        self.cfg = cfg or AlerterConfig()
        self._load = load
        self.entities: OrderedDict[str, EntityState] = OrderedDict()  # least recently seen first
        self._dirty: set[str] = set()
        self._evicted: dict[str, dict] = {}  # dropped from memory, not yet handed over for persisting
        self.counters: Counter = Counter()

    # -- entities ---------------------------------------------------------------------------
    def _entity(self, s: Score, now: float) -> EntityState:
        eid = s.entity_id
        ent = self.entities.get(eid)
        if ent is None:
            snap = self._evicted.pop(eid, None)
            if snap is None and self._load is not None:
                snap = self._load(eid)
            if snap is not None:
                ent = EntityState.from_dict(snap)
                self.counters["loaded"] += 1
            else:
                ent = EntityState(eid)
            self.entities[eid] = ent
            self._evict_over_cap()
        self.entities.move_to_end(eid)
        ent.last_seen = now
        ent.ref = {k: getattr(s, k) for k in _REF_FIELDS}
        return ent

    def _evict_over_cap(self) -> None:
        while len(self.entities) > self.cfg.max_entities:
            eid, ent = next(iter(self.entities.items()))
            self._forget(eid, ent)
            self.counters["evicted_cap"] += 1

    def _forget(self, eid: str, ent: EntityState) -> None:
        del self.entities[eid]
        if eid in self._dirty:
            self._dirty.discard(eid)
            self._evicted[eid] = ent.to_dict()

    def close_stale(self, snapshot: dict) -> list[Anomaly]:
        """Close the incident of a persisted state that no Score brought (an entity that went away
        while no alerter ran). Nothing happens when the entity is in memory (it is live here)."""
        ent = EntityState.from_dict(snapshot)
        eid = ent.entity_id
        if eid in self.entities or eid in self._evicted or ent.incident is None:
            return []
        self.entities[eid] = ent
        out = self.close_idle(eid)
        self._forget(eid, ent)
        return out

    def drop(self, entity_ids) -> dict[str, dict]:
        """Forget these entities (e.g. their partitions moved); returns their states to persist."""
        out = {}
        for eid in entity_ids:
            ent = self.entities.pop(eid, None)
            self._dirty.discard(eid)
            snap = self._evicted.pop(eid, None)
            if ent is not None:
                out[eid] = ent.to_dict()
            elif snap is not None:
                out[eid] = snap
        return out

    def take_dirty(self) -> dict[str, dict]:
        """States changed since the last call (entity id -> state dict), to persist."""
        out = dict(self._evicted)
        self._evicted.clear()
        for eid in self._dirty:
            ent = self.entities.get(eid)
            if ent is not None:
                out[eid] = ent.to_dict()
        self._dirty.clear()
        return out

    def open_incidents(self) -> int:
        return sum(1 for e in self.entities.values() if e.incident is not None)

    # -- scores -----------------------------------------------------------------------------
    def _threshold(self, st: Stream, s: Score) -> float | None:
        static = self.cfg.static_thresholds
        v = static.get(s.model_id, static.get(model_family(s.model_id)))
        if v is not None:
            return v
        if self.cfg.use_model_threshold and s.threshold is not None and math.isfinite(s.threshold) \
                and s.threshold > 0:
            return float(s.threshold)
        if st.threshold is not None:
            return st.threshold
        if math.isfinite(s.score):
            st.calib.append(float(s.score))
        if len(st.calib) >= self.cfg.calibration_scores:
            r = pot_threshold(st.calib, q=self.cfg.q, fence_k=self.cfg.calibration_fence or None)
            st.threshold, st.method, st.calib = max(r.value, MIN_THRESHOLD), r.method, []
            self.counters["calibrated"] += 1
            out = r.info.get("left_out", 0)
            log.info("threshold for %s of %s is %.6g (%s on %d scores%s)", s.model_id, s.entity_id, st.threshold,
                     r.method, self.cfg.calibration_scores,
                     f"; {out} above Q3 + {self.cfg.calibration_fence:g} IQR = {r.info['fence']:.6g} left out"
                     if out else "")
        return None

    def observe(self, s: Score, now: float) -> list[Anomaly]:
        """One Score; returns the Anomaly states to publish (0 or 1)."""
        ent = self._entity(s, now)
        st = ent.streams.get(s.model_id)
        if st is None:
            self._prune_streams(ent)
            st = ent.streams[s.model_id] = Stream(s.model_id)
        seq = s.window_end_seq
        if st.last_seq is not None and seq <= st.last_seq:
            self.counters["duplicate"] += 1
            return []
        self._dirty.add(ent.entity_id)
        st.last_seq, st.gap = seq, s.gap
        ent.max_seq = max(ent.max_seq, seq)
        thr = self._threshold(st, s)
        if thr is None:
            return []  # calibrating: not judged
        st.judged_threshold = thr
        inc = ent.incident
        opened = False
        if math.isfinite(s.score) and s.score > thr:
            ratio = s.score / thr
            ev = Evidence(seq, s.window_end_ts, s.window_end_ts - s.gap * s.interval_s, ratio, s.score, thr,
                          s.model_id, _weights(s, ratio))
            st.over_run += 1
            st.under_run = 0
            if inc is None:
                st.pending = (st.pending + [ev])[-self.cfg.open_after:]
                if st.over_run >= self.cfg.open_after:
                    inc, opened = self._open(ent, s), True
            else:
                _add(inc, ev)
        else:
            st.over_run = 0
            st.under_run += 1
            st.pending = []
        if inc is None:
            return []
        if seq > inc.last_seq:
            inc.last_seq, inc.last_ts = seq, s.window_end_ts
        if opened:
            self.counters["opened"] += 1
            return [self._publish(ent, inc, "open", seq)]
        if self._should_close(ent):
            ent.incident = None
            ent.last_closed_seq = max(ent.last_closed_seq, inc.last_seq)
            self.counters["closed"] += 1
            return [self._publish(ent, inc, "closed", seq)]
        if seq > inc.published_seq and self._changed(inc):
            self.counters["updated"] += 1
            return [self._publish(ent, inc, "update", seq)]
        return []

    def tick(self, now: float) -> list[Anomaly]:
        """Close the incidents of entities idle for ``idle_timeout_s`` and forget those entities."""
        out = []
        limit = now - self.cfg.idle_timeout_s
        for eid, ent in list(self.entities.items()):
            if ent.last_seen > limit:
                break  # ordered by last seen: the rest are newer
            out += self.close_idle(eid)
            self._forget(eid, ent)
            self.counters["evicted_idle"] += 1
        return out

    def close_idle(self, eid: str) -> list[Anomaly]:
        ent = self.entities.get(eid)
        if ent is None or ent.incident is None:
            return []
        inc, ent.incident = ent.incident, None
        ent.last_closed_seq = max(ent.last_closed_seq, inc.last_seq)
        self._dirty.add(eid)
        self.counters["closed_idle"] += 1
        return [self._publish(ent, inc, "closed", inc.last_seq, why="no scores")]

    # -- incidents --------------------------------------------------------------------------
    def _open(self, ent: EntityState, s: Score) -> Incident:
        evs = sorted((ev for st in ent.streams.values() if st.over_run > 0 for ev in st.pending),
                     key=lambda e: (e.seq, e.model_id))
        first = max(evs[0].seq, ent.last_closed_seq + 1)
        inc = Incident(anomaly_id=anomaly_id_for(ent.entity_id, first), first_seq=first, start_ts=evs[0].start_ts,
                       last_seq=s.window_end_seq, last_ts=s.window_end_ts, last_over_seq=evs[0].seq,
                       last_over_ts=evs[0].end_ts)
        for ev in evs:
            _add(inc, ev)
        for st in ent.streams.values():
            st.pending = []
        ent.incident = inc
        return inc

    def _should_close(self, ent: EntityState) -> bool:
        judged = [st for st in ent.streams.values() if st.judged_threshold is not None and st.last_seq is not None
                  and ent.max_seq - st.last_seq <= self.cfg.stale_windows * max(st.gap, 1)]
        return bool(judged) and all(st.under_run >= self.cfg.close_after for st in judged)

    def _top(self, inc: Incident) -> list[tuple[str, float]]:
        total = sum(inc.evidence.values())
        ranked = sorted(inc.evidence.items(), key=lambda kv: (-kv[1], kv[0]))[: self.cfg.top_k]
        return [(f, v / total if total > 0 else 0.0) for f, v in ranked]

    def _changed(self, inc: Incident) -> bool:
        return ([f for f, _ in self._top(inc)] != inc.published_top
                or severity_of(inc.max_ratio) != inc.published_severity
                or inc.models != inc.published_models
                or inc.max_ratio > inc.published_ratio * (1.0 + self.cfg.update_min_change))

    def _publish(self, ent: EntityState, inc: Incident, status: str, seq: int, why: str = "") -> Anomaly:
        inc.revision += 1
        top = self._top(inc)
        sev = severity_of(inc.max_ratio)
        inc.published_seq, inc.published_ratio, inc.published_severity = seq, inc.max_ratio, sev
        inc.published_top, inc.published_models = [f for f, _ in top], list(inc.models)
        who = ent.ref.get("comm") or ent.entity_id
        summary = (f"{who}: {', '.join(inc.models)} over threshold in {inc.windows_over} window(s), "
                   f"max {inc.max_ratio:.2f}x threshold ({sev})")
        if top:
            summary += "; top features: " + ", ".join(f for f, _ in top[:3])
        if status == "closed":
            summary += "; closed" + (f" ({why})" if why else "")
        return Anomaly(
            entity_id=ent.entity_id, **{k: ent.ref.get(k) for k in _REF_FIELDS if ent.ref.get(k) is not None},
            anomaly_id=inc.anomaly_id, revision=inc.revision, status=status, severity=sev,
            start_ts=inc.start_ts, last_ts=inc.last_ts, end_ts=inc.last_over_ts if status == "closed" else None,
            score=inc.best_score, threshold=inc.best_threshold, models=list(inc.models),
            root_causes=[RootCause(feature=f, contribution=round(v, 6)) for f, v in top], summary=summary,
            max_ratio=inc.max_ratio, first_window_seq=inc.first_seq, windows_over=inc.windows_over,
        )

    def _prune_streams(self, ent: EntityState) -> None:
        """A new model joins: forget models that stopped reporting long ago (e.g. a replaced checkpoint)."""
        for mid, st in list(ent.streams.items()):
            if st.last_seq is not None and ent.max_seq - st.last_seq > 10 * self.cfg.stale_windows * max(st.gap, 1):
                del ent.streams[mid]


def _weights(s: Score, ratio: float) -> dict[str, float]:
    c = [x if math.isfinite(x) and x > 0 else 0.0 for x in s.contributions]
    total = sum(c)
    if total <= 0:
        return {}
    return {f: ratio * x / total for f, x in zip(s.features, c) if x > 0}


def _add(inc: Incident, ev: Evidence) -> None:
    for f, w in ev.weights.items():
        inc.evidence[f] = inc.evidence.get(f, 0.0) + w
    if ev.model_id not in inc.models:
        inc.models = sorted(inc.models + [ev.model_id])
    if ev.ratio > inc.max_ratio:
        inc.max_ratio, inc.best_score, inc.best_threshold = ev.ratio, ev.score, ev.threshold
    if ev.seq >= inc.last_over_seq:
        inc.last_over_seq, inc.last_over_ts = ev.seq, ev.end_ts
    if ev.seq not in inc.recent_over_seqs:
        inc.windows_over += 1
        inc.recent_over_seqs = sorted(inc.recent_over_seqs + [ev.seq])[-64:]
