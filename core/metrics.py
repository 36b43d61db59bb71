"""Detection-quality metrics: pure functions of scores, labels and per-feature contributions.

Conventions (the same everywhere in osad):

* ``scores``: float [T], higher = more anomalous; a point is *flagged* at threshold ``thr`` when
  ``score >= thr``.
* ``labels``: 0/1 [T], 1 = the point lies in a labelled anomaly.
* a *segment* is a maximal run of consecutive labelled points.

What each metric means (see ``docs/evaluation.md``):

* :func:`best_f1`: point-wise F1 at the best of all thresholds: a threshold-free upper bound of
  what the score can do (Quo Vadis, Sarfraz et al., ICML 2024, argue for reporting it instead of
  point-adjusted F1).
* :func:`auprc`: area under the precision-recall curve as *average precision*,
  ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds (no interpolation).
* :func:`pa_best_f1`: best F1 after *point adjustment* (Xu et al., WWW 2018, used by OmniAnomaly,
  KDD 2019): a labelled segment counts as fully found when any of its points is flagged. A random
  score reaches high values with it, so it is only for comparing with published tables.
* :func:`f1_at`: F1 at one given threshold (``deployed_f1`` when the threshold was chosen
  without labels, see :mod:`core.thresholds`).
* :func:`hitrate`: HitRate@P% for root cause (OmniAnomaly, Su et al., KDD 2019), per labelled
  anomaly segment: rank features by their mean contribution over the segment, take the top
  ``floor(P/100 * |G|)`` and count the share of the ground-truth features ``G`` among them.

Example::

    >>> import numpy as np
    >>> s = np.array([0.1, 0.9, 0.8, 0.2]); y = np.array([0, 1, 1, 0])
    >>> best_f1(s, y)["f1"]
    1.0
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["best_f1", "auprc", "pa_best_f1", "point_adjust", "f1_at", "segments", "hitrate", "prf"]


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf values; score every point first")
    return s, (y > 0)


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """precision, recall, F1 from counts (0 where undefined)."""
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / (tp + fn) if tp + fn > 0 else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return float(p), float(r), float(f)


def _curve(s: np.ndarray, y: np.ndarray):
    """Distinct thresholds (descending) and cumulative TP/FP when flagging ``score >= thr``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # the last index of each run of equal scores: all tied points are flagged together
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    return s_sorted[last], tp[last].astype(np.float64), fp[last].astype(np.float64)


def best_f1(scores, labels) -> dict:
    """Best point-wise F1 over all thresholds: ``{f1, precision, recall, threshold}``.

    NaN values when ``labels`` holds no anomaly (F1 is undefined there).

    >>> best_f1([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])  # thr 0.35 flags 3 points: P 2/3, R 1
    {'f1': 0.8, 'precision': 0.6666666666666666, 'recall': 1.0, 'threshold': 0.35}
    """
    s, y = _check(scores, labels)
    npos = float(y.sum())
    if npos == 0 or s.size == 0:
        return {"f1": math.nan, "precision": math.nan, "recall": math.nan, "threshold": math.nan}
    thr, tp, fp = _curve(s, y)
    f1 = 2 * tp / (2 * tp + fp + (npos - tp))
    k = int(np.argmax(f1))
    p, r, f = prf(tp[k], fp[k], npos - tp[k])
    return {"f1": f, "precision": p, "recall": r, "threshold": float(thr[k])}


def auprc(scores, labels) -> float:
    """Average precision: ``sum_k (R_k - R_{k-1}) * P_k`` over distinct thresholds (NaN without anomalies).

    >>> auprc([0.9, 0.8, 0.7], [1, 0, 1])  # R 0.5 at P 1, then R 1 at P 2/3
    0.8333333333333333
    """
    s, y = _check(scores, labels)
    npos = float(y.sum())
    if npos == 0 or s.size == 0:
        return math.nan
    _, tp, fp = _curve(s, y)
    precision = tp / (tp + fp)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def segments(labels) -> list[tuple[int, int]]:
    """Labelled segments as (start, end) with ``end`` inclusive.

    >>> segments([0, 1, 1, 0, 1])
    [(1, 2), (4, 4)]
    """
    y = (np.asarray(labels).reshape(-1) > 0).astype(np.int8)
    d = np.diff(np.r_[0, y, 0])
    starts = np.nonzero(d == 1)[0]
    ends = np.nonzero(d == -1)[0] - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def point_adjust(pred, labels) -> np.ndarray:
    """Point adjustment: every point of a labelled segment is flagged when any of them is.

    >>> point_adjust([0, 1, 0, 0, 1], [1, 1, 1, 0, 0]).tolist()
    [True, True, True, False, True]
    """
    p = np.asarray(pred).reshape(-1) > 0
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"pred and labels must have the same length, got {p.shape[0]} and {y.shape[0]}")
    out = p.copy()
    for a, b in segments(y):
        if p[a: b + 1].any():
            out[a: b + 1] = True
    return out


