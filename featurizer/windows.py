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
  names of the entity's first sample but :data:`NOT_DEFAULT_FEATURES` (``open_fds``). Metrics outside the
  set are ignored (counted).
* **missing metric** in a sample: the feature's last value is carried forward; a feature never
  seen yet takes its calibration minimum (scaled 0). Counted as ``missing_value``.
* **duplicate** (seq equal to the last one) and **late / out of order** (seq lower): dropped and
  counted (``duplicate``, ``late``); windows already emitted are never revised.
* **gap** (seq jumps ahead by k > 1): up to ``max_fill`` missing samples are filled with the last
  sample (counted ``filled``); a longer gap restarts the entity's window, so no window spans it
  (counted ``reset``); windows resume once ``span`` consecutive samples are in.
* **calibration**: with no known ranges, the first ``calibration_samples`` samples are buffered,
  min-max ranges are fitted on them -- all but the first ``calibration_warmup`` ones (at most a
  quarter), and at least ``range_floor`` (5%) of the metric's level wide, so a
  process's start-up burst does not stretch its normal range -- and persisted, then the buffered
  samples are processed like any others (their windows are emitted too).
* **eviction**: an entity with no sample for ``idle_timeout_s`` (wall clock) is dropped, and the
  least recently seen entities are dropped when more than ``max_entities`` are live, so memory
  stays bounded with process churn.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges, span, squash
from osad.runtime.config import Config, at_least, in_range, int_list, non_negative, positive, setting
from osad.schemas.wire import MAX_MESSAGE_BYTES


def _scales(text: str) -> tuple[int, ...]:
    return tuple(int_list(text))


def _every_scale_positive(scales) -> str | None:
    return None if scales and min(scales) >= 1 else "give at least one scale, each at least 1"


#: metrics a Sample carries that are not features unless --features names them. ``open_fds``: a snapshot at the
#: end of each interval of a count that any process opening and closing files moves by a few at any instant; after
#: min-max scaling on a calibration stretch where it happened to stay put, such a jitter dominated the score (the
#: end-to-end fault test's normal stretch: four false incidents, each led by open_fds, none without it), while the
#: leak it would show is a trend over many windows. It stays in the Samples, for root cause and reports.
NOT_DEFAULT_FEATURES = frozenset({"open_fds"})


