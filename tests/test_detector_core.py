"""The detector transform without Kafka: per-entity calibrated compressed sensing after a jump start."""

import numpy as np

from osad.detector.cs import CSScorer
from osad.detector.engine import Engine, EngineConfig
from osad.detector.service import BatchConfig, Detector
from osad.runtime.service import InputMeta
from osad.schemas import SignatureWindow


def windows(x, entity="e", gap=5, T=60):
    out = []
    for k, end in enumerate(range(T - 1, x.shape[0], gap)):
        v = x[end - T + 1:end + 1]
        out.append(SignatureWindow(entity_id=entity, host="h", window_end_ts=float(end), window_end_seq=end,
                                   interval_s=1.0, gap=gap, scales=[60], features=[f"m{i}" for i in range(x.shape[1])],
                                   signatures=np.zeros((1, 1, x.shape[1], x.shape[1]), np.float32), values=v))
    return out


def test_entity_switches_to_its_calibrated_scorer_which_keeps_a_sustained_shift_visible():
    rng = np.random.default_rng(0)
    t = np.arange(600)[:, None]
    latent = np.sin(t / np.array([[7.0, 11.0, 17.0]]))  # 10 correlated metrics driven by 3 signals
    x = 0.5 + 0.1 * latent @ rng.normal(size=(3, 10)) + 0.01 * rng.normal(size=(600, 10))
    x[500:, 2] += 1.0  # a sustained level shift of one metric from sample 500 on
    det = Detector(Engine(CSScorer(gap=5, max_iter=200), EngineConfig(cs_calibrate=30, cs_handover=0)), BatchConfig(max_batch=1))
    outs = []
    for i, w in enumerate(windows(x)):
        outs += det.process_batch([(w, InputMeta("t", 0, i))])
    ids = [o.msg.model_id for o in outs]
    assert all(m.startswith("cs-jumpstarter") for m in ids[:30])
    assert all(m.startswith("cs-calibrated") and ":fitted:" in m for m in ids[30:])
    cal = [o.msg for o in outs[30:]]
    normal = [s.score for s in cal if s.window_end_seq < 500]
    shifted = [s for s in cal if s.window_end_seq >= 500 + 59]  # the shift fills the whole window
    # (scores sum square roots of standardised deviations: 2x here is 4x in squared units)
    assert shifted and min(s.score for s in shifted) > 2 * max(normal)
    assert all(int(np.argmax(s.contributions)) == 2 for s in shifted)


def test_windows_after_the_calibrating_one_in_the_same_batch_get_the_calibrated_scorer():
    """A batch that holds an entity's cs_calibrate-th window and later ones: the later ones are scored
    by the scorer fitted on the first cs_calibrate (as `osad evaluate` scores the held-out tail),
    not by the jump-start scorer (which would shift the alerter's calibration scores)."""
    rng = np.random.default_rng(1)
    x = 0.5 + 0.1 * rng.normal(size=(400, 4))
    wins = windows(x)  # 69 windows
    det = Detector(Engine(CSScorer(gap=5, max_iter=100), EngineConfig(cs_calibrate=10, cs_handover=0)), BatchConfig(max_batch=40))
    outs = det.process_batch([(w, InputMeta("t", 0, i)) for i, w in enumerate(wins[:40])])
    by_seq = {o.msg.window_end_seq: o.msg.model_id for o in outs}
    assert len(by_seq) == 40
    ordered = [by_seq[w.window_end_seq] for w in wins[:40]]
    assert all(m.startswith("cs-jumpstarter") for m in ordered[:10])
    assert all(":fitted:" in m for m in ordered[10:])
    # and no second calibration buffer was started for the entity
    assert not det.engine.calibrating


def test_queued_windows_set_the_runners_poll_deadline():
    """A live window waits at most max_wait_ms for its batch: the detector tells the runner when the
    oldest queued one is due, and the runner polls no longer than that."""
    import doctest

    from osad.runtime import service as runtime_service
    from osad.runtime.service import poll_timeout_ms

    now = [100.0]
    det = Detector(Engine(CSScorer(gap=5, max_iter=50), EngineConfig(cs_calibrate=0)),
                   BatchConfig(max_batch=64, max_wait_ms=20.0), clock=lambda: now[0])
    assert det.next_deadline() is None and poll_timeout_ms(200, det.next_deadline()) == 200
    rng = np.random.default_rng(2)
    w = windows(0.5 + 0.1 * rng.normal(size=(80, 4)))
    assert det.process_batch([(w[0], InputMeta("t", 0, 0))]) == []  # queued, not scored yet
    now[0] += 0.005
    assert abs(det.next_deadline() - 0.015) < 1e-9 and poll_timeout_ms(200, det.next_deadline()) in (15, 16)
    assert list(det.tick(0.0)) == []  # not due yet
    now[0] += 0.015
    assert poll_timeout_ms(200, det.next_deadline()) == 0
    assert [o.msg.window_end_seq for o in det.tick(0.0)] == [w[0].window_end_seq]
    assert det.next_deadline() is None
    assert doctest.testmod(runtime_service).failed == 0


def _failing_for(det, entity):
    """Make ``det``'s engine fail on any batch that holds a window of ``entity`` (a stand-in for a bug or a
    window a model cannot take)."""
    score = det.engine.score

    def failing(ws):
        if any(w.entity_id == entity for w in ws):
            raise FloatingPointError(f"cannot score {entity}")
        return score(ws)
    det.engine.score = failing


def test_a_window_that_fails_to_score_in_tick_is_dead_lettered_and_the_others_are_scored():
    """Windows queued for a batch are scored from tick(), where an exception would stop the service: the
    batch is scored one window at a time instead, and the one that fails comes back as a dead letter."""
    now = [0.0]
    det = Detector(Engine(CSScorer(gap=5, max_iter=50), EngineConfig(cs_calibrate=0)),
                   BatchConfig(max_batch=64, max_wait_ms=10.0), clock=lambda: now[0])
    _failing_for(det, "bad")
    rng = np.random.default_rng(3)
    good = windows(0.5 + 0.1 * rng.normal(size=(80, 4)), entity="good")[:3]
    bad = windows(0.5 + 0.1 * rng.normal(size=(80, 4)), entity="bad")[:1]
    batch = [(w, InputMeta("t", 1, i)) for i, w in enumerate(good[:2] + bad + good[2:])]
    assert det.process_batch(batch) == []  # queued
    now[0] += 1.0
    outs = list(det.tick(0.0))
    scored = [o for o in outs if o.dead is None]
    dead = [o for o in outs if o.dead is not None]
    assert sorted(o.msg.window_end_seq for o in scored) == sorted(w.window_end_seq for w in good)
    assert [(o.msg.entity_id, o.key, o.dead[0].offset) for o in dead] == [("bad", "bad", 2)]
    assert dead[0].dead[1] == "scoring failed: FloatingPointError: cannot score bad"
    assert det.pending == []  # nothing left behind to fail again
