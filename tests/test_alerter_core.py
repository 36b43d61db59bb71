"""The alerter's pure core: thresholds, debouncing, incidents, severity, root cause, idempotency, restart."""

import numpy as np
import pytest

from osad.alerter.core import AlerterConfig, Engine, anomaly_id_for, parse_threshold_override, severity_of
from osad.core.thresholds import pot_threshold
from osad.schemas import Score

FEATS = ["cpu", "mem", "net", "io"]
CS = "cs-jumpstarter:v1"
MS = "mscred:abc123"


def sc(i, value, model=CS, entity="h/1@100", contrib=(1.0, 1.0, 1.0, 1.0), thr=None, gap=10):
    """Score of window i (window_end_seq = 1000 + gap * i)."""
    seq = 1000 + gap * i
    return Score(entity_id=entity, host="h", pid=1, comm="proc", window_end_ts=1e9 + seq, window_end_seq=seq,
                 interval_s=1.0, gap=gap, model_id=model, score=float(value), threshold=thr, features=FEATS,
                 contributions=list(contrib))


def feed(eng, scores, now=0.0):
    out = []
    for s in scores:
        out += eng.observe(s, now)
    return out


def normal(n, seed=0, start=0, **kw):
    rng = np.random.default_rng(seed)
    return [sc(start + i, 1.0 + 0.1 * rng.random(), **kw) for i in range(n)]


def calibrated(n=30, **cfg):
    eng = Engine(AlerterConfig(calibration_scores=n, **cfg))
    assert feed(eng, normal(n)) == []
    return eng


def test_threshold_is_pot_on_the_first_scores_which_are_not_judged():
    rng = np.random.default_rng(3)
    vals = rng.exponential(1.0, 100)
    vals[50] = 1000.0  # a spike inside calibration: no alarm (calibration is assumed normal)
    eng = Engine(AlerterConfig(calibration_scores=100, q=1e-3, arm_scores=0))
    assert feed(eng, [sc(i, v) for i, v in enumerate(vals)]) == []
    st = eng.entities["h/1@100"].streams[CS]
    expected = pot_threshold(vals, q=1e-3, fence_k=6.0)
    assert st.threshold == pytest.approx(expected.value) and st.method == expected.method
    assert expected.info["left_out"] == 1  # the spike, above Q3 + 6 IQR, is left out of the fit
    assert eng.counters["calibrated"] == 1
    # judged from the next score on
    t = st.threshold
    assert feed(eng, [sc(100, 0.5 * t)]) == [] and st.under_run == 1
    assert feed(eng, [sc(101, 2 * t), sc(102, 2 * t)])[0].status == "open"


def test_a_spike_while_calibrating_does_not_lift_the_threshold_out_of_reach():
    """Seen once end to end: one process's POT threshold came out at 1326 where its neighbours got
    10-15, and its syscall storm never opened. A spike in its 60 calibration scores does that."""
    rng = np.random.default_rng(7)
    vals = 4.0 + rng.gamma(4.0, 0.5, 60)
    vals[[20, 21]] = [400.0, 250.0]
    fenced = Engine(AlerterConfig(calibration_scores=60, open_after=3, arm_scores=0))
    unfenced = Engine(AlerterConfig(calibration_scores=60, open_after=3, calibration_fence=0, arm_scores=0))
    fault = [sc(60 + i, 100.0) for i in range(3)]
    for eng in (fenced, unfenced):
        assert feed(eng, [sc(i, v) for i, v in enumerate(vals)]) == []
    t_fenced = fenced.entities["h/1@100"].streams[CS].threshold
    t_unfenced = unfenced.entities["h/1@100"].streams[CS].threshold
    assert t_fenced == pytest.approx(pot_threshold(vals[vals < 100], q=1e-3).value)  # as if no spike
    assert t_fenced < 100 < 1000 < t_unfenced
    assert [a.status for a in feed(fenced, fault)] == ["open"]
    assert feed(unfenced, fault) == []
    with pytest.raises(ValueError, match="--calibration-fence"):
        AlerterConfig(calibration_fence=-1)