def pa_best_f1(scores, labels) -> dict:
    """Best F1 over all thresholds after point adjustment: ``{f1, precision, recall, threshold}``.

    At threshold ``thr`` a segment is found when its maximum score is ``>= thr``; normal points
    count as usual.

    >>> pa_best_f1([0.9, 0.1, 0.1, 0.5, 0.2], [1, 1, 1, 0, 0])["f1"]  # thr 0.9 finds the 3-point segment
    1.0
    """
    s, y = _check(scores, labels)
    npos = float(y.sum())
    if npos == 0 or s.size == 0:
        return {"f1": math.nan, "precision": math.nan, "recall": math.nan, "threshold": math.nan}
    segs = segments(y)
    seg_max = np.array([s[a: b + 1].max() for a, b in segs])
    seg_len = np.array([b - a + 1 for a, b in segs], dtype=np.float64)
    thr = np.unique(s)[::-1]  # descending distinct thresholds
    neg = np.sort(s[~y])
    fp = neg.size - np.searchsorted(neg, thr, side="left")  # normal points with score >= thr
    o = np.argsort(seg_max)
    sm, cl = seg_max[o], np.r_[0.0, np.cumsum(seg_len[o])]
    tp = cl[-1] - cl[np.searchsorted(sm, thr, side="left")]  # length of segments with max >= thr
    f1 = 2 * tp / (2 * tp + fp + (npos - tp))
    k = int(np.argmax(f1))
    p, r, f = prf(tp[k], fp[k], npos - tp[k])
    return {"f1": f, "precision": p, "recall": r, "threshold": float(thr[k])}


def f1_at(scores, labels, threshold: float) -> dict:
    """Point-wise ``{f1, precision, recall, threshold}`` when flagging ``score >= threshold``.

    >>> f1_at([0.1, 0.6, 0.7, 0.2], [0, 1, 0, 0], 0.5)["f1"]
    0.6666666666666666
    """
    s, y = _check(scores, labels)
    if y.sum() == 0:
        return {"f1": math.nan, "precision": math.nan, "recall": math.nan, "threshold": float(threshold)}
    pred = s >= threshold
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    p, r, f = prf(tp, fp, fn)
    return {"f1": f, "precision": p, "recall": r, "threshold": float(threshold)}


def hitrate(contributions, interpretation, percent: float = 100.0) -> float:
    """HitRate@P% over labelled anomaly segments (NaN without any).

    ``contributions``: [T, N] non-negative per-point, per-feature contributions (root-cause
    ranking); ``interpretation``: ``(start, end, features)`` with ``end`` inclusive and 0-based
    feature indices, as read by :func:`core.datasets.parse_interpretation`. Per segment, features are
    ranked by their mean contribution over the segment (ties: lower index first); the hit rate is
    ``|top_k & G| / |G|`` with ``k = floor(P/100 * |G|)``; the result is the mean over segments.

    >>> c = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.4]])
    >>> hitrate(c, [(0, 1, [0, 1])], 100)  # top-2 = {0, 2}: one of 2 ground-truth features
    0.5
    >>> hitrate(c, [(0, 1, [0, 1])], 150)  # top-3 holds both
    1.0
    """
    c = np.asarray(contributions, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"contributions must be [T, N], got shape {c.shape}")
    rates = []
    for start, end, feats in interpretation:
        g = set(int(f) for f in feats)
        if not g or start >= c.shape[0]:
            continue
        seg = c[max(0, start): min(c.shape[0], end + 1)]
        mean = np.nan_to_num(seg.mean(axis=0), nan=0.0)
        k = int(math.floor(percent / 100.0 * len(g) + 1e-9))
        top = np.argsort(-mean, kind="mergesort")[:k]
        rates.append(len(g.intersection(top.tolist())) / len(g))
    return float(np.mean(rates)) if rates else math.nan
