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
