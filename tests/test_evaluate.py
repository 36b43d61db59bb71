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
    assert "| entity | model | vus_pr | vus_roc | event_recall |" in p.stdout  # the second table
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


# -- VUS window and incidents (synthetic data, no ../shared) ---------------------------------------


def test_estimate_period_follows_tsb_ads_find_length_rank():
    from osad.detector.evaluate import estimate_period

    t = np.arange(5000)
    rng = np.random.default_rng(4)
    assert estimate_period(np.sin(2 * np.pi * t / 48)) == 48
    assert estimate_period(np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3, t.size)) == 24
    assert estimate_period(3.0 * np.sin(2 * np.pi * t / 24) + 7.0) == 24  # affine-invariant, as the ACF
    assert estimate_period(np.sin(2 * np.pi * t / 350)) == 125  # peak past lag 303: TSB-AD's default
    assert estimate_period(np.ones(800)) == 125  # constant: no ACF, default
    assert estimate_period(np.linspace(0, 1, 800)) == 125  # no local maximum
    # only the first 20,000 points count
    x = np.r_[np.sin(2 * np.pi * np.arange(20_000) / 30), np.sin(2 * np.pi * np.arange(20_000) / 70)]
    assert estimate_period(x) == 30
    # the FFT autocorrelation is the direct (biased, mean removed) one
    v = np.sin(2 * np.pi * t[:900] / 40) + rng.normal(0, 0.5, 900)
    d = v - v.mean()
    direct = np.array([d[: d.size - k] @ d[k:] for k in range(401)]) / (d @ d)
    peaks = [k for k in range(4, 400) if direct[k] > direct[k - 1] and direct[k] > direct[k + 1]]
    assert estimate_period(v) == max(peaks, key=lambda k: direct[k])


