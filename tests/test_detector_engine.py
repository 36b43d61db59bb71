"""The detector's pure engine (detector/engine.py): no broker, no torch; fake checkpoints and a fake trainer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from osad.detector.base import Scorer, ScoreBatch, WindowBatch, WindowSpec
from osad.detector.baselines import L2Scorer, PCAScorer, RandomScorer
from osad.detector.cs import CalibratedCSScorer, CSScorer
from osad.detector.engine import Engine, EngineConfig
from osad.detector.folder import CheckpointFolder, ModelsConfig
from osad.detector.registry import SCORERS, ScorerOptions, create
from osad.runtime.config import ConfigError
from osad.schemas import SignatureWindow

FEATS = ["a", "b", "c"]


def window(eid: str, seq: int, n: int = 3, gap: int = 5, scaling_id: str = "", features=None):
    rng = np.random.default_rng(seq)
    features = list(features) if features else [f"m{i}" for i in range(n)]
    n = len(features)
    return SignatureWindow(entity_id=eid, host="h", window_end_ts=float(seq), window_end_seq=seq, interval_s=1.0,
                           gap=gap, scales=[60], features=features, scaling_id=scaling_id,
                           signatures=np.full((1, 1, n, n), 0.25, np.float32),
                           values=(0.5 + 0.1 * rng.normal(size=(60, n))).astype(np.float32))


def stream(eid: str, count: int, n: int = 3, first: int = 59):
    return [window(eid, first + 5 * k, n) for k in range(count)]


def families(scores) -> list[str]:
    return [s.model_id.split(":")[0] for s in scores]


def cs_engine(calibrate: int, **kw) -> Engine:
    return Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=calibrate, **{"cs_handover": 0, **kw}))


# ------------------------------------------------------------------------------ calibration


def test_an_entity_is_calibrated_after_its_nth_window_and_then_keeps_its_own_scorer():
    eng = cs_engine(5)
    first = eng.score(stream("e", 3))
    assert families(first) == ["cs-jumpstarter"] * 3 and eng.calibrating == ["e"]
    rest = eng.score(stream("e", 4, first=59 + 15))  # windows 4..7: the 5th calibrates, 6 and 7 use it
    assert families(rest) == ["cs-jumpstarter"] * 2 + ["cs-calibrated"] * 2
    assert all(":fitted:" in s.model_id for s in rest[2:])
    assert eng.calibrating == [] and eng.calibrated_entities == ["e"]
    assert [s.window_end_seq for s in first + rest] == [59 + 5 * k for k in range(7)]  # order kept per entity
    assert all(s.threshold is None for s in first + rest)  # compressed sensing has no own threshold


def test_after_calibration_the_jump_start_score_comes_too_for_the_handover_windows():
    """So the alerter's jump-start stream, armed already, judges the entity while the calibrated stream arms."""
    eng = cs_engine(5, cs_handover=3)
    out = eng.score(stream("e", 5)) + eng.score(stream("e", 4, first=59 + 25))  # 5 calibrate, then 4
    fam = families(out)
    assert fam[:5] == ["cs-jumpstarter"] * 5
    later = [(f, s.window_end_seq) for f, s in zip(fam[5:], out[5:])]
    seqs = [59 + 5 * k for k in range(5, 9)]
    assert [q for f, q in later if f == "cs-calibrated"] == seqs
    assert [q for f, q in later if f == "cs-jumpstarter"] == seqs[:3]  # 4 windows in one chunk: all 4 here
    plain = cs_engine(5)  # the jump-start Scores of the handover are what the jump-start scorer gives
    ref = plain.score(stream("e", 5))[:0] + Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=0)).score(
        stream("e", 4, first=59 + 25))
    jump = [s for s in out[5:] if s.model_id.startswith("cs-jumpstarter")]
    assert [s.score for s in jump] == pytest.approx([s.score for s in ref[:len(jump)]], rel=1e-4)


def test_a_window_seen_again_while_calibrating_is_scored_but_not_counted_twice():
    """A window delivered twice (re-read after a restart, re-sent by a restarted featurizer) must not stand for two
    calibration windows: the fit would come one window early, on other data, and every later score differ."""
    ws = stream("e", 6)
    eng, ref = cs_engine(5), cs_engine(5)
    got = eng.score(ws[:4] + [ws[3]] + ws[4:])  # window 4 twice
    want = ref.score(ws)
    assert families(got) == ["cs-jumpstarter"] * 6 + ["cs-calibrated"]  # the 5th distinct window calibrates
    assert [s.score for s in got[:4] + got[5:]] == [s.score for s in want]