def test_model_threshold_static_override_and_no_model_threshold():
    # MSCRED carries its own threshold: judged at once, no calibration
    eng = Engine(AlerterConfig(calibration_scores=50))
    out = feed(eng, [sc(0, 5.0, model=MS, thr=10.0), sc(1, 25.0, model=MS, thr=10.0), sc(2, 31.0, model=MS, thr=10.0)])
    assert [a.status for a in out] == ["open"] and out[0].threshold == 10.0 and out[0].severity == "high"
    assert eng.counters["calibrated"] == 0
    # --no-model-threshold: the stream calibrates like any other
    eng = Engine(AlerterConfig(calibration_scores=20, use_model_threshold=False))
    assert feed(eng, [sc(i, 25.0 + i % 3, model=MS, thr=10.0) for i in range(22)]) == []
    assert eng.counters["calibrated"] == 1
    # a static override per family wins over both
    eng = Engine(AlerterConfig(calibration_scores=50, static_thresholds={"mscred": 100.0}))
    assert feed(eng, [sc(i, 50.0, model=MS, thr=10.0) for i in range(3)]) == []
    out = feed(eng, [sc(3, 150.0, model=MS, thr=10.0), sc(4, 160.0, model=MS, thr=10.0)])
    assert out[0].threshold == 100.0 and out[0].severity == "medium"


def test_threshold_override_syntax_errors_say_what_to_write():
    assert parse_threshold_override(" cs-jumpstarter = 0.5") == ("cs-jumpstarter", 0.5)
    for bad, words in (("mscred", "MODEL_FAMILY=VALUE"), ("=3", "MODEL_FAMILY=VALUE"), ("mscred=abc", "not a number"),
                       ("mscred=-1", "greater than 0"), ("mscred=nan", "greater than 0")):
        with pytest.raises(ValueError, match=words):
            parse_threshold_override(bad)
    with pytest.raises(ValueError, match="--open-after"):
        AlerterConfig(open_after=0)


def test_debounce_opens_after_two_windows_over_and_closes_after_three_under():
    eng = calibrated()
    thr = eng.entities["h/1@100"].streams[CS].threshold
    hi, lo = 4 * thr, 0.5 * thr
    assert feed(eng, [sc(30, hi), sc(31, lo), sc(32, hi), sc(33, lo)]) == []  # single windows over: no incident
    out = feed(eng, [sc(34, hi)])
    assert out == []
    out = feed(eng, [sc(35, hi)])
    assert [a.status for a in out] == ["open"]
    a = out[0]
    assert a.revision == 0 and a.first_window_seq == 1000 + 10 * 34 and a.windows_over == 2
    assert a.anomaly_id == anomaly_id_for("h/1@100", 1340)
    assert a.start_ts == pytest.approx(1e9 + 1340 - 10) and a.end_ts is None and a.models == [CS]
    assert feed(eng, [sc(36, lo), sc(37, lo)]) == []  # two under: still open
    out = feed(eng, [sc(38, lo)])
    assert [x.status for x in out] == ["closed"]
    c = out[0]
    assert c.anomaly_id == a.anomaly_id and c.revision > a.revision
    assert c.end_ts == pytest.approx(1e9 + 1350) and c.last_ts == pytest.approx(1e9 + 1380)
    # an over window interrupting the under run restarts the count
    feed(eng, [sc(40, hi), sc(41, hi), sc(42, lo), sc(43, lo), sc(44, hi), sc(45, lo), sc(46, lo)])
    assert eng.entities["h/1@100"].incident is not None
    assert feed(eng, [sc(47, lo)])[0].status == "closed"


def test_one_anomaly_per_incident_open_update_closed_with_increasing_revisions():
    eng = calibrated()
    thr = eng.entities["h/1@100"].streams[CS].threshold
    ratios = [2.0, 2.0, 2.05, 4.0, 4.1, 12.0, 12.0, 0.5, 0.5, 0.5]
    out = feed(eng, [sc(30 + i, r * thr) for i, r in enumerate(ratios)])
    assert [a.status for a in out] == ["open", "update", "update", "closed"]
    assert len({a.anomaly_id for a in out}) == 1
    assert [a.revision for a in out] == [0, 1, 2, 3]
    assert [a.severity for a in out] == ["medium", "high", "critical", "critical"]
    assert out[-1].max_ratio == pytest.approx(12.0) and out[-1].windows_over == 7
    assert out[-1].score == pytest.approx(12.0 * thr) and out[-1].threshold == pytest.approx(thr)
    # the next incident is another anomaly
    out2 = feed(eng, [sc(50, 3 * thr), sc(51, 3 * thr)])
    assert out2[0].status == "open" and out2[0].anomaly_id != out[0].anomaly_id and out2[0].revision == 0


