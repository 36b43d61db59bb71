"""Compressed-sensing scorer: the batched solver against a reference LP, reconstruction, scoring."""

from __future__ import annotations

import numpy as np
import pytest

from osad.detector.base import WindowBatch
from osad.detector.cs import (CalibratedCSScorer, CSScorer, basis_pursuit_dct, dct_matrix, group_basis, group_labels,
                         lesinn_outlier_scores, sampling_mask, sbd_matrix)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py



def batch(values) -> WindowBatch:
    v = np.asarray(values, np.float32)
    return WindowBatch(np.zeros((v.shape[0], 0, 3, v.shape[2], v.shape[2]), np.float32), v)


def smooth_windows(b: int, t: int = 60, n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tt = np.arange(t)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, (b, 1, n))
    freq = rng.uniform(0.5, 1.5, (b, 1, n))
    return 0.5 + 0.3 * np.sin(2 * np.pi * freq * tt / t + phase)


def linprog_bp(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference: basis pursuit as an LP, v = p - q, p, q >= 0, min 1'(p + q) s.t. A(p - q) = y."""
    from scipy.optimize import linprog

    n = a.shape[1]
    res = linprog(np.ones(2 * n), A_eq=np.hstack([a, -a]), b_eq=y, bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return res.x[:n] - res.x[n:]


def test_dct_matrix_is_orthonormal_dct2():
    from scipy.fft import dct

    d = dct_matrix(12)
    assert np.allclose(d @ d.T, np.eye(12))
    x = np.random.default_rng(0).standard_normal(12)
    assert np.allclose(d @ x, dct(x, norm="ortho"))


def test_group_basis_is_block_diagonal_and_orthonormal():
    labels = np.array([0, 1, 0, 2, 1])
    g = group_basis(labels)
    assert np.allclose(g @ g.T, np.eye(5))
    assert g[0, 1] == 0 and g[3, 3] == 1.0  # no mixing across groups; a singleton keeps its value
    assert np.allclose(g[np.ix_([0, 2], [0, 2])], dct_matrix(2))


@pytest.mark.parametrize("seed,t,n,groups", [(0, 16, 1, [0]), (1, 20, 3, [0, 0, 1]), (2, 24, 2, [0, 0]),
                                             (3, 18, 4, [0, 1, 1, 2]), (4, 16, 3, [0, 1, 2])])
def test_solver_matches_linprog_reference(seed, t, n, groups):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n)).cumsum(axis=0) * 0.2  # generic data: the LP has a unique minimiser
    mask = np.zeros(t, bool)
    mask[rng.choice(t, int(0.4 * t), replace=False)] = True
    g = group_basis(np.array(groups))
    # the problem as the paper writes it: A = sampled rows of kron(G^T, IDCT_t), column-major vec
    psi = np.kron(g.T, dct_matrix(t).T)
    rows = np.nonzero(np.tile(mask, n))[0]
    v_ref = linprog_bp(psi[rows], x.reshape(-1, order="F")[rows])
    res = basis_pursuit_dct(x[None], mask[None], g[None], max_iter=50000, tol=1e-7, dtype="float64")
    v = res.coef[0].reshape(-1, order="F")
    assert np.linalg.norm(v - v_ref) / np.linalg.norm(v_ref) <= 1e-3
    assert abs(np.abs(v).sum() - np.abs(v_ref).sum()) / np.abs(v_ref).sum() <= 1e-3
    assert np.allclose(res.x_hat[0][mask], x[mask], atol=1e-8)  # the samples are kept exactly


def test_solver_batches_independent_problems():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 20, 2)).cumsum(axis=1) * 0.1
    masks = rng.random((4, 20)) < 0.5
    res = basis_pursuit_dct(x, masks, dtype="float64")
    alone = [basis_pursuit_dct(x[i:i + 1], masks[i:i + 1], dtype="float64") for i in range(4)]
    # each window stops on its own: the same iterations and result as when solved alone
    assert res.iterations.tolist() == [a.iterations[0] for a in alone]
    assert np.allclose(res.x_hat, np.concatenate([a.x_hat for a in alone]), atol=1e-10)


