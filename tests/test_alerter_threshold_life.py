"""A stream's threshold through its life (osad.core.thresholds.StreamThreshold in the alerter's Engine): armed
after a few scores with a conservative provisional threshold, calibrated by POT on normal scores only, adapting
(with --adapt) on normal windows only and never while an incident is open, and all of it kept across a restart."""

import json

import numpy as np
import pytest

from osad.alerter.core import AlerterConfig, Engine, EntityState
from osad.core.thresholds import ARM_SCORES, DSPOT, StreamThreshold, pot_threshold, provisional_threshold
from tests.test_alerter_core import CS, feed, sc

ENT = "h/1@100"


def stream(eng):
    return eng.entities[ENT].streams[CS]


def gamma_scores(n, seed=0, level=5.0):
    return level + np.random.default_rng(seed).gamma(4.0, 0.5, n)


def test_a_stream_is_armed_after_arm_scores_and_a_fault_then_opens_an_incident_before_calibration():
    eng = Engine(AlerterConfig(calibration_scores=100, open_after=2))
    vals = gamma_scores(ARM_SCORES)
    assert feed(eng, [sc(i, v) for i, v in enumerate(vals[:-1])]) == []
    assert stream(eng).threshold is None  # arming: nothing is judged yet
    feed(eng, [sc(ARM_SCORES - 1, vals[-1])])
    st = stream(eng)
    assert st.method == "provisional" and st.threshold == pytest.approx(provisional_threshold(vals))
    assert eng.counters["armed"] == 1
    # conservative: above every normal score so far, by the factor for 16 scores (3.5x their maximum)
    assert st.threshold == pytest.approx(3.5 * vals.max())
    out = feed(eng, [sc(ARM_SCORES + i, 10 * st.threshold) for i in range(2)])
    assert [a.status for a in out] == ["open"]


def test_the_provisional_threshold_tightens_and_a_fault_is_not_calibrated_on():
    cfg = AlerterConfig(calibration_scores=100, open_after=2, close_after=3)
    eng = Engine(cfg)
    vals = gamma_scores(200, seed=1)
    feed(eng, [sc(i, v) for i, v in enumerate(vals[:20])])
    first = stream(eng).threshold
    feed(eng, [sc(20 + i, v) for i, v in enumerate(vals[20:60])])
    assert stream(eng).threshold < first  # more history: tighter
    fault = [sc(60 + i, 1000.0) for i in range(5)]  # over the provisional threshold: an incident, not normal
    assert [a.status for a in feed(eng, fault)] == ["open"]
    # the windows after the fault, while the incident is still open, are not learnt either
    after = [sc(65 + i, v) for i, v in enumerate(vals[60:200])]
    feed(eng, after)
    st = stream(eng)
    assert st.method == "pot"
    # 60 normal scores before the fault, then the 40 after the incident closed (3 windows under it at close)
    learnt = np.r_[vals[:60], vals[60 + 3:60 + 3 + 40]]
    assert st.threshold == pytest.approx(pot_threshold(learnt, q=cfg.q, fence_k=cfg.calibration_fence).value)


def test_arm_scores_0_keeps_the_first_scores_unjudged_until_pot():
    eng = Engine(AlerterConfig(calibration_scores=40, arm_scores=0))
    vals = gamma_scores(40)
    vals[30] = 1e4  # calibration is assumed normal
    assert feed(eng, [sc(i, v) for i, v in enumerate(vals)]) == []
    assert stream(eng).method in ("pot", "sigma") and eng.counters["armed"] == 0


