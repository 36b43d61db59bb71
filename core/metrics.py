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
* :func:`vus_pr`, :func:`vus_roc` (:func:`vus` for both): volume under the range-based PR / ROC
  surfaces over buffer lengths 0 .. ``window`` and 250 thresholds, exactly as the TSB-AD benchmark
  (Paparrizos et al., VLDB 2022; Liu and Paparrizos, NeurIPS 2024) reports them: threshold-free and
  tolerant of labels a little off in time (``tests/data/vus_reference.json`` holds its values).

Incident-level measures of a stream of alarms (alerts that stay right for days): per-point alarms
(``score >= thr``) or incidents as (start, end) pairs, end inclusive:

* :func:`incidents_from_alarms`: incidents by the alerter's open_after / close_after rule;
* :func:`event_recall`: share of labelled segments during which an incident is open (``tolerance``:
  or that it opened at most that many points after the segment's start);
* :func:`detection_delay`: points from a found segment's start to its first open point, and median;
* :func:`false_incidents`, :func:`false_incidents_per_day`: incidents overlapping no labelled segment.

Example::

    >>> import numpy as np
    >>> s = np.array([0.1, 0.9, 0.8, 0.2]); y = np.array([0, 1, 1, 0])
    >>> best_f1(s, y)["f1"]
    1.0
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["best_f1", "auprc", "pa_best_f1", "point_adjust", "f1_at", "segments", "hitrate", "prf",
           "vus_pr", "vus_roc", "vus", "incidents_from_alarms", "event_recall", "detection_delay",
           "false_incidents", "false_incidents_per_day"]


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


def f1_of(flags, labels) -> dict:
    """Point-wise ``{f1, precision, recall}`` of given per-point flags (e.g. each point against the threshold in
    force when its window arrived).

    >>> f1_of([False, True, True, False], [0, 1, 0, 0])["f1"]
    0.6666666666666666
    """
    pred, y = _check(flags, labels)
    pred = pred > 0
    if y.sum() == 0:
        return {"f1": math.nan, "precision": math.nan, "recall": math.nan}
    p, r, f = prf(float((pred & y).sum()), float((pred & ~y).sum()), float((~pred & y).sum()))
    return {"f1": f, "precision": p, "recall": r}


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


# -- VUS: volume under the range-based PR / ROC surfaces (TSB-AD) --------------------------------


def _vus_ramp(window: int) -> np.ndarray:
    """``[window + 1, window // 2 + 1]``: the soft label ``sqrt(1 - d / w)`` a point at distance ``d``
    (1 .. ``w // 2``) outside a segment gets at buffer length ``w``; 0 beyond ``w // 2`` (and at ``d = 0``)."""
    h = window // 2
    w = np.arange(window + 1, dtype=np.float64)[:, None]
    d = np.arange(h + 1, dtype=np.float64)[None, :]
    inside = (d >= 1) & (d <= np.floor(w / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(np.where(inside, 1.0 - d / np.where(w > 0, w, 1.0), 0.0))
    return np.where(inside, r, 0.0)


def _vus_surfaces(scores, labels, window: int, n_thresholds: int):
    """Per buffer length ``w = 0 .. window``: (AUC-ROC, AP) of TSB-AD's range-based curves, or None when
    the metric is undefined (no labelled point, or no normal one)."""
    s, y = _check(scores, labels)
    window, n_thresholds = int(window), int(n_thresholds)
    if window < 0 or n_thresholds < 1:
        raise ValueError(f"window must be >= 0 and n_thresholds >= 1, got {window} and {n_thresholds}")
    n = s.size
    segs = np.array(segments(y), dtype=np.int64).reshape(-1, 2)
    if segs.shape[0] == 0 or y.all():
        return None
    starts, ends = segs[:, 0], segs[:, 1]
    n_pos = float(y.sum())
    h_max = window // 2

    # thresholds: the scores at ranks linspace(0, n - 1, n_thresholds) of the descending order; a point
    # is predicted at threshold thr when score >= thr (ties flag together)
    s_asc = np.sort(s)
    thr = s_asc[::-1][np.linspace(0, n - 1, n_thresholds).astype(int)]
    n_pred = (n - np.searchsorted(s_asc, thr, side="left")).astype(np.float64)
    pos = np.sort(s[y])
    hit = (pos.size - np.searchsorted(pos, thr, side="left")).astype(np.float64)  # labelled points predicted

    # soft labels of the unlabelled points within window // 2 of a segment, one row per buffer length:
    # the ramps of all segments add up, then are capped at 1 (as TSB-AD's ``sequencing``)
    near = np.zeros(n + 1, dtype=np.int64)
    np.add.at(near, np.maximum(starts - h_max, 0), 1)
    np.add.at(near, np.minimum(ends + h_max + 1, n), -1)
    region = np.nonzero((np.cumsum(near[:n]) > 0) & ~y)[0]
    col = np.full(n, -1, dtype=np.int64)
    col[region] = np.arange(region.size)
    ramp = _vus_ramp(window)
    ext = np.zeros((window + 1, region.size))
    for d in range(1, h_max + 1):
        for t in (ends + d, starts - d):  # each side separately: no repeated index within one update
            t = t[(t >= 0) & (t < n)]
            t = t[~y[t]]
            ext[:, col[t]] += ramp[:, d: d + 1]
    np.minimum(ext, 1.0, out=ext)
    # weighted hits on those points: sum of soft labels of the predicted ones, for every threshold
    order = np.argsort(-s[region], kind="mergesort")
    cum = np.concatenate([np.zeros((window + 1, 1)), np.cumsum(ext[:, order], axis=1)], axis=1)
    reg_sorted = np.sort(s[region])
    soft = cum[:, region.size - np.searchsorted(reg_sorted, thr, side="left")]  # [window + 1, n_thresholds]

    # existence: share of the buffered segments (those whose buffers overlap are merged, as TSB-AD's
    # ``new_sequence``) holding at least one predicted point
    s_pad = np.r_[s, -np.inf]
    found = np.empty((window + 1, n_thresholds))
    by_h: dict[int, np.ndarray] = {}
    for w in range(window + 1):
        h = w // 2
        if h not in by_h:
            lo, hi = starts - h, ends + h
            first = np.r_[True, hi[:-1] < lo[1:]]
            last = np.r_[first[1:], True]
            g_lo, g_hi = np.maximum(lo[first], 0), np.minimum(hi[last], n - 1)
            mx = np.maximum.reduceat(s_pad, np.column_stack([g_lo, g_hi + 1]).ravel())[::2]
            mx.sort()
            by_h[h] = (mx.size - np.searchsorted(mx, thr, side="left")) / mx.size
        found[w] = by_h[h]

    tp = hit[None, :] + soft
    p_new = n_pos + soft / 2.0  # TSB-AD's (P + N_labels) / 2 with N_labels = P + soft
    tpr = np.minimum(tp / p_new, 1.0) * found
    fpr = (n_pred[None, :] - tp) / (n - p_new)
    prec = tp / n_pred[None, :]
    zero, one = np.zeros((window + 1, 1)), np.ones((window + 1, 1))
    tpr_roc, fpr_roc = np.hstack([zero, tpr, one]), np.hstack([zero, fpr, one])
    auc = np.sum(np.diff(fpr_roc, axis=1) * (tpr_roc[:, 1:] + tpr_roc[:, :-1]) / 2.0, axis=1)
    ap = np.sum(np.diff(np.hstack([zero, tpr]), axis=1) * prec, axis=1)
    return auc, ap


def vus_pr(scores, labels, window: int = 100, n_thresholds: int = 250) -> float:
    """VUS-PR: volume under the range-based precision-recall surface, as the TSB-AD benchmark computes it.

    Source: Paparrizos, Boniol, Palpanas, Tsay, Elmore, Franklin, "Volume Under the Surface: A New
    Accuracy Evaluation Measure for Time-Series Anomaly Detection", VLDB 2022; Liu and Paparrizos, "The
    Elephant in the Room: Towards A Reliable Time-Series Anomaly Detection Benchmark", NeurIPS 2024
    (TSB-AD, ``get_metrics`` -> ``generate_curve`` -> ``RangeAUC_volume_opt``, release 1.5). The values
    equal TSB-AD's (checked against it in ``tests/data/vus_reference.json``); the algorithm is ours
    (sorting and cumulative sums instead of a loop over thresholds and buffer lengths).

    It measures how well the score ranks the labelled segments *and a soft margin around them* above
    normal points, without a threshold, and without depending on one buffer length:

    * buffer lengths ``w = 0 .. window`` (``window + 1`` surfaces): the label is extended on both sides
      of each segment by ``w // 2`` points with the soft value ``sqrt(1 - d / w)`` at distance ``d``
      (ramps of neighbouring segments add up, capped at 1); ``w = 0`` and ``1`` add nothing;
    * thresholds: ``n_thresholds`` scores at ranks ``linspace(0, T - 1, n_thresholds)`` of the
      descending order, a point predicted when ``score >= thr``;
    * at each (w, thr): ``TP`` = predicted labelled points + soft labels of predicted buffer points,
      ``P' = P + (soft labels of predicted buffer points) / 2``, recall ``min(TP / P', 1)`` times the
      *existence reward*: the share of buffered segments (segments whose buffers overlap count as one)
      with a predicted point; precision ``TP / #predicted``;
    * per ``w`` the average precision ``sum (R_k - R_{k-1}) P_k`` starting from ``R = 0``; VUS-PR is
      the mean over ``w``.

    ``window``: the largest buffer length. 100 is the default of TSB-AD's ``get_metrics``
    (``slidingWindow=100``); TSB-AD's benchmark scripts pass the series' period instead
    (``find_length_rank``), so pass that window to compare with its tables. NaN without labelled or
    without normal points.

    >>> y = np.zeros(40, int); y[10:15] = 1
    >>> vus_pr(y.astype(float), y, window=8)  # a perfect score
    1.0
    >>> round(vus_pr(np.ones(40), y, window=8), 6)  # a constant score: TP / T, soft labels included
    0.197379
    """
    r = _vus_surfaces(scores, labels, window, n_thresholds)
    return math.nan if r is None else float(np.mean(r[1]))


def vus(scores, labels, window: int = 100, n_thresholds: int = 250) -> dict:
    """``{"vus_pr": ..., "vus_roc": ...}`` from one pass (see :func:`vus_pr`, :func:`vus_roc`).

    >>> vus([0.1, 0.9, 0.2, 0.1], [0, 1, 0, 0], window=2)
    {'vus_pr': 1.0, 'vus_roc': 1.0}
    """
    r = _vus_surfaces(scores, labels, window, n_thresholds)
    if r is None:
        return {"vus_pr": math.nan, "vus_roc": math.nan}
    return {"vus_pr": float(np.mean(r[1])), "vus_roc": float(np.mean(r[0]))}


def vus_roc(scores, labels, window: int = 100, n_thresholds: int = 250) -> float:
    """VUS-ROC: volume under the range-based ROC surface, as the TSB-AD benchmark computes it.

    Source and definitions: see :func:`vus_pr` (Paparrizos et al., VLDB 2022; Liu and Paparrizos,
    NeurIPS 2024, TSB-AD ``RangeAUC_volume_opt``). Per buffer length ``w = 0 .. window``, the ROC curve
    runs through ``(0, 0)``, the ``n_thresholds`` points ``(FPR, TPR)`` with TPR the existence-weighted
    range recall of :func:`vus_pr` and ``FPR = (#predicted - TP) / (T - P')``, then ``(1, 1)``; its
    trapezoidal area is averaged over ``w``. NaN without labelled or without normal points.

    >>> y = np.zeros(40, int); y[10:15] = 1
    >>> vus_roc(y.astype(float), y, window=8)
    1.0
    >>> round(vus_roc(np.ones(40), y, window=8), 6)  # one step to TPR 1 at FPR < 1: area 1 - FPR / 2
    0.522131
    """
    r = _vus_surfaces(scores, labels, window, n_thresholds)
    return math.nan if r is None else float(np.mean(r[0]))


# -- incidents: what an operator sees of a stream of alarms --------------------------------------


def incidents_from_alarms(alarms, open_after: int = 1, close_after: int = 1) -> list[tuple[int, int]]:
    """Incidents ``(opened, last_open)`` (inclusive point indices) made from per-point alarms by the
    alerter's rule (:mod:`osad.alerter.core`, one stream): an incident **opens** at the point that
    completes ``open_after`` consecutive alarmed points, stays open through alarms and quiet gaps of
    fewer than ``close_after`` points, and **closes** at the ``close_after``-th consecutive quiet
    point, which is no longer open (so ``last_open = last alarm + close_after - 1``); one still open at
    the end of the stream ends at the last point. With ``open_after = close_after = 1`` the incidents
    are the maximal runs of alarms. The alerter's defaults are ``open_after=2, close_after=3``; it
    alarms on ``score > threshold`` (pass ``alarms`` accordingly) and dates the incident's evidence
    from the first alarm of the opening run (``opened - open_after + 1``); here ``opened`` is when it
    is published. Pure: no state beyond the input.

    >>> a = [0, 1, 1, 0, 1, 0, 0, 0, 1, 0]
    >>> incidents_from_alarms(a)
    [(1, 2), (4, 4), (8, 8)]
    >>> incidents_from_alarms(a, open_after=2, close_after=2)  # opens at 2; the 1-point gap at 3 keeps it
    [(2, 5)]
    """
    a = np.asarray(alarms).reshape(-1) > 0
    open_after, close_after = int(open_after), int(close_after)
    if open_after < 1 or close_after < 1:
        raise ValueError(f"open_after and close_after must be at least 1, got {open_after} and {close_after}")
    n = a.size
    out: list[tuple[int, int]] = []
    opened = last = None
    for start, end in segments(a):
        if opened is not None:
            if start - last - 1 < close_after:  # the quiet gap was too short to close it
                last = end
                continue
            out.append((opened, last + close_after - 1))
            opened = None
        if end - start + 1 >= open_after:
            opened, last = start + open_after - 1, end
    if opened is not None:
        out.append((opened, min(last + close_after - 1, n - 1)))
    return out


def _intervals(alarms, n: int) -> np.ndarray:
    """``[K, 2]`` inclusive intervals from per-point alarms (length ``n``: maximal runs) or from given
    (start, end) pairs (``[K, 2]``, ``0 <= start <= end < n``)."""
    x = np.asarray(alarms)
    if x.ndim == 2 and x.shape[1] == 2:
        iv = x.astype(np.int64)
        if iv.size and ((iv[:, 0] < 0).any() or (iv[:, 0] > iv[:, 1]).any() or (iv[:, 1] >= n).any()):
            raise ValueError(f"incidents must be (start, end) with 0 <= start <= end < {n}")
        return iv
    if x.ndim == 1 and x.size == n:
        return np.array(segments(x), dtype=np.int64).reshape(-1, 2)
    if x.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    raise ValueError(f"expected {n} per-point alarms or (start, end) incidents, got shape {x.shape}")


def _found(alarms, labels, tolerance: int):
    """Per labelled segment: its start and the first point of ``[start, max(end, start + tolerance)]``
    (capped at the last point) at which an incident is open, ``-1`` if none; and the incidents."""
    y = np.asarray(labels).reshape(-1) > 0
    n = y.size
    if int(tolerance) < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    iv = _intervals(alarms, n)
    segs = np.array(segments(y), dtype=np.int64).reshape(-1, 2)
    reach = np.minimum(np.maximum(segs[:, 1], segs[:, 0] + int(tolerance)), n - 1)
    on = np.zeros(n + 1, dtype=np.int64)
    np.add.at(on, iv[:, 0], 1)
    np.add.at(on, iv[:, 1] + 1, -1)
    idx = np.where(np.cumsum(on[:n]) > 0, np.arange(n), n)
    nxt = np.r_[np.minimum.accumulate(idx[::-1])[::-1], n]  # first open point at or after t
    first = nxt[segs[:, 0]]
    first = np.where(first <= reach, first, -1)
    return segs, reach, first, iv


def event_recall(alarms, labels, tolerance: int = 0) -> float:
    """Share of labelled segments found by an alarm or incident (NaN without segments).

    ``alarms``: per-point alarms (bool [T], e.g. ``score >= threshold``; incidents = maximal runs) or
    incidents as (start, end) pairs, end inclusive (e.g. :func:`incidents_from_alarms`). A segment
    ``[s, e]`` is found when an incident is open at some point of it, or, with ``tolerance``, opens
    up to ``tolerance`` points after ``s`` (so after a short segment's end: the alerter's
    ``open_after`` delay). This is event-wise recall, the *existence reward* of range-based recall
    (Tatbul et al., "Precision and Recall for Time Series", NeurIPS 2018) and the recall of event-wise
    F1 (Hundman et al., KDD 2018), per incident as an operator sees it.

    >>> y = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    >>> event_recall([0, 0, 1, 0, 0, 0, 0, 0, 0, 0], y)
    0.5
    >>> event_recall([(8, 9)], y, tolerance=2)  # opened 2 points after the start of the second segment
    0.5
    """
    segs, _, first, _ = _found(alarms, labels, tolerance)
    return math.nan if segs.shape[0] == 0 else float(np.mean(first >= 0))


def detection_delay(alarms, labels, tolerance: int = 0) -> dict:
    """Detection delay per found segment: ``{"delays": [...], "median": ...}``.

    For each labelled segment found as in :func:`event_recall` (same ``alarms`` and ``tolerance``),
    the number of points from the segment's start to the first point of the segment (or of the
    tolerance reach after it) at which an incident is open: 0 when one is already open at the start.
    ``delays`` lists them in segment order (missed segments are left out: see :func:`event_recall`);
    ``median`` is NaN when no segment was found. Time to detect in points: multiply by the interval.
    Earliness as an evaluation measure of streaming detection: the Numenta Anomaly Benchmark (Lavin
    and Ahmad, "Evaluating Real-time Anomaly Detection Algorithms -- the Numenta Anomaly Benchmark",
    ICMLA 2015), which rewards a detection by how early in the anomaly window it comes.

    >>> y = [0, 1, 1, 1, 0, 0, 1, 0, 0, 1]
    >>> detection_delay([0, 0, 0, 1, 1, 0, 0, 0, 0, 1], y)
    {'delays': [2, 0], 'median': 1.0}
    """
    segs, _, first, _ = _found(alarms, labels, tolerance)
    d = [int(f - s) for f, s in zip(first.tolist(), segs[:, 0].tolist()) if f >= 0]
    return {"delays": d, "median": float(np.median(d)) if d else math.nan}


def false_incidents(alarms, labels, tolerance: int = 0) -> int:
    """Number of incidents that overlap no labelled segment: false alarms as an operator counts them.

    ``alarms`` and ``tolerance`` as in :func:`event_recall`: an incident that opens within
    ``tolerance`` points after a segment's start (after its end) is the detection of that segment, not
    a false one. Per incident, not per point: ten noisy points in a row are one false incident, as
    one page to the on-call (the per-alarm false-positive count of Hundman et al., KDD 2018, for the
    incidents of :func:`incidents_from_alarms`).

    >>> false_incidents([1, 1, 0, 1, 0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0])  # (0,1), (6,7), (9,9)
    3
    """
    y = np.asarray(labels).reshape(-1) > 0
    n = y.size
    segs, reach, _, iv = _found(alarms, labels, tolerance)
    cover = np.zeros(n + 1, dtype=np.int64)
    np.add.at(cover, segs[:, 0], 1)
    np.add.at(cover, reach + 1, -1)
    c = np.r_[0, np.cumsum(np.cumsum(cover[:n]) > 0)]  # c[t] = covered points before t
    return int(np.sum(c[iv[:, 1] + 1] - c[iv[:, 0]] == 0))


def false_incidents_per_day(n_false: float, n_points: int, interval_s: float) -> float:
    """False incidents per day of stream: ``n_false / (n_points * interval_s / 86400)``.

    ``n_points`` points, one every ``interval_s`` seconds (for windows: the stride between window
    ends). The operator's cost of a detector at a threshold, in the unit of alert-fatigue
    budgets ("at most one false page per day"); a plain rate, with :func:`false_incidents` as its count.

    >>> false_incidents_per_day(3, 17280, 5.0)  # 17280 points of 5 s = 1 day
    3.0
    """
    days = float(n_points) * float(interval_s) / 86400.0
    if not days > 0:
        raise ValueError(f"n_points * interval_s must be > 0, got {n_points} * {interval_s}")
    return float(n_false) / days
