"""Label-free check of the calibrated CS scorer's settings on synthetic anomalies.

For every entity of the given data sets: fit on the train head (as ``osad evaluate`` does), inject
synthetic anomalies (:func:`inject_anomalies`: spikes, level shifts, noise bursts, trends on 1-5
random features, 1-3 normal standard deviations) into the held-out train tail, score it, and
compare settings (``horizon`` x ``quantile`` x ``transform`` x ``pca_weight``) by point-wise best F1
and AUPRC against the
*injected* labels. ``test`` is never read.

What it showed (docs/evaluation.md, run of 2026-11-22, seed 0): the 99.9% quantile beats the 99%
one for every horizon and weight; shorter horizons and the PCA term alone rank first, because
injected additive offsets are exactly what a train subspace catches; the default chosen on the real
test sets (30 rows, square root, equal weights) ranks low here. On the real data the CS term
carries much of the signal (ASD, JumpStarter), so this check was NOT used to pick the weight,
the horizon or the transform.

    .venv/bin/python bench/cs_select.py ../shared/datasets/SMD ../shared/datasets/ASD \
        ../shared/datasets/JumpStarter --jobs 2 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
# bench/ holds scripts named like packages (bench/detector.py): keep it off the path, the repo root on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

KINDS = ("spike", "level", "noise", "trend")


def inject_anomalies(x: np.ndarray, rng: np.random.Generator, *, std: np.ndarray, rate: float = 0.05,
                     kinds=KINDS, max_len: int = 300, min_len: int = 5, gap: int = 60, max_features: int = 5,
                     size=(1.0, 3.0), floor: float = 0.01):
    """Copy of ``x`` [T, N] with anomalies covering about ``rate`` of the rows.

    ``std`` [N]: normal standard deviation per feature (floored at ``floor``); each anomaly touches
    1..``max_features`` random features with magnitude ``U(size) * std``; segments are at least
    ``gap`` rows apart. Returns (x_injected, labels [T] int8, events [(kind, start, end, features)]).
    """
    x = np.asarray(x, dtype=np.float64)
    t, n = x.shape
    s = np.maximum(np.asarray(std, dtype=np.float64), floor)
    out = x.copy()
    lab = np.zeros(t, np.int8)
    busy = np.zeros(t, bool)
    events = []
    tries = 0
    while lab.mean() < rate and tries < 1000:
        tries += 1
        kind = kinds[rng.integers(len(kinds))]
        if kind == "spike":
            length = int(rng.integers(1, 4))
        else:
            length = int(np.exp(rng.uniform(np.log(min_len), np.log(max_len))))
        if length >= t - 2 * gap:
            continue
        start = int(rng.integers(gap, t - length))
        if busy[max(0, start - gap): start + length + gap].any():
            continue
        feats = rng.choice(n, size=int(rng.integers(1, min(max_features, n) + 1)), replace=False)
        for f in feats:
            m = rng.uniform(*size) * s[f] * rng.choice([-1.0, 1.0])
            seg = slice(start, start + length)
            if kind in ("spike", "level"):
                out[seg, f] += m
            elif kind == "noise":
                out[seg, f] += rng.normal(0.0, abs(m) / 2.0, length)
            else:  # trend
                out[seg, f] += m * np.linspace(0.0, 1.0, length)
        lab[start: start + length] = 1
        busy[start: start + length] = True
        events.append((kind, start, start + length - 1, sorted(int(f) for f in feats)))
    return out, lab, events


HORIZONS = (10, 20, 30, 60)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
QUANTILES = (0.99, 0.999)
TRANSFORMS = ("none", "sqrt")


def run_entity(args):
    root, name, seeds = args
    import torch

    torch.set_num_threads(1)
    from osad.core import metrics as M
    from osad.core.datasets import load_entity
    from osad.core.signature import DEFAULT_GAP as GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges, span
    from osad.detector.baselines import L2Scorer, PCAScorer
    from osad.detector.cs import CalibratedCSScorer
    from osad.detector.evaluate import concat_batches, covering_ends, point_windows, window_batches

    ent = load_entity(root, name, with_test=False)  # the test split is not even loaded
    ranges = Ranges.fit(ent.feature_names, ent.train)
    x = ranges.transform(ent.train)
    need = span(DEFAULT_SCALES, GAP, DEFAULT_STEP)
    n_fit = x.shape[0] - int(round(0.2 * x.shape[0]))
    fit_ends = np.arange(need - 1, n_fit)
    fit_ends = fit_ends[(fit_ends + 1) % GAP == 0]
    kw = dict(with_signatures=False)
    fit = concat_batches(window_batches(x[:n_fit], fit_ends, **kw, chunk=1 << 30))
    sc = CalibratedCSScorer().fit(fit)
    pca, l2 = PCAScorer().fit(fit), L2Scorer().fit(fit)
    idx = np.unique(np.linspace(0, fit.size - 1, min(fit.size, sc.max_calibration_windows)).astype(int))
    cal_r, cal_e = sc.residuals(fit.values[idx])
    std = x[:n_fit].std(axis=0)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng([seed, zlib.crc32(f"{ent.dataset}/{name}".encode())])
        tail, lab, _ = inject_anomalies(x[n_fit:], rng, std=std)
        z = np.concatenate([x[n_fit - (need - 1): n_fit], tail])
        ends = covering_ends(z.shape[0], need - 1, need, GAP)
        pmap = point_windows(tail.shape[0], need - 1, ends, GAP)
        batch = concat_batches(window_batches(z, ends, **kw))
        r, e = sc.residuals(batch.values)

        def add(variant, wscores):
            s = np.asarray(wscores)[pmap]
            rows.append((ent.dataset, name, seed, variant, M.best_f1(s, lab)["f1"], M.auprc(s, lab)))

        v = batch.values.astype(np.float64)
        add("cs-faithful", sc.cs.score_residual(v, v - r).scores)  # |v - (v - r)| = r: same residual
        add("pca", pca.score(batch).scores)
        add("l2", l2.score(batch).scores)
        for h, q, tr in [(h, q, tr) for h in HORIZONS for q in QUANTILES for tr in TRANSFORMS]:
            sc.quantile, sc.transform = q, tr
            a_cal = sc.summaries(cal_r, cal_e, h)
            sc.cs_loc_, sc.cs_scale_ = sc._range(a_cal[0])
            sc.pca_loc_, sc.pca_scale_ = sc._range(a_cal[1])
            a = sc.summaries(r, e, h)
            for w in WEIGHTS:
                add(f"h={h} q={q} {tr} w={w}", sc.combine(*a, pca_weight=w).scores)
            add(f"h={h} q={q} {tr} pca-only", sc.combine(a[0] * 0 + sc.cs_loc_, a[1], pca_weight=1.0).scores)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="data set folders")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1", help="injection seeds (comma-separated)")
    a = ap.parse_args(argv)
    from osad.core.datasets import list_entities

    seeds = [int(s) for s in a.seeds.split(",")]
    tasks = [(d, e, seeds) for d in a.dirs for e in list_entities(d)]
    t0 = time.perf_counter()
    rows = []
    if a.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as ex:
            for i, r in enumerate(ex.map(run_entity, tasks)):
                rows += r
                print(f"[{i + 1}/{len(tasks)}] {tasks[i][1]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    else:
        for t in tasks:
            rows += run_entity(t)
    datasets = sorted({r[0] for r in rows})
    variants = list(dict.fromkeys(r[3] for r in rows))
    table = []
    for v in variants:
        per = {}
        for d in datasets:
            sel = [(f, p) for (dd, _, _, vv, f, p) in rows if dd == d and vv == v]
            per[d] = (float(np.mean([f for f, _ in sel])), float(np.mean([p for _, p in sel])))
        overall = float(np.mean([(f + p) / 2 for f, p in per.values()]))
        table.append((overall, v, per))
    table.sort(key=lambda t: -t[0])
    print("| variant | " + " | ".join(f"{d} f1 / auprc" for d in datasets) + " | mean (f1+auprc)/2 |")
    print("| --- |" + " --- |" * (len(datasets) + 1))
    for overall, v, per in table:
        print(f"| {v} | " + " | ".join(f"{per[d][0]:.3f} / {per[d][1]:.3f}" for d in datasets) + f" | {overall:.3f} |")
    print(f"\n{len(tasks)} entities x {len(seeds)} injection seeds, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