def test_updates_at_most_once_per_window():
    eng = Engine(AlerterConfig(calibration_scores=20, update_min_change=0.0))
    # two models with their own thresholds score the same windows; both change the incident each window
    out = []
    for i in range(6):
        out += feed(eng, [sc(i, (2 + i) * 10.0, model=MS, thr=10.0), sc(i, (3 + i) * 10.0, model="mscred:other",
                                                                          thr=10.0)])
    seqs = [a.last_ts for a in out if a.status == "update"]
    assert len(seqs) == len(set(seqs)) and len(seqs) >= 3


def test_severity_bounds():
    assert [severity_of(r) for r in (1.0, 1.49, 1.5, 2.99, 3.0, 9.99, 10.0, 1e6)] == \
        ["low", "low", "medium", "medium", "high", "high", "critical", "critical"]


def test_root_cause_puts_the_injected_feature_first():
    eng = calibrated(top_k=3)
    thr = eng.entities["h/1@100"].streams[CS].threshold
    noisy = np.random.default_rng(1)
    scores = []
    for i in range(6):
        c = noisy.random(4) * 0.2
        c[2] += 1.0  # "net" carries the anomaly
        scores.append(sc(30 + i, 3 * thr, contrib=c))
    out = feed(eng, scores)
    last = out[-1]
    assert last.root_causes[0].feature == "net"
    assert len(last.root_causes) == 3
    assert sum(r.contribution for r in last.root_causes) <= 1.0 + 1e-9
    assert last.root_causes[0].contribution > 0.5


def test_root_cause_weights_models_by_their_ratio():
    """Model A (ratio 2) blames cpu, model B (ratio 8) blames io: io wins, cpu second."""
    eng = Engine(AlerterConfig(calibration_scores=20))
    out = []
    for i in range(3):
        out += feed(eng, [sc(i, 20.0, model=MS, thr=10.0, contrib=(5, 0, 0, 0)),
                          sc(i, 80.0, model="mscred:b", thr=10.0, contrib=(0, 0, 0, 0.3))])
    for i in range(3, 6):
        out += feed(eng, [sc(i, 1.0, model=MS, thr=10.0), sc(i, 1.0, model="mscred:b", thr=10.0)])
    assert out[-1].status == "closed"
    top = out[-1].root_causes
    assert [r.feature for r in top] == ["io", "cpu"]
    assert top[0].contribution == pytest.approx(0.8) and top[1].contribution == pytest.approx(0.2)


def test_or_rule_across_two_models():
    eng = Engine(AlerterConfig(calibration_scores=20))
    thr = {CS: None, MS: 10.0}
    # cs calibrates on 20 windows while MSCRED (own threshold) stays under
    for i in range(20):
        assert feed(eng, [sc(i, 1.0 + 0.01 * (i % 5)), sc(i, 5.0, model=MS, thr=10.0)]) == []
    cs_thr = eng.entities["h/1@100"].streams[CS].threshold
    thr[CS] = cs_thr
    # only MSCRED goes over: that alone opens the incident (OR)
    out = feed(eng, [sc(20, 0.5 * cs_thr), sc(20, 30.0, model=MS, thr=10.0),
                     sc(21, 0.5 * cs_thr), sc(21, 30.0, model=MS, thr=10.0)])
    assert [a.status for a in out] == ["open"] and out[0].models == [MS]
    # cs joins: the models list grows (an update)
    out = feed(eng, [sc(22, 5 * cs_thr), sc(22, 30.0, model=MS, thr=10.0)])
    assert [a.status for a in out] == ["update"] and out[0].models == sorted([CS, MS])
    # MSCRED falls under for 3 windows but cs stays over: still open
    out = feed(eng, [s for i in (23, 24, 25) for s in (sc(i, 5 * cs_thr), sc(i, 1.0, model=MS, thr=10.0))])
    assert all(a.status != "closed" for a in out)
    # both under for 3 windows: closed
    out = feed(eng, [s for i in (26, 27, 28) for s in (sc(i, 0.1 * cs_thr), sc(i, 1.0, model=MS, thr=10.0))])
    assert [a.status for a in out][-1] == "closed" and out[-1].models == sorted([CS, MS])


