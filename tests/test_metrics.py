"""Metrics and label-free thresholds on small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from osad.core import metrics as M
from osad.core.thresholds import SPOT, fence, fit_gpd, pot_threshold, sigma_threshold


def test_best_f1_hand_example():
    # thresholds 0.8 (P 1, R 1/2, F 2/3), 0.4 (P 1/2, R 1/2), 0.35 (P 2/3, R 1, F 0.8), 0.1 (P 1/2, R 1)
    r = M.best_f1([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert r["f1"] == pytest.approx(0.8)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == 1.0 and r["threshold"] == 0.35


def test_best_f1_ties_flag_together():
    # all scores equal: the only threshold flags everything: P 1/4, R 1
    assert M.best_f1([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 0])["f1"] == pytest.approx(2 * 0.25 / 1.25)


def test_best_f1_without_anomalies_is_nan():
    assert math.isnan(M.best_f1([0.1, 0.2], [0, 0])["f1"])
    assert math.isnan(M.auprc([0.1, 0.2], [0, 0]))


def test_scores_must_be_finite_and_aligned():
    with pytest.raises(ValueError, match="NaN"):
        M.best_f1([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        M.auprc([0.1, 0.2, 0.3], [0, 1])


def test_auprc_hand_example():
    # ranks: 1 (pos) -> P 1, R 1/2; 2 (neg); 3 (pos) -> P 2/3, R 1: AP = 1/2 * 1 + 1/2 * 2/3
    assert M.auprc([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 1 / 3)
    assert M.auprc([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)
    # a tie between a positive and a negative is one threshold: P 1/2 at R 1
    assert M.auprc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)


def test_segments_and_point_adjust():
    assert M.segments([1, 1, 0, 0, 1, 0, 1]) == [(0, 1), (4, 4), (6, 6)]
    assert M.segments([0, 0]) == []
    adj = M.point_adjust([0, 1, 0, 0, 0, 0, 1], [1, 1, 1, 0, 1, 1, 0])
    assert adj.tolist() == [True, True, True, False, False, False, True]


def test_pa_best_f1_hand_example():
    s = [0.5, 0.4, 0.1, 0.1, 0.6, 0.1]
    y = [0, 1, 1, 1, 0, 0]
    # thr 0.6: 0 TP, 1 FP; 0.5: 0 TP, 2 FP; 0.4: segment found (3 TP), 2 FP -> P 3/5, R 1, F 0.75;
    # 0.1: 3 TP, 3 FP -> F 2/3
    r = M.pa_best_f1(s, y)
    assert r["f1"] == pytest.approx(0.75) and r["threshold"] == 0.4
    # point-wise best F1 of the same scores is lower: one point of three at 0.4
    assert M.best_f1(s, y)["f1"] < r["f1"]


def test_pa_best_f1_agrees_with_brute_force():
    rng = np.random.default_rng(3)
    y = np.zeros(300, int)
    for a in (20, 90, 200):
        y[a: a + rng.integers(1, 15)] = 1
    s = rng.random(300)
    brute = max(M.f1_at(M.point_adjust(s >= t, y).astype(float), y, 0.5)["f1"] for t in np.unique(s))
    assert M.pa_best_f1(s, y)["f1"] == pytest.approx(brute)
    brute_pw = max(M.f1_at(s, y, t)["f1"] for t in np.unique(s))
    assert M.best_f1(s, y)["f1"] == pytest.approx(brute_pw)


def test_f1_at_threshold():
    r = M.f1_at([0.1, 0.6, 0.7, 0.2], [0, 1, 0, 0], 0.5)  # flags 0.6 (TP) and 0.7 (FP)
    assert (r["precision"], r["recall"], r["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert M.f1_at([0.1, 0.2], [0, 1], 0.9)["f1"] == 0.0


def test_hitrate_hand_example():
    c = np.array([
        [0.9, 0.1, 0.5, 0.0],
        [0.8, 0.2, 0.4, 0.0],
        [0.0, 0.0, 0.1, 0.9],
        [0.0, 0.1, 0.0, 0.8],
    ])
    interp = [(0, 1, [0, 1]), (2, 3, [3])]
    # segment 1: mean ranks 0 (0.85), 2 (0.45), 1 (0.15): top-2 hits {0} of {0, 1} -> 1/2; top-3 -> 1
    # segment 2: top-1 = 3 -> 1
    assert M.hitrate(c, interp, 100) == pytest.approx((0.5 + 1.0) / 2)
    assert M.hitrate(c, interp, 150) == pytest.approx(1.0)
    assert math.isnan(M.hitrate(c, [], 100))


# ------------------------------------------------------------------------------- thresholds

def test_fit_gpd_recovers_parameters():
    rng = np.random.default_rng(0)
    gamma, sigma = 0.3, 2.0
    u = rng.random(20000)
    y = sigma / gamma * (u ** -gamma - 1.0)  # inverse CDF of the generalized Pareto distribution
    g, s = fit_gpd(y)
    assert g == pytest.approx(gamma, abs=0.05) and s == pytest.approx(sigma, rel=0.05)
    g, s = fit_gpd(rng.exponential(1.5, 20000))  # gamma = 0 case
    assert abs(g) < 0.05 and s == pytest.approx(1.5, rel=0.05)
    # bounded tail (gamma < 0)
    g, s = fit_gpd(1.0 / -0.3 * (rng.random(20000) ** 0.3 - 1.0))  # GPD(-0.3, 1)
    assert g == pytest.approx(-0.3, abs=0.05) and s == pytest.approx(1.0, rel=0.05)


def test_pot_threshold_matches_known_quantile():
    rng = np.random.default_rng(1)
    r = pot_threshold(rng.exponential(1.0, 50000), q=1e-3)
    assert r.method == "pot"
    assert r.value == pytest.approx(np.log(1000), rel=0.05)  # P(X > z) = 1e-3 for Exp(1)
    # risk q: on fresh normal data about q of the scores exceed it
    fresh = rng.exponential(1.0, 200000)
    assert (fresh >= r.value).mean() == pytest.approx(1e-3, rel=0.3)


def test_pot_falls_back_to_mean_plus_3_sigma():
    few = [1.0, 2.0, 3.0, 4.0]
    r = pot_threshold(few)
    assert r.method == "sigma" and r.value == pytest.approx(np.mean(few) + 3 * np.std(few))
    assert "only 4 scores" in r.info["why"]
    const = np.ones(500)  # no excesses to fit
    assert pot_threshold(const).method == "sigma"
    assert sigma_threshold([0.0, 2.0], k=1.0).value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        pot_threshold([1.0] * 100, q=2.0)


def test_fence_leaves_out_a_spike_but_not_a_mode():
    rng = np.random.default_rng(2)
    s = rng.normal(10.0, 1.0, 200)
    kept, f, n = fence(s)
    assert n == 0 and np.array_equal(kept, s)  # nothing far out in a normal sample
    s[5] = 1e6
    kept, f, n = fence(s)
    q1, q3 = np.percentile(s, [25, 75])
    assert n == 1 and f == pytest.approx(q3 + 6 * (q3 - q1)) and kept.size == 199 and 1e6 not in kept
    assert pot_threshold(s, fence_k=6.0).value == pytest.approx(pot_threshold(np.delete(s, 5)).value)
    assert pot_threshold(s).value > 1000
    s[:20] = 1e6  # 10% that far out: a mode of normal behaviour, kept
    assert fence(s)[2] == 0 and fence(s)[0].size == 200
    assert fence(np.ones(50))[2] == 0  # no spread: nothing to judge by


def test_spot_streaming():
    rng = np.random.default_rng(2)
    spot = SPOT(q=1e-3).fit(rng.exponential(1.0, 5000))
    z0 = spot.value
    assert not spot.step(0.3)
    assert spot.step(50.0)  # alarm, not learned
    for v in rng.exponential(1.0, 2000):
        spot.step(float(v))
    assert spot.value == pytest.approx(z0, rel=0.2)
    with pytest.raises(RuntimeError, match="fit"):
        SPOT().value


# -- VUS-PR / VUS-ROC (TSB-AD) and incident-level measures ----------------------------------------

import importlib.util
import json
import pathlib
import time

DATA = pathlib.Path(__file__).resolve().parent / "data"


def _vus_inputs():
    spec = importlib.util.spec_from_file_location("make_vus_reference", DATA / "make_vus_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # numpy only: TSB-AD is imported in its main(), never here
    return mod


def test_vus_matches_tsb_ad_reference():
    """Values of TSB-AD 1.5's generate_curve (what its get_metrics reports), stored with the inputs'
    specs; inputs are rebuilt by an integer hash, so they are the same bits on any numpy."""
    mk = _vus_inputs()
    doc = json.loads((DATA / "vus_reference.json").read_text())
    assert len(doc["cases"]) >= 15
    names = {c["name"] for c in doc["cases"]}
    assert {"perfect", "constant", "segments_at_start_and_end", "random_w0"} <= names
    for case in doc["cases"]:
        s, y = mk.make_case(case)
        nt = case.get("n_thresholds", 250)
        got = M.vus(s, y, window=case["window"], n_thresholds=nt)
        assert got["vus_pr"] == pytest.approx(case["vus_pr"], abs=1e-9), case["name"]
        assert got["vus_roc"] == pytest.approx(case["vus_roc"], abs=1e-9), case["name"]
        assert M.vus_pr(s, y, case["window"], nt) == got["vus_pr"]
        assert M.vus_roc(s, y, case["window"], nt) == got["vus_roc"]


def test_vus_reference_inputs_are_the_stored_ones():
    mk = _vus_inputs()
    u = mk.uniform(4, 1)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 4
    assert mk.uniform(4, 1).tolist() == u.tolist() and mk.uniform(4, 2).tolist() != u.tolist()
    case = {"n": 10, "segments": [[2, 3]], "score": {"seed": 1, "bumps": [[2, 2, 5.0]], "levels": 2}}
    s, y = mk.make_case(case)
    assert y.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0] and s[2] >= 5.0 and set(s * 2) <= set(range(20))


def test_vus_hand_example():
    # T 10, segment [4, 5], window 2: buffer lengths 0, 1, 2 with half-width 0, 0, 1; at w = 2 the
    # points 3 and 6 get sqrt(1 - 1/2). The score ranks 4, 5 first, then 3, then the rest.
    s = np.array([0.0, 0.1, 0.2, 0.7, 0.9, 0.8, 0.3, 0.05, 0.15, 0.25])
    y = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    # w = 0 / 1 (no buffer): 250 thresholds at ranks linspace(0, 9, 250); the first flag only 4 (P 1, R 1/2),
    # then 4, 5 (P 1, R 1): AP = 1, ROC through (0, 1) = 1 -> only w = 2 can lose anything.
    r = M.vus(s, y, window=2)
    # w = 2: flagging {4} -> TP 1, P' 2, TPR 1/2; {4, 5} -> TPR 1, P 1; {3, 4, 5} -> TP 2 + b, P' 2 + b/2,
    # TPR 1 (capped), P (2 + b) / 3; AP still 1 (recall reached 1 at precision 1).
    assert r["vus_pr"] == pytest.approx(1.0)
    assert r["vus_roc"] == pytest.approx(1.0)
    # move the segment's top score below one normal point: every surface loses
    s2 = s.copy()
    s2[4] = 0.6
    lower = M.vus(s2, y, window=2)
    assert lower["vus_pr"] < 1 and lower["vus_roc"] < 1


def test_vus_buffer_rewards_a_near_miss():
    # the score peaks 3 points before the labelled point: a point-wise metric sees nothing; with buffers
    # up to 8, the lengths 6, 7, 8 (half-width 3, 3, 4) reach it: 3 of 9 surfaces give partial credit
    # (TSB-AD gives the same 0.150426 / 0.591490; without buffer 0.005 / 0.497487)
    y = np.zeros(200, int)
    y[100] = 1
    s = np.zeros(200)
    s[97] = 1.0
    assert M.auprc(s, y) < 0.05
    assert M.vus(s, y, window=0) == pytest.approx({"vus_pr": 0.005, "vus_roc": 0.497487}, abs=1e-6)
    assert M.vus(s, y, window=8) == pytest.approx({"vus_pr": 0.150426, "vus_roc": 0.591490}, abs=1e-6)


def test_vus_undefined_and_bad_arguments():
    assert math.isnan(M.vus_pr([0.1, 0.2], [0, 0])) and math.isnan(M.vus_roc([0.1, 0.2], [1, 1]))
    assert all(math.isnan(v) for v in M.vus([0.1, 0.2], [0, 0]).values())
    with pytest.raises(ValueError, match="window"):
        M.vus_pr([0.1, 0.2], [0, 1], window=-1)
    with pytest.raises(ValueError, match="same length"):
        M.vus_roc([0.1, 0.2, 0.3], [0, 1])


def test_vus_is_fast_on_30000_points():
    rng = np.random.default_rng(0)
    y = np.zeros(30000, int)
    for a in rng.choice(29000, 50, replace=False):
        y[a: a + rng.integers(1, 400)] = 1
    s = rng.random(30000) + 0.5 * y
    t0 = time.perf_counter()
    r = M.vus(s, y, window=100)
    assert time.perf_counter() - t0 < 3.0  # about 0.05 s here
    assert 0 < r["vus_pr"] < 1 and 0.5 < r["vus_roc"] < 1


def _alerter_rule_brute(alarms, open_after, close_after):
    """The alerter's state machine point by point (alerter/core.py, one stream)."""
    out, over, under, opened = [], 0, 0, None
    for t, a in enumerate(alarms):
        over, under = (over + 1, 0) if a else (0, under + 1)
        if opened is None and a and over >= open_after:
            opened = t
        elif opened is not None and not a and under >= close_after:
            out.append((opened, t - 1))
            opened = None
    if opened is not None:
        out.append((opened, len(alarms) - 1))
    return out