def _grid_pmap(n_points: int, first: int, gap: int = 10) -> np.ndarray:
    """Window of each point when the first window holds ``first`` points, then ``gap`` each."""
    return np.where(np.arange(n_points) < first, 0, (np.arange(n_points) - first) // gap + 1)


def test_incident_metrics_apply_the_alerter_rule_on_windows():
    from osad.detector.evaluate import incident_metrics

    pmap = _grid_pmap(104, 4)  # windows: [0-3], [4-13], [14-23], ..., [94-103] -> 11 windows
    ws = np.zeros(11)
    ws[[1, 2]] = 5.0  # two windows over: opens at window 2 (points 14-23), stays open to window 4 (close_after 3)
    ws[6] = 5.0  # a single window over: no incident with open_after 2
    ws[[8, 9, 10]] = 5.0  # opens at window 9, open to the end of the stream
    y = np.zeros(104, int)
    y[6:9] = 1  # in window 1: found by the first incident (evidence from window 1), published at point 23
    y[55:60] = 1  # in window 6: missed
    r = incident_metrics(ws, pmap, y, 4.0, open_after=2, close_after=3, interval_s=60.0)
    assert r["incidents"] == 2 and r["segments"] == 2 and r["segments_found"] == 1
    assert r["event_recall"] == 0.5
    assert r["detection_delay"] == 23 - 6  # to the end of the publishing window
    assert r["false_incidents"] == 1  # the one from window 8 on covers no label
    assert r["false_incidents_per_day"] == pytest.approx(1 / (104 * 60 / 86400))
    # the threshold flags score > threshold (the alerter's rule); at every score's level: nothing at all
    q = incident_metrics(ws, pmap, y, 5.0, open_after=2, close_after=3, interval_s=60.0)
    assert (q["incidents"], q["false_incidents"], q["event_recall"]) == (0, 0, 0.0) and np.isnan(q["detection_delay"])
    # open_after = close_after = 1: incidents are the runs of windows over the threshold; window 6 finds y[55:60]
    one = incident_metrics(ws, pmap, y, 4.0, open_after=1, close_after=1, interval_s=60.0)
    assert (one["incidents"], one["event_recall"], one["false_incidents"]) == (3, 1.0, 1)
    assert one["detection_delay"] == np.median([13 - 6, 63 - 55])
    # a segment that began before the incident was published: delay 0 if published before it starts
    y2 = np.zeros(104, int)
    y2[30:33] = 1  # window 3, the incident (published at point 23) is still open
    assert incident_metrics(ws, pmap, y2, 4.0, open_after=2, close_after=3, interval_s=60.0)["detection_delay"] == 0


def test_incidents_match_what_the_alerter_publishes():
    """The windows at which ``osad alert``'s Engine opens and closes incidents are those of incident_metrics'
    rule (its defaults; a static threshold so that nothing calibrates)."""
    from osad.alerter.config import AlerterConfig
    from osad.alerter.core import Engine
    from osad.core.metrics import incidents_from_alarms
    from osad.schemas import Score

    cfg = AlerterConfig(static_thresholds=[("cs-jumpstarter", 1.0)], host_min_entities=0)
    rng = np.random.default_rng(5)
    over = rng.random(400) < 0.3
    ws = np.where(over, 2.0, 0.5)
    eng = Engine(cfg)
    events = []
    for i, v in enumerate(ws):
        s = Score(entity_id="h/1@2", host="h", window_end_ts=float(i), window_end_seq=10 * i + 9, interval_s=1.0,
                  gap=10, model_id="cs-jumpstarter:x", score=float(v), features=["a", "b"], contributions=[1.0, 1.0])
        events += [(a.status, i) for a in eng.observe(s, now=float(i)) if a.status in ("open", "closed")]
    expect = []
    for a, b in incidents_from_alarms(ws > 1.0, cfg.open_after, cfg.close_after):
        expect.append(("open", a))
        if b + 1 < ws.size:
            expect.append(("closed", b + 1))  # published at the close_after-th quiet window, the first not open
    assert len(expect) > 10 and events == expect


def _tiny_dataset(root, rng, n_train=900, n_test=700):
    """An SMD-shaped folder (name SMD: 60 s interval) with one entity, sine metrics and two injected anomalies."""
    t = np.arange(n_train + n_test)
    x = 0.5 + 0.3 * np.sin(2 * np.pi * t[:, None] / 60 + np.arange(4)) + rng.normal(0, 0.02, (t.size, 4))
    y = np.zeros(n_test, int)
    for a, b in ((200, 240), (500, 520)):
        x[n_train + a: n_train + b, 1] += 1.5
        y[a:b] = 1
    for sub, arr in (("train", x[:n_train]), ("test", x[n_train:]), ("test_label", y[:, None])):
        (root / sub).mkdir(parents=True)
        np.savetxt(root / sub / "m-1.txt", arr, delimiter=",", fmt="%.6g")
    return root


def test_evaluate_reports_vus_and_incidents(tmp_path):
    from osad.detector.evaluate import INCIDENT_KEYS, format_incident_table, format_table

    root = _tiny_dataset(tmp_path / "SMD", np.random.default_rng(6))
    summary = evaluate(root, ["l2", "random"], out=tmp_path / "run", plots=False, progress=None)
    ent = summary["entities"][0]
    assert ent["interval_s"] == 60.0 and ent["test_days"] == pytest.approx(700 * 60 / 86400)
    assert ent["vus_window"] == 60  # the period of the sine
    for m in ("l2", "random"):
        r = ent["models"][m]
        assert 0 <= r["vus_pr"] <= 1 and 0 <= r["vus_roc"] <= 1
        assert r["segments"] == 2 and r["false_incidents"] <= r["incidents"]
        assert r["false_incidents_per_day"] == pytest.approx(r["false_incidents"] / ent["test_days"])
        for k in INCIDENT_KEYS:
            v, mv = r[k], summary["mean"][m][k]
            assert (np.isnan(v) and np.isnan(mv)) or mv == pytest.approx(v)
    l2 = ent["models"]["l2"]
    assert l2["event_recall"] == 1.0 and l2["false_incidents"] == 0 and l2["vus_pr"] > ent["models"]["random"]["vus_pr"]
    assert 0 <= l2["detection_delay"] <= 2 * 10  # published within two windows of the start
    assert summary["mean"]["l2"]["false_incidents_per_entity_day"] == pytest.approx(0.0)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["entities"][0]["models"]["l2"]["event_recall"] == 1.0
    assert saved["protocol"]["open_after"] == 2 and saved["protocol"]["close_after"] == 3
    table = format_incident_table(summary)
    assert "| m-1 | l2 |" in table and "| **mean** | **random** |" in table
    assert "vus_pr" not in format_table(summary)  # the first table is unchanged
