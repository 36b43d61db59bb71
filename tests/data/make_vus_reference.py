"""Inputs of ``vus_reference.json`` and how its reference values were made.

The inputs are built from each case's spec with numpy only (:func:`make_case`: a splitmix64 hash,
the same on every numpy version and platform), so the test rebuilds them without storing arrays.

The reference values come from the TSB-AD package (PyPI ``TSB-AD`` 1.5, Liu and Paparrizos, NeurIPS
2024), ``TSB_AD.evaluation.basic_metrics.generate_curve(labels, score, window, "opt", n_thresholds)``,
which is what its ``get_metrics`` reports as VUS-ROC / VUS-PR. It pins numpy<2, so it lives in its own
virtual environment, outside the project::

    python3 -m venv /tmp/vusref
    /tmp/vusref/bin/pip install "numpy<2" scikit-learn
    /tmp/vusref/bin/pip install --no-deps TSB-AD==1.5   # its evaluation module needs only these two
    /tmp/vusref/bin/python tests/data/make_vus_reference.py   # rewrites vus_reference.json

This file is not a test (pytest collects ``test_*.py`` only) and the tests never import TSB-AD.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def uniform(n: int, seed: int) -> np.ndarray:
    """``n`` floats in [0, 1) from splitmix64 of ``seed * 2**32 + i``: exact integer arithmetic."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 32)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(31))) & _M
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def make_case(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of one case: labels 1 on ``segments`` ([start, end], end inclusive); scores
    ``kind`` "perfect" (= labels), "constant" (all 1) or "random": ``noise * uniform`` plus ``height`` on
    each ``bumps`` entry [start, end, height], quantised to ``levels`` steps when given (ties)."""
    n = int(case["n"])
    y = np.zeros(n, dtype=np.int64)
    for a, b in case["segments"]:
        y[a: b + 1] = 1
    sc = case["score"]
    kind = sc.get("kind", "random")
    if kind == "perfect":
        s = y.astype(np.float64)
    elif kind == "constant":
        s = np.ones(n)
    else:
        s = sc.get("noise", 1.0) * uniform(n, sc["seed"])
        for a, b, height in sc.get("bumps", []):
            s[a: b + 1] += height
        if sc.get("levels"):
            s = np.floor(s * sc["levels"]) / sc["levels"]
    return s, y


def _random_segments(n: int, count: int, seed: int, longest: int) -> list[list[int]]:
    u = uniform(2 * count, seed)
    starts = np.sort((u[:count] * (n - longest - 1)).astype(int))
    lens = 1 + (u[count:] * longest).astype(int)
    segs, last = [], -2
    for a, ln in zip(starts.tolist(), lens.tolist()):
        a = max(a, last + 2)  # keep segments apart by at least one normal point
        b = min(a + ln - 1, n - 1)
        if a <= b:
            segs.append([a, b])
            last = b
    return segs


SEGS = [[100, 100], [400, 404], [1000, 1029], [2000, 2119]]  # lengths 1, 5, 30, 120
BUMPS = [[95, 102, 0.6], [402, 402, 0.9], [1040, 1060, 0.5], [2050, 2200, 0.4], [2600, 2610, 0.8]]

CASES = [
    {"name": "random_w100", "n": 3000, "segments": SEGS, "window": 100,
     "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "random_w20", "n": 3000, "segments": SEGS, "window": 20, "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "random_w7_odd", "n": 3000, "segments": SEGS, "window": 7, "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "random_w1", "n": 3000, "segments": SEGS, "window": 1, "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "random_w0", "n": 3000, "segments": SEGS, "window": 0, "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "pure_noise", "n": 2000, "segments": [[300, 340], [1500, 1502]], "window": 100,
     "score": {"seed": 2}},
    {"name": "perfect", "n": 3000, "segments": SEGS, "window": 100, "score": {"kind": "perfect"}},
    {"name": "constant", "n": 3000, "segments": SEGS, "window": 100, "score": {"kind": "constant"}},
    {"name": "segments_at_start_and_end", "n": 1500, "segments": [[0, 9], [700, 730], [1494, 1499]],
     "window": 60, "score": {"seed": 3, "bumps": [[0, 3, 0.7], [1490, 1499, 0.5]]}},
    {"name": "close_segments_overlapping_buffers", "n": 1200,
     "segments": [[200, 210], [213, 220], [226, 226], [260, 300], [303, 303]], "window": 60,
     "score": {"seed": 4, "bumps": [[205, 230, 0.5], [290, 310, 0.3]]}},
    {"name": "ties_5_levels", "n": 2500, "segments": SEGS[:3], "window": 50,
     "score": {"seed": 5, "bumps": BUMPS[:3], "levels": 5}},
    {"name": "short_series_fewer_points_than_thresholds", "n": 60, "segments": [[20, 24], [50, 50]],
     "window": 10, "score": {"seed": 6, "bumps": [[22, 26, 0.5]]}},
    {"name": "one_point_segment", "n": 500, "segments": [[250, 250]], "window": 100,
     "score": {"seed": 7, "bumps": [[245, 249, 0.5]]}},
    {"name": "anomaly_scored_low", "n": 1000, "segments": [[400, 450]], "window": 30,
     "score": {"seed": 8, "bumps": [[400, 450, -0.6]]}},
    {"name": "fifty_thresholds", "n": 3000, "segments": SEGS, "window": 40, "n_thresholds": 50,
     "score": {"seed": 1, "bumps": BUMPS}},
    {"name": "window_longer_than_series_margins", "n": 300, "segments": [[5, 8], [290, 295]], "window": 200,
     "score": {"seed": 9, "bumps": [[0, 20, 0.3]]}},
    {"name": "long_30000_many_segments", "n": 30000, "segments": _random_segments(30000, 60, 10, 300),
     "window": 100, "score": {"seed": 11, "noise": 1.0,
                              "bumps": [[a, min(b + 20, 29999), 0.3] for a, b in _random_segments(30000, 60, 10, 300)[::2]]}},
]


def main() -> None:
    from TSB_AD.evaluation.basic_metrics import generate_curve

    import TSB_AD

    out = []
    for case in CASES:
        s, y = make_case(case)
        nt = case.get("n_thresholds", 250)
        *_, roc, pr = generate_curve(y, s, case["window"], "opt", nt)
        out.append({**case, "vus_roc": float(roc), "vus_pr": float(pr)})
        print(f"{case['name']:45s} VUS-ROC {roc:.12f}  VUS-PR {pr:.12f}")
    doc = {
        "source": "TSB-AD " + getattr(TSB_AD, "__version__", "1.5") + " (PyPI), TSB_AD.evaluation.basic_metrics."
                  "generate_curve(labels, score, window, 'opt', n_thresholds); inputs: make_vus_reference.make_case",
        "numpy": np.__version__,
        "cases": out,
    }
    (HERE / "vus_reference.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