def test_reconstructs_smooth_signals_and_leaves_spikes_in_the_residual():
    x = smooth_windows(8)
    rng = np.random.default_rng(1)
    masks = np.zeros((8, 60), bool)
    for m in masks:
        m[rng.choice(60, 24, replace=False)] = True
    rec = basis_pursuit_dct(x, masks).x_hat
    assert np.linalg.norm(rec - x) / np.linalg.norm(x) < 0.06  # sinusoids: nearly sparse in the DCT
    # exactly sparse in the DCT (3 low-frequency atoms per metric): recovered exactly (Candes et al. 2006)
    coef = np.zeros((8, 60, 4))
    coef[:, [0, 1, 3], :] = rng.normal(0, 1, (8, 3, 4))
    sparse = np.einsum("kt,bkn->btn", dct_matrix(60), coef)
    rec = basis_pursuit_dct(sparse, masks, max_iter=5000, tol=1e-7, dtype="float64").x_hat
    assert np.linalg.norm(rec - sparse) / np.linalg.norm(sparse) < 1e-3
    # a spike at an unsampled point is not reconstructed: it stays in the residual
    spiked = x.copy()
    free = np.nonzero(~masks[0])[0]
    j = free[len(free) // 2]
    spiked[0, j, 1] += 1.0
    r = np.abs(spiked - basis_pursuit_dct(spiked, masks).x_hat)
    assert r[0, j, 1] > 0.8
    assert np.delete(r[0, :, 1], j).max() < 0.2


def test_sbd_groups_shapes():
    t = np.arange(60)
    a = np.sin(2 * np.pi * t / 30)
    v = np.stack([a, 3 * a + 1, np.roll(a, 4), np.random.default_rng(0).standard_normal(60), np.ones(60)], axis=1)
    d = sbd_matrix(v[None])[0]
    assert d[0, 1] == pytest.approx(0.0, abs=1e-5)  # scaled and shifted in value: same shape
    assert d[0, 2] < 0.1  # shifted in time: cross-correlation finds the lag
    assert d[0, 3] > 0.5 and d[4, 0] == 1.0  # noise is far; a constant has no shape
    lab = group_labels(d, 0.01)
    assert lab[0] == lab[1] and len(set(lab.tolist())) == 4


def test_lesinn_and_sampling_avoid_outliers():
    x = smooth_windows(1, n=3)
    x[0, 55, :] += 2.0  # an outlying time point
    cs = CSScorer()
    subsets, m, unit_u, pick_u = cs._random(60)
    o = lesinn_outlier_scores(x, subsets)
    assert o[0].argmax() == 55 and (o >= 1.0).all()
    mask = sampling_mask(o, m, unit_u, pick_u, cs.rho, cs.kernel_std)
    assert mask.sum() == m == 24 and not mask[0, 55]


def test_cs_scorer_needs_no_fit_and_flags_a_spike():
    base = smooth_windows(1)[0]
    spiked = base.copy()
    spiked[-4:-2, :2] += 1.0  # a two-point burst on two metrics among the newest points
    sc = CSScorer()
    assert sc.needs_fit is False
    out = sc.score(batch(np.stack([base, spiked])))
    assert out.scores.shape == (2,) and out.contributions.shape == (2, 4)
    assert out.scores[1] > 5 * max(out.scores[0], 1e-3)
    assert set(np.argsort(out.contributions[1])[-2:]) == {0, 1}
    assert (out.contributions >= 0).all()


def test_cs_scores_do_not_depend_on_the_batch():
    v = smooth_windows(6, seed=3)
    v[2, -3, 0] += 1.0
    sc = CSScorer(seed=7)
    all_at_once = sc.score(batch(v)).scores
    one_by_one = np.concatenate([CSScorer(seed=7).score(batch(v[i:i + 1])).scores for i in range(6)])
    assert np.allclose(all_at_once, one_by_one, rtol=1e-4, atol=1e-6)
    assert np.array_equal(sc.score(batch(v)).scores, all_at_once)  # deterministic


def test_cs_fit_groups_from_calibration():
    v = smooth_windows(20, n=3, seed=4)
    v[:, :, 1] = 2 * v[:, :, 0] - 0.3  # metric 1 has metric 0's shape in every window
    sc = CSScorer(grouping="fit").fit(batch(v))
    assert sc.groups_[0] == sc.groups_[1] != sc.groups_[2]
    with pytest.raises(ValueError, match="fitted on 3 features"):
        sc.score(batch(smooth_windows(1, n=4)))


def test_calibrated_cs_jump_starts_then_uses_train_ranges():
    train = smooth_windows(64, seed=5) + np.random.default_rng(0).normal(0, 0.01, (64, 60, 4))
    test = smooth_windows(2, seed=6)
    test[1, -5:, 3] += 0.8  # a level shift on metric 3 in the newest rows
    sc = CalibratedCSScorer(max_calibration_windows=32)
    before = sc.score(batch(test))  # unfitted: JumpStarter's score
    assert np.allclose(before.scores, CSScorer().score(batch(test)).scores)
    sc.fit(batch(train))
    out = sc.score(batch(test))
    assert out.scores[1] > 3 * out.scores[0]
    assert out.contributions[1].argmax() == 3
    assert set(out.detail) >= {"cs", "pca"}


@pytest.mark.parametrize("grouping", ["window", "fit"])
def test_score_many_scores_each_entity_as_its_own_scorer_would(grouping):
    """Entities with their own calibrations, one reconstruction for all (the detector's batch across processes):
    each entity's scores and contributions are those of its own scorer alone, to the tolerance batching has
    anyway (test_cs_scores_do_not_depend_on_the_batch); unfitted ones score as JumpStarter."""
    from osad.detector.cs import score_many

    rng = np.random.default_rng(11)
    scorers, items = [], []
    for e in range(5):
        sc = CalibratedCSScorer(max_calibration_windows=16, grouping=grouping)
        if e != 3:  # entity 3 is still calibrating
            sc.fit(batch(smooth_windows(24, seed=20 + e) + rng.normal(0, 0.01, (24, 60, 4))))
            if grouping == "fit":
                sc.cs.fit(batch(smooth_windows(24, seed=20 + e)))
        v = smooth_windows(1 + e % 3, seed=40 + e)
        v[0, -4:, e % 4] += 0.7
        scorers.append(sc)
        items.append((sc, v))
    together = score_many(items)
    for (sc, v), got in zip(items, together):
        alone = sc.score(batch(v))
        assert got.scores.shape == alone.scores.shape
        assert np.allclose(got.scores, alone.scores, rtol=1e-4, atol=1e-6)
        assert np.allclose(got.contributions, alone.contributions, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="fitted on 4 features"):
        score_many([(scorers[0], smooth_windows(1, n=3))])


def test_fast_grouping_matches_scipy_clustering():
    from scipy.cluster.hierarchy import fcluster, linkage

    from osad.detector.cs import group_labels_batch

    rng = np.random.default_rng(8)
    d = rng.uniform(0.0, 0.03, (30, 12, 12))  # many pairs under the cut: big components
    d = 0.5 * (d + np.swapaxes(d, 1, 2))
    d[:, np.arange(12), np.arange(12)] = 0
    fast = group_labels_batch(d, 0.01)
    for w in range(30):
        ref = fcluster(linkage(d[w][np.triu_indices(12, 1)], "average"), t=0.01, criterion="distance")
        same_fast = fast[w][:, None] == fast[w][None, :]
        assert np.array_equal(same_fast, ref[:, None] == ref[None, :])


def test_calibrated_cs_blames_the_metric_that_moved_not_its_correlated_twin():
    """Metrics 0 and 1 always move together; metric 0 jumps. The squared PCA residual is as large on
    metric 1 (the correlation broke), so attribution="score" nearly ties them; the partial
    decomposition (default) puts the blame on metric 0. The score does not depend on it."""
    def wins(b, seed):
        r = np.random.default_rng(seed)
        t = np.arange(60)[None, :]
        base = 0.5 + 0.3 * np.sin(2 * np.pi * t / 40 + r.uniform(0, 2 * np.pi, (b, 1)))
        other = 0.5 + 0.3 * np.sin(2 * np.pi * t / 25 + r.uniform(0, 2 * np.pi, (b, 1)))
        return np.stack([base, base + r.normal(0, 0.005, (b, 60)), other, r.normal(0.5, 0.05, (b, 60))], axis=2)

    train, test = wins(64, 1), wins(1, 2)
    test[0, -12:, 0] += 3.0
    pdc = CalibratedCSScorer(max_calibration_windows=32).fit(batch(train)).score(batch(test))
    raw = CalibratedCSScorer(max_calibration_windows=32, attribution="score").fit(batch(train)).score(batch(test))
    np.testing.assert_allclose(pdc.scores, raw.scores)
    c, d = pdc.contributions[0], raw.contributions[0]
    assert c.argmax() == 0 and c[0] > 3 * c[1]
    assert d[1] > 0.5 * d[0]  # the smear the decomposition removes
    with pytest.raises(ValueError, match="attribution"):
        CalibratedCSScorer(attribution="nope")
