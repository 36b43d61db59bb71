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

Host-wide events: when several processes of one host deviate together with the same root-cause
profile, the cause is most likely the host (CPU contention, steal time on a VM, a noisy neighbour),
not each process. Such windows make one incident of the host (``scope='host'``, entity_id
``host:<host>``, ``members`` = the processes) instead of one per process; a process whose profile
differs (the culprit that spins while the others wait for a CPU) keeps its own incident. The rules
are in :meth:`Engine._host_group`; a process due to open an incident waits up to ``host_hold``
windows while such an event may be forming (:meth:`Engine._host_stirs`), as the process with the
lowest threshold crosses first; ``host_min_entities=0`` turns them off. They see the entities
held by one alerter: run one alerter per group of hosts (the default, one alerter) for them to apply.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping

from osad.core.thresholds import DEFAULT_FENCE_K, pot_threshold
from osad.schemas import SEVERITIES, Anomaly, RootCause, Score

log = logging.getLogger("osad.alerter")

#: ratio bounds between consecutive severities: low < 1.5 <= medium < 3 <= high < 10 <= critical
SEVERITY_BOUNDS = (1.5, 3.0, 10.0)
#: a chosen threshold is never below this (a constant calibration period would give 0)
MIN_THRESHOLD = 1e-9
STATE_VERSION = 1
#: weight of one window in an entity's running rate of each feature leading its contributions
TOP_FREQ_ALPHA = 0.02
#: windows an entity must have had before its usual leading features are trusted
TOP_FREQ_MIN_WINDOWS = 20


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
    host_min_entities: int = 3
    host_share: float = 0.5
    host_similarity: float = 0.7
    host_lift: float = 2.0
    host_hold: int = 2

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
            (self.host_min_entities == 0 or self.host_min_entities >= 2,
             "host_min_entities must be 0 (no host-wide events) or at least 2"),
            (0 < self.host_share <= 1, f"host_share must be in (0, 1], got {self.host_share}"),
            (0 < self.host_similarity <= 1, f"host_similarity must be in (0, 1], got {self.host_similarity}"),
            (self.host_lift >= 1, f"host_lift must be at least 1, got {self.host_lift}"),
            (self.host_hold >= 0, f"host_hold must be 0 (no holding) or more, got {self.host_hold}"),
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
    last_ts: float = 0.0  # window_end_ts of the newest score
    last_over_ts: float = -math.inf  # window_end_ts of the newest score over threshold
    recent: list = field(default_factory=list)  # [window_end_ts, weights] of recent scores over threshold
    recent_top: list = field(default_factory=list)  # [window_end_ts, top feature] of recent scores
    top_freq: dict = field(default_factory=dict)  # feature -> how often it leads the contributions when not over
    top_n: int = 0  # windows counted in top_freq
    host_event: str | None = None  # anomaly_id of the host-wide event this entity's windows are part of
    last_seen: float = 0.0  # wall clock of the last score (not persisted: a reload counts as seen)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("last_seen")
        if not math.isfinite(d["last_over_ts"]):
            d["last_over_ts"] = None  # JSON has no -inf
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
        last_over = d.get("last_over_ts")
        return cls(entity_id=d["entity_id"], ref=dict(d.get("ref") or {}), streams=streams, incident=inc,
                   max_seq=d.get("max_seq", -1), last_closed_seq=d.get("last_closed_seq", -1),
                   last_ts=d.get("last_ts", 0.0), last_over_ts=-math.inf if last_over is None else last_over,
                   recent=list(d.get("recent") or []), recent_top=list(d.get("recent_top") or []),
                   top_freq=dict(d.get("top_freq") or {}), top_n=d.get("top_n", 0), host_event=d.get("host_event"))


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
        if d.get("v") != STATE_VERSION or d.get("kind") != "host":
            raise ValueError(f"not a host state of version {STATE_VERSION}: {d.get('kind')!r} v{d.get('v')}")
        inc = Incident(**d["incident"]) if d.get("incident") else None
        return cls(host=d["host"], incident=inc, members=list(d.get("members") or []),
                   last_closed_seq=d.get("last_closed_seq", -1))


