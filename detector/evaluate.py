"""Offline evaluation of scorers on the benchmark data sets (``osad evaluate``).

Protocol per entity (see docs/evaluation.md and shared/notes/ALGORITHMS.md, "How detection quality
is measured"):

1. Min-max scaling ranges (:class:`core.signature.Ranges`) are fitted on the whole ``train`` split
   and applied (with clipping) to train and test.
2. ``train`` is split in time: the head (``1 - val_fraction``) fits the model on its windows; the
   held-out tail is scored and only its scores choose the alarm threshold (POT, q = 1e-3,
   :func:`core.thresholds.pot_threshold`), so ``deployed_f1`` uses no label.
3. ``test`` is scored causally: the last ``span - 1`` rows before it are prepended, windows are cut
   as the featurizer cuts them from a replay of train then test (``osad replay``: a window ends at
   every row whose number ``seq`` in train + test has ``(seq + 1) % gap == 0``; one more ends at the
   last test row) and a point's score is the score of the window whose ``gap`` newest samples contain it.
   So every score uses data up to at most ``gap - 1`` samples after its point, never later.
4. Metrics from :mod:`core.metrics`: f1, auprc, pa_f1, deployed_f1, hitrate@100% / @150%; vus_pr and
   vus_roc (TSB-AD's, window = :func:`estimate_period`); and at the label-free threshold, the
   incidents the alerter's rule makes of the test windows (:func:`incident_metrics`): event_recall,
   detection_delay, false_incidents and false_incidents_per_day.
   Test labels are used only here, never to choose anything.

Baselines (PCA, L2, random) run in the same process on the same windows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osad.alerter.config import AlerterConfig
from osad.core import metrics as M
from osad.core.datasets import Entity, list_entities, load_entity
from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges, signature_windows, span
from osad.alerter.thresholds import adapt_settings
from osad.core.thresholds import DEFAULT_FENCE_K, StreamThreshold, judge_stream
from osad.runtime.config import Config, in_range, setting

from . import registry
from .base import Scorer, WindowBatch

BASELINES = ("pca", "l2", "random")
METRIC_KEYS = ("f1", "auprc", "pa_f1", "deployed_f1", "hitrate@100", "hitrate@150")
#: threshold-free range-based measures and the incidents at the label-free threshold (second table)
INCIDENT_KEYS = ("vus_pr", "vus_roc", "event_recall", "detection_delay", "false_incidents", "false_incidents_per_day")


def model_names() -> dict[str, str]:
    """Model name -> one-line description (what ``--model`` accepts)."""
    return registry.names()


def make_scorer(name: str, entity: Entity, ranges: Ranges, *, gap: int = DEFAULT_GAP, scales=DEFAULT_SCALES,
                step: int = DEFAULT_STEP, seed: int = 0, threads: int | None = None) -> Scorer:
    """A fresh scorer by name for one entity (its features and scaling ranges)."""
    return registry.create(name, registry.ScorerOptions(gap=gap, scales=tuple(scales), step=step, seed=seed,
                                                        features=entity.feature_names, ranges=ranges,
                                                        threads=threads))


# ------------------------------------------------------------------------------------ windows

def covering_ends(n_rows: int, first_point: int, need: int, gap: int, seq0: int | None = None,
                  cover_last: bool = True) -> np.ndarray:
    """Window ends (indices into a series of ``n_rows``) so that every row from ``first_point`` on
    lies among the ``gap`` newest rows of a window.

    Windows end where the featurizer ends them: at rows whose sequence number ``seq0 + index``
    satisfies ``(seq + 1) % gap == 0`` (``seq0``: the sequence number of row 0), from the first
    such row at or after ``first_point`` (``seq0`` None: every ``gap`` rows counted from
    ``first_point``); plus one window ending at the last row when the series
    does not end on the grid. Needs ``first_point >= need - 1`` rows of history before the first point.
    """
    if first_point < need - 1:
        raise ValueError(f"need {need - 1} rows of history before the first scored point, got {first_point}")
    last = n_rows - 1
    if last < first_point:
        return np.zeros(0, np.int64)
    first_end = first_point + (gap - 1 if seq0 is None else (-(seq0 + first_point + 1)) % gap)
    ends = np.arange(first_end, last + 1, gap)
    if cover_last and (ends.size == 0 or ends[-1] != last):
        ends = np.r_[ends, last]
    return ends.astype(np.int64)


def point_windows(n_points: int, first_point: int, ends: np.ndarray, gap: int) -> np.ndarray:
    """For each point ``first_point + i`` the index of the first window whose newest ``gap`` rows hold it."""
    p = first_point + np.arange(n_points)
    w = np.searchsorted(ends, p, side="left")
    if (w >= ends.size).any() or (ends[np.minimum(w, ends.size - 1)] - gap >= p).any():
        raise AssertionError("a point is not covered by any window")
    return w


def score_points(scorer: Scorer, history: np.ndarray, series: np.ndarray, *, scales=DEFAULT_SCALES,
                 gap: int = DEFAULT_GAP, step: int = DEFAULT_STEP, chunk: int = 256, seq0: int | None = None,
                 cover_last: bool = True, with_map: bool = False):
    """Causal point scores [T] and contributions [T, N] of ``series`` [T, N] (scaled).

    ``history`` holds the rows before it (at least ``span - 1`` of them are used). A point's score is
    the score of the first window whose ``gap`` newest rows contain it; that window ends at most
    ``gap - 1`` rows after the point. ``seq0``, the sequence number of ``series[0]`` in the stream,
    puts the windows on the featurizer's grid (``(seq + 1) % gap == 0``); None: a grid starting at
    ``series[0]``. ``cover_last`` False: no extra window for the rows after the last grid window;
    only window_scores are returned then (the point arrays are None).
    Returns (point_scores, point_contributions, window_scores), and with ``with_map`` a fourth item:
    for each point of ``series`` the index of its window in ``window_scores`` (None without ``cover_last``).
    """
    need = span(scales, gap, step)
    if history.shape[0] < need - 1:
        raise ValueError(f"need {need - 1} history rows before the scored series, got {history.shape[0]}")
    # a whole number of gap blocks of history when there is enough, so the grid sits on block boundaries
    h = min(history.shape[0], -(-(need - 1) // gap) * gap)
    z = np.concatenate([history[history.shape[0] - h:], series]) if h else series
    ends = covering_ends(z.shape[0], h, need, gap, seq0=None if seq0 is None else seq0 - h, cover_last=cover_last)
    pmap = point_windows(series.shape[0], h, ends, gap) if cover_last else None
    ws, wc = score_windows(scorer, window_batches(z, ends, with_signatures=scorer.uses_signatures, scales=scales,
                                                  gap=gap, step=step, chunk=chunk))
    if pmap is None:
        return (None, None, ws, None) if with_map else (None, None, ws)
    return (ws[pmap], wc[pmap], ws, pmap) if with_map else (ws[pmap], wc[pmap], ws)


def window_batches(x: np.ndarray, ends: np.ndarray, *, with_signatures: bool, scales=DEFAULT_SCALES,
                   gap: int = DEFAULT_GAP, step: int = DEFAULT_STEP, chunk: int = 256):
    """Yield WindowBatch chunks for the window ends ``ends`` of the scaled series ``x`` [T, N] (signatures
    None unless ``with_signatures``)."""
    t = max(scales)
    n = x.shape[1]
    for s in range(0, ends.size, chunk):
        e = ends[s: s + chunk]
        values = np.stack([x[i - t + 1: i + 1] for i in e]).astype(np.float32)
        if with_signatures:
            sig = np.empty((e.size, step, len(scales), n, n), np.float32)
            g = int(np.gcd.reduce([gap, *scales]))
            for r in np.unique((e + 1) % g):  # signature_windows needs ends on block boundaries of its series
                sel = (e + 1) % g == r
                sig[sel] = signature_windows(x[r:], e[sel] - r, scales, gap, step)
        else:  # the scorer reads values only
            sig = None
        yield WindowBatch(signatures=sig, values=values)


def concat_batches(batches) -> WindowBatch:
    bs = list(batches)
    sig = None if any(b.signatures is None for b in bs) else np.concatenate([b.signatures for b in bs])
    return WindowBatch(sig, np.concatenate([b.values for b in bs]))


def score_windows(scorer: Scorer, batches) -> tuple[np.ndarray, np.ndarray]:
    scores, contrib = [], []
    for b in batches:
        out = scorer.score(b)
        scores.append(np.asarray(out.scores, np.float64))
        contrib.append(np.asarray(out.contributions, np.float64))
    return np.concatenate(scores), np.concatenate(contrib)


# ------------------------------------------------------------------------------------ VUS and incidents

#: TSB-AD's ``find_length_rank``: ACF over lags 3 .. 400 of the first 20,000 points; its highest local
#: maximum is the period, unless it lies outside 3 .. 300 lags past the base (or there is none): 125 then
PERIOD_MAX_POINTS, PERIOD_NLAGS, PERIOD_BASE, PERIOD_DEFAULT = 20_000, 400, 3, 125


def estimate_period(x) -> int:
    """The VUS window TSB-AD's benchmark passes (``find_length_rank(data[:, 0], rank=1)``, release 1.5).

    ``x``: one series [T] (TSB-AD uses the first feature of the whole file, train then test). Its
    autocorrelation (mean removed, biased, as ``statsmodels.tsa.stattools.acf(fft=True)``) at lags 0 .. 400
    of the first 20,000 points; the strict local maxima of lags 3 .. 400; the highest one's lag if it
    is 6 .. 303, else 125 (also for a constant series or one without a local maximum).

    >>> t = np.arange(3000)
    >>> estimate_period(np.sin(2 * np.pi * t / 48))
    48
    >>> estimate_period(np.ones(500))
    125
    """
    v = np.asarray(x, dtype=np.float64).reshape(-1)[:PERIOD_MAX_POINTS]
    v = v - v.mean()
    n = v.size
    if n < 2:
        return PERIOD_DEFAULT
    f = np.fft.rfft(v, n=2 * n)
    acov = np.fft.irfft(f * np.conj(f), n=2 * n)[: PERIOD_NLAGS + 1] / n
    if not acov[0] > 0:
        return PERIOD_DEFAULT
    ac = (acov / acov[0])[PERIOD_BASE:]
    if ac.size < 3:
        return PERIOD_DEFAULT
    peaks = np.nonzero((ac[1:-1] > ac[:-2]) & (ac[1:-1] > ac[2:]))[0] + 1
    if peaks.size == 0:
        return PERIOD_DEFAULT
    k = int(peaks[np.argsort(ac[peaks], kind="stable")[::-1][0]])
    if k < 3 or k > 300:
        return PERIOD_DEFAULT
    return k + PERIOD_BASE


def incident_metrics(window_scores: np.ndarray, pmap: np.ndarray, labels: np.ndarray, threshold: float, *,
                     open_after: int, close_after: int, interval_s: float) -> dict:
    """Incident-level measures of one test stream at one threshold, by the alerter's rule.

    Alarms are per *window* (``window_score > threshold``, the alerter's rule, as ``deployed_f1`` flags points;
    ``threshold``: one value, or the one in force at each window); windows make incidents with
    :func:`core.metrics.incidents_from_alarms` (``open_after`` / ``close_after`` count windows, as the
    alerter's do). ``pmap``: each test point's window (see :func:`score_points`), so window ``w`` holds
    the points ``pmap == w``. An incident covers the points from its opening run's first alarmed window
    (the alerter dates its evidence from there) through its last open window; a labelled segment is
    found when an incident covers one of its points (:func:`core.metrics.event_recall`), and an
    incident covering none is false (:func:`core.metrics.false_incidents`). ``detection_delay``: per
    found segment, points from its start to the last point of the window that published the incident
    (the alerter can page only once that window has ended; 0 when it was published before the segment
    began), median over found segments (NaN when none). ``false_incidents_per_day``: over the test
    stream's duration (``n_points * interval_s``).
    """
    ws = np.asarray(window_scores, dtype=np.float64)
    pmap = np.asarray(pmap, dtype=np.int64)
    y = np.asarray(labels).reshape(-1) > 0
    n = y.size
    if pmap.size != n:
        raise ValueError(f"pmap has {pmap.size} points, labels {n}")
    idx = np.arange(ws.size)
    p0 = np.searchsorted(pmap, idx, side="left")  # first and last test point of each window
    p1 = np.searchsorted(pmap, idx, side="right") - 1
    if (p1 < p0).any():
        raise AssertionError("a window holds no test point")
    inc = M.incidents_from_alarms(ws > threshold, open_after, close_after)
    ev = np.array([(p0[a - open_after + 1], p1[b]) for a, b in inc], dtype=np.int64).reshape(-1, 2)
    pub = np.array([p1[a] for a, _ in inc], dtype=np.int64)
    segs = M.segments(y)
    delays = []
    for s0, e0 in segs:
        i = int(np.searchsorted(ev[:, 1], s0, side="left"))  # first incident still open at or after s0
        if i < ev.shape[0] and ev[i, 0] <= e0:
            delays.append(max(0, int(pub[i]) - s0))
    n_false = M.false_incidents(ev, y)
    return {
        "event_recall": M.event_recall(ev, y),
        "detection_delay": float(np.median(delays)) if delays else math.nan,
        "false_incidents": int(n_false),
        "false_incidents_per_day": M.false_incidents_per_day(n_false, n, interval_s),
        "incidents": len(inc),
        "segments": len(segs),
        "segments_found": len(delays),
    }


# ------------------------------------------------------------------------------------ one entity

def parse_fit_options(s: str) -> dict:
    """``KEY=VALUE[,KEY=VALUE]`` -> a dict; values that read as int or float become numbers.

    >>> parse_fit_options("epochs=5,lr=1e-3,device=cpu")
    {'epochs': 5, 'lr': 0.001, 'device': 'cpu'}
    """
    out = {}
    for item in (x for x in s.split(",") if x.strip()):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--fit-option {item!r}: expected KEY=VALUE")
        for conv in (int, float):
            try:
                out[k.strip()] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = v.strip()
    return out


def _fence(v: float) -> str | None:
    return None if v >= 0 else "must be 0 (off) or more"


@dataclass(frozen=True)
class EvalConfig(Config):
    """The evaluation protocol's settings (the flags of ``osad evaluate``, and the window layout)."""

    val_fraction: float = setting(0.2, help="share of train (its tail) held out to choose the label-free threshold",
                                  check=in_range(0, 0.9))
    q: float = setting(1e-3, help="POT risk: probability that a normal window exceeds the threshold",
                       check=in_range(0, 1))
    level: float = 0.98  # POT's initial-threshold quantile (pot_threshold's default; recorded in results.json)
    fence: float = setting(DEFAULT_FENCE_K, flag="--calibration-fence", check=_fence,
                           help="leave out held-out scores above Q3 + this many IQR (at most 5%) before POT, as "
                           "'osad alert' does (0: off)")
    gap: int = DEFAULT_GAP
    scales: tuple = DEFAULT_SCALES
    step: int = DEFAULT_STEP
    seed: int = setting(0, help="seed of every random draw (sampling, random baseline)")
    threads: int | None = setting(0, help="torch threads per process (0: 1; parallelism comes from --jobs)")
    limit_train: int | None = setting(0, help="use only the last N train rows (0: all; quick runs)")
    limit_test: int | None = setting(0, help="use only the first N test rows (0: all; quick runs)")
    fit_options: dict | None = setting(None, flag="--fit-option", parse=parse_fit_options,
                                       help="KEY=VALUE[,KEY=VALUE] passed to fit() of mscred (e.g. epochs=5)")
    adapt: bool = setting(AlerterConfig().adapt, help="let the threshold adapt on the test windows judged normal, "
                          "as 'osad alert --adapt' does (default: as the alerter's default)")
    # the alerter's incident rule (windows), its defaults: the incident measures are what 'osad alert' would page
    open_after: int = AlerterConfig().open_after
    close_after: int = AlerterConfig().close_after


def prepare(root, name: str, cfg: EvalConfig) -> tuple[Entity, Ranges, np.ndarray, np.ndarray, int]:
    """(entity, ranges fitted on its train rows, scaled train, scaled test, sequence number of the
    first train row kept: rows are numbered train then test, as ``osad replay`` numbers them)."""
    ent = load_entity(root, name)
    if ent.test is None or ent.test_label is None:
        raise ValueError(f"{ent.entity_id}: evaluation needs test/ and test_label/ files")
    seq0 = 0
    if cfg.limit_train and cfg.limit_train < ent.train.shape[0]:
        seq0 = ent.train.shape[0] - cfg.limit_train
        ent.train = ent.train[-cfg.limit_train:]
    if cfg.limit_test:
        ent.test, ent.test_label = ent.test[: cfg.limit_test], ent.test_label[: cfg.limit_test]
        ent.interpretation = [(a, min(b, cfg.limit_test - 1), f) for a, b, f in ent.interpretation
                              if a < cfg.limit_test]
    ranges = Ranges.fit(ent.feature_names, ent.train)
    return ent, ranges, ranges.transform(ent.train), ranges.transform(ent.test), seq0


def evaluate_entity(root, name: str, models, cfg: EvalConfig = EvalConfig(), keep_scores: bool = False) -> dict:
    """Fit, calibrate and score every model on one entity; metrics per model (see module docstring)."""
    ent, ranges, xtr, xte, seq0 = prepare(root, name, cfg)
    need = span(cfg.scales, cfg.gap, cfg.step)
    n_train = xtr.shape[0]
    n_val = int(round(cfg.val_fraction * n_train))
    n_fit = n_train - n_val
    if n_fit < need + cfg.gap or n_val < cfg.gap:
        raise ValueError(f"{ent.entity_id}: {n_train} train rows are too few to fit on {1 - cfg.val_fraction:.0%} "
                         f"and calibrate on {cfg.val_fraction:.0%} (windows need {need} rows); give more train rows")
    fit_ends = np.arange(need - 1, n_fit)
    fit_ends = fit_ends[(seq0 + fit_ends + 1) % cfg.gap == 0]  # the featurizer's grid on the train head
    labels = ent.test_label
    # VUS's window as TSB-AD's benchmark picks it: the period of the first feature of train then test (raw)
    vus_window = estimate_period(np.concatenate([ent.train[:, 0], ent.test[:, 0]]))
    result = {"entity": ent.name, "dataset": ent.dataset, "n_train": n_train, "n_fit": n_fit, "n_val": n_val,
              "n_test": int(xte.shape[0]), "anomaly_rate": float(labels.mean()), "vus_window": vus_window,
              "interval_s": ent.interval_s, "test_days": float(xte.shape[0] * ent.interval_s / 86400.0),
              "models": {}}
    arrays = {"labels": labels}
    for mname in models:
        scorer = make_scorer(mname, ent, ranges, gap=cfg.gap, scales=cfg.scales, step=cfg.step, seed=cfg.seed,
                             threads=cfg.threads or None)
        kw = dict(with_signatures=scorer.uses_signatures, scales=cfg.scales, gap=cfg.gap, step=cfg.step)
        t0 = time.perf_counter()
        fit_batch = concat_batches(window_batches(xtr[:n_fit], fit_ends, **kw, chunk=1 << 30))
        if cfg.fit_options and registry.entry(mname).fit_options:
            scorer.fit(fit_batch, **cfg.fit_options)
        else:
            scorer.fit(fit_batch)
        del fit_batch
        t1 = time.perf_counter()
        pkw = dict(scales=cfg.scales, gap=cfg.gap, step=cfg.step)
        # held-out train tail, then test, on the featurizer's grid of a stream that starts at train row 0
        # (the tail's windows are the grid's: the rows after its last one are scored by the first test window)
        _, _, val_scores = score_points(scorer, xtr[:n_fit], xtr[n_fit:], seq0=seq0 + n_fit, cover_last=False, **pkw)
        # the label-free threshold as the alerter keeps it: POT on the tail, then (with --adapt) adapting on the
        # test windows judged normal, causally (the threshold in force when each window arrives)
        tracker = StreamThreshold(calibration=max(val_scores.size, 2), q=cfg.q, fence_k=cfg.fence or None, arm=0,
                                  adapt=adapt_settings() if cfg.adapt else None).fit(val_scores)
        thr0 = tracker.value  # POT on the tail (DSPOT's first threshold with --adapt)
        s, c, w_scores, pmap = score_points(scorer, xtr, xte, seq0=seq0 + n_train, with_map=True, **pkw)
        thr_w = judge_stream(tracker, w_scores, cfg.open_after, cfg.close_after)
        t2 = time.perf_counter()
        dep = M.f1_of(s > thr_w[pmap], labels)  # the alerter's rule: over when score > threshold
        best = M.best_f1(s, labels)
        r = {
            "f1": best["f1"], "auprc": M.auprc(s, labels), "pa_f1": M.pa_best_f1(s, labels)["f1"],
            "deployed_f1": dep["f1"],
            "hitrate@100": M.hitrate(c, ent.interpretation, 100), "hitrate@150": M.hitrate(c, ent.interpretation, 150),
            "best_threshold": best["threshold"], "threshold": thr0, "threshold_method": tracker.method,
            "threshold_last": float(thr_w[-1]) if thr_w.size else thr0,
            "deployed_precision": dep["precision"], "deployed_recall": dep["recall"],
            "model_id": scorer.model_id, "fit_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3),
            "windows_scored": int(val_scores.size + w_scores.size),
        }
        r.update(M.vus(s, labels, window=vus_window))
        r.update(incident_metrics(w_scores, pmap, labels, thr_w, open_after=cfg.open_after,
                                  close_after=cfg.close_after, interval_s=ent.interval_s))
        result["models"][mname] = r
        arrays[mname] = s
        arrays[mname + ":threshold"] = thr_w[pmap]
    if keep_scores:
        result["_arrays"] = arrays
    return result


# ------------------------------------------------------------------------------------ many entities

def _worker_init(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def _run_one(args):
    root, name, models, cfg = args
    t0 = time.perf_counter()
    res = evaluate_entity(root, name, models, cfg, keep_scores=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def means(results: list[dict], models) -> dict:
    """Per model, the mean over entities of every metric (NaN ones left out); and
    ``false_incidents_per_entity_day``: all false incidents over all entities' test days."""
    out = {}
    for m in models:
        out[m] = {}
        for k in METRIC_KEYS + INCIDENT_KEYS:
            vals = [r["models"][m].get(k) for r in results if m in r["models"]]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            out[m][k] = float(np.mean(vals)) if vals else math.nan
        rs = [r for r in results if m in r["models"] and "false_incidents" in r["models"][m]]
        days = sum(r.get("test_days", 0.0) for r in rs)
        out[m]["false_incidents_per_entity_day"] = (
            float(sum(r["models"][m]["false_incidents"] for r in rs) / days) if days > 0 else math.nan)
    return out


def evaluate(root, models, entities=None, jobs: int = 1, out=None, cfg: EvalConfig = EvalConfig(),
             plots: bool = True, progress=sys.stderr) -> dict:
    """Evaluate ``models`` (baselines included by the caller) on the entities of one data set folder."""
    from osad.core.datasets import dataset_name

    all_names = list_entities(root)
    names = list(entities) if entities else all_names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ValueError(f"{root}: no entity {', '.join(unknown)}; entities: {', '.join(all_names)}")
    jobs = max(1, min(int(jobs), len(names)))
    # one torch thread per process by default: the solver's matrices are small, and on a shared
    # machine intra-op threads contend (bench/cs.py: 2 threads on a loaded 2-core box ran 5x slower)
    threads = cfg.threads or 1
    cfg = cfg.replace(threads=threads)
    tasks = [(str(root), n, list(models), cfg) for n in names]
    results: list[dict] = []
    t0 = time.perf_counter()

    def report(res):
        results.append(res)
        main = res["models"][models[0]]
        if progress:
            print(f"[{len(results)}/{len(names)}] {res['dataset']}/{res['entity']}: {models[0]} f1 {main['f1']:.3f} "
                  f"auprc {main['auprc']:.3f} ({res['seconds']:.0f} s, {time.perf_counter() - t0:.0f} s total)",
                  file=progress, flush=True)

    if jobs == 1:
        _worker_init(threads)
        for t in tasks:
            report(_run_one(t))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as ex:
            futs = [ex.submit(_run_one, t) for t in tasks]
            for f in as_completed(futs):
                report(f.result())
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r["entity"]])
    arrays = {r["entity"]: r.pop("_arrays") for r in results}
    summary = {"dataset": dataset_name(root), "root": str(root), "models": list(models), "entities": results,
               "mean": means(results, models),
               "protocol": {"val_fraction": cfg.val_fraction, "q": cfg.q, "level": cfg.level, "gap": cfg.gap,
                            "scales": list(cfg.scales), "step": cfg.step, "seed": cfg.seed,
                            "open_after": cfg.open_after, "close_after": cfg.close_after,
                            "vus": "TSB-AD 1.5, window = estimate_period (find_length_rank)",
                            "limit_train": cfg.limit_train or None, "limit_test": cfg.limit_test or None}}
    if out:
        outd = Path(out)
        outd.mkdir(parents=True, exist_ok=True)
        (outd / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default))
        if plots:
            for r in results:
                plot_entity(r, arrays[r["entity"]], list(models), outd / f"{r['dataset']}_{r['entity']}.png")
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def plot_entity(res: dict, arrays: dict, models, path: Path) -> None:
    """One PNG: per model, point scores over the test period, labelled anomalies shaded, chosen threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = arrays["labels"]
    fig, axes = plt.subplots(len(models), 1, figsize=(14, 1.9 * len(models) + 0.6), sharex=True, squeeze=False)
    segs = M.segments(labels)
    for ax, m in zip(axes[:, 0], models):
        s = arrays[m]
        thr = np.broadcast_to(np.asarray(arrays[m + ":threshold"], np.float64), s.shape)  # in force at each point
        for a, b in segs:
            ax.axvspan(a, b + 1, color="tab:red", alpha=0.18, lw=0)
        ax.plot(s, lw=0.6, color="tab:blue")
        ax.plot(thr, color="tab:orange", lw=1, ls="--")
        r = res["models"][m]
        ax.set_ylabel(m)
        ax.set_title(f"{m}: f1 {r['f1']:.3f}  auprc {r['auprc']:.3f}  deployed_f1 {r['deployed_f1']:.3f} "
                     f"(threshold {r['threshold_method']})", fontsize=8, loc="left")
        lo, hi = np.percentile(s, 0.5), max(np.percentile(s, 99.9), float(np.nanmax(thr)))
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
    axes[-1, 0].set_xlabel("test sample (red: labelled anomaly; dashed: label-free threshold)")
    fig.suptitle(f"{res['dataset']}/{res['entity']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(summary: dict) -> str:
    """Per-entity and mean rows as a Markdown table."""
    models = summary["models"]
    head = "| entity | model | f1 | auprc | pa_f1 | deployed_f1 | hitrate@100% | hitrate@150% |"
    lines = [head, "|" + " --- |" * 8]

    def fmt(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for r in summary["entities"]:
        for m in models:
            x = r["models"][m]
            lines.append(f"| {r['entity']} | {m} | " + " | ".join(fmt(x[k]) for k in METRIC_KEYS) + " |")
    for m in models:
        x = summary["mean"][m]
        lines.append(f"| **mean** | **{m}** | " + " | ".join(fmt(x[k]) for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def format_incident_table(summary: dict) -> str:
    """The second table: VUS and the incidents at the label-free threshold, per entity and mean.

    ``delay`` is the median detection delay in points; ``false/day`` the false incidents per day of
    test (in the mean row: all false incidents over all entity-days)."""
    models = summary["models"]
    lines = ["| entity | model | vus_pr | vus_roc | event_recall | delay (points) | false incidents | false/day |",
             "|" + " --- |" * 8]

    def fmt(v, d=3):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    def row(name, m, x, per_day):
        return (f"| {name} | {m} | {fmt(x['vus_pr'])} | {fmt(x['vus_roc'])} | {fmt(x['event_recall'])} | "
                f"{fmt(x['detection_delay'], 1)} | {fmt(float(x['false_incidents']), 1)} | {fmt(per_day, 2)} |")

    for r in summary["entities"]:
        for m in models:
            x = r["models"][m]
            lines.append(row(r["entity"], m, x, x["false_incidents_per_day"]))
    for m in models:
        x = summary["mean"][m]
        lines.append(row("**mean**", f"**{m}**", x, x["false_incidents_per_entity_day"]))
    return "\n".join(lines)