def test_the_detector_holds_back_the_offsets_of_an_unfinished_calibration():
    """Its calibration buffer lives in memory: until the fit, the offset of the entity's first buffered window is
    retained, so that a restart reads the windows again instead of calibrating on later ones."""
    from osad.detector.service import BatchConfig, Detector
    from osad.runtime.service import InputMeta

    det = Detector(cs_engine(5), BatchConfig(max_batch=1, max_wait_ms=1))
    ws = stream("e", 6)
    for k, w in enumerate(ws[:3]):
        det.process(w, InputMeta("osad.signatures", 2, 100 + k))
    assert det.retained() == {2: 100}  # the first calibration window
    det.process(window("x", 59), InputMeta("osad.signatures", 4, 7))
    assert det.retained() == {2: 100, 4: 7}
    for k, w in enumerate(ws[3:]):
        det.process(w, InputMeta("osad.signatures", 2, 103 + k))
    assert det.retained() == {4: 7}  # e calibrated: nothing of it held back any more
    det.revoke({4})
    assert det.retained() == {}


def test_cs_calibrate_zero_never_calibrates_and_the_config_checks_its_value():
    eng = cs_engine(0)
    assert set(families(eng.score(stream("e", 8)))) == {"cs-jumpstarter"} and eng.calibrating == []
    with pytest.raises(ConfigError, match="--cs-calibrate.*0 or at least 5"):
        EngineConfig(cs_calibrate=3, cs_handover=0)


def test_a_window_whose_feature_set_changes_restarts_calibration():
    eng = cs_engine(5)
    eng.score(stream("e", 4))
    assert eng.calibrating == ["e"]
    eng.score(stream("e", 2, n=4, first=200))  # 4 features now: the 3-feature windows kept so far are dropped
    assert eng.calibrating == ["e"] and eng.calibrated_entities == []
    out = eng.score(stream("e", 4, n=4, first=300))  # 2 + 3 = the 5th window of the new feature set calibrates
    assert families(out) == ["cs-jumpstarter"] * 3 + ["cs-calibrated"]
    assert len(out[-1].contributions) == 4


def test_calibrated_scorers_are_bounded_least_recently_used_first():
    eng = cs_engine(5, cs_max_entities=2)
    for eid in ("a", "b"):
        eng.score(stream(eid, 5))
    assert eng.calibrated_entities == ["a", "b"]
    eng.score(stream("a", 1, first=200))  # a is used again: b is now the least recently used
    assert eng.calibrated_entities == ["b", "a"]
    eng.score(stream("c", 5))
    assert eng.calibrated_entities == ["a", "c"]  # b dropped
    again = eng.score(stream("b", 1, first=300))
    assert families(again) == ["cs-jumpstarter"] and eng.calibrating == ["b"]  # b starts over


def test_a_saved_calibration_goes_on_after_a_restart_and_in_another_replica(tmp_path, caplog):
    """With a store, a second engine (a restarted detector, or a replica sharing the folder) scores the entity
    with the very calibration the first one made, from its first window: the same scores, no jump-start."""
    from osad.detector.calibrations import CalibrationStore

    first = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0), store=CalibrationStore(tmp_path))
    first.score(stream("e", 5))
    later = stream("e", 3, first=59 + 25)
    want = first.score(later)
    assert families(want) == ["cs-calibrated"] * 3
    second = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0), store=CalibrationStore(tmp_path))
    got = second.score(later)
    assert [s.model_id for s in got] == [s.model_id for s in want] and second.calibrating == []
    np.testing.assert_allclose([s.score for s in got], [s.score for s in want], rtol=1e-12)
    np.testing.assert_allclose([s.contributions for s in got], [s.contributions for s in want], rtol=1e-12)
    assert second.store.restored == 1
    # other options, features or scaling: that calibration is not used; the entity calibrates again
    other = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0),
                   calibrated=CalibratedCSScorer(gap=5, max_iter=40, quantile=0.99), store=CalibrationStore(tmp_path))
    assert families(other.score(later)) == ["cs-jumpstarter"] * 3 and other.store.rejected == 1
    rescaled = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0), store=CalibrationStore(tmp_path))
    assert families(rescaled.score([window("e", 59 + 25, scaling_id="new")])) == ["cs-jumpstarter"]
    # a damaged file: said, moved aside, calibrated again; every window still scored
    path = CalibrationStore(tmp_path).path("e")
    path.write_bytes(path.read_bytes()[:100])
    third = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0), store=CalibrationStore(tmp_path))
    assert families(third.score(later)) == ["cs-jumpstarter"] * 3
    assert third.store.corrupt == 1 and len(list(tmp_path.glob(path.name + ".corrupt-*"))) == 1 and "unreadable" in caplog.text
    # an entity evicted from the bounded memory comes back from the store, not from a new calibration
    small = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0, cs_max_entities=1),
                   store=CalibrationStore(tmp_path / "lru"))
    small.score(stream("x", 5) + stream("y", 5))
    assert small.calibrated_entities == ["y"]
    assert families(small.score(stream("x", 1, first=59 + 25))) == ["cs-calibrated"]


