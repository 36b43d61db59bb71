"""The detector's logic, pure: SignatureWindows in, Scores out, no Kafka.

Given a chunk of windows (of many entities, in arrival order), the :class:`Engine` decides which
scorer scores each window and what goes into one model call, and keeps the per-entity state:

* **Compressed sensing from the first window** (``cs``, needs no training): windows are grouped
  by (feature count, window length, gap) and each group is one call of the jump-start scorer
  (a clone of ``cs`` for the group's gap, ``cs.clone(gap=...)``).
* **Per-entity calibration** (``cs_calibrate`` > 0): an entity's first ``cs_calibrate``
  windows (assumed normal) are scored by the jump-start scorer and kept; on the
  ``cs_calibrate``-th, a clone of ``calibrated`` (by default
  :meth:`CalibratedCSScorer.from_jump_start(cs) <osad.detector.cs.CalibratedCSScorer.from_jump_start>`:
  the same reconstruction options) is fitted on them, and from then on, even later windows in
  the same chunk, the entity is scored by its own calibrated scorer. A window with another
  window length or feature count than the kept ones restarts the entity's calibration. At most
  ``cs_max_entities`` calibrated scorers are kept (the least recently used is dropped; that
  entity is jump-started again). A fit that fails is logged; the entity stays jump-started. For
  ``cs_handover`` windows after its fit, an entity gets its jump-start Score as well (same
  reconstruction, no extra solve), so the alerter's armed jump-start stream judges it while the
  calibrated stream arms.
* **MSCRED** (or any checkpointed scorer): a window that a checkpoint in the folder matches
  (:meth:`CheckpointFolder.match`) is scored by it as well, one call per checkpoint.
* **Online training hand-off**: a window no checkpoint matches goes to the online trainer, if
  there is one; when the trainer has finished a model, :meth:`Engine.refresh` re-scans the
  folder at once, so the new checkpoint scores the entity's next windows.

Outputs come in this order: the compressed-sensing groups (per group: the jump-started windows,
then each calibrated entity's), then each checkpoint's windows. A Score carries the scorer's
``model_id``, its own ``threshold`` (if finite), the window's identity and the scorer's
contributions and ``detail``; a non-finite score is published as 0 with ``detail.invalid = 1``.

Example::

    >>> import numpy as np
    >>> from osad.detector.cs import CSScorer
    >>> from osad.schemas import SignatureWindow
    >>> rng = np.random.default_rng(0)
    >>> def window(seq):
    ...     return SignatureWindow(entity_id="h/1@2", host="h", window_end_ts=float(seq), window_end_seq=seq,
    ...                            interval_s=1.0, gap=5, scales=[60], features=["a", "b", "c"],
    ...                            signatures=np.zeros((1, 1, 3, 3), np.float32),
    ...                            values=0.5 + 0.1 * rng.normal(size=(60, 3)))
    >>> eng = Engine(CSScorer(gap=5, max_iter=50), EngineConfig(cs_calibrate=5))
    >>> ids = [s.model_id.split(":")[0] for s in eng.score([window(59 + 5 * i) for i in range(7)])]
    >>> ids.count("cs-jumpstarter"), ids.count("cs-calibrated"), eng.calibrating  # (2 handed over: both scores)
    (7, 2, [])
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from osad.core.thresholds import ARM_SCORES
from osad.runtime.config import Config, setting
from osad.schemas import Score, SignatureWindow
from osad.schemas.wire import unpack_symmetric

from .base import ScoreBatch, Scorer, WindowBatch
from .calibrations import CalibrationStore
from .cs import CalibratedCSScorer, CSScorer, score_many
from .folder import Checkpoint, CheckpointFolder
from .online import OnlineTrainer

log = logging.getLogger("osad.detector")


#: windows after an entity's calibration that the jump-start scorer also scores: the alerter arms the calibrated
#: model's stream after this many scores (osad.core.thresholds.ARM_SCORES), and until then the jump-start stream,
#: armed already, keeps judging the entity, so calibrating it leaves no window unjudged
HANDOVER_WINDOWS = ARM_SCORES


def _zero_or_at_least_5(v: int) -> str | None:
    return None if v == 0 or v >= 5 else "0 or at least 5"


@dataclass(frozen=True)
class EngineConfig(Config):
    """How the engine calibrates compressed sensing per entity."""

    cs_calibrate: int = setting(30, help="after this many windows of an entity (assumed normal), score it with "
                                "compressed sensing calibrated on them (per-metric normal range + PCA level term; "
                                "model cs-calibrated) instead of the window-relative jump-start score (0: never)",
                                check=_zero_or_at_least_5)
    cs_handover: int = setting(HANDOVER_WINDOWS, check=lambda v: None if v >= 0 else "must be 0 or more",
                               help="windows after an entity's calibration that also get the jump-start score, so the "
                               "alerter's armed jump-start stream judges them while the calibrated stream arms (the "
                               "alerter's --arm-scores; 0: none)")
    cs_max_entities: int = 10_000  # calibrated scorers kept; the least recently used is dropped


#: (scorer, windows in the call, seconds) after every model call: the service's metrics
ModelCallObserver = Callable[[Scorer, int, float], None]


class Engine:
    """Scores chunks of windows (see the module docstring)."""

    def __init__(self, cs: CSScorer | None, config: EngineConfig = EngineConfig(),
                 folder: CheckpointFolder | None = None, trainer: OnlineTrainer | None = None,
                 calibrated: Scorer | None = None, on_model_call: ModelCallObserver | None = None,
                 store: CalibrationStore | None = None):
        self.cs = cs
        self.store = store  # calibrations on disk: kept across restarts, shared by replicas
        self.config = config
        if calibrated is None and cs is not None and config.cs_calibrate:
            calibrated = CalibratedCSScorer.from_jump_start(cs)
        self.calibrated = calibrated  # the unfitted scorer each entity gets a fitted clone of
        self.folder = folder
        self.trainer = trainer
        self.on_model_call = on_model_call
        self._jump_by_gap: dict[int, Scorer] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}  # entity -> values of its windows so far
        self._buffer_last: dict[str, int] = {}  # entity -> window_end_seq of its newest buffered window
        self._fitted: "OrderedDict[str, Scorer]" = OrderedDict()  # entity -> its calibrated scorer (LRU order)
        # entity -> windows after its calibration still also scored by the jump-start scorer (HANDOVER_WINDOWS)
        self._handover: dict[str, int] = {}
        self._trained_seen: set[str] = set()

    # -- state ---------------------------------------------------------------------------------
    @property
    def calibrating(self) -> list[str]:
        """Entities whose calibration windows are being collected."""
        return list(self._buffers)

    @property
    def calibrated_entities(self) -> list[str]:
        """Entities scored by their own calibrated scorer, least recently used first."""
        return list(self._fitted)

    def calibrated_for(self, entity_id: str) -> Scorer | None:
        """The entity's calibrated scorer, if it has one."""
        return self._fitted.get(entity_id)

    @property
    def checkpoints(self) -> int:
        """Checkpoints loaded from the folder."""
        return len(self.folder.models) if self.folder else 0

    def refresh(self) -> None:
        """Re-scan the checkpoint folder when it is due, or at once when the online trainer has finished
        a model since the last call."""
        if self.folder is None:
            return
        finished = bool(self.trainer and self.trainer.done - self._trained_seen)
        self.folder.scan(force=finished)
        if self.trainer:
            self._trained_seen = set(self.trainer.done)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, windows: list[SignatureWindow]) -> list[Score]:
        """Scores of ``windows`` (arrival order): compressed sensing for each, plus each matching checkpoint's."""
        out: list[Score] = []
        if self.cs is not None:
            groups: dict[tuple, list[SignatureWindow]] = {}
            for w in windows:
                groups.setdefault((len(w.features), w.values.shape[0], w.gap), []).append(w)
            for (_, _, gap), group in groups.items():
                out += self._score_cs(gap, group)
        by_model: dict[object, tuple[Checkpoint, list[SignatureWindow]]] = {}
        for w in windows:
            m = self.folder.match(w) if self.folder else None
            if m is not None:
                by_model.setdefault(m.path, (m, []))[1].append(w)
            elif self.trainer is not None:
                self.trainer.observe(w)
        for m, group in by_model.values():
            out += self._run(m.scorer, group)
        return out

    def _score_cs(self, gap: int, windows: list[SignatureWindow]) -> list[Score]:
        """Jump-start compressed sensing for entities still calibrating; afterwards each entity's own
        calibrated scorer."""
        jump = self._jump_start(gap)
        if self.calibrated is None or not self.config.cs_calibrate:
            return self._run(jump, windows)
        # In arrival order: an entity's windows before and including its cs_calibrate-th are scored by
        # the jump-start scorer and kept; the fit happens right there, so its later windows, even in
        # this same chunk, get the calibrated scorer.
        fresh: list[SignatureWindow] = []
        by_entity: dict[str, list[SignatureWindow]] = {}
        for w in windows:
            eid = w.entity_id
            if self.store is not None and eid not in self._fitted and eid not in self._buffers:
                self._restore(eid, gap, w)
            if eid in self._fitted:
                by_entity.setdefault(eid, []).append(w)
                continue
            fresh.append(w)
            buf = self._buffers.setdefault(eid, [])
            if buf and buf[0].shape != w.values.shape:
                buf.clear()  # the entity's feature set changed: start again
            elif buf and w.window_end_seq <= self._buffer_last[eid]:
                continue  # a window seen again (re-read after a restart, re-sent): scored, not counted twice
            buf.append(w.values)
            self._buffer_last[eid] = w.window_end_seq
            if len(buf) >= self.config.cs_calibrate:
                self._buffer_last.pop(eid, None)
                self._fit_entity(eid, gap, self._buffers.pop(eid), w)
        out = self._run(jump, fresh) if fresh else []
        own, lost = [], []
        for eid, ws in by_entity.items():
            if eid in self._fitted:  # (an entity fitted in this chunk may already be evicted again)
                self._fitted.move_to_end(eid)
                own.append((self._fitted[eid], ws))
            else:
                lost += ws
        if own:  # every calibrated entity of the chunk in one reconstruction (cs.score_many)
            out += self._run_many(own, jump)
        return out + (self._run(jump, lost) if lost else [])

    def _fit_entity(self, eid: str, gap: int, values: list[np.ndarray], last: SignatureWindow) -> None:
        sc = self.calibrated.clone(gap=gap)
        try:
            sc.fit(WindowBatch(None, np.stack(values)))
        except Exception as e:  # keep scoring with the jump-start scorer; say why
            log.warning("could not calibrate compressed sensing for %s: %s", eid, e)
            return
        self._keep(eid, sc)
        if self.config.cs_handover:
            self._handover[eid] = self.config.cs_handover
        log.info("compressed sensing calibrated for %s on %d windows", eid, len(values))
        if self.store is not None:
            try:
                self.store.save(eid, sc, last.features, last.scaling_id)
            except OSError as e:  # scoring goes on; only the restart would calibrate again
                log.warning("could not save the calibration of %s to %s: %s", eid, self.store.folder, e)

    def _restore(self, eid: str, gap: int, w: SignatureWindow) -> None:
        """The entity's calibration from the store, when one was saved for these features and scaling."""
        if not isinstance(self.calibrated, CalibratedCSScorer):
            return
        sc = self.store.load(eid, self.calibrated.clone(gap=gap), w.features, w.scaling_id)
        if sc is not None:
            self._keep(eid, sc)
            log.info("compressed sensing calibration of %s restored from %s", eid, self.store.folder)

    def _keep(self, eid: str, sc: Scorer) -> None:
        self._fitted[eid] = sc
        while len(self._fitted) > self.config.cs_max_entities:
            self._handover.pop(self._fitted.popitem(last=False)[0], None)

    def _jump_start(self, gap: int) -> Scorer:
        """The jump-start scorer for windows of this gap (it scores the newest gap points)."""
        if self.cs.window.gap == gap:
            return self.cs
        if gap not in self._jump_by_gap:
            self._jump_by_gap[gap] = self.cs.clone(gap=gap)
        return self._jump_by_gap[gap]

    def _run(self, scorer: Scorer, windows: list[SignatureWindow]) -> list[Score]:
        """One model call: ``windows`` (one feature set) through ``scorer``, as Scores."""
        values = np.stack([w.values for w in windows])
        sig = unpack_symmetric(np.stack([w.tri for w in windows]), len(windows[0].features)) \
            if scorer.uses_signatures else None
        t0 = time.perf_counter()
        res = scorer.score(WindowBatch(signatures=sig, values=values))
        if self.on_model_call:
            self.on_model_call(scorer, len(windows), time.perf_counter() - t0)
        return self._scores(scorer, windows, res)

    def _run_many(self, pairs: list[tuple[Scorer, list[SignatureWindow]]], jump: Scorer) -> list[Score]:
        """Entities' own calibrated scorers, each with its windows (one feature set), in one model call; for an
        entity just calibrated, its jump-start Scores too (from the same reconstruction), for HANDOVER_WINDOWS."""
        t0 = time.perf_counter()
        handing = {i: None for i, (_, ws) in enumerate(pairs) if self._handover.get(ws[0].entity_id)}
        results = score_many([(sc, np.stack([w.values for w in ws])) for sc, ws in pairs], jump_start=handing)
        if self.on_model_call:
            self.on_model_call(pairs[0][0], sum(len(ws) for _, ws in pairs), time.perf_counter() - t0)
        out: list[Score] = []
        for i, ((sc, ws), res) in enumerate(zip(pairs, results)):
            out += self._scores(sc, ws, res)
            if handing.get(i) is not None:
                eid = ws[0].entity_id
                left = self._handover.pop(eid)
                k = min(left, len(ws))
                if left > k:
                    self._handover[eid] = left - k
                j = handing[i]
                out += self._scores(jump, ws[:k], ScoreBatch(j.scores[:k], j.contributions[:k],
                                                             {n: v[:k] for n, v in j.detail.items()}))
        return out

    def _scores(self, scorer: Scorer, windows: list[SignatureWindow], res) -> list[Score]:
        """The Scores of one scorer's result for ``windows``."""
        thr = scorer.threshold
        thr = float(thr) if thr is not None and math.isfinite(thr) else None
        mid = scorer.model_id
        scores = np.asarray(res.scores, np.float64)
        contrib = np.nan_to_num(np.asarray(res.contributions, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        bad = ~np.isfinite(scores)
        if bad.any():  # never publish NaN: it would not survive JSON; say so instead
            log.warning("%s produced %d non-finite scores; published as 0 with detail.invalid=1", mid, int(bad.sum()))
            scores = np.where(bad, 0.0, scores)
        levels = window_levels(windows)
        out = []
        for i, w in enumerate(windows):
            detail = {k: float(v[i]) for k, v in res.detail.items() if np.isfinite(v[i])}
            if bad[i]:
                detail["invalid"] = 1.0
            out.append(Score(
                entity_id=w.entity_id, host=w.host, pid=w.pid, comm=w.comm, cgroup=w.cgroup,
                container_id=w.container_id, window_end_ts=w.window_end_ts, window_end_seq=w.window_end_seq,
                interval_s=w.interval_s, gap=w.gap, model_id=mid, score=float(scores[i]), threshold=thr,
                features=list(w.features), contributions=contrib[i].tolist(), detail=detail, levels=levels[i],
            ))
        return out


def window_levels(windows: list[SignatureWindow]) -> list[list[float] | None]:
    """Each window's per-feature level: the mean of its newest ``gap`` scaled samples (4 decimals; None where
    a value is not finite). The alerter compares them with the entity's usual levels to tell a rise from a fall.

    >>> import numpy as np
    >>> from osad.schemas import SignatureWindow
    >>> v = np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 0.5], [4.0, 0.5]], np.float32)
    >>> w = SignatureWindow(entity_id="h/1@2", host="h", window_end_ts=1.0, window_end_seq=4, interval_s=1.0,
    ...                     gap=2, features=["a", "b"], scales=[4], signatures=np.zeros((1, 1, 2, 2)), values=v)
    >>> window_levels([w])
    [[3.0, 0.5]]
    """
    out: list[list[float] | None] = []
    for w in windows:
        m = np.asarray(w.values[-max(1, min(w.gap, len(w.values))):], np.float64).mean(axis=0)
        out.append([round(float(x), 4) for x in m] if np.isfinite(m).all() else None)
    return out
