"""Memory per watched process in the pure cores of the featurizer and the alerter (issue 16, item 4).

    .venv/bin/python bench/memory_per_entity.py [--entities 1000] [--features 35]

Each core is fed synthetic data for ENTITIES processes of FEATURES metrics (35: what a live process's Sample
carries by default) until every process is past its calibration, the way a service holds them, and the Python
heap it keeps (tracemalloc, after a garbage collection) is divided by the number of processes:

* featurizer: ``WindowStore`` at its defaults (ranges learnt on 300 samples), fed 400 samples per process;
* alerter: ``Engine`` at its defaults, two models per process (the jump-start and the calibrated compressed
  sensing, as the detector sends them), 130 windows each, Scores with ``levels``; beside it, in the same run, the
  same Scores without levels and with ``contention_z=0`` (the alerter before culprit and victims), and the
  ratio. Also the JSON the alerter's store keeps per process.

The detector's per-process state (each calibrated scorer's arrays) is not measured here yet.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def held(build) -> tuple[int, object]:
    """(bytes the object ``build()`` returns still holds on the Python heap, the object)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    obj = build()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used, obj


def featurizer(n: int, f: int, samples: int = 400):
    from osad.featurizer.windows import WindowConfig, WindowStore

    names = [f"m{j}" for j in range(f)]
    rng = np.random.default_rng(0)

    def build():
        store = WindowStore(WindowConfig())
        for e in range(n):
            x = rng.random((samples, f))
            store.add_many(f"h/{e}@1", [(i, dict(zip(names, row.tolist())), i) for i, row in enumerate(x)])
        return store
    return held(build)


def alerter(n: int, f: int, levels: bool, windows: int = 130):
    from osad.alerter.core import AlerterConfig, Engine
    from osad.schemas import Score

    names = [f"m{j}" for j in range(f)]
    rng = np.random.default_rng(0)
    models = ("cs-jumpstarter:bench", "cs-calibrated:bench")

    def build():
        eng = Engine(AlerterConfig(contention_z=3.0 if levels else 0.0))
        for t in range(windows):
            contrib = rng.random((n, f))
            lv = rng.random((n, f))
            value = 1.0 + 0.1 * rng.random(n)
            for e in range(n):
                for m in models:
                    eng.observe(Score(entity_id=f"h/{e}@1", host="h", pid=e, comm="svc", window_end_ts=1e9 + 10.0 * t,
                                      window_end_seq=10 * t + 9, interval_s=1.0, gap=10, model_id=m,
                                      score=float(value[e]), features=names, contributions=contrib[e].tolist(),
                                      levels=lv[e].round(4).tolist() if levels else None), now=0.0)
        eng.take_dirty()
        return eng
    return held(build)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=1000, help="processes held")
    ap.add_argument("--features", type=int, default=35, help="metrics per process")
    a = ap.parse_args(argv)
    n, f = a.entities, a.features
    t0 = time.perf_counter()
    fb, store = featurizer(n, f)
    print(f"featurizer  {fb / n:10,.0f} bytes per process ({n} processes, {f} metrics, past calibration; "
          f"{store.counters.as_dict().get('calibrated', '?') if hasattr(store.counters, 'as_dict') else ''})",
          flush=True)
    del store
    ab, eng = alerter(n, f, levels=True)
    state = sum(len(json.dumps(eng.entities[e].to_dict())) for e in list(eng.entities)[:100]) / 100
    del eng
    ob, _ = alerter(n, f, levels=False)
    print(f"alerter     {ab / n:10,.0f} bytes per process (2 models, past calibration, culprit and victims on); "
          f"its stored state {state:,.0f} bytes of JSON")
    print(f"alerter     {ob / n:10,.0f} bytes per process without levels and contention_z=0 (before culprit and "
          f"victims): ratio {ab / ob:.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