def test_incidents_from_alarms_hand_examples():
    a = [0, 1, 1, 0, 1, 0, 0, 0, 1, 0]
    assert M.incidents_from_alarms(a) == [(1, 2), (4, 4), (8, 8)]  # (1, 1): maximal runs
    assert M.incidents_from_alarms(a, open_after=2) == [(2, 2)]
    # opens at 2; the quiet point 3 is 1 < 2: kept open; quiet 5, 6 close it at 6 -> open through 5;
    # the lone alarm at 8 cannot open one
    assert M.incidents_from_alarms(a, open_after=2, close_after=2) == [(2, 5)]
    assert M.incidents_from_alarms(a, open_after=1, close_after=3) == [(1, 6), (8, 9)]  # still open at the end
    assert M.incidents_from_alarms([1, 1, 1], open_after=3, close_after=5) == [(2, 2)]
    assert M.incidents_from_alarms([0, 0]) == [] and M.incidents_from_alarms([]) == []
    assert M.incidents_from_alarms(np.array([0.2, 0.9]) >= 0.5) == [(1, 1)]
    with pytest.raises(ValueError, match="at least 1"):
        M.incidents_from_alarms(a, open_after=0)


def test_incidents_from_alarms_is_the_alerter_rule():
    rng = np.random.default_rng(7)
    for _ in range(300):
        a = (rng.random(int(rng.integers(1, 60))) < rng.random()).tolist()
        oa, ca = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        assert M.incidents_from_alarms(a, oa, ca) == _alerter_rule_brute(a, oa, ca), (a, oa, ca)


