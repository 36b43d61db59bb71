"""osad evaluate: window coverage, causality, no use of test labels, end to end on a small slice."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from osad.core.signature import span
from osad.detector.baselines import L2Scorer, PCAScorer, RandomScorer
from osad.detector.base import WindowBatch
from osad.detector.cs import CSScorer
from osad.detector.evaluate import EvalConfig, covering_ends, evaluate, evaluate_entity, point_windows, score_points

from tests.conftest import osad_cmd

NEED = span((10, 30, 60), 10, 5)  # 100 rows per window


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py



@pytest.mark.parametrize("n_points", [1, 9, 10, 11, 57, 100])
def test_every_point_is_covered_by_the_window_it_ends_in(n_points):
    gap = 10
    ends = covering_ends(NEED - 1 + n_points, NEED - 1, NEED, gap)
    w = point_windows(n_points, NEED - 1, ends, gap)
    p = NEED - 1 + np.arange(n_points)
    assert ((ends[w] - gap < p) & (p <= ends[w])).all()  # among the gap newest rows of its window
    assert (ends[w] - p <= gap - 1).all()  # scored at most gap - 1 rows after the point
    on_grid = ends[:-1] if (n_points % gap) else ends
    assert ((on_grid - (NEED - 1) + 1) % gap == 0).all()
    with pytest.raises(ValueError, match="history"):
        covering_ends(50, 10, NEED, gap)


def test_point_scores_are_causal():
    rng = np.random.default_rng(0)
    t = np.arange(400)
    x = 0.5 + 0.3 * np.sin(2 * np.pi * t[:, None] / 50 + np.arange(3)) + rng.normal(0, 0.02, (400, 3))
    hist, series = x[:200], x[200:].copy()
    before, _, _ = score_points(CSScorer(), hist, series)
    series[150:] += rng.normal(0, 1.0, (50, 3))  # the future changes from test row 150 on
    after, _, _ = score_points(CSScorer(), hist, series)
    assert np.array_equal(before[:150], after[:150])  # windows ending before row 150 see none of it
    assert not np.allclose(before[150:], after[150:])


def test_baselines_score_newest_rows():
    rng = np.random.default_rng(1)
    train = WindowBatch(np.zeros((40, 0, 3, 5, 5)), rng.normal(0.5, 0.05, (40, 60, 5)))
    test = rng.normal(0.5, 0.05, (3, 60, 5))
    test[1, -3:, 4] += 1.0  # newest rows: counts
    test[2, :10, 4] += 1.0  # oldest rows: not what the window's score is about
    tb = WindowBatch(np.zeros((3, 0, 3, 5, 5)), test)
    for sc in (PCAScorer().fit(train), L2Scorer().fit(train)):
        out = sc.score(tb)
        assert out.scores[1] > 2 * out.scores[0] and out.scores[2] < 1.5 * out.scores[0]
        assert out.contributions[1].argmax() == 4 and (out.contributions >= 0).all()
    pca = PCAScorer().fit(train)
    assert 1 <= pca.components_.shape[0] <= 5
    r = RandomScorer(seed=3).score(tb)
    assert r.scores.shape == (3,) and r.contributions.shape == (3, 5)
    with pytest.raises(RuntimeError, match="fit"):
        PCAScorer().score(tb)


SLICE = EvalConfig(limit_train=900, limit_test=800)  # omi-2: 3 anomalies in its first 800 test rows


def test_thresholds_and_scores_never_see_test_labels(datasets_dir, monkeypatch):
    import osad.detector.evaluate as ev
    root = datasets_dir / "ASD"
    a = evaluate_entity(root, "omi-2", ["cs", "pca"], SLICE, keep_scores=True)
    real_load = ev.load_entity

    def flipped(*args, **kw):
        ent = real_load(*args, **kw)
        ent.test_label = 1 - ent.test_label
        return ent

    monkeypatch.setattr(ev, "load_entity", flipped)
    b = evaluate_entity(root, "omi-2", ["cs", "pca"], SLICE, keep_scores=True)
    for m in ("cs", "pca"):
        assert a["models"][m]["threshold"] == b["models"][m]["threshold"]
        assert np.array_equal(a["_arrays"][m], b["_arrays"][m])


def test_evaluate_end_to_end_on_a_slice(datasets_dir, tmp_path):
    out = tmp_path / "run"
    summary = evaluate(datasets_dir / "ASD", ["cs", "cs-faithful", "pca", "l2", "random"], ["omi-2"],
                       out=out, cfg=SLICE, progress=None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "ASD" and saved["protocol"]["limit_test"] == 800
    assert (out / "ASD_omi-2.png").stat().st_size > 10_000
    ent = summary["entities"][0]
    assert ent["n_test"] == 800 and ent["n_fit"] + ent["n_val"] == 900
    for m in ("cs", "cs-faithful", "pca", "l2", "random"):
        r = ent["models"][m]
        for k in ("f1", "auprc", "pa_f1", "deployed_f1", "hitrate@100", "hitrate@150"):
            assert 0.0 <= r[k] <= 1.0, (m, k, r[k])
        assert r["threshold_method"] in ("pot", "sigma") and np.isfinite(r["threshold"])
        assert summary["mean"][m]["f1"] == pytest.approx(r["f1"])


def test_cli_evaluate(datasets_dir, tmp_path):
    p = subprocess.run(osad_cmd("evaluate", str(datasets_dir / "ASD"), "--model", "l2", "--baselines", "random",
                                "--entities", "omi-2", "--limit-train", "900", "--limit-test", "800",
                                "--out", str(tmp_path), "--no-plots"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| omi-2 | l2 |" in p.stdout and "| **mean** | **random** |" in p.stdout
    assert "[1/1] ASD/omi-2" in p.stderr  # progress on stderr
    assert (tmp_path / "results.json").exists()
    bad = subprocess.run(osad_cmd("evaluate", str(datasets_dir / "ASD"), "--model", "nope"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown model nope" in bad.stderr
    missing = subprocess.run(osad_cmd("evaluate", str(datasets_dir / "ASD"), "--entities", "omi-9"),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no entity omi-9" in missing.stderr


def test_mscred_is_available_through_the_same_interface(datasets_dir):
    pytest.importorskip("osad.detector.mscred")
    from osad.core.datasets import load_entity
    from osad.core.signature import Ranges
    from osad.detector.base import Scorer
    from osad.detector.evaluate import make_scorer

    ent = load_entity(datasets_dir / "ASD", "omi-1", with_test=False)
    sc = make_scorer("mscred", ent, Ranges.fit(ent.feature_names, ent.train), threads=1)
    assert isinstance(sc, Scorer) and sc.needs_fit


def test_window_batches_match_the_signature_reference_on_and_off_the_grid():
    from osad.core.signature import signature_windows_naive
    from osad.detector.evaluate import window_batches

    x = np.random.default_rng(2).random((300, 4))
    ends = np.array([99, 150, 209, 299, 233])  # 150 and 233 are off the block grid (tail windows)
    b = next(window_batches(x, ends, with_signatures=True))
    assert np.allclose(b.signatures, signature_windows_naive(x, ends), atol=1e-6)
    assert np.array_equal(b.values, x[ends[:, None] + np.arange(-59, 1)].astype(np.float32))