def host_key(host: str) -> str:
    """The entity_id of a host's host-wide events (and the key of its state)."""
    return f"host:{host}"


_REF_FIELDS = ("host", "pid", "comm", "cgroup", "container_id")


# -- engine --------------------------------------------------------------------------------------

class Engine:
    """Per-entity incidents over a stream of Scores.

    ``load(entity_id)`` returns a persisted state (:meth:`EntityState.to_dict`) or None; it is asked
    the first time an entity is seen. :meth:`take_dirty` hands over the states to persist.
    ``counters`` counts events (duplicate, calibrated, opened, updated, closed, closed_idle,
    evicted_idle, evicted_cap, loaded, held, host_opened, host_updated, host_closed).
    """

    def __init__(self, cfg: AlerterConfig | None = None, load: Callable[[str], dict | None] | None = None):
        self.cfg = cfg or AlerterConfig()
        self._load = load
        self.entities: OrderedDict[str, EntityState] = OrderedDict()  # least recently seen first
        self._dirty: set[str] = set()
        self._evicted: dict[str, dict] = {}  # dropped from memory, not yet handed over for persisting
        self.hosts: dict[str, HostState] = {}
        self._by_host: dict[str, set[str]] = {}  # host -> entity ids in memory
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
        self._by_host.setdefault(s.host, set()).add(eid)
        return ent

    def _host_of(self, ent: EntityState, now: float) -> HostState | None:
        """The host's state (loaded or new); None when host-wide events are off."""
        if self.cfg.host_min_entities == 0:
            return None
        host = ent.ref["host"]
        hs = self.hosts.get(host)
        if hs is None:
            key = host_key(host)
            snap = self._evicted.pop(key, None)
            if snap is None and self._load is not None:
                snap = self._load(key)
            hs = self.hosts[host] = HostState.from_dict(snap) if snap is not None else HostState(host)
        hs.last_seen = now
        return hs

    def _evict_over_cap(self) -> None:
        while len(self.entities) > self.cfg.max_entities:
            eid, ent = next(iter(self.entities.items()))
            self._forget(eid, ent)
            self.counters["evicted_cap"] += 1

    def _forget(self, eid: str, ent: EntityState) -> None:
        del self.entities[eid]
        self._by_host.get(ent.ref.get("host"), set()).discard(eid)
        if eid in self._dirty:
            self._dirty.discard(eid)
            self._evicted[eid] = ent.to_dict()

    def close_stale(self, snapshot: dict) -> list[Anomaly]:
        """Close the incident of a persisted state that no Score brought (an entity that went away
        while no alerter ran). Nothing happens when the entity is in memory (it is live here)."""
        if snapshot.get("kind") == "host":
            hs = HostState.from_dict(snapshot)
            if hs.host in self.hosts or hs.incident is None or hs.key in self._evicted:
                return []
            out = self._close_host(hs, why="no scores")
            self._evicted[hs.key] = hs.to_dict()
            return out
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
            if ent is not None:
                self._by_host.get(ent.ref.get("host"), set()).discard(eid)
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
        hosts = {hs.key: hs for hs in self.hosts.values()}
        for eid in self._dirty:
            ent = self.entities.get(eid)
            if ent is not None:
                out[eid] = ent.to_dict()
            elif eid in hosts:
                out[eid] = hosts[eid].to_dict()
        self._dirty.clear()
        return out

    def open_incidents(self) -> int:
        return (sum(1 for e in self.entities.values() if e.incident is not None)
                + sum(1 for h in self.hosts.values() if h.incident is not None))

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
        ent.last_ts = max(ent.last_ts, s.window_end_ts)
        hs = self._host_of(ent, now)
        thr = self._threshold(st, s)
        over = thr is not None and math.isfinite(s.score) and s.score > thr
        if hs is not None:
            self._track_top(ent, s, learn=not over and hs.incident is None)
        if thr is None:
            return []  # calibrating: not judged
        st.judged_threshold = thr
        inc = ent.incident
        opened = False
        if over:
            ratio = s.score / thr
            ev = Evidence(seq, s.window_end_ts, s.window_end_ts - s.gap * s.interval_s, ratio, s.score, thr,
                          s.model_id, _weights(s, ratio))
            st.over_run += 1
            st.under_run = 0
            self._remember(ent, ev, s)
            if inc is None:
                st.pending = (st.pending + [ev])[-(self.cfg.open_after + self.cfg.host_hold):]
                due = st.over_run >= self.cfg.open_after
                if hs is not None and (ent.host_event or due):
                    group = self._host_group(ent, hs, s)
                    if group:
                        return self._fold(hs, group, s)
                    if due and st.over_run < self.cfg.open_after + self.cfg.host_hold and self._host_stirs(ent, hs, s):
                        self.counters["held"] += 1
                        due = False
                if due:
                    inc, opened = self._open(ent, s), True
            else:
                _add(inc, ev)
        else:
            st.over_run = 0
            st.under_run += 1
            st.pending = []
        out = self._host_check(ent, hs, s) if hs is not None else []
        if inc is None:
            return out
        if seq > inc.last_seq:
            inc.last_seq, inc.last_ts = seq, s.window_end_ts
        if opened:
            self.counters["opened"] += 1
            return out + [self._publish(ent, inc, "open", seq)]
        if self._should_close(ent):
            ent.incident = None
            ent.last_closed_seq = max(ent.last_closed_seq, inc.last_seq)
            self.counters["closed"] += 1
            return out + [self._publish(ent, inc, "closed", seq)]
        if seq > inc.published_seq and self._changed(inc):
            self.counters["updated"] += 1
            return out + [self._publish(ent, inc, "update", seq)]
        return out

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
        for host, hs in list(self.hosts.items()):
            if hs.last_seen > limit:
                continue
            if hs.incident is not None:
                out += self._close_host(hs, why="no scores")
            if not self._by_host.get(host):
                self._by_host.pop(host, None)
                self._forget_host(hs)
        return out

    def _forget_host(self, hs: HostState) -> None:
        del self.hosts[hs.host]
        if hs.key in self._dirty:
            self._dirty.discard(hs.key)
            self._evicted[hs.key] = hs.to_dict()

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
        return self._anomaly(ent.entity_id, ent.ref, inc, status, seq, ent.ref.get("comm") or ent.entity_id, why)

    def _anomaly(self, entity_id: str, ref: dict, inc: Incident, status: str, seq: int, lead: str, why: str,
                 **extra) -> Anomaly:
        inc.revision += 1
        top = self._top(inc)
        sev = severity_of(inc.max_ratio)
        inc.published_seq, inc.published_ratio, inc.published_severity = seq, inc.max_ratio, sev
        inc.published_top, inc.published_models = [f for f, _ in top], list(inc.models)
        families = ", ".join(dict.fromkeys(model_family(m) for m in inc.models))  # `models` has the full ids
        summary = (f"{lead}: {families} over threshold in {inc.windows_over} window(s), "
                   f"max {inc.max_ratio:.2f}x threshold ({sev})")
        if top:
            summary += "; top features: " + ", ".join(f for f, _ in top[:3])
        if status == "closed":
            summary += "; closed" + (f" ({why})" if why else "")
        fields = {"first_window_seq": inc.first_seq, **extra}
        return Anomaly(
            entity_id=entity_id, **{k: ref.get(k) for k in _REF_FIELDS if ref.get(k) is not None},
            anomaly_id=inc.anomaly_id, revision=inc.revision, status=status, severity=sev,
            start_ts=inc.start_ts, last_ts=inc.last_ts, end_ts=inc.last_over_ts if status == "closed" else None,
            score=inc.best_score, threshold=inc.best_threshold, models=list(inc.models),
            root_causes=[RootCause(feature=f, contribution=round(v, 6)) for f, v in top], summary=summary,
            max_ratio=inc.max_ratio, windows_over=inc.windows_over, **fields,
        )

    # -- host-wide events ---------------------------------------------------------------------
    def _remember(self, ent: EntityState, ev: Evidence, s: Score) -> None:
        """Keep the recent over-threshold windows' weights: the entity's current root-cause profile."""
        ent.last_over_ts = max(ent.last_over_ts, ev.end_ts)
        ent.recent = self._recent_plus(ent.recent, [ev.end_ts, ev.weights], s, most=8 * self.cfg.open_after)

    def _track_top(self, ent: EntityState, s: Score, learn: bool) -> None:
        """Remember which feature leads this score's contributions; with ``learn`` (the score is under
        threshold and no host-wide event is open), learn how often each feature leads."""
        top = _top_feature(s)
        if top is None:
            return
        ent.recent_top = self._recent_plus(ent.recent_top, [s.window_end_ts, top], s, most=4 * self.cfg.open_after)
        if learn:
            a = TOP_FREQ_ALPHA
            for f in list(ent.top_freq):
                ent.top_freq[f] *= 1 - a
                if ent.top_freq[f] < 1e-4:
                    del ent.top_freq[f]
            ent.top_freq[top] = ent.top_freq.get(top, 0.0) + a
            ent.top_n += 1

    def _recent_plus(self, rows: list, row: list, s: Score, most: int) -> list:
        """``rows`` ([window_end_ts, ...], oldest first) with ``row`` added, keeping the rows of the last
        ``2 * open_after`` windows, at most ``most``."""
        keep_from = row[0] - 2 * self.cfg.open_after * s.gap * s.interval_s
        return [r for r in rows if r[0] >= keep_from][-(most - 1):] + [row]

    @staticmethod
    def _usual_lead(ent: EntityState, feature: str) -> float:
        """How often ``feature`` leads ``ent``'s windows under threshold (1 until enough were seen)."""
        if ent.top_n < TOP_FREQ_MIN_WINDOWS:
            return 1.0
        return ent.top_freq.get(feature, 0.0) / (1.0 - (1.0 - TOP_FREQ_ALPHA) ** ent.top_n)  # unbiased from 0

    def _host_group(self, ent: EntityState, hs: HostState, s: Score) -> list[EntityState] | None:
        """The entities to fold into a host-wide event with ``ent`` (which is over), or None.

        An open event takes ``ent`` while its recent profile is like the event's (cosine similarity
        at least ``host_similarity``, or the same leading feature). Otherwise an event forms when,
        among the host's judged entities that reported lately (at least ``host_min_entities``), at
        least ``host_min_entities`` and ``host_share`` of them moved together within the same
        ``open_after`` windows (with one window of slack, as windows of different processes need not
        be aligned), either way:

        * *together over*: they were over threshold, with profiles similar to ``ent``'s;
        * *a shared lead*: the feature that leads ``ent``'s profile led most of their recent windows,
          over threshold or not, and at least ``host_lift`` times as many entities as usual (each
          entity's usual rate is learnt from its windows under threshold). This is how contention
          looks: every process waits more for a CPU, a few cross their thresholds.

        Entities with an incident of their own count but keep it.
        """
        cfg = self.cfg
        view = self._host_view(ent, hs, s)
        if view is None:
            return None
        w, since, mine, lead = view
        if hs.incident is not None:
            ev = hs.incident.evidence
            alike = _cosine(mine, ev) >= cfg.host_similarity or (ev and lead == _lead(ev))
            return [ent] if alike else None
        active = self._active(hs, since - w)
        need = self._need(len(active))
        if len(active) < need:
            return None
        together = [p for p in active if p is ent or (p.last_over_ts >= since - w and
                                                      _cosine(_profile(p, since - w), mine) >= cfg.host_similarity)]
        if len(together) >= need:
            return [p for p in together if p.incident is None]
        shared = [p for p in active if _leads(p, lead, since - w)]
        usual = sum(self._usual_lead(p, lead) for p in active)
        if ent in shared and len(shared) >= need and len(shared) >= cfg.host_lift * usual:
            return [p for p in shared if p.incident is None]
        return None

    def _host_view(self, ent: EntityState, hs: HostState, s: Score):
        """What judging ``ent`` against its host needs: the window length, the start of the last
        ``open_after`` windows, and ``ent``'s profile over them and its leading feature; None while
        ``ent`` has no profile."""
        w = s.gap * s.interval_s
        since = s.window_end_ts - (self.cfg.open_after - 0.5) * w
        mine = _profile(ent, since)
        return (w, since, mine, _lead(mine)) if mine else None

    def _active(self, hs: HostState, since: float) -> list[EntityState]:
        """The host's entities that are judged (past calibration) and reported at or after ``since``."""
        peers = (self.entities.get(e) for e in sorted(self._by_host.get(hs.host, ())))
        return [p for p in peers if p is not None and p.last_ts >= since
                and any(st.judged_threshold is not None for st in p.streams.values())]

    def _need(self, active: int) -> int:
        """How many entities a host event needs, among ``active`` judged entities of the host."""
        return max(self.cfg.host_min_entities, math.ceil(self.cfg.host_share * active))

    def _host_stirs(self, ent: EntityState, hs: HostState, s: Score) -> bool:
        """Whether ``ent``, due to open an incident of its own, should wait (up to ``host_hold`` windows)
        because a host-wide event may be forming: no event is open, and with ``ent`` at least half
        of the entities a host event needs (and ``host_min_entities``) show the start of one. A peer
        shows it when it was over threshold lately with a profile like ``ent``'s, or when ``ent``'s
        leading feature led its latest window and usually leads fewer than half of them. The entities
        that cross first (those with the lowest thresholds) are the ones this keeps out of incidents
        of their own."""
        if hs.incident is not None:
            return False
        view = self._host_view(ent, hs, s)
        if view is None:
            return False
        w, since, mine, lead = view
        cfg, since = self.cfg, since - w
        active = self._active(hs, since)
        need = self._need(len(active))
        stirring = 1 + sum(1 for p in active if p is not ent and (
            (p.last_over_ts >= since and _cosine(_profile(p, since), mine) >= cfg.host_similarity)
            or (p.recent_top and p.recent_top[-1][0] >= since and p.recent_top[-1][1] == lead
                and self._usual_lead(p, lead) < 0.5)))
        return stirring >= max(cfg.host_min_entities, math.ceil(need / 2))

    def _fold(self, hs: HostState, members: list[EntityState], s: Score) -> list[Anomaly]:
        """Fold the members' windows over threshold into the host's event (opened if none is)."""
        t = _ms(s.window_end_ts)
        evs = [replace(ev, seq=_ms(ev.end_ts)) for m in members for st in m.streams.values() for ev in st.pending]
        inc, opened = hs.incident, False
        if inc is None:
            evs.sort(key=lambda e: (e.seq, e.model_id))
            first = max(evs[0].seq, hs.last_closed_seq + 1)
            inc = hs.incident = Incident(anomaly_id=anomaly_id_for(hs.key, first), first_seq=first,
                                         start_ts=evs[0].start_ts, last_seq=t, last_ts=s.window_end_ts,
                                         last_over_seq=evs[0].seq, last_over_ts=evs[0].end_ts)
            hs.members, opened = [], True
        for ev in evs:
            _add(inc, ev)
        for m in members:
            for st in m.streams.values():
                st.pending = []
            m.host_event = inc.anomaly_id
            if m.entity_id not in hs.members:
                hs.members.append(m.entity_id)
            self._dirty.add(m.entity_id)
        self._dirty.add(hs.key)
        if t > inc.last_seq:
            inc.last_seq, inc.last_ts = t, s.window_end_ts
        if opened:
            self.counters["host_opened"] += 1
            return [self._publish_host(hs, inc, "open", t)]
        if t > inc.published_seq and self._changed(inc):
            self.counters["host_updated"] += 1
            return [self._publish_host(hs, inc, "update", t)]
        return []

    def _host_check(self, ent: EntityState, hs: HostState, s: Score) -> list[Anomaly]:
        """After a score of ``ent``: it leaves the host's event once under threshold for ``close_after``
        windows (or when it opened its own incident); the event closes when no member is in it or none
        was over for ``close_after`` windows (and a half, for unaligned windows)."""
        inc = hs.incident
        left = ent.host_event is not None and (inc is None or ent.host_event != inc.anomaly_id
                                               or ent.incident is not None or self._should_close(ent))
        if left:
            ent.host_event = None
        if inc is None:
            return []
        # whether any member is still in it can only change when one leaves
        held = not left or any((m := self.entities.get(e)) is not None and m.host_event == inc.anomaly_id
                               for e in hs.members)
        quiet = s.window_end_ts - inc.last_over_ts > (self.cfg.close_after + 0.5) * s.gap * s.interval_s
        return self._close_host(hs) if quiet or not held else []

    def _close_host(self, hs: HostState, why: str = "") -> list[Anomaly]:
        inc, hs.incident = hs.incident, None
        hs.last_closed_seq = max(hs.last_closed_seq, inc.last_seq)
        for e in hs.members:
            m = self.entities.get(e)
            if m is not None and m.host_event == inc.anomaly_id:
                m.host_event = None
                self._dirty.add(e)
        self._dirty.add(hs.key)
        self.counters["host_closed"] += 1
        return [self._publish_host(hs, inc, "closed", inc.last_seq, why)]

    def _publish_host(self, hs: HostState, inc: Incident, status: str, seq: int, why: str = "") -> Anomaly:
        def who(eid: str) -> str:
            ref = (self.entities[eid].ref if eid in self.entities else {})
            return f"{ref['comm']} ({ref['pid']})" if ref.get("comm") and ref.get("pid") is not None else eid
        names = [who(e) for e in hs.members]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lead = (f"host {hs.host}: {len(names)} watched processes deviate together with the same profile ({shown}), "
                "a common cause on the host (e.g. CPU contention) rather than one process's own behaviour")
        return self._anomaly(hs.key, {"host": hs.host}, inc, status, seq, lead, why, scope="host",
                             members=list(hs.members), first_window_seq=None)

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