def test_the_state_folder_must_be_writable(tmp_path):
    from osad.detector.calibrations import CalibrationStore

    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(OSError, match="--state-dir .*cannot create"):
        CalibrationStore(f / "sub")


def test_the_calibrated_scorer_keeps_the_jump_start_scorers_options():
    eng = Engine(CSScorer(gap=10, max_iter=40, seed=3, sample_rate=0.5), EngineConfig(cs_calibrate=5, cs_handover=0))
    eng.score(stream("e", 5))  # windows of gap 5
    fitted = eng.calibrated_for("e")
    assert isinstance(fitted, CalibratedCSScorer) and fitted.fitted
    assert fitted.cs.options() == {**eng.cs.options(), "gap": 5}
    assert fitted.horizon == 15  # the default 3 * gap, of the windows' gap


# ------------------------------------------------------------------------------ the Scorer contract


@pytest.mark.parametrize("scorer", [CSScorer(max_iter=77, seed=3, grouping="none"),
                                    CalibratedCSScorer(pca_weight=0.5, max_iter=50, horizon=None),
                                    PCAScorer(variance=0.8), L2Scorer(gap=7), RandomScorer(seed=4)],
                         ids=lambda s: type(s).__name__)
def test_clone_is_a_new_unfitted_scorer_with_the_same_options_but_those_given(scorer):
    c = scorer.clone(gap=5)
    assert type(c) is type(scorer) and c is not scorer
    assert c.options() == {**scorer.options(), "gap": 5} and c.window == WindowSpec(gap=5)
    assert scorer.clone().options() == scorer.options()
    assert c.threshold is None and c.scaling_id is None and not c.uses_signatures


def test_the_registry_makes_every_scorer_by_name():
    assert set(SCORERS) == {"cs", "cs-faithful", "pca", "l2", "random", "mscred"}
    assert all(e.description for e in SCORERS.values())
    for name in ("cs", "cs-faithful", "pca", "l2", "random"):
        sc = create(name, ScorerOptions(gap=5, seed=2))
        assert isinstance(sc, Scorer) and sc.window.gap == 5
    assert create("cs", ScorerOptions(extra={"pca_weight": 0.5})).pca_weight == 0.5
    with pytest.raises(ValueError, match="unknown model 'nope'; choose one of: cs, cs-faithful"):
        create("nope")


class FakeModel(Scorer):
    """A checkpointed scorer for tests: bound to features, scales, gap and step, maybe to a scaling."""

    needs_fit = False
    uses_signatures = True

    def __init__(self, name: str, features=tuple(FEATS), scaling_id: str | None = None, gap: int = 5,
                 score: float = 1.0, threshold: float | None = 2.0):
        self.name, self.features, self._scaling_id, self.gap = name, tuple(features), scaling_id, gap
        self.value, self._threshold = score, threshold
        self.seen: list[WindowBatch] = []

    @property
    def model_id(self) -> str:
        return f"fake:{self.name}"

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap, features=self.features, scales=(60,), step=1)

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @property
    def scaling_id(self) -> str | None:
        return self._scaling_id

    def options(self) -> dict:
        return dict(name=self.name, features=self.features, scaling_id=self._scaling_id, gap=self.gap,
                    score=self.value, threshold=self._threshold)

    def fit(self, windows):
        return self

    def score(self, windows):
        self.seen.append(windows)
        b, n = windows.size, windows.n_features
        return ScoreBatch(np.full(b, self.value), np.ones((b, n)), {"x": np.arange(b, dtype=float)})


def folder_of(tmp_path, models: dict[str, tuple[FakeModel, float]], **cfg) -> CheckpointFolder:
    for name, (_, mtime) in models.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(name.encode())
        os.utime(p, (mtime, mtime))
    f = CheckpointFolder(ModelsConfig(models=str(tmp_path), **cfg), loader=lambda p: models[p.stem][0])
    f.scan(force=True)
    return f


def mwin(eid="e", seq=59, scaling_id="s1", features=FEATS, gap=5):
    """A window of the features the fake checkpoints are made for."""
    return window(eid, seq, gap=gap, scaling_id=scaling_id, features=features)