def test_event_recall_hand_examples():
    y = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0]  # segments (1, 2), (6, 6)
    assert M.event_recall([0, 0, 1, 0, 0, 0, 0, 0, 0, 0], y) == 0.5
    assert M.event_recall([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], y) == 1.0
    assert M.event_recall([1, 0, 0, 1, 1, 1, 0, 1, 0, 0], y) == 0.0  # next to the segments, not in them
    # incidents as intervals: one open since before the segment counts
    assert M.event_recall([(0, 1)], y) == 0.5 and M.event_recall([(3, 9)], y) == 0.5
    # tolerance: an incident opening at 8 is within 2 points of the start 6 (after the end 6)
    assert M.event_recall([(8, 9)], y) == 0.0
    assert M.event_recall([(8, 9)], y, tolerance=2) == 0.5
    assert M.event_recall([(8, 9)], y, tolerance=1) == 0.0
    # tolerance shorter than the segment changes nothing; it never reaches back before the start
    assert M.event_recall([(0, 0)], y, tolerance=5) == 0.0
    # tolerance past the end of the stream is capped
    assert M.event_recall([(9, 9)], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0], tolerance=10) == 1.0
    assert math.isnan(M.event_recall([0, 1], [0, 0]))
    assert M.event_recall([], y) == 0.0