def window_bytes(n_features: int, cfg: "WindowConfig") -> int:
    """An upper estimate of one encoded SignatureWindow of ``n_features`` metrics: float32 upper triangles
    [step, scales, N(N+1)/2] and raw values [max(scales), N], plus a header of at most 300 bytes a feature.

    >>> window_bytes(20, WindowConfig()) < 64 * 1024 < window_bytes(600, WindowConfig())
    True
    """
    n = n_features
    return 4 * (cfg.step * len(cfg.scales) * n * (n + 1) // 2 + max(cfg.scales) * n) + 300 * n + 4096


def max_features(cfg: "WindowConfig") -> int:
    """The most metrics per entity whose windows fit in one message (:data:`MAX_MESSAGE_BYTES`).

    >>> max_features(WindowConfig())
    519
    """
    n = 1
    while window_bytes(n + 1, cfg) <= MAX_MESSAGE_BYTES:
        n += 1
    return n


@dataclass(frozen=True)
class WindowConfig(Config):
    """The window settings (``osad featurizer`` flags, ``OSAD_*`` variables), declared once.

    >>> WindowConfig(scales=(2, 4), gap=2, step=2).span
    6
    """

    scales: tuple[int, ...] = setting(DEFAULT_SCALES, parse=_scales, check=_every_scale_positive,
                                      help="signature matrix scales w, in samples")
    gap: int = setting(DEFAULT_GAP, check=positive, help="samples between windows")
    step: int = setting(DEFAULT_STEP, check=positive, help="signature tensors per window")
    # 120: two minutes at one Sample a second, so that with the detector's jump-start score and the alerter's
    # provisional threshold (--arm-scores 16 windows) a new process is judged within about 250 s of its first
    # Sample (docs/alerter.md "Arming"); the detector's calibration standardises each metric's residual on its
    # own normal windows, so these ranges mostly set the soft clip
    calibration_samples: int = setting(120, check=at_least(2),
                                       help="samples buffered to learn an entity's ranges when none are known")
    calibration_warmup: int = setting(20, check=non_negative,
                                      help="first samples of an entity left out of its calibration, at most a "
                                      "quarter of them (a process's start-up is not its normal)")
    range_floor: float = setting(0.05, check=in_range(0, 1, lo_open=False),
                                 help="ranges learned by calibration are at least this share of a metric's level "
                                 "wide (a metric that hardly moved while calibrating is not anomalous for moving "
                                 "by a few pages)")
    max_fill: int = setting(3, check=non_negative,
                            help="longest gap (in samples) filled by carrying the last sample forward")
    idle_timeout_s: float = setting(300.0, check=positive, help="evict an entity after this long without samples")
    max_entities: int = setting(10_000, check=positive, help="most entities kept (least recently seen evicted)")
    clip: float = setting(10.0, check=positive, help="soft-clip scaled values beyond +-clip ranges: z becomes "
                          "clip*(1+ln(|z|/clip)), order kept")

    @property
    def warmup_samples(self) -> int:
        """Samples left out of calibration: ``calibration_warmup``, at most a quarter of them."""
        return min(self.calibration_warmup, self.calibration_samples // 4)

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
    tri: np.ndarray  # float32 [step, S, N(N+1)/2]: upper triangles of the signature matrices
    values: np.ndarray  # float32 [max(scales), N]

    @property
    def signatures(self) -> np.ndarray:
        from osad.schemas.wire import unpack_symmetric

        return unpack_symmetric(self.tri, self.values.shape[1])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class EntityWindow:
    """One entity's incremental state.

    * a ring of the last ``span`` scaled rows (and the input offset of each);
    * a ring of block sums: X_b^T X_b over each block of B = gcd(gap, scales) samples, as float64
      upper triangles, covering the largest scale;
    * a ring of the last ``step`` *step tensors*: the S signature matrices at one window end.
      Consecutive windows share step-1 of their step tensors, so each is computed once, when its
      end sample arrives, from prefix sums over the block ring: M(t, w) = (1/w) sum of w/B blocks.

    Work per sample: scaling, plus one B x N x N product per block (amortised N^2); per gap
    samples: one step tensor (S subtractions of N(N+1)/2 values); per window: copying ``step``
    cached tensors. Nothing is recomputed from raw rows, and sums are exact (every block is summed
    once from its rows, in float64; there is no running-sum drift).

    ``push_run`` takes a run of consecutive samples (one or many; long runs such as a backlog
    are processed vectorised) and returns the windows that fall due in it.
    """

    __slots__ = ("cfg", "n", "ring", "ring_off", "blocks", "steps", "last_seq", "contig", "ranges",
                 "_lo", "_den", "_clip", "_iu", "_W")

    def __init__(self, cfg: WindowConfig, ranges: Ranges):
        self.cfg = cfg
        self.ranges = ranges
        self.n = len(ranges.features)
        L = cfg.span
        nt = self.n * (self.n + 1) // 2
        self._W = max(cfg.scales)
        self.ring = np.zeros((L, self.n), np.float64)  # scaled rows, row seq % L
        self.ring_off = np.full(L, -1, np.int64)  # input offset each ring row came from
        self.blocks = np.zeros((self._W // cfg.block, nt), np.float64)  # block j at slot j % len
        self.steps = np.zeros((cfg.step, len(cfg.scales), nt), np.float32)  # point p at slot p % step
        self.last_seq: int | None = None
        self.contig = 0  # consecutive samples ending at last_seq
        self._lo, self._den, self._clip = ranges.lo, ranges.scale_den, ranges.clip
        self._iu = np.triu_indices(self.n)

    def push(self, seq: int, raw: np.ndarray, offset: int = -1) -> Window | None:
        """Add one sample (seq = last_seq + 1, or any seq after a reset)."""
        out = self.push_run(seq, np.asarray(raw, np.float64)[None, :], np.array([offset], np.int64))
        return out[0] if out else None

    def push_run(self, seq0: int, raw: np.ndarray, offs: np.ndarray) -> list[Window]:
        """Add samples seq0, seq0+1, ... (rows of ``raw``); return the windows that fall due."""
        L, B, gap, W = self.cfg.span, self.cfg.block, self.cfg.gap, self._W
        m = raw.shape[0]
        contig0 = self.contig
        last = seq0 + m - 1
        first_ok = seq0 - contig0  # earliest seq of the contiguous stretch
        # blocks that complete in this run with all their rows in the stretch
        j_lo = max(_ceil_div(seq0 + 1, B) - 1, _ceil_div(first_ok, B))
        j_hi = (last + 1) // B - 1
        # step points in this run: (t + 1) % gap == 0 with the largest scale's rows in the stretch
        t_min = max(seq0, first_ok + W - 1)
        t_min += (-(t_min + 1)) % gap
        if m == 1 and j_hi < j_lo and t_min > last:  # the common streaming case: just store the row
            z = self.ring[seq0 % L]
            np.subtract(raw[0], self._lo, out=z)
            np.divide(z, self._den, out=z)
            squash(z, self._clip, out=z)
            self.ring_off[seq0 % L] = offs[0]
            self.last_seq = seq0
            self.contig = contig0 + 1
            return []
        z = np.subtract(raw, self._lo)
        np.divide(z, self._den, out=z)
        squash(z, self._clip, out=z)
        wins: list[Window] = []
        if j_hi >= j_lo or t_min <= last:
            h = min(contig0, L)
            base = seq0 - h  # seq of buf[0]
            buf = np.concatenate((np.take(self.ring, np.arange(base, seq0), axis=0, mode="wrap"), z)) if h else z
            new = None
            if j_hi >= j_lo:
                k = j_hi - j_lo + 1
                rows = buf[j_lo * B - base:(j_hi + 1) * B - base].reshape(k, B, self.n)
                new = np.matmul(rows.transpose(0, 2, 1), rows)[:, self._iu[0], self._iu[1]]
            if t_min <= last:
                wins = self._step_points(t_min, last, first_ok, new, j_lo, buf, base)
            if new is not None:
                kk = min(new.shape[0], self.blocks.shape[0])
                self.blocks[np.arange(j_hi - kk + 1, j_hi + 1) % self.blocks.shape[0]] = new[-kk:]
        r = min(m, L)
        slots = np.arange(last - r + 1, last + 1) % L
        self.ring[slots] = z[-r:]
        self.ring_off[slots] = offs[-r:]
        self.last_seq = last
        self.contig = contig0 + m
        return wins

    def _step_points(self, t_min: int, last: int, first_ok: int, new: np.ndarray, j_new: int,
                     buf: np.ndarray, base: int) -> list[Window]:
        cfg, B, gap, W = self.cfg, self.cfg.block, self.cfg.gap, self._W
        nbr, ns = self.blocks.shape[0], cfg.step
        jb = (t_min + 1 - W) // B  # oldest block the first point needs
        if j_new > jb:
            chron = np.concatenate((self.blocks[np.arange(jb, j_new) % nbr], new))
        else:  # the run's first blocks are older than any point needs
            chron = new[jb - j_new:]
        prefix = np.empty((chron.shape[0] + 1, chron.shape[1]))
        prefix[0] = 0.0
        np.cumsum(chron, axis=0, out=prefix[1:])
        g = gap // B
        e0 = (t_min + 1) // B - jb
        npts = (last - t_min) // gap + 1
        e1 = e0 + (npts - 1) * g + 1
        pts = np.empty((npts, len(cfg.scales), chron.shape[1]), np.float32)
        for s, w in enumerate(cfg.scales):
            wb = w // B
            np.multiply(prefix[e0:e1:g] - prefix[e0 - wb:e1 - wb:g], 1.0 / w, out=pts[:, s], casting="same_kind")
        p0 = (t_min + 1) // gap  # point number of the first new point
        # windows: points whose whole span is in the stretch
        e_first = max(t_min, first_ok + cfg.span - 1)
        e_first += (-(e_first + 1)) % gap
        wins: list[Window] = []
        if e_first <= last:
            hist = self.steps[np.arange(p0 - ns + 1, p0) % ns]  # the step-1 points before this run's
            allp = np.concatenate((hist, pts))  # point p0 - ns + 1 + i at row i
            ends = np.arange(e_first, last + 1, gap)
            pe = (ends + 1) // gap - (p0 - ns + 1)  # row of each window's newest point
            vbuf = buf[int(ends[0]) - W + 1 - base:].astype(np.float32)  # shared: windows are views
            vb0 = int(ends[0]) - W + 1
            wins = [Window(int(e), allp[p - ns + 1:p + 1], vbuf[e - W + 1 - vb0:e + 1 - vb0])
                    for e, p in zip(ends.tolist(), pe.tolist())]
        kk = min(npts, ns)
        self.steps[np.arange(p0 + npts - kk, p0 + npts) % ns] = pts[-kk:]
        return wins

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
    calib: list = field(default_factory=list)  # accepted (seq, raw tuple, offset) while calibrating
    last_seq: int | None = None  # last accepted seq
    last_raw: tuple | None = None  # its raw values
    last_off: int = -1  # its input offset
    last_seen: float = 0.0
    partition: int = -1
    warned_extra: bool = False
    had_nan: bool = False  # some feature was missing before it was ever seen

    def __post_init__(self):
        self.featset = frozenset(self.features)
        g = operator.itemgetter(*self.features)
        self.getter = g if len(self.features) > 1 else (lambda d, _g=g: (_g(d),))


class Counters(dict):
    def add(self, k: str, n: int = 1) -> None:
        self[k] = self.get(k, 0) + n


class WindowStore:
    """All entities' windows. Feed raw metric dicts in; get due windows out.

    >>> st = WindowStore(WindowConfig(scales=(2, 4), gap=2, step=2, calibration_samples=4))
    >>> outs = [st.add("e", i, {"a": float(i % 3), "b": 1.0}) for i in range(12)]
    >>> [w.end_seq for o in outs for _, w in o]
    [5, 7, 9, 11]
    """

    def __init__(self, cfg: WindowConfig, ranges_lookup=None, ranges_sink=None, features: list[str] | None = None,
                 window_cls: type[EntityWindow] = EntityWindow):
        self.cfg = cfg
        self.window_cls = window_cls
        self.entities: OrderedDict[str, EntityState] = OrderedDict()
        self.counters = Counters()
        self._lookup = ranges_lookup or (lambda entity_id: None)
        self._sink = ranges_sink or (lambda entity_id, ranges: None)
        self._features = tuple(features) if features else None

    # -- input ---------------------------------------------------------------------------------
    def add(self, entity_id: str, seq: int, metrics: dict[str, float], offset: int = -1, partition: int = -1,
            now: float = 0.0) -> list[tuple[EntityState, Window]]:
        """One sample of one entity."""
        return self.add_many(entity_id, [(seq, metrics, offset)], partition, now)

    def add_many(self, entity_id: str, items: list[tuple[int, dict[str, float], int]], partition: int = -1,
                 now: float = 0.0) -> list[tuple[EntityState, Window]]:
        """Samples (seq, metrics, input offset) of one entity, in arrival order."""
        if not items:
            return []
        st = self.entities.get(entity_id)
        if st is None:
            st = self._new_entity(entity_id, items[0][1])
            self.entities[entity_id] = st
            if len(self.entities) > self.cfg.max_entities:
                self.entities.popitem(last=False)
                self.counters.add("evicted_capacity")
        else:
            self.entities.move_to_end(entity_id)
        st.last_seen = now
        st.partition = partition
        accepted = self._accept(st, items)
        if not accepted:
            return []
        if st.window is None:
            st.calib += accepted
            if len(st.calib) < self.cfg.calibration_samples:
                return []
            accepted, st.calib = st.calib, []
            self._calibrate(entity_id, st, accepted)
        return self._feed(st, accepted)

    def _accept(self, st: EntityState, items) -> list:
        """Apply the input policy: drop duplicates and late samples, fill short gaps."""
        out = []
        last, last_raw, last_off = st.last_seq, st.last_raw, st.last_off
        max_fill = self.cfg.max_fill
        for seq, metrics, off in items:
            if last is not None and seq <= last:
                self.counters.add("duplicate" if seq == last else "late")
                continue
            raw = self._vector(st, metrics, last_raw)
            if last is not None and seq > last + 1:
                missing = seq - last - 1
                if missing <= max_fill:
                    self.counters.add("filled", missing)
                    out += [(s, last_raw, last_off) for s in range(last + 1, seq)]
                else:
                    self.counters.add("reset")  # the seq discontinuity restarts the window in _feed
            out.append((seq, raw, off))
            last, last_raw, last_off = seq, raw, off
        st.last_seq, st.last_raw, st.last_off = last, last_raw, last_off
        return out

    def _calibrate(self, entity_id: str, st: EntityState, entries: list) -> None:
        data = np.array([r for _, r, _ in entries[self.cfg.warmup_samples:]], dtype=np.float64)
        ranges = Ranges.fit(st.features, data, clip=self.cfg.clip)
        lo = np.where(np.isfinite(ranges.lo), ranges.lo, 0.0)
        hi = np.where(np.isfinite(ranges.hi), ranges.hi, lo)
        # A metric that hardly moved while calibrating (RSS, thread count) gets a range of at least
        # range_floor of its level: a change of a few pages is not an anomaly, a leak still is.
        need = self.cfg.range_floor * np.maximum(np.abs(lo), np.abs(hi))
        widen = np.maximum(need - (hi - lo), 0.0) / 2
        ranges = Ranges(ranges.features, lo - widen, hi + widen, ranges.clip)
        self._sink(entity_id, ranges)
        st.window = self.window_cls(self.cfg, ranges)
        self.counters.add("calibrated")

    def _feed(self, st: EntityState, entries: list) -> list[tuple[EntityState, Window]]:
        win = st.window
        out = []
        i, n = 0, len(entries)
        while i < n:
            j = i + 1
            while j < n and entries[j][0] == entries[j - 1][0] + 1:
                j += 1
            seq0 = entries[i][0]
            if win.last_seq is not None and seq0 != win.last_seq + 1:
                win.reset()
            if j - i == 1:
                raw = np.array(entries[i][1], dtype=np.float64)[None, :]
                offs = np.array([entries[i][2]], np.int64)
            else:
                raw = np.array([r for _, r, _ in entries[i:j]], dtype=np.float64)
                offs = np.fromiter((o for _, _, o in entries[i:j]), np.int64, j - i)
            if st.had_nan and np.isnan(raw).any():  # features never seen before calibration: their minimum
                raw = np.where(np.isnan(raw), win.ranges.lo, raw)
            out += [(st, w) for w in win.push_run(seq0, raw, offs)]
            i = j
        return out

    def _new_entity(self, entity_id: str, metrics: dict[str, float]) -> EntityState:
        ranges = self._lookup(entity_id)
        if ranges is not None:
            feats = ranges.features
        else:
            feats = self._features or tuple(sorted(m for m in metrics if m not in NOT_DEFAULT_FEATURES))
        if not feats:
            raise ValueError(f"entity {entity_id}: the first sample has no metrics and no feature list is configured")
        size = window_bytes(len(feats), self.cfg)
        if size > MAX_MESSAGE_BYTES:  # its windows could never be published: refuse it (its samples are dead-lettered)
            most = max_features(self.cfg)
            raise ValueError(f"entity {entity_id}: {len(feats)} metrics make windows of {size / 2**20:.1f} MiB, above "
                             f"the {MAX_MESSAGE_BYTES // 2**20} MiB message limit; send at most {most} metrics per "
                             "entity with these scales and step (or a --features list)")
        win = self.window_cls(self.cfg, ranges) if ranges is not None else None
        return EntityState(features=tuple(feats), window=win)

    def _vector(self, st: EntityState, metrics: dict[str, float], prev: tuple | None) -> tuple:
        try:
            vals = st.getter(metrics)
        except KeyError:
            pass  # some feature is missing: carry it forward below
        else:
            if not st.warned_extra and len(metrics) > len(st.features):
                st.warned_extra = True
                self.counters.add("extra_metrics_entities")
            return vals
        vals = []
        for i, f in enumerate(st.features):
            v = metrics.get(f)
            if v is None:
                self.counters.add("missing_value")
                if prev is not None:
                    v = prev[i]
                elif st.window is not None:
                    v = float(st.window.ranges.lo[i])
                else:
                    v = math.nan  # filled with the calibration minimum once ranges are fitted
                    st.had_nan = True
            vals.append(v)
        if not st.warned_extra and not metrics.keys() <= st.featset:
            st.warned_extra = True
            self.counters.add("extra_metrics_entities")
        return tuple(vals)

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
