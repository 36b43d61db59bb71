"""Per-entity windows and incremental MSCRED signature matrices (the featurizer's pure core).

Incremental update (O(N^2) per sample, independent of the scales): samples are grouped into
blocks of ``B = gcd(gap, scales)`` consecutive samples; when a block completes, its sum of outer
products X_b^T X_b (one small matrix product) is stored in a ring of the last ``span / B`` blocks.
When a window is due, each signature matrix M(t, w) = (1/w) * sum over its w/B blocks is read
off a prefix sum over that ring. Nothing is ever recomputed from the raw window, and sums are
exact (no running-sum drift): each block is summed once from its raw rows in float64.

Policy for imperfect input (per entity; ``seq`` is the Sample's consecutive interval number):

* **feature set**: fixed when the entity is first seen: the scaling ranges' features if ranges are
  known (``--ranges`` file or state dir), else ``--features`` if given, else the sorted metric
  names of the entity's first sample. Metrics outside the set are ignored (counted).
* **missing metric** in a sample: the feature's last value is carried forward; a feature never
  seen yet takes its calibration minimum (scaled 0). Counted as ``missing_value``.
* **duplicate** (seq equal to the last one) and **late / out of order** (seq lower): dropped and
  counted (``duplicate``, ``late``); windows already emitted are never revised.
* **gap** (seq jumps ahead by k > 1): up to ``max_fill`` missing samples are filled with the last
  sample (counted ``filled``); a longer gap restarts the entity's window, so no window spans it
  (counted ``reset``); windows resume once ``span`` consecutive samples are in.
* **calibration**: with no known ranges, the first ``calibration_samples`` samples are buffered,
  min-max ranges are fitted on them and persisted, then the buffered samples are processed like
  any others (their windows are emitted too).
* **eviction**: an entity with no sample for ``idle_timeout_s`` (wall clock) is dropped, and the
  least recently seen entities are dropped when more than ``max_entities`` are live, so memory
  stays bounded with process churn.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges, span


@dataclass(frozen=True)
class WindowConfig:
    scales: tuple[int, ...] = DEFAULT_SCALES
    gap: int = DEFAULT_GAP
    step: int = DEFAULT_STEP
    max_fill: int = 3
    calibration_samples: int = 300
    idle_timeout_s: float = 300.0
    max_entities: int = 10_000
    clip: float = 10.0

    def __post_init__(self):
        if self.gap < 1 or self.step < 1 or not self.scales or min(self.scales) < 1:
            raise ValueError("gap, step and every scale must be at least 1")
        if self.calibration_samples < 2:
            raise ValueError("calibration_samples must be at least 2")

    @property
    def span(self) -> int:
        return span(self.scales, self.gap, self.step)

    @property
    def block(self) -> int:
        return int(math.gcd(self.gap, *self.scales))


@dataclass
class Window:
    """What a due window holds (the service wraps it into a SignatureWindow)."""

    end_seq: int
    signatures: np.ndarray  # float32 [step, S, N, N]
    values: np.ndarray  # float32 [max(scales), N]


@lru_cache(maxsize=32)
def _plan(cfg: WindowConfig) -> list[tuple[int, slice, slice, float]]:
    """Per scale: (channel, slice of window ends, slice of window starts, 1/w), as slices of the
    chronological prefix sums over the ring of blocks (step k ends at block nb - (step-1-k)*gap/B)."""
    nb = cfg.span // cfg.block
    g = cfg.gap // cfg.block
    e0 = nb - (cfg.step - 1) * g
    plan = []
    for s, w in enumerate(cfg.scales):
        wb = w // cfg.block
        plan.append((s, slice(e0, nb + 1, g), slice(e0 - wb, nb + 1 - wb, g), 1.0 / w))
    return plan


class EntityWindow:
    """One entity's ring of scaled samples and block sums."""

    __slots__ = ("cfg", "ranges", "n", "ring", "ring_off", "blocks", "last_seq", "contig", "last_raw",
                 "_lo", "_den", "_clip", "_prefix")

    def __init__(self, cfg: WindowConfig, ranges: Ranges):
        self.cfg = cfg
        self.ranges = ranges
        self.n = len(ranges.features)
        L = cfg.span
        self.ring = np.zeros((L, self.n), np.float64)
        self.ring_off = np.full(L, -1, np.int64)  # input offset each ring row came from
        self.blocks = np.zeros((L // cfg.block, self.n, self.n), np.float64)
        self.last_seq: int | None = None
        self.contig = 0  # consecutive samples in the ring, ending at last_seq
        self.last_raw: np.ndarray | None = None
        self._lo, self._den, self._clip = ranges.lo, ranges.scale_den, ranges.clip
        self._prefix = np.zeros((self.blocks.shape[0] + 1, self.n, self.n))

    def push(self, seq: int, raw: np.ndarray, offset: int = -1) -> Window | None:
        """Add one (already gap-checked, consecutive) raw sample; return a window if one is due."""
        cfg, L = self.cfg, self.cfg.span
        self.last_raw = raw
        row = seq % L
        z = self.ring[row]
        np.subtract(raw, self._lo, out=z)
        np.divide(z, self._den, out=z)
        np.clip(z, -self._clip, self._clip, out=z)
        self.ring_off[row] = offset
        self.last_seq = seq
        self.contig += 1
        B = cfg.block
        if (seq + 1) % B == 0 and self.contig >= B:
            if B == 1:
                blk = np.multiply.outer(z, z)
            else:
                idx = np.arange(seq - B + 1, seq + 1) % L
                rows = self.ring[idx]
                blk = rows.T @ rows
            self.blocks[((seq + 1) // B - 1) % self.blocks.shape[0]] = blk
        if (seq + 1) % cfg.gap == 0 and self.contig >= L:
            return self._window(seq)
        return None

    def _window(self, seq: int) -> Window:
        cfg, L = self.cfg, self.cfg.span
        nb = self.blocks.shape[0]
        first = ((seq + 1) // cfg.block) % nb  # ring slot of the oldest block
        prefix = self._prefix  # prefix[j] = sum of the j oldest blocks
        np.cumsum(self.blocks[first:], axis=0, out=prefix[1:nb - first + 1])
        if first:
            np.cumsum(self.blocks[:first], axis=0, out=prefix[nb - first + 1:])
            prefix[nb - first + 1:] += prefix[nb - first]
        sig = np.empty((cfg.step, len(cfg.scales), self.n, self.n), np.float32)
        for s, ends, starts, inv_w in _plan(cfg):
            np.multiply(prefix[ends] - prefix[starts], inv_w, out=sig[:, s], casting="same_kind")
        T = max(cfg.scales)
        vals = np.take(self.ring, np.arange(seq - T + 1, seq + 1), axis=0, mode="wrap").astype(np.float32)
        return Window(seq, sig, vals)

    def reset(self) -> None:
        self.contig = 0

    def oldest_needed_offset(self) -> int | None:
        """Input offset of the oldest sample that a future window still needs."""
        if self.last_seq is None or self.contig == 0:
            return None
        cfg, L = self.cfg, self.cfg.span
        s = self.last_seq
        nxt = s + 1 + (-(s + 2)) % cfg.gap  # next seq e > s with (e + 1) % gap == 0
        need_from = max(nxt - L + 1, s - min(self.contig, L) + 1)
        if need_from > s:
            return None
        offs = self.ring_off[np.arange(need_from, s + 1) % L]
        offs = offs[offs >= 0]
        return int(offs.min()) if offs.size else None


@dataclass
class EntityState:
    features: tuple[str, ...]
    window: EntityWindow | None  # None while calibrating
    calib: list = field(default_factory=list)  # (seq, raw, offset) while calibrating
    last_seq: int | None = None
    last_raw: np.ndarray | None = None
    last_seen: float = 0.0
    partition: int = -1
    ref: dict = field(default_factory=dict)  # host, pid, comm, cgroup, container_id of the latest sample
    interval_s: float = 1.0
    last_ts: float = 0.0
    warned_extra: bool = False

    def __post_init__(self):
        self.featset = frozenset(self.features)
        g = operator.itemgetter(*self.features)
        self.getter = g if len(self.features) > 1 else (lambda d, _g=g: (_g(d),))


class Counters(dict):
    def add(self, k: str, n: int = 1) -> None:
        self[k] = self.get(k, 0) + n


class WindowStore:
    """All entities' windows. Feed raw metric dicts in; get due windows out.

    >>> import numpy as np
    >>> st = WindowStore(WindowConfig(scales=(2, 4), gap=2, step=2, calibration_samples=4))
    >>> outs = [st.add("e", i, float(i), 1.0, {"a": float(i % 3), "b": 1.0}) for i in range(12)]
    >>> [w.end_seq for o in outs for _, w in o]
    [5, 7, 9, 11]
    """

    def __init__(self, cfg: WindowConfig, ranges_lookup=None, ranges_sink=None, features: list[str] | None = None):
        self.cfg = cfg
        self.entities: OrderedDict[str, EntityState] = OrderedDict()
        self.counters = Counters()
        self._lookup = ranges_lookup or (lambda entity_id: None)
        self._sink = ranges_sink or (lambda entity_id, ranges: None)
        self._features = tuple(features) if features else None

    # -- input ---------------------------------------------------------------------------------
    def add(self, entity_id: str, seq: int, ts: float, interval_s: float, metrics: dict[str, float],
            offset: int = -1, partition: int = -1, now: float = 0.0, ref: dict | None = None) -> list[tuple[EntityState, Window]]:
        st = self.entities.get(entity_id)
        if st is None:
            st = self._new_entity(entity_id, metrics)
            self.entities[entity_id] = st
            if len(self.entities) > self.cfg.max_entities:
                old, _ = self.entities.popitem(last=False)
                self.counters.add("evicted_capacity")
        else:
            self.entities.move_to_end(entity_id)
        st.last_seen = now
        st.partition = partition
        st.interval_s, st.last_ts = interval_s, ts
        if ref is not None:
            st.ref = ref
        if st.last_seq is not None and seq <= st.last_seq:
            self.counters.add("duplicate" if seq == st.last_seq else "late")
            return []
        raw = self._vector(st, metrics)
        out: list[tuple[EntityState, Window]] = []
        if st.last_seq is not None and seq > st.last_seq + 1:
            missing = seq - st.last_seq - 1
            if missing <= self.cfg.max_fill:
                self.counters.add("filled", missing)
                for s in range(st.last_seq + 1, seq):
                    out += self._push(entity_id, st, s, st.last_raw, offset)
            else:
                self.counters.add("reset")
                if st.window is not None:
                    st.window.reset()
        out += self._push(entity_id, st, seq, raw, offset)
        st.last_seq, st.last_raw = seq, raw
        return out

    def _new_entity(self, entity_id: str, metrics: dict[str, float]) -> EntityState:
        ranges = self._lookup(entity_id)
        if ranges is not None:
            feats = ranges.features
        else:
            feats = self._features or tuple(sorted(metrics))
        if not feats:
            raise ValueError(f"entity {entity_id}: the first sample has no metrics and no feature list is configured")
        win = EntityWindow(self.cfg, ranges) if ranges is not None else None
        return EntityState(features=tuple(feats), window=win)

    def _vector(self, st: EntityState, metrics: dict[str, float]) -> np.ndarray:
        try:
            vec = np.array(st.getter(metrics), dtype=np.float64)
        except KeyError:
            pass  # some feature is missing: the slow path below fills it
        else:
            if not st.warned_extra and len(metrics) > len(st.features):
                st.warned_extra = True
                self.counters.add("extra_metrics_entities")
            return vec
        feats = st.features
        get = metrics.get
        vals = [get(f) for f in feats]
        if None in vals:
            prev = st.last_raw
            for i, v in enumerate(vals):
                if v is None:
                    if prev is not None:
                        vals[i] = prev[i]
                    elif st.window is not None:
                        vals[i] = st.window.ranges.lo[i]
                    else:
                        vals[i] = math.nan  # filled from the calibration minimum when ranges are fitted
                    self.counters.add("missing_value")
        if not st.warned_extra and not metrics.keys() <= st.featset:
            st.warned_extra = True
            self.counters.add("extra_metrics_entities")
        return np.array(vals, dtype=np.float64)

    def _push(self, entity_id: str, st: EntityState, seq: int, raw: np.ndarray, offset: int):
        if st.window is None:
            st.calib.append((seq, raw, offset))
            if len(st.calib) < self.cfg.calibration_samples:
                return []
            data = np.stack([r for _, r, _ in st.calib])
            ranges = Ranges.fit(st.features, data, clip=self.cfg.clip)
            lo = np.where(np.isfinite(ranges.lo), ranges.lo, 0.0)
            hi = np.where(np.isfinite(ranges.hi), ranges.hi, lo)
            ranges = Ranges(ranges.features, lo, hi, ranges.clip)
            self._sink(entity_id, ranges)
            st.window = EntityWindow(self.cfg, ranges)
            self.counters.add("calibrated")
            out = []
            for s, r, o in st.calib:
                r = np.where(np.isnan(r), lo, r)
                w = st.window.push(s, r, o)
                if w is not None:
                    out.append((st, w))
            st.calib = []
            return out
        w = st.window.push(seq, raw, offset)
        return [(st, w)] if w is not None else []

    # -- housekeeping --------------------------------------------------------------------------
    def evict_idle(self, now: float) -> list[str]:
        gone = []
        while self.entities:
            eid, st = next(iter(self.entities.items()))
            if now - st.last_seen < self.cfg.idle_timeout_s:
                break
            self.entities.popitem(last=False)
            gone.append(eid)
        if gone:
            self.counters.add("evicted_idle", len(gone))
        return gone

    def drop_partitions(self, partitions: set[int]) -> int:
        drop = [e for e, st in self.entities.items() if st.partition in partitions]
        for e in drop:
            del self.entities[e]
        return len(drop)

    def retained(self) -> dict[int, int]:
        """Per partition, the oldest input offset still needed by some entity's future windows."""
        out: dict[int, int] = {}
        for st in self.entities.values():
            if st.window is None:
                off = min((o for _, _, o in st.calib if o >= 0), default=None)
            else:
                off = st.window.oldest_needed_offset()
            if off is not None and st.partition >= 0:
                cur = out.get(st.partition)
                out[st.partition] = off if cur is None else min(cur, off)
        return out