def test_event_recall_bad_input():
    with pytest.raises(ValueError, match="per-point alarms"):
        M.event_recall([0, 1, 0], [0, 1])
    with pytest.raises(ValueError, match="start <= end"):
        M.event_recall([(3, 1)], [0, 1, 0, 0])
    with pytest.raises(ValueError, match="start <= end"):
        M.event_recall([(2, 4)], [0, 1, 0, 0])
    with pytest.raises(ValueError, match="tolerance"):
        M.event_recall([0, 1], [0, 1], tolerance=-1)


def test_detection_delay_hand_examples():
    y = [0, 1, 1, 1, 0, 0, 1, 0, 0, 1]  # segments (1, 3), (6, 6), (9, 9)
    r = M.detection_delay([0, 0, 0, 1, 1, 0, 0, 0, 0, 1], y)  # (1, 3) at 3 -> 2; (6, 6) missed; (9, 9) -> 0
    assert r == {"delays": [2, 0], "median": 1.0}
    assert M.detection_delay([(0, 9)], y) == {"delays": [0, 0, 0], "median": 0.0}  # open all along
    # with the alerter's open_after the incident opens late: tolerance lets it count, delay 2
    y2 = [0, 0, 1, 0, 0, 0, 0, 0]
    inc = M.incidents_from_alarms([0, 0, 1, 1, 1, 0, 0, 0], open_after=3)
    assert inc == [(4, 4)]
    assert M.detection_delay(inc, y2)["delays"] == []
    assert math.isnan(M.detection_delay(inc, y2)["median"])
    assert M.detection_delay(inc, y2, tolerance=2) == {"delays": [2], "median": 2.0}


