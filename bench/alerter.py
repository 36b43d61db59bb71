"""Alerter core throughput with host-wide events on vs off, same run.

    .venv/bin/python bench/alerter.py [--hosts 4] [--processes 50] [--ticks 400] [--rounds 5]

``--hosts`` hosts with ``--processes`` watched processes each, one Score per process per tick
(one model, 20 features), through ``alerter.core.Engine.observe`` -- the service's own path, no
Kafka, no store. Every process calibrates (100 scores) and then runs normally; from the middle on,
a few processes per host have faults of their own (5 % of the processes at a time, 20 ticks each),
and every host has a 30-tick contention episode in which all its processes' run-queue wait rises
and a third cross their thresholds (what host-wide events are for). The baseline is the same
engine with ``host_min_entities=0`` (each process judged alone). Rounds alternate the two so both
see the same machine conditions; medians of Scores per second, and the ratio.

It also prints what each variant published, as a check that the load is the intended one: with
host events on, each contention episode is one host event instead of many process incidents.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

from osad.alerter.core import AlerterConfig, Engine  # noqa: E402
from osad.schemas import Score  # noqa: E402

N_FEATURES = 20
FEATURES = [f"m{j}" for j in range(N_FEATURES)]
RUNQ = 1  # the feature that rises everywhere during contention
CALIB = 100


def make_scores(hosts: int, processes: int, ticks: int, seed: int = 0) -> list[Score]:
    rng = np.random.default_rng(seed)
    n = hosts * processes
    level = rng.uniform(0.5, 1.5, n)
    out = []
    half = CALIB + (ticks - CALIB) // 2
    for t in range(ticks):
        value = level * (1.0 + 0.1 * rng.random(n))
        contrib = rng.random((n, N_FEATURES))
        contrib[:, 0] += 1.0  # usually m0 leads
        if t >= half:
            faulty = ((np.arange(n) + t // 20) % 20 == 0)  # 5 % of the processes, 20 ticks at a time
            value[faulty] *= 10
            contrib[faulty, 2 + (t // 20) % (N_FEATURES - 2)] += 5
            for h in range(hosts):  # each host's contention episode
                t0 = half + 40 * h % max(ticks - half - 30, 1)
                if t0 <= t < t0 + 30:
                    sl = slice(h * processes, (h + 1) * processes)
                    contrib[sl, RUNQ] += 3
                    value[sl] *= np.where(np.arange(processes) % 3 == 0, 3.0, 1.05)
        for i in range(n):
            h, p = divmod(i, processes)
            out.append(Score(entity_id=f"host{h}/{p}@1", host=f"host{h}", pid=p, comm=f"svc{p}",
                             window_end_ts=1e9 + 5.0 * t, window_end_seq=10 * t + 9, interval_s=0.5, gap=10,
                             model_id="cs-calibrated:bench", score=float(value[i]), features=FEATURES,
                             contributions=contrib[i].tolist()))
    return out


def run(scores: list[Score], host_events: bool) -> tuple[float, dict]:
    eng = Engine(AlerterConfig(calibration_scores=CALIB, host_min_entities=3 if host_events else 0))
    published = {"entity": set(), "host": set()}
    t0 = time.perf_counter()
    for s in scores:
        for a in eng.observe(s, 0.0):
            published[a.scope].add(a.anomaly_id)
    dt = time.perf_counter() - t0
    return len(scores) / dt, {k: len(v) for k, v in published.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--processes", type=int, default=50, help="watched processes per host")
    ap.add_argument("--ticks", type=int, default=400, help="Scores per process (the first 100 calibrate)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    if a.ticks < CALIB + 100:
        ap.error(f"--ticks must be at least {CALIB + 100} (100 calibrate, the rest is judged)")
    print(f"building {a.hosts * a.processes * a.ticks} Scores ...", file=sys.stderr, flush=True)
    scores = make_scores(a.hosts, a.processes, a.ticks)
    rates = {True: [], False: []}
    seen = {}
    for r in range(a.rounds):
        for variant in ((True, False) if r % 2 == 0 else (False, True)):
            rate, seen[variant] = run(scores, variant)
            rates[variant].append(rate)
        print(f"round {r + 1}/{a.rounds}: host events on {rates[True][-1]:,.0f} Scores/s, "
              f"off {rates[False][-1]:,.0f} Scores/s", file=sys.stderr, flush=True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"{a.hosts} hosts x {a.processes} processes x {a.ticks} ticks ({len(scores)} Scores), "
          f"medians of {a.rounds} rounds")
    print(f"  host events on : {on:10,.0f} Scores/s  published: {seen[True]['entity']} process incidents, "
          f"{seen[True]['host']} host events")
    print(f"  host events off: {off:10,.0f} Scores/s  published: {seen[False]['entity']} process incidents")
    print(f"  ratio on/off: {on / off:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