def _ms(ts: float) -> int:
    """A window end time as the integer "seq" of host-wide events (milliseconds)."""
    return int(round(ts * 1000))


def _profile(ent: EntityState, since: float) -> dict[str, float]:
    """Summed weights of ``ent``'s windows over threshold that end at or after ``since``."""
    out: dict[str, float] = {}
    for ts, weights in ent.recent:
        if ts >= since:
            for f, v in weights.items():
                out[f] = out.get(f, 0.0) + v
    return out


def _lead(profile: Mapping[str, float]) -> str:
    """The feature with the largest weight (ties: the last name)."""
    return max(profile, key=lambda f: (profile[f], f))


def _top_feature(s: Score) -> str | None:
    best, top = 0.0, None
    for f, c in zip(s.features, s.contributions):
        if math.isfinite(c) and c > best:
            best, top = c, f
    return top


def _leads(ent: EntityState, feature: str, since: float) -> bool:
    """``feature`` led at least half of ``ent``'s windows ending at or after ``since``."""
    tops = [f for ts, f in ent.recent_top if ts >= since]
    return bool(tops) and 2 * tops.count(feature) >= len(tops)


def _cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Cosine similarity of two non-negative feature profiles (0 when either is empty).

    >>> round(_cosine({"cpu": 1.0}, {"cpu": 2.0, "mem": 0.0}), 6), _cosine({"cpu": 1.0}, {"mem": 1.0})
    (1.0, 0.0)
    """
    dot = sum(v * b.get(f, 0.0) for f, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


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
