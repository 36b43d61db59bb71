"""The featurizer's pure core: incremental signature matrices and the input policy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osad.core.signature import Ranges, signature_windows, signature_windows_naive, squash, window_ends
from osad.featurizer.windows import WindowConfig, WindowStore


def feed(store, X, names, eid="e", seqs=None, **kw):
    out = []
    for i, row in enumerate(X):
        seq = i if seqs is None else seqs[i]
        out += store.add(eid, seq, dict(zip(names, row.tolist())), offset=i, partition=0, **kw)
    return [w for _, w in out]


def fixed(r):
    return lambda eid: r


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), gap=st.integers(1, 4), step=st.integers(1, 4),
       mult=st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True), seed=st.integers(0, 10**6))
def test_incremental_equals_formula(n, gap, step, mult, seed):
    scales = tuple(sorted(m * gap for m in mult))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(max(scales) + (step - 1) * gap + 7 * gap, n)) * 3
    names = [f"m{i}" for i in range(n)]
    r = Ranges.fit(names, X)
    cfg = WindowConfig(scales=scales, gap=gap, step=step)
    wins = feed(WindowStore(cfg, fixed(r)), X, names)
    ends = window_ends(len(X), scales, gap, step)
    assert [w.end_seq for w in wins] == list(ends)
    ref = signature_windows_naive(r.transform(X), ends, scales, gap, step)
    np.testing.assert_allclose(np.stack([w.signatures for w in wins]), ref, atol=1e-6, rtol=1e-5)
    vals = np.stack([w.values for w in wins])
    np.testing.assert_allclose(vals[-1], r.transform(X)[len(X) - 1 - (len(X) - 1 - ends[-1]) - max(scales) + 1: ends[-1] + 1], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), cuts=st.lists(st.integers(1, 400), max_size=12),
       holes=st.lists(st.integers(0, 399), max_size=4),
       shape=st.sampled_from([((10, 30, 60), 10, 5), ((2, 4), 2, 2), ((3,), 3, 1), ((4, 8), 2, 3), ((6,), 2, 4)]))
def test_batches_of_any_size_equal_one_by_one(seed, cuts, holes, shape):
    """add_many over arbitrary batch boundaries (with gaps inside) gives exactly the one-by-one windows,
    and both equal the formula."""
    scales, gap, step = shape
    cfg = WindowConfig(scales=scales, gap=gap, step=step, max_fill=1)
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c"]
    X = rng.random((400, 3))
    r = Ranges.fit(names, X)
    seqs = [i for i in range(400) if i not in set(holes) and i not in {h + 1 for h in holes if h % 3 == 0}]
    items = [(q, dict(zip(names, X[q].tolist())), k) for k, q in enumerate(seqs)]
    one = WindowStore(cfg, fixed(r))
    ref = [w for it in items for _, w in one.add("e", it[0], it[1], offset=it[2])]
    many = WindowStore(cfg, fixed(r))
    bounds = sorted(set([0, len(items), *[c for c in cuts if c < len(items)]]))
    got = [w for a, b in zip(bounds, bounds[1:]) for _, w in many.add_many("e", items[a:b])]
    assert [w.end_seq for w in got] == [w.end_seq for w in ref]
    for g, w in zip(got, ref):
        np.testing.assert_allclose(g.tri, w.tri, atol=1e-6)
        np.testing.assert_array_equal(g.values, w.values)
    assert many.counters == one.counters
    assert many.retained() == one.retained()
    # against the literal formula on the series the policy produced (short holes filled)
    full = X.copy()
    for q in range(1, 400):
        if q not in seqs:
            full[q] = full[q - 1]
    z = r.transform(full)
    for w in ref[:: max(1, len(ref) // 5)]:
        exp = signature_windows_naive(z, [w.end_seq], scales, gap, step)[0]
        np.testing.assert_allclose(w.signatures, exp, atol=1e-6)


def test_vectorised_reference_matches_naive():
    X = np.random.default_rng(0).random((400, 7))
    e = window_ends(400)
    np.testing.assert_allclose(signature_windows(X, e), signature_windows_naive(X, e), atol=1e-6)


def test_duplicates_and_late_samples_are_dropped_and_counted():
    names = ["a", "b"]
    X = np.random.default_rng(1).random((130, 2))
    r = Ranges.fit(names, X)
    s = WindowStore(WindowConfig(), fixed(r))
    seqs = list(range(120)) + [119, 50, 120, 121]  # one duplicate, one late
    Xs = np.vstack([X[:120], X[119], X[50], X[120:122]])
    wins = feed(s, Xs, names, seqs=seqs)
    assert s.counters["duplicate"] == 1 and s.counters["late"] == 1
    clean = feed(WindowStore(WindowConfig(), fixed(r)), X[:122], names)
    assert [w.end_seq for w in wins] == [w.end_seq for w in clean]


def test_short_gap_is_filled_long_gap_restarts_window():
    names = ["a"]
    X = np.arange(400, dtype=float)[:, None]
    r = Ranges.fit(names, X)
    cfg = WindowConfig(max_fill=3)
    s = WindowStore(cfg, fixed(r))
    seqs = [i for i in range(300) if i not in (150, 151)]  # a 2-sample hole: filled
    wins = feed(s, X[seqs], names, seqs=seqs)
    assert s.counters["filled"] == 2
    assert [w.end_seq for w in wins] == list(window_ends(300))
    # the filled samples carry the last value forward
    w = next(w for w in wins if w.end_seq == 159)
    scaled = r.transform(np.array([[149.0], [149.0]]))
    np.testing.assert_allclose(w.values[-10:-8, 0], scaled[:, 0], atol=1e-6)

    s2 = WindowStore(cfg, fixed(r))
    seqs2 = list(range(150)) + list(range(160, 400))  # a 10-sample hole: restart
    wins2 = feed(s2, X[seqs2], names, seqs=seqs2)
    assert s2.counters["reset"] == 1
    ends2 = [w.end_seq for w in wins2]
    assert max(e for e in ends2 if e < 160) == 149
    assert min(e for e in ends2 if e >= 160) == 160 + cfg.span - 1  # needs a full span after the gap


def test_missing_metric_carries_last_value_forward():
    r = Ranges(("a", "b"), np.zeros(2), np.ones(2) * 10)
    s = WindowStore(WindowConfig(scales=(2,), gap=1, step=1), fixed(r))
    s.add("e", 0, {"a": 1.0, "b": 2.0})
    out = s.add("e", 1, {"a": 3.0})  # b missing -> 2.0 carried
    assert s.counters["missing_value"] == 1
    np.testing.assert_allclose(out[0][1].values, [[0.1, 0.2], [0.3, 0.2]], atol=1e-7)


def test_calibration_learns_ranges_and_emits_its_windows():
    names = ["a", "b"]
    X = np.random.default_rng(2).random((500, 2)) * [5, 100]
    X[3] = [1e6, -1e6]  # a start-up burst
    saved = {}
    cfg = WindowConfig(calibration_samples=200)
    s = WindowStore(cfg, ranges_sink=lambda e, r: saved.__setitem__(e, r))
    wins = feed(s, X, names)
    assert "e" in saved and s.counters["calibrated"] == 1
    r = saved["e"]
    np.testing.assert_allclose(r.lo, X[20:200].min(0))  # the first 20 (start-up) are left out
    np.testing.assert_allclose(r.hi, X[20:200].max(0))
    # a metric that hardly moved gets a range of at least 5% of its level
    s2 = WindowStore(WindowConfig(calibration_samples=50), ranges_sink=lambda e, r: saved.__setitem__(e, r))
    flat = np.column_stack([np.full(50, 1000.0), np.linspace(0, 10, 50)])
    flat[::7, 0] += 4.0
    feed(s2, flat, names, eid="flat")
    rf = saved["flat"]
    assert rf.hi[0] - rf.lo[0] == pytest.approx(0.05 * 1004.0)  # 5% of its level (1004), around it
    assert rf.hi[0] > 1004.0 and rf.lo[0] < 1000.0
    warm = 50 // 4  # warm-up is at most a quarter of the calibration samples
    np.testing.assert_allclose([rf.lo[1], rf.hi[1]], [flat[warm:, 1].min(), 10.0])  # wide enough: unchanged
    ends = window_ends(500)
    assert [w.end_seq for w in wins] == list(ends)  # calibration-period windows are emitted too
    ref = signature_windows_naive(r.transform(X), ends)
    np.testing.assert_allclose(np.stack([w.signatures for w in wins]), ref, atol=1e-6)


def test_feature_set_is_fixed_at_first_sample_extra_metrics_ignored():
    s = WindowStore(WindowConfig(calibration_samples=2))
    s.add("e", 0, {"b": 1.0, "a": 2.0})
    s.add("e", 1, {"b": 1.0, "a": 2.0, "zzz": 5.0})
    assert s.entities["e"].features == ("a", "b")
    assert s.counters["extra_metrics_entities"] == 1


def test_an_entity_whose_windows_could_not_be_published_is_refused_and_others_go_on():
    """More metrics than one message holds (windows above MAX_MESSAGE_BYTES) would crash the service at publish,
    on every restart: the entity is refused at its first sample (the service dead-letters its samples)."""
    from osad.featurizer.windows import max_features, window_bytes
    from osad.schemas.wire import MAX_MESSAGE_BYTES

    cfg = WindowConfig(calibration_samples=2)
    most = max_features(cfg)
    assert window_bytes(most, cfg) <= MAX_MESSAGE_BYTES < window_bytes(most + 1, cfg)
    s = WindowStore(cfg)
    with pytest.raises(ValueError, match=f"{most + 1} metrics make windows .* send at most {most} metrics"):
        s.add("big", 0, {f"m{i}": 1.0 for i in range(most + 1)})
    assert "big" not in s.entities
    s.add("ok", 0, {f"m{i}": 1.0 for i in range(most)})
    assert len(s.entities["ok"].features) == most


def test_idle_and_capacity_eviction_bound_memory():
    cfg = WindowConfig(idle_timeout_s=10, max_entities=50, calibration_samples=2)
    s = WindowStore(cfg)
    for i in range(200):  # process churn: many short-lived entities
        s.add(f"p{i}", 0, {"x": 1.0}, now=float(i))
    assert len(s.entities) == 50 and s.counters["evicted_capacity"] == 150
    s.evict_idle(now=205.0)  # idle for 10 s or more: last seen at t <= 195
    assert sorted(st.last_seen for st in s.entities.values()) == [196.0, 197.0, 198.0, 199.0]
    assert s.counters["evicted_idle"] == 46


def test_retained_offset_is_oldest_sample_future_windows_need():
    names = ["a"]
    X = np.random.default_rng(3).random((250, 1))
    r = Ranges.fit(names, X)
    cfg = WindowConfig()
    s = WindowStore(cfg, fixed(r))
    feed(s, X[:245], names)  # offsets == seq; last window ended at 239; next ends at 249
    assert s.retained() == {0: 249 - cfg.span + 1}
    s2 = WindowStore(WindowConfig(calibration_samples=100))
    feed(s2, X[:30], names)  # still calibrating: everything from the first sample
    assert s2.retained() == {0: 0}
    s.drop_partitions({0})
    assert s.retained() == {} and not s.entities


@pytest.mark.parametrize("bad", [{"features": ["a"], "min": [0, 1], "max": [1, 2]},
                                 {"features": ["a"], "min": [2], "max": [1]}, {"min": [0]}])
def test_bad_ranges_are_rejected_with_a_reason(bad):
    with pytest.raises(ValueError, match="ranges"):
        Ranges.from_dict(bad, "ranges")


def test_squash_is_identity_inside_and_keeps_order_beyond():
    z = np.array([-0.5, 3.0, 10.0, -10.0, 10.5, 25.0, 4000.0, -4000.0, 1e30, np.inf])
    s = squash(z, 10.0)
    np.testing.assert_array_equal(s[:4], z[:4])
    assert 10.0 < s[4] < 10.5 < s[5] < 25.0 < s[6]  # beyond the clip: smaller, still increasing
    assert s[7] == -s[6]
    assert np.isfinite(s).all() and s[-1] == s[-2]  # absurd values and inf are capped alike
    eps = 1e-9  # continuous at the clip
    assert abs(squash(np.array([10.0 + eps]), 10.0)[0] - 10.0) < 1e-8
    w = z.copy()
    squash(w, 10.0, out=w)
    np.testing.assert_array_equal(w, s)


def test_values_far_outside_the_ranges_are_squashed_alike_streaming_and_batched():
    """A fault 1,000 ranges out and one 20 ranges out keep their order in the windows (a hard clip
    would tie them), and streaming one by one, a backlog and the offline transform agree."""
    names = ["syscalls", "cpu"]
    rng = np.random.default_rng(3)
    X = rng.random((200, 2))
    r = Ranges.fit(names, X[:100])
    X[150:, 0] = 1000.0
    X[150:, 1] = 20.0
    cfg = WindowConfig(scales=(10, 30, 60), gap=10, step=5)
    one = feed(WindowStore(cfg, fixed(r)), X, names)
    items = [(q, dict(zip(names, X[q].tolist())), q) for q in range(len(X))]
    many = [w for _, w in WindowStore(cfg, fixed(r)).add_many("e", items)]
    last = one[-1].values[-1]
    assert last[0] > last[1] > r.clip
    np.testing.assert_allclose(last, r.transform(X[-1:])[0], rtol=1e-6)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.tri, b.tri, rtol=1e-6)
