"""Model refresh, offline: does refitting each entity's `cs` calibration on its recent normal windows help?

    .venv/bin/python bench/model_refresh.py ../shared/datasets/SMD [ASD ...]      # about 4 minutes for SMD

Issue 13, item 2. Per entity, exactly as `osad evaluate` (the same preparation, fit on the train head, POT on the
train tail's window scores, frozen), then the test windows in order: every `every` windows the calibrated scorer's
PCA term and per-metric normal ranges are refitted on the last `keep` windows judged normal (the tail's first),
causally. The CS residuals do not depend on the calibration, so each window is reconstructed once (cached in
/tmp/osad-refresh-cache). Two guards for "judged normal": `alerter` (under the threshold, no incident open,
the alerter's rule: open after 2, close after 3) and `fence` (the detector alone could apply it: under
Q3 + 3 IQR of its recent eligible scores, and not within 6 windows after one that was not). Prints the mean
deployed F1 and best-threshold F1 per setting, beside no refresh (which reproduces docs/evaluation.md).
"""
import sys, time, numpy as np, pickle, os
from concurrent.futures import ProcessPoolExecutor
import torch
from osad.core.signature import span
from osad.core.datasets import list_entities
from osad.core import metrics as M
from osad.core.thresholds import StreamThreshold, judge_stream, pot_threshold
from osad.detector.evaluate import (EvalConfig, concat_batches, covering_ends, make_scorer, point_windows, prepare,
                                    window_batches)

def windows(x, ends, t=60):
    return np.stack([x[i - t + 1: i + 1] for i in ends]).astype(np.float32).astype(np.float64)

def resid(sc, v):
    return np.concatenate([np.abs(v[s:s+256] - sc.cs.reconstruct(v[s:s+256])[1]) for s in range(0, v.shape[0], 256)])

def compute(args):
    root, name = args
    torch.set_num_threads(1)
    cfg = EvalConfig(); t0 = time.time()
    ent, ranges, xtr, xte, seq0 = prepare(root, name, cfg)
    need = span(cfg.scales, cfg.gap, cfg.step)
    n_train = xtr.shape[0]; n_val = int(round(cfg.val_fraction * n_train)); n_fit = n_train - n_val
    fit_ends = np.arange(need - 1, n_fit); fit_ends = fit_ends[(seq0 + fit_ends + 1) % cfg.gap == 0]
    sc = make_scorer("cs", ent, ranges, gap=cfg.gap, scales=cfg.scales, step=cfg.step, seed=cfg.seed, threads=1)
    kw = dict(with_signatures=False, scales=cfg.scales, gap=cfg.gap, step=cfg.step)
    sc.fit(concat_batches(window_batches(xtr[:n_fit], fit_ends, **kw, chunk=1 << 30)))
    # tail windows (as score_points with cover_last False)
    h = min(n_fit, -(-(need - 1) // cfg.gap) * cfg.gap)
    z = np.concatenate([xtr[n_fit - h:n_fit], xtr[n_fit:]])
    tail_ends = covering_ends(z.shape[0], h, need, cfg.gap, seq0=seq0 + n_fit - h, cover_last=False)
    vt = windows(z, tail_ends)
    h2 = min(n_train, -(-(need - 1) // cfg.gap) * cfg.gap)
    z2 = np.concatenate([xtr[n_train - h2:], xte])
    ends = covering_ends(z2.shape[0], h2, need, cfg.gap, seq0=seq0 + n_train - h2)
    pmap = point_windows(xte.shape[0], h2, ends, cfg.gap)
    vs = windows(z2, ends)
    return dict(name=name, sc=sc, vt=vt, rt=resid(sc, vt), vs=vs, rs=resid(sc, vs), pmap=pmap, y=np.asarray(ent.test_label, bool),
                secs=time.time() - t0)

def refit(sc, v, r):
    import copy
    return copy.deepcopy(sc).fit_residuals(v, r)

def score(sc, v, r):
    return np.asarray(sc._score_residual(v, *sc._pca_terms(v, r)).scores, np.float64)

def run(e, every=None, keep=512, guard="alerter", k=3.0, hold=6):
    sc = e["sc"]
    tail_scores = score(sc, e["vt"], e["rt"])
    tr = StreamThreshold(calibration=max(tail_scores.size, 2), arm=0).fit(tail_scores)
    vs, rs = e["vs"], e["rs"]
    if every is None:
        ws = score(sc, vs, rs); thr = judge_stream(tr, ws, 2, 3)
        return ws, thr
    buf_v, buf_r = [e["vt"]], [e["rt"]]
    ws = np.empty(vs.shape[0]); thr = np.empty(vs.shape[0])
    over_run = under_run = 0; inc = False; cur = sc; pend_v, pend_r = [], []
    elig = list(tail_scores); held = 0
    for i in range(vs.shape[0]):
        x = score(cur, vs[i:i+1], rs[i:i+1])[0]; ws[i] = x
        t = tr.value; thr[i] = t; over = x > t
        normal = not over and not inc
        if over:
            over_run, under_run = over_run + 1, 0; inc = inc or over_run >= 2
        else:
            over_run, under_run = 0, under_run + 1; inc = inc and under_run < 3
        if guard == "fence":  # the detector's own rule: under Q3 + k IQR of its recent eligible scores, no hold
            q1, q3 = np.percentile(elig[-keep:], [25, 75]); ok = x <= q3 + k * (q3 - q1)
            if not ok: held = hold
            elif held > 0: held -= 1; ok = False
            normal = ok
            if ok: elig.append(x)
        if normal:
            pend_v.append(vs[i]); pend_r.append(rs[i])
        if (i + 1) % every == 0 and pend_v:
            buf_v.append(np.stack(pend_v)); buf_r.append(np.stack(pend_r)); pend_v, pend_r = [], []
            V = np.concatenate(buf_v)[-keep:]; R = np.concatenate(buf_r)[-keep:]
            buf_v, buf_r = [V], [R]
            cur = refit(sc, V, R)
    return ws, thr

def f1(e, ws, thr):
    s = ws[e["pmap"]]; return M.f1_of(s > thr[e["pmap"]], e["y"])["f1"], M.best_f1(s, e["y"])["f1"]

def main(path: str) -> None:
    from pathlib import Path
    ds = Path(path).name
    if (Path(path) / "Dataset2").is_dir():
        path = str(Path(path) / "Dataset2")
    os.makedirs("/tmp/osad-refresh-cache", exist_ok=True)
    cache = f"/tmp/osad-refresh-cache/{ds}.pkl"
    if os.path.exists(cache):
        ents = pickle.load(open(cache, "rb"))
    else:
        names = list_entities(path)
        with ProcessPoolExecutor(2) as ex:
            ents = list(ex.map(compute, [(path, n) for n in names]))
        pickle.dump(ents, open(cache, "wb"))
    for every, keep, guard in [(None, 0, "-"), (30, 512, "alerter"), (30, 512, "fence"), (30, 256, "alerter"), (10, 512, "alerter"), (100, 512, "alerter"), (30, 256, "fence"), (10, 512, "fence")]:
        r = [f1(e, *run(e, every, keep, guard)) for e in ents]
        print(ds, f"refresh every {every} keep {keep} guard {guard}: deployed {np.mean([a for a,_ in r]):.3f} best {np.mean([b for _,b in r]):.3f}  per entity " + " ".join(f"{a:.2f}" for a,_ in r), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    for p in sys.argv[1:]:
        main(p)
