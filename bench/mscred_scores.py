"""Which MSCRED score ranks anomalies better: the paper's count of broken elements or a continuous one?

    .venv/bin/python bench/mscred_scores.py ../shared/datasets/SMD machine-1-6,machine-2-1,machine-3-3 \
        [--max-windows 600] [--epochs 8] [--threads 1] [--models DIR]

Per entity: train MSCRED on the train split (``detector.train.dataset_windows``: scaling ranges fit
on train, last 20% of windows held out for early stopping), score the test split causally (each test
row gets the score of the first window whose newest ``gap`` rows hold it), then report point-wise
best F1, AUPRC (core.metrics) and HitRate@100% for each score computed from the same residuals:

* ``sse_w10``: sum of squared residuals on the smallest scale (osad's default, ``score_kind="sse"``);
* ``broken_w10``: number of |R_ij|^2 > theta (0.005) on the smallest scale (the paper's,
  ``score_kind="broken"``);
* ``sse_all`` / ``broken_all``: the same over all scales; ``sse_w60``: the largest scale alone.

Quality, not speed; a trained checkpoint per entity is kept in ``--models`` and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

import numpy as np  # noqa: E402

import osad.core.metrics as M  # noqa: E402
from osad.core.datasets import load_entity  # noqa: E402
from osad.core.signature import signature_windows, span  # noqa: E402
from osad.detector.mscred import MSCREDScorer  # noqa: E402
from osad.detector.train import TrainConfig, dataset_windows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("entities", help="comma-separated")
    ap.add_argument("--max-windows", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="var/bench-mscred", help="folder for the per-entity checkpoints")
    args = ap.parse_args(argv)
    scales, gap, step = (10, 30, 60), 10, 5
    need = span(scales, gap, step)
    head = gap * -(-(need - 1) // gap)  # train rows before the test: enough history, aligned to gap
    Path(args.models).mkdir(parents=True, exist_ok=True)
    out = {}
    for e in args.entities.split(","):
        t0 = time.time()
        ck = Path(args.models) / f"{e}.safetensors"
        if ck.exists():
            sc = MSCREDScorer.from_checkpoint(ck, threads=args.threads)
        else:
            data = dataset_windows(args.dir, e, scales, gap, step, 0.2, args.max_windows)
            sc = MSCREDScorer(data.features, ranges=data.ranges, threads=args.threads, batch_size=64)
            sc.fit_training_windows(data, TrainConfig(epochs=args.epochs, patience=3))
            sc.save(ck)
        ent = load_entity(args.dir, e)
        x = sc.ranges.transform(np.concatenate([ent.train[-head:], ent.test]))
        ends = np.arange(head + gap - 1, len(x), gap)
        r2 = sc.residuals(signature_windows(x, ends, scales, gap, step))
        th = sc.theta
        kinds = {
            "sse_w10": (r2[:, 0].sum((1, 2)), r2[:, 0].sum(2)),
            "broken_w10": ((r2[:, 0] > th).sum((1, 2)), (r2[:, 0] > th).sum(2)),
            "sse_all": (r2.sum((1, 2, 3)), r2.sum((1, 3))),
            "broken_all": ((r2 > th).sum((1, 2, 3)), (r2 > th).sum((1, 3))),
            "sse_w60": (r2[:, 2].sum((1, 2)), r2[:, 2].sum(2)),
        }
        rows = np.arange(head, len(x))
        idx = np.minimum(np.searchsorted(ends, rows), len(ends) - 1)  # the last rows (< gap) take the last window
        y = ent.test_label
        res = {}
        for k, (s, c) in kinds.items():
            ps, pc = s[idx].astype(float), c[idx].astype(float)
            res[k] = {"f1": round(M.best_f1(ps, y)["f1"], 4), "auprc": round(M.auprc(ps, y), 4),
                      "hit100": round(M.hitrate(pc, ent.interpretation, 100), 4) if ent.interpretation else None}
        res["seconds"] = round(time.time() - t0, 1)
        out[e] = res
        print(e, json.dumps(res), flush=True)
    keys = [k for k in next(iter(out.values())) if k != "seconds"]
    print("\nmean over entities:")
    for k in keys:
        f1 = np.mean([r[k]["f1"] for r in out.values()])
        ap_ = np.mean([r[k]["auprc"] for r in out.values()])
        print(f"  {k:11s} f1 {f1:.3f}  auprc {ap_:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