def test_a_model_that_stopped_reporting_does_not_hold_the_incident_open():
    eng = Engine(AlerterConfig(calibration_scores=20, stale_windows=5))
    feed(eng, [sc(i, 30.0, model=MS, thr=10.0) for i in range(3)])  # opens, then MSCRED goes silent
    out = feed(eng, [sc(i, 1.0, model="mscred:new", thr=10.0) for i in range(3, 12)])
    assert [a.status for a in out] == ["closed"]


def test_same_scores_twice_create_nothing_new():
    eng = calibrated()
    thr = eng.entities["h/1@100"].streams[CS].threshold
    burst = [sc(30 + i, r * thr) for i, r in enumerate([3, 3, 5, 0.1, 0.1, 0.1])]
    first = feed(eng, burst)
    again = feed(eng, normal(30) + burst)
    assert [a.status for a in first] == ["open", "closed"] or [a.status for a in first] == ["open", "update", "closed"]
    assert again == []
    assert eng.counters["duplicate"] == 36


def test_restart_from_persisted_state_keeps_thresholds_and_the_open_incident():
    saved: dict = {}
    eng = calibrated()
    thr = eng.entities["h/1@100"].streams[CS].threshold
    opened = feed(eng, [sc(30, 3 * thr), sc(31, 3 * thr)])
    assert opened[0].status == "open"
    saved.update(eng.take_dirty())
    assert "h/1@100" in saved and eng.take_dirty() == {}

    eng2 = Engine(AlerterConfig(calibration_scores=30), load=saved.get)
    # the Scores after the last persisted one are delivered again (at-least-once) plus new ones
    out = feed(eng2, [sc(30, 3 * thr), sc(31, 3 * thr), sc(32, 20 * thr), sc(33, 0.1), sc(34, 0.1), sc(35, 0.1)])
    assert eng2.counters["calibrated"] == 0 and eng2.counters["loaded"] == 1 and eng2.counters["duplicate"] == 2
    assert [a.status for a in out] == ["update", "closed"]
    assert {a.anomaly_id for a in out} == {opened[0].anomaly_id}
    assert [a.revision for a in out] == [1, 2]
    assert eng2.entities["h/1@100"].streams[CS].threshold == thr


def test_calibration_in_progress_survives_a_restart():
    eng = Engine(AlerterConfig(calibration_scores=30))
    feed(eng, normal(20))
    saved = eng.take_dirty()
    eng2 = Engine(AlerterConfig(calibration_scores=30), load=saved.get)
    feed(eng2, normal(30)[20:], now=1.0)
    assert eng2.counters["calibrated"] == 1


def test_idle_entities_are_closed_and_forgotten_and_count_is_capped():
    eng = Engine(AlerterConfig(calibration_scores=20, idle_timeout_s=100, max_entities=3))
    out = feed(eng, [sc(i, 30.0, model=MS, thr=10.0) for i in range(2)], now=0.0)
    assert out[0].status == "open"
    feed(eng, [sc(0, 1.0, model=MS, thr=10.0, entity="other")], now=50.0)
    out = eng.tick(120.0)
    assert [a.status for a in out] == ["closed"] and "no scores" in out[0].summary
    assert list(eng.entities) == ["other"]
    snap = eng.take_dirty()
    assert snap["h/1@100"]["incident"] is None  # the closed state is handed over for persisting
    for k in range(5):
        feed(eng, [sc(0, 1.0, model=MS, thr=10.0, entity=f"e{k}")], now=130.0)
    assert len(eng.entities) == 3 and eng.counters["evicted_cap"] == 3
    assert set(eng.take_dirty()) >= {"e0", "e1"}  # evicted unsaved states are handed over, not lost


def test_close_stale_closes_an_incident_nobody_holds():
    eng = calibrated()
    thr = eng.entities["h/1@100"].streams[CS].threshold
    feed(eng, [sc(30, 3 * thr), sc(31, 3 * thr)])
    snap = eng.take_dirty()["h/1@100"]
    other = Engine(AlerterConfig(calibration_scores=30))
    out = other.close_stale(snap)
    assert [a.status for a in out] == ["closed"] and out[0].revision == 1
    assert other.entities == {} and other.take_dirty()["h/1@100"]["incident"] is None
    assert eng.close_stale(snap) == []  # held in memory here: live, not stale