def test_a_checkpoint_for_the_windows_scaling_wins_then_the_newest(tmp_path):
    models = {"any_old": (FakeModel("any_old"), 100.0), "any_new": (FakeModel("any_new"), 300.0),
              "s1": (FakeModel("s1", scaling_id="s1"), 200.0), "s2": (FakeModel("s2", scaling_id="s2"), 400.0),
              "wide": (FakeModel("wide", features=FEATS + ["d"]), 500.0)}
    f = folder_of(tmp_path, models)
    assert f.match(mwin(scaling_id="s1")).scorer.name == "s1"  # made for this scaling, though older
    assert f.match(mwin(scaling_id="s9")).scorer.name == "any_new"  # s1/s2 are for other scalings
    assert f.match(mwin(scaling_id="")).scorer.name == "s2"  # unknown scaling: any checkpoint, newest made for one
    assert f.match(mwin(features=FEATS + ["d"])).scorer.name == "wide"  # the one for these features
    assert f.match(mwin(features=["c", "b", "a"])) is None  # same names, another order
    assert f.match(mwin(gap=10)) is None  # another gap


def test_checkpoint_scores_carry_its_threshold_and_get_signatures(tmp_path):
    m = FakeModel("s1", scaling_id="s1", threshold=2.5)
    eng = Engine(None, folder=folder_of(tmp_path, {"s1": (m, 1.0)}))
    out = eng.score([mwin(seq=59), mwin("other", 64), mwin(seq=64)])
    assert [(s.entity_id, s.window_end_seq, s.model_id, s.threshold) for s in out] == [
        ("e", 59, "fake:s1", 2.5), ("other", 64, "fake:s1", 2.5), ("e", 64, "fake:s1", 2.5)]
    assert len(m.seen) == 1 and m.seen[0].signatures.shape == (3, 1, 1, 3, 3)  # one model call, full matrices
    assert np.allclose(m.seen[0].signatures, 0.25) and out[1].detail == {"x": 1.0}


def test_non_finite_scores_and_thresholds_are_never_published(tmp_path):
    m = FakeModel("s1", score=float("nan"), threshold=float("inf"))
    out = Engine(None, folder=folder_of(tmp_path, {"s1": (m, 1.0)})).score([mwin()])
    assert out[0].score == 0.0 and out[0].detail["invalid"] == 1.0 and out[0].threshold is None


class FakeTrainer:
    def __init__(self):
        self.observed: list[str] = []
        self.done: set[str] = set()

    def observe(self, w):
        self.observed.append(w.entity_id)


def test_windows_no_checkpoint_matches_go_to_the_online_trainer_and_its_model_is_picked_up_at_once(tmp_path):
    m = FakeModel("online", scaling_id="s1")
    loaded = {}
    trainer = FakeTrainer()
    f = CheckpointFolder(ModelsConfig(models=str(tmp_path), reload_s=1e9), loader=lambda p: loaded[p.stem])
    f.scan(force=True)
    eng = Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=0, cs_handover=0), folder=f, trainer=trainer)
    out = eng.score([mwin("e", 59), mwin("e", 64)])
    assert families(out) == ["cs-jumpstarter"] * 2 and trainer.observed == ["e", "e"]
    # the trainer finishes and writes its checkpoint; the next refresh scans at once (reload_s is far off)
    loaded["online-e"] = m
    (tmp_path / "online-e.safetensors").write_bytes(b"x")
    eng.refresh()
    assert eng.checkpoints == 0  # not due, and the trainer has not said it is done
    trainer.done.add("e")
    eng.refresh()
    assert eng.checkpoints == 1
    out = eng.score([mwin("e", 69)])
    assert families(out) == ["cs-jumpstarter", "fake"] and trainer.observed == ["e", "e"]  # matched: not observed
    eng.refresh()  # nothing new finished: no forced scan
    assert f.loaded_total == 1


def test_a_corrupt_checkpoint_is_skipped_once(tmp_path, caplog):
    def loader(p):
        raise ValueError("not a checkpoint")

    (tmp_path / "bad.safetensors").write_bytes(b"?")
    f = CheckpointFolder(ModelsConfig(models=str(tmp_path)), loader=loader)
    f.scan(force=True)
    f.scan(force=True)
    assert f.models == {} and caplog.text.count("skipping checkpoint") == 1


def test_the_engine_module_doctest():
    import doctest

    import osad.detector.engine as engine
    import osad.detector.registry as registry

    assert doctest.testmod(engine).failed == 0 and doctest.testmod(registry).failed == 0
