"""Calibrated compressed sensing across processes: one reconstruction for a batch of many entities' windows
(`detector.cs.score_many`, what the detector's engine does now) against one model call per entity (what it did
before), side by side in one run.

    .venv/bin/python bench/cs_batch.py [--entities 64] [--features 38] [--rounds 5] [--threads 1] [--write-docs]

The workload is the live one: every watched process sends a window per gap, so a batch of the detector
(``--max-batch``, 64) holds one window of each of 64 processes, each process with its own calibration. The
windows are synthetic (38 smooth metrics with noise; each entity fitted on 40 windows of its own), because what
is measured is the arithmetic and the dispatch, which depend on the shapes only. Rounds alternate the two paths
so that a busy machine slows both alike; the figures are medians of windows per second of process CPU time
(other work on the machine counts less than in wall time) and of wall time, ``--threads`` torch threads.
Both paths are checked to give the same scores (relative 1e-4). ``--write-docs`` replaces the section
"## Detector (compressed sensing across processes)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

import numpy as np  # noqa: E402
import torch  # noqa: E402

from osad.detector.base import WindowBatch  # noqa: E402
from osad.detector.cs import CalibratedCSScorer, score_many  # noqa: E402

HEADING = "## Detector (compressed sensing across processes)"


def windows(rng, e: int, b: int, t: int, n: int) -> np.ndarray:
    tt = np.arange(t)[None, :, None] + np.arange(b)[:, None, None] * 10
    base = 0.5 + 0.3 * np.sin(2 * np.pi * tt / (20 + e % 17) + np.arange(n)[None, None, :])
    return np.clip(base + 0.05 * rng.normal(size=(b, t, n)), 0.0, 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=64, help="processes in one batch, one window each (64)")
    ap.add_argument("--features", type=int, default=38, help="metrics per window (38)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of both paths, alternated (5)")
    ap.add_argument("--batches", type=int, default=2, help="batches per path per round (2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the per-core figure)")
    ap.add_argument("--write-docs", action="store_true", help="write the figures into docs/benchmarks.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(16)
    t, n, e = 60, a.features, a.entities
    print(f"fitting {e} calibrations ({n} metrics, 40 windows each) ...", file=sys.stderr)
    scorers = [CalibratedCSScorer(gap=10).fit(WindowBatch(None, windows(rng, k, 40, t, n))) for k in range(e)]
    work = [[(scorers[k], windows(rng, k, 1, t, n)) for k in range(e)] for _ in range(a.batches)]

    def one_by_one():
        return [sc.score(WindowBatch(None, v)) for batch in work for sc, v in batch]

    def together():
        return [r for batch in work for r in score_many(batch)]

    # the same scores (and a warm-up of both)
    old, new = one_by_one(), together()
    worst = max(float(np.max(np.abs(x.scores - y.scores) / np.maximum(np.abs(x.scores), 1e-9))) for x, y in zip(old, new))
    if worst > 1e-4:
        print(f"scores differ by up to {worst:.2e} (relative); expected under 1e-4", file=sys.stderr)
        return 1
    figures = {"one model call per entity": ([], []), "one call for the batch (score_many)": ([], [])}
    total = a.batches * e
    for r in range(a.rounds):
        for name, fn in zip(figures, (one_by_one, together)):
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            figures[name][0].append(total / cpu)
            figures[name][1].append(total / wall)
        print(f"  round {r + 1}/{a.rounds} done", file=sys.stderr)
    med = {k: (statistics.median(c), statistics.median(w)) for k, (c, w) in figures.items()}
    base, fast = med["one model call per entity"], med["one call for the batch (score_many)"]
    lines = [f"{e} entities x 1 window ({n} metrics, T = {t}), {a.batches} batches per round, {a.rounds} rounds, "
             f"{a.threads} torch thread(s), {platform.processor() or platform.machine()}; max relative score "
             f"difference {worst:.1e}", "",
             "| path | windows/s (CPU time) | windows/s (wall) |", "| --- | --- | --- |"]
    for k, (c, w) in med.items():
        lines.append(f"| {k} | {c:.0f} | {w:.0f} |")
    lines.append(f"| ratio | {fast[0] / base[0]:.2f}x | {fast[1] / base[1]:.2f}x |")
    print("\n".join(lines))
    if a.write_docs:
        write_docs(lines, a)
    return 0


def write_docs(lines: list[str], a) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    cmd = (f"`.venv/bin/python bench/cs_batch.py --entities {a.entities} --features {a.features} --rounds {a.rounds}"
           f" --threads {a.threads} --write-docs`")
    section = "\n".join([HEADING, "", cmd, "", *lines, "",
                         "The detector's engine scores every calibrated entity of a batch this way; jump-start "
                         "windows (entities still calibrating) were already one call. Where the time goes now "
                         "(profile, 64 windows, one thread): the ADMM iterations 75% (a median window needs 270 of "
                         "at most 400 iterations at tol 3e-4; each is a few small matrix products, so dispatch "
                         "and elementwise work dominate), the per-window metric grouping (SBD by FFT) 15%, LESINN "
                         "sampling 4%, the calibrated summaries 5%.", ""])
    if HEADING in text:
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