def test_adapting_thresholds_follow_a_slow_rise_and_stay_put_while_an_incident_is_open():
    cfg = AlerterConfig(calibration_scores=200, adapt=True, open_after=2, close_after=3)
    eng = Engine(cfg)
    base = gamma_scores(200, seed=2)
    feed(eng, [sc(i, v) for i, v in enumerate(base)])
    st = stream(eng)
    assert st.method == "dspot"
    t0 = st.threshold
    # the normal level doubles slowly (its spread stays): the threshold follows it, no incident opens
    rise = gamma_scores(600, seed=3) + np.linspace(0.0, 7.0, 600)
    assert feed(eng, [sc(200 + i, v) for i, v in enumerate(rise)]) == []
    t1 = stream(eng).threshold
    assert t1 > t0 * 1.3
    frozen = Engine(AlerterConfig(calibration_scores=200, open_after=2, close_after=3))
    feed(frozen, [sc(i, v) for i, v in enumerate(base)])
    assert [a.status for a in feed(frozen, [sc(200 + i, v) for i, v in enumerate(rise)])][:1] == ["open"]
    # a fault opens an incident; while it is open, nothing moves the threshold, even windows under it
    out = feed(eng, [sc(800 + i, 5 * t1) for i in range(2)])
    assert [a.status for a in out] == ["open"]
    inside = [sc(802, 5 * t1), sc(803, 0.5 * t1), sc(804, 0.5 * t1)]
    feed(eng, inside)
    assert stream(eng).threshold == t1 and eng.entities[ENT].incident is not None


def test_the_adapted_state_survives_a_restart_and_continues_identically():
    cfg = AlerterConfig(calibration_scores=150, adapt=True)
    eng = Engine(cfg)
    vals = gamma_scores(400, seed=4) * np.linspace(1.0, 1.5, 400)
    feed(eng, [sc(i, v) for i, v in enumerate(vals[:300])])
    snap = json.loads(json.dumps(eng.entities[ENT].to_dict()))  # what the store keeps
    assert snap["streams"][CS]["tracker"]["dspot"]["kind"] == "dspot"
    back = Engine(cfg, load=lambda eid: snap if eid == ENT else None)
    rest = [sc(300 + i, v) for i, v in enumerate(vals[300:])]
    ta, tb = [], []
    for s in rest:
        feed(eng, [s]), feed(back, [s])
        ta.append(stream(eng).threshold)
        tb.append(stream(back).threshold)
    assert ta == tb and len(set(ta)) > 10  # it kept adapting, the same way


def test_a_version_1_state_loads_with_its_threshold_frozen():
    v1 = {"entity_id": ENT, "v": 1, "ref": {"host": "h", "pid": 1, "comm": "proc"},
          "streams": {CS: {"model_id": CS, "last_seq": 1000, "gap": 10, "calib": [], "threshold": 7.5,
                           "method": "pot", "judged_threshold": 7.5, "over_run": 0, "under_run": 1, "pending": []},
                      "m2": {"model_id": "m2", "last_seq": 1000, "gap": 10, "calib": [1.0, 2.0], "threshold": None,
                             "method": "", "judged_threshold": None, "over_run": 0, "under_run": 0, "pending": []}}}
    ent = EntityState.from_dict(v1)
    assert ent.streams[CS].threshold == 7.5 and ent.streams[CS].tracker.phase == "calibrated"
    assert ent.streams["m2"].tracker.calib == [1.0, 2.0]
    eng = Engine(AlerterConfig(), load=lambda eid: v1 if eid == ENT else None)
    out = feed(eng, [sc(1 + i, 50.0) for i in range(2)])
    assert [a.status for a in out] == ["open"]


def test_dspot_state_is_bounded():
    rng = np.random.default_rng(5)
    d = DSPOT(q=1e-2, depth=50, rate=0.02, max_peaks=40).fit(rng.exponential(1.0, 300))
    for x in rng.exponential(1.0, 20_000):
        if x < d.threshold:
            d.learn(x)
    assert len(d.peaks) <= 40 and len(d.window) == 50
    assert d.n < 20_000  # the count was scaled with the forgotten peaks
    t = StreamThreshold(calibration=300, adapt=dict(q=1e-2, depth=50, rate=0.02, max_peaks=40)).fit(
        rng.exponential(1.0, 300))
    assert len(json.dumps(t.to_dict())) < 20_000