def test_false_incidents_hand_examples():
    y = [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]  # segment (3, 4)
    assert M.false_incidents([1, 1, 0, 1, 0, 0, 1, 1, 0, 1], y) == 3  # (0,1), (6,7), (9,9); (3,3) is true
    assert M.false_incidents([0, 0, 1, 1, 1, 1, 1, 0, 0, 0], y) == 0  # overlapping counts as true
    assert M.false_incidents([(0, 9)], y) == 0 and M.false_incidents([(5, 5)], y) == 1
    # an incident opening within the tolerance after the start detects the segment: not false
    assert M.false_incidents([(5, 6)], y, tolerance=2) == 0
    assert M.false_incidents([(6, 6)], y, tolerance=2) == 1
    assert M.false_incidents([1, 0, 1], [0, 0, 0]) == 2  # no labels: every incident is false
    assert M.false_incidents([], y) == 0
    # the alerter's rule merges noisy alarms into fewer incidents
    noisy = [1, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert M.false_incidents(noisy, [0] * 10) == 3
    assert M.false_incidents(M.incidents_from_alarms(noisy, 1, 2), [0] * 10) == 1


def test_false_incidents_per_day():
    assert M.false_incidents_per_day(3, 17280, 5.0) == pytest.approx(3.0)  # one day of 5 s points
    assert M.false_incidents_per_day(1, 8640, 5.0) == pytest.approx(2.0)  # half a day
    assert M.false_incidents_per_day(0, 100, 1.0) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        M.false_incidents_per_day(1, 0, 5.0)


def test_metrics_doctests():
    import doctest

    assert doctest.testmod(M).failed == 0
