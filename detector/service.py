"""The detector service: SignatureWindows in, Scores out, a thin shell over :class:`~osad.detector.engine.Engine`.

The transform only queues and batches: windows wait until ``max_batch`` are there or the
oldest has waited ``max_wait_ms``; then the chunk goes to the engine, which decides what each
model call scores (cold start with compressed sensing, per-entity calibration, MSCRED from the
checkpoint folder, online training). Replicas share the signatures topic's partitions through
the consumer group.

Offsets of queued (not yet scored) windows are never committed, so a crash loses none.

Metrics (``bind_metrics``) besides the runtime's: per model call its batch size and time, Scores by model
family, and the **latest score of every scored (entity, model family)** as ``osad_detector_last_score{entity,
host, model}`` with a histogram of all scores by family (``osad_detector_score``). Those per-entity series
are bounded (:class:`ScoreSeries`): at most ``series_max_entities`` entities (by default the engine's
``cs_max_entities``, 10,000; the least recently scored leave first), a family that scored none of an
entity's last :data:`STALE_WINDOWS` windows is removed (e.g. cs-jumpstarter once the entity is calibrated),
an entity without a window for ``series_idle_s`` (600 s) is removed, and so are the entities of revoked
partitions (their new owner exports them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from osad.runtime.config import Config, positive, setting
from osad.runtime.service import InputMeta, Output, Transform
from osad.schemas import SCORES, SIGNATURES, SignatureWindow

from .base import Scorer
from .engine import Engine

log = logging.getLogger("osad.detector")


@dataclass(frozen=True)
class BatchConfig(Config):
    """How windows of many entities are batched into one model call."""

    max_batch: int = setting(64, help="most windows per model call", check=positive)
    max_wait_ms: float = setting(20.0, help="longest a window waits for its batch to fill", check=positive)


#: a model family that scored none of an entity's last this many windows no longer has its score exported
STALE_WINDOWS = 3
#: an entity without a window for this long has its scores removed from the metrics (the alerter's idle timeout)
SERIES_IDLE_S = 600.0
#: buckets of osad_detector_score: scores of different families differ by orders of magnitude
SCORE_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000)


def model_family(model_id: str) -> str:
    """The part of a model_id before ':' (the ``model`` label of the detector's metrics).

    >>> model_family("cs-jumpstarter:rate=0.4:seed=0"), model_family("mscred")
    ('cs-jumpstarter', 'mscred')
    """
    return model_id.split(":", 1)[0]


@dataclass
class _Entity:
    host: str
    partition: int | None
    gap: int = 1
    last_seq: int = -1
    seen: float = 0.0
    families: dict[str, int] = field(default_factory=dict)  # model family -> window_end_seq of its last score


class ScoreSeries:
    """The latest score per (entity, model family), kept in ``gauge`` (labels entity, host, model; set by
    :meth:`Detector.bind_metrics`) and bounded: see the module docstring. Thread-safe (a rebalance may revoke
    partitions from the consumer's IO thread)."""

    def __init__(self, max_entities: int, idle_s: float = SERIES_IDLE_S, stale_windows: int = STALE_WINDOWS,
                 gauge=None):
        self.max_entities, self.idle_s, self.stale_windows = max_entities, idle_s, stale_windows
        self.gauge = gauge
        self.entities: OrderedDict[str, _Entity] = OrderedDict()  # least recently scored first
        self._lock = threading.Lock()

    def update(self, scores, partitions: dict[str, int], now: float) -> None:
        """Record a chunk's Scores (``partitions``: entity id -> input partition), then drop what went stale."""
        with self._lock:
            touched = {}
            for s in scores:
                e = self.entities.get(s.entity_id)
                if e is None:
                    e = self.entities[s.entity_id] = _Entity(s.host, partitions.get(s.entity_id))
                self.entities.move_to_end(s.entity_id)
                fam = model_family(s.model_id)
                e.seen, e.gap = now, s.gap
                e.partition = partitions.get(s.entity_id, e.partition)
                e.last_seq = max(e.last_seq, s.window_end_seq)
                e.families[fam] = max(e.families.get(fam, -1), s.window_end_seq)
                if self.gauge is not None:
                    self.gauge.labels(s.entity_id, s.host, fam).set(s.score)
                touched[s.entity_id] = e
            for eid, e in touched.items():
                for fam, seq in list(e.families.items()):
                    if e.last_seq - seq > self.stale_windows * max(e.gap, 1):
                        self._remove(eid, e, fam)
            while len(self.entities) > self.max_entities:
                eid, e = self.entities.popitem(last=False)
                self._remove_all(eid, e)

    def expire(self, now: float) -> None:
        """Remove the entities without a window for ``idle_s``."""
        with self._lock:
            while self.entities:
                eid, e = next(iter(self.entities.items()))
                if now - e.seen < self.idle_s:
                    break
                del self.entities[eid]
                self._remove_all(eid, e)

    def revoke(self, partitions: set[int]) -> None:
        with self._lock:
            for eid, e in list(self.entities.items()):
                if e.partition in partitions:
                    del self.entities[eid]
                    self._remove_all(eid, e)

    def _remove_all(self, eid: str, e: _Entity) -> None:
        for fam in list(e.families):
            self._remove(eid, e, fam)

    def _remove(self, eid: str, e: _Entity, fam: str) -> None:
        del e.families[fam]
        if self.gauge is not None:
            self.gauge.remove_if_present(eid, e.host, fam)

    def __len__(self) -> int:
        return len(self.entities)


#: an entity's unfinished calibration holds its windows' offsets back (they are read again after a restart) for at most
#: this long; an entity that went away before its cs_calibrate-th window would otherwise hold its partition forever
CALIBRATION_RETAIN_S = 3600.0


class Detector(Transform):
    name = "detector"
    input = SIGNATURES

    def __init__(self, engine: Engine, batching: BatchConfig = BatchConfig(), clock=time.monotonic,
                 series_max_entities: int | None = None, series_idle_s: float = SERIES_IDLE_S):
        self.engine = engine
        self._calibrating_from: dict[str, tuple[int, int, float]] = {}  # entity -> (partition, offset, when)
        self.max_batch = batching.max_batch
        self.max_wait_s = batching.max_wait_ms / 1000.0
        self.clock = clock
        self.pending: list[tuple[SignatureWindow, InputMeta, float]] = []
        self._m = None
        cap = engine.config.cs_max_entities if series_max_entities is None else series_max_entities
        self.series = ScoreSeries(cap, series_idle_s)

    def bind_metrics(self, metrics) -> None:
        self._m = {
            "batch": metrics.histogram("osad_detector_batch_windows", "Windows per model call",
                                       (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
            "model_s": metrics.histogram("osad_detector_model_seconds", "Time of one model call",
                                         (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)),
            "scored": metrics.counter("osad_detector_scores", "Scores published by model family", ("model",)),
            "models": metrics.gauge("osad_detector_checkpoints", "MSCRED checkpoints loaded"),
            "score": metrics.histogram("osad_detector_score", "Scores published, by model family (scores of "
                                       "different families are not comparable)", SCORE_BUCKETS, ("model",)),
            "entities": metrics.gauge("osad_detector_scored_entities",
                                      "Entities whose latest score is exported (osad_detector_last_score)"),
        }
        self.series.gauge = metrics.gauge(
            "osad_detector_last_score", "Latest score per scored entity and model family (removed when the entity "
            "leaves: see docs/observability.md)", ("entity", "host", "model"))
        self.engine.on_model_call = self._observe_call

    def _observe_call(self, scorer: Scorer, windows: int, seconds: float) -> None:
        self._m["model_s"].observe(seconds)
        self._m["batch"].observe(windows)
        self._m["scored"].labels(model_family(scorer.model_id)).inc(windows)

    # -- transform ---------------------------------------------------------------------------
    def process(self, msg: SignatureWindow, meta: InputMeta):
        return self.process_batch([(msg, meta)])

    def process_batch(self, batch):
        if self.engine.cs is not None:
            for w, _ in batch:  # refused here, where the runner dead-letters it; in tick() it would stop the service
                if w.values.shape[0] < 2:
                    raise ValueError(f"window of {w.entity_id} has {w.values.shape[0]} value row (max scale "
                                     f"{max(w.scales)}); compressed sensing needs at least 2")
        now = self.clock()
        self.pending.extend((w, meta, now) for w, meta in batch)
        out: list[Output] = []
        while len(self.pending) >= self.max_batch:
            chunk, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
            out += self._score(chunk)
        return out

    def tick(self, now: float):
        self.engine.refresh()
        self.series.expire(self.clock())
        if self._m:
            self._m["models"].set(self.engine.checkpoints)
            self._m["entities"].set(len(self.series))
        if self.pending and self.next_deadline() <= 0:  # the oldest has waited max_wait_ms
            chunk, self.pending = self.pending, []
            return self._score(chunk)
        return ()

    def next_deadline(self) -> float | None:
        """Seconds until the oldest queued window has waited ``max_wait_ms`` (None: nothing queued)."""
        return self.pending[0][2] + self.max_wait_s - self.clock() if self.pending else None

    def retained(self) -> dict[int, int]:
        """The windows still queued, and those an entity's unfinished calibration holds (they are in memory only:
        after a restart they are read again and the calibration goes on where it was, instead of starting over
        on later windows with different scores). A calibration that has not finished within
        ``CALIBRATION_RETAIN_S`` of its first window holds nothing back any more (its entity may have gone)."""
        out: dict[int, int] = {}
        now = self.clock()
        held = [(p, o) for p, o, t in self._calibrating_from.values() if now - t < CALIBRATION_RETAIN_S]
        for partition, offset in [(meta.partition, meta.offset) for _, meta, _ in self.pending] + held:
            cur = out.get(partition)
            if cur is None or offset < cur:
                out[partition] = offset
        return out

    def revoke(self, partitions: set[int]):
        self._calibrating_from = {e: v for e, v in self._calibrating_from.items() if v[0] not in partitions}
        self.pending = [p for p in self.pending if p[1].partition not in partitions]
        self.series.revoke(partitions)
        if self._m:
            self._m["entities"].set(len(self.series))
        return ()

    def close(self):
        chunk, self.pending = self.pending, []
        return self._score(chunk) if chunk else ()

    def _score(self, chunk) -> list[Output]:
        try:
            scores = self.engine.score([w for w, _, _ in chunk])
            dead: list[Output] = []
        except Exception:  # noqa: BLE001 - a bug or a window the models cannot take: the service goes on
            log.warning("detector: scoring a batch of %d windows failed; scoring them one by one", len(chunk),
                        exc_info=True)
            scores, dead = self._score_one_by_one(chunk)
        calibrating = set(self.engine.calibrating)
        for w, meta, _ in chunk:  # where each calibrating entity's first buffered window is (retained)
            if w.entity_id in calibrating:
                self._calibrating_from.setdefault(w.entity_id, (meta.partition, meta.offset, self.clock()))
            else:
                self._calibrating_from.pop(w.entity_id, None)
        self.series.update(scores, {w.entity_id: meta.partition for w, meta, _ in chunk}, self.clock())
        if self._m:
            hist = self._m["score"]
            for s in scores:
                hist.labels(model_family(s.model_id)).observe(s.score)
            self._m["entities"].set(len(self.series))
        return [Output(SCORES, s) for s in scores] + dead

    def _score_one_by_one(self, chunk) -> tuple[list, list[Output]]:
        """The Scores of the windows of ``chunk`` that score alone, and the others as dead letters (the runner
        publishes them to the dead-letter topic with the reason: scoring ran in ``tick``, where an exception
        would stop the service, or in a batch whose raw messages are gone)."""
        scores, dead = [], []
        for w, meta, _ in chunk:
            try:
                scores += self.engine.score([w])
            except Exception as e:  # noqa: BLE001
                log.exception("detector: scoring the window of %s ending at seq %d failed", w.entity_id,
                              w.window_end_seq)
                dead.append(Output(SCORES, w, key=w.entity_id, dead=(meta, f"scoring failed: {type(e).__name__}: {e}")))
        return scores, dead
