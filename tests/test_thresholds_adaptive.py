"""Drift-aware streaming POT (osad.core.thresholds.DSPOT) on synthetic streams."""

import copy
import json
import math

import numpy as np
import pytest

from osad.core.thresholds import DSPOT, pot_threshold

N = 2000


def calibration(seed=0, n=400):
    return np.random.default_rng(seed).normal(10.0, 1.0, n)


def drifting(seed=1, n=N):
    """Normal stream whose level doubles (10 -> 20) over ``n`` scores, noise sd 1."""
    return np.linspace(10.0, 20.0, n) + np.random.default_rng(seed).normal(0.0, 1.0, n)


@pytest.fixture(params=[dict(), dict(mode="mul"), dict(memory=200), dict(center="median", hold=5)],
                ids=["add", "mul", "memory", "median-hold"])
def kw(request):
    return dict(q=1e-3, depth=20, rate=0.05, **request.param)


def test_drift_few_false_alarms_where_frozen_pot_floods(kw):
    cal, x = calibration(), drifting()
    frozen = pot_threshold(cal, q=1e-3, fence_k=6.0).value
    frozen_alarms = int((x >= frozen).sum())
    _, alarms = DSPOT(**kw).fit(cal).run(x)
    assert frozen_alarms > 0.5 * N  # the level passes the frozen threshold a third of the way in
    assert alarms.sum() <= 0.005 * N, alarms.sum()


def test_step_fault_after_drift_alarms_at_once(kw):
    d = DSPOT(**kw).fit(calibration())
    d.run(drifting())
    fault = np.full(50, 35.0) + np.random.default_rng(2).normal(0, 1, 50)  # level ~20 by now
    _, alarms = d.run(fault)
    assert alarms[0] and alarms.all()


def test_learning_frozen_when_asked(kw):
    d = DSPOT(**kw).fit(calibration())
    before = json.dumps(d.to_dict())
    thr, _ = d.run(drifting(), learn=False)
    assert np.all(thr == thr[0])
    counters = {"alarms": 0, "hold_left": 0}  # counted even when frozen; all else stays
    assert json.dumps({**d.to_dict(), **counters}) == json.dumps({**json.loads(before), **counters})
    d.frozen = True
    thr2, _ = d.run(drifting(seed=3))
    assert np.all(thr2 == thr[0])
    d.frozen = False  # thawed: learns again
    thr3, _ = d.run(drifting(seed=4))
    assert thr3[-1] > thr[0] + 5


def test_hold_freezes_after_alarm():
    d = DSPOT(q=1e-3, depth=20, hold=10).fit(calibration())
    assert d.step(100.0)
    state = d.to_dict()
    for v in np.full(10, 12.0):  # below the threshold but held: not learned
        assert not d.step(v)
    after = d.to_dict()
    assert after["window"] == state["window"] and after["base"] == state["base"] and after["n"] == state["n"]
    d.step(12.0)
    assert d.to_dict()["n"] == state["n"] + 1


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_speed_cap_holds(mode):
    cal = calibration()
    d = DSPOT(q=1e-3, depth=20, rate=0.01, mode=mode).fit(cal)
    # an abrupt shift that stays below the threshold (plus the slow drift): the level would jump at once
    x = np.r_[np.full(300, 12.0), drifting(n=2000), np.full(300, 8.0)]
    thr, _ = d.run(x)
    thr = np.r_[thr, d.threshold]
    tr = np.log(thr + d.eps) if mode == "mul" else thr
    moves = np.abs(np.diff(tr))
    assert moves.max() <= d.max_step * (1 + 1e-9) + 1e-12
    assert moves.max() > 0.5 * d.max_step  # the cap is what bounded it
    # uncapped, the same stream moves the threshold much faster
    u = DSPOT(q=1e-3, depth=20, rate=math.inf, mode=mode).fit(cal)
    tu, _ = u.run(x)
    tu = np.log(tu + u.eps) if mode == "mul" else tu
    assert np.abs(np.diff(tu)).max() > 3 * d.max_step


def test_state_round_trips_and_continues_identically(kw):
    d = DSPOT(**kw).fit(calibration())
    x = drifting()
    d.run(x[:1500])
    s = json.loads(json.dumps(d.to_dict()))  # plain JSON
    e = DSPOT.from_dict(s)
    assert e.to_dict() == d.to_dict()
    t1, a1 = d.run(x[1500:])
    t2, a2 = e.run(x[1500:])
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(a1, a2)
    assert e.to_dict() == d.to_dict()


def test_uncapped_state_round_trips():
    d = DSPOT(rate=math.inf).fit(calibration())
    e = DSPOT.from_dict(json.loads(json.dumps(d.to_dict())))
    assert e.rate == math.inf and e.to_dict() == d.to_dict()


def test_run_equals_step_by_step(kw):
    x = np.r_[drifting(), np.full(20, 40.0), drifting(seed=5, n=500) + 10]
    learn = np.random.default_rng(6).random(x.size) > 0.1
    a = DSPOT(**kw).fit(calibration())
    b = copy.deepcopy(a)
    thr, al = a.run(x, learn=learn)
    t2, a2 = [], []
    for v, lr in zip(x, learn):
        t2.append(b.threshold)
        a2.append(b.step(v, learn=bool(lr)))
    np.testing.assert_array_equal(thr, np.array(t2))
    np.testing.assert_array_equal(al, np.array(a2))
    assert a.to_dict() == b.to_dict()


def test_short_calibration_and_bad_arguments():
    d = DSPOT(depth=50).fit(np.random.default_rng(0).exponential(1.0, 30))  # fewer than depth + 2 * min_peaks
    assert math.isfinite(d.threshold)
    with pytest.raises(RuntimeError):
        DSPOT().step(1.0)
    for bad in (dict(q=0), dict(depth=0), dict(mode="x"), dict(rate=0), dict(hold=-1), dict(memory=5)):
        with pytest.raises(ValueError):
            DSPOT(**bad)
