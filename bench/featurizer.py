"""Featurizer core throughput: incremental block sums vs recomputing every window, same run.

    .venv/bin/python bench/featurizer.py [--samples 20000] [--rounds 5]

38 features (an SMD machine's test rows), scales 10/30/60, gap 10, step 5, one entity, ONE
core (BLAS threads pinned to 1), through ``WindowStore`` -- the service's own path: metric
dict -> vector -> scaling -> windows (packed float32 triangles + values), no Kafka:

* streaming: one ``add`` per sample (live operation: one sample per entity per poll);
* batched: ``add_many`` with 500 samples (what the service does with a poll of a backlog/replay);
* and the same two on numeric rows straight into ``EntityWindow.push_run``: the signature
  computation alone, without turning metric dicts into vectors (which both variants share).

The baseline ("recompute") keeps the same ring of scaled rows and the same input path, but
computes each due window's 15 signature matrices from the raw rows (X_w^T X_w / w, BLAS).
Rounds alternate incremental and recompute so both see the same machine conditions; medians.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

from osad.core.datasets import load_entity  # noqa: E402
from osad.core.signature import Ranges  # noqa: E402
from osad.featurizer.windows import EntityWindow, Window, WindowConfig, WindowStore  # noqa: E402


class RecomputeWindow(EntityWindow):
    """Baseline: the same ring of scaled rows; every due window recomputed from them."""

    def push_run(self, seq0, raw, offs):
        L, gap = self.cfg.span, self.cfg.gap
        z = np.clip((raw - self._lo) / self._den, -self._clip, self._clip)
        wins = []
        for i in range(raw.shape[0]):
            seq = seq0 + i
            self.ring[seq % L] = z[i]
            self.ring_off[seq % L] = offs[i]
            self.contig += 1
            if (seq + 1) % gap == 0 and self.contig >= L:
                wins.append(self._recompute(seq))
        self.last_seq = seq0 + raw.shape[0] - 1
        return wins

    def _recompute(self, seq):
        cfg, L = self.cfg, self.cfg.span
        rows = self.ring[np.arange(seq - L + 1, seq + 1) % L]  # chronological
        iu0, iu1 = self._iu
        tri = np.empty((cfg.step, len(cfg.scales), len(iu0)), np.float32)
        for k in range(cfg.step):
            end = L - (cfg.step - 1 - k) * cfg.gap
            for s, w in enumerate(cfg.scales):
                seg = rows[end - w: end]
                tri[k, s] = (seg.T @ seg)[iu0, iu1] / w
        return Window(seq, tri, rows[L - max(cfg.scales):].astype(np.float32))


def run_once(cls, dicts, ranges, batch: int):
    store = WindowStore(WindowConfig(), ranges_lookup=lambda e: ranges, window_cls=cls)
    n_win, last = 0, None
    t0 = time.perf_counter()
    if batch == 1:
        add = store.add
        for i, d in enumerate(dicts):
            out = add("bench", i, d, i, 0)
            if out:
                n_win += len(out)
                last = out[-1][1].tri
    else:
        items = [(i, d, i) for i, d in enumerate(dicts)]
        for a in range(0, len(items), batch):
            out = store.add_many("bench", items[a:a + batch], 0)
            if out:
                n_win += len(out)
                last = out[-1][1].tri
    return len(dicts) / (time.perf_counter() - t0), n_win, last


def run_vectors(cls, x, ranges, batch: int):
    """The signature computation alone: numeric rows straight into one entity's window state."""
    w = cls(WindowConfig(), ranges)
    offs = np.arange(x.shape[0], dtype=np.int64)
    n_win, last = 0, None
    t0 = time.perf_counter()
    for a in range(0, x.shape[0], batch):
        out = w.push_run(a, x[a:a + batch], offs[a:a + batch])
        if out:
            n_win += len(out)
            last = out[-1].tri
    return x.shape[0] / (time.perf_counter() - t0), n_win, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500, help="samples per add_many call in the batched mode")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "SMD"))
    a = ap.parse_args()
    ent = load_entity(a.data, "machine-1-6")
    x = np.vstack([ent.test] * (1 + a.samples // ent.test.shape[0]))[: a.samples]
    names = ent.feature_names
    dicts = [dict(zip(names, row.tolist())) for row in x]
    ranges = Ranges.fit(names, ent.train)
    res = {}
    modes = (("metric dicts, streaming (add x1)", run_once, dicts, 1),
             (f"metric dicts, batched (add_many x{a.batch})", run_once, dicts, a.batch),
             ("numeric rows, streaming (push x1)", run_vectors, x, 1),
             (f"numeric rows, batched (push_run x{a.batch})", run_vectors, x, a.batch))
    for mode, fn, data, batch in modes:
        inc, rec = [], []
        for r in range(a.rounds):
            si, ni, li = fn(EntityWindow, data, ranges, batch)
            sr, nr, lr = fn(RecomputeWindow, data, ranges, batch)
            assert ni == nr and np.allclose(li, lr, atol=1e-5), "incremental and recomputed windows differ"
            inc.append(si)
            rec.append(sr)
            print(f"{mode} round {r + 1}: incremental {si:,.0f}/s, recompute {sr:,.0f}/s", file=sys.stderr)
        res[mode] = (statistics.median(inc), statistics.median(rec), ni)
    print(f"featurizer core: {len(names)} features, scales 10/30/60, gap 10, step 5, one core, "
          f"{a.samples} samples per round, {a.rounds} rounds, medians")
    print(f"{'input, mode':<46}{'incremental':>14}{'recompute':>14}{'ratio':>8}")
    for mode, (mi, mr, nw) in res.items():
        print(f"{mode:<46}{mi:>12,.0f}/s{mr:>12,.0f}/s{mi / mr:>7.1f}x")
    print(f"({nw} windows per round; samples/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
