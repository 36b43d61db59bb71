"""The detector service: SignatureWindows in, Scores out, a thin shell over :class:`~osad.detector.engine.Engine`.

The transform only queues and batches: windows wait until ``max_batch`` are there or the
oldest has waited ``max_wait_ms``; then the chunk goes to the engine, which decides what each
model call scores (cold start with compressed sensing, per-entity calibration, MSCRED from the
checkpoint folder, online training). Replicas share the signatures topic's partitions through
the consumer group.

Offsets of queued (not yet scored) windows are never committed, so a crash loses none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from osad.runtime.config import Config, positive, setting
from osad.runtime.service import InputMeta, Output, Transform
from osad.schemas import SCORES, SIGNATURES, SignatureWindow

from .base import Scorer
from .engine import Engine


@dataclass(frozen=True)
class BatchConfig(Config):
    """How windows of many entities are batched into one model call."""

    max_batch: int = setting(64, help="most windows per model call", check=positive)
    max_wait_ms: float = setting(20.0, help="longest a window waits for its batch to fill", check=positive)


class Detector(Transform):
    name = "detector"
    input = SIGNATURES

    def __init__(self, engine: Engine, batching: BatchConfig = BatchConfig(), clock=time.monotonic):
        self.engine = engine
        self.max_batch = batching.max_batch
        self.max_wait_s = batching.max_wait_ms / 1000.0
        self.clock = clock
        self.pending: list[tuple[SignatureWindow, InputMeta, float]] = []
        self._m = None

    def bind_metrics(self, metrics) -> None:
        self._m = {
            "batch": metrics.histogram("osad_detector_batch_windows", "Windows per model call",
                                       (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
            "model_s": metrics.histogram("osad_detector_model_seconds", "Time of one model call",
                                         (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)),
            "scored": metrics.counter("osad_detector_scores", "Scores published by model family", ("model",)),
            "models": metrics.gauge("osad_detector_checkpoints", "MSCRED checkpoints loaded"),
        }
        self.engine.on_model_call = self._observe_call

    def _observe_call(self, scorer: Scorer, windows: int, seconds: float) -> None:
        self._m["model_s"].observe(seconds)
        self._m["batch"].observe(windows)
        self._m["scored"].labels(scorer.model_id.split(":")[0]).inc(windows)

    # -- transform ---------------------------------------------------------------------------
    def process(self, msg: SignatureWindow, meta: InputMeta):
        return self.process_batch([(msg, meta)])

    def process_batch(self, batch):
        now = self.clock()
        self.pending.extend((w, meta, now) for w, meta in batch)
        out: list[Output] = []
        while len(self.pending) >= self.max_batch:
            chunk, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
            out += self._score(chunk)
        return out

    def tick(self, now: float):
        self.engine.refresh()
        if self._m:
            self._m["models"].set(self.engine.checkpoints)
        if self.pending and self.next_deadline() <= 0:  # the oldest has waited max_wait_ms
            chunk, self.pending = self.pending, []
            return self._score(chunk)
        return ()

    def next_deadline(self) -> float | None:
        """Seconds until the oldest queued window has waited ``max_wait_ms`` (None: nothing queued)."""
        return self.pending[0][2] + self.max_wait_s - self.clock() if self.pending else None

    def retained(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, meta, _ in self.pending:
            cur = out.get(meta.partition)
            if cur is None or meta.offset < cur:
                out[meta.partition] = meta.offset
        return out

    def revoke(self, partitions: set[int]):
        self.pending = [p for p in self.pending if p[1].partition not in partitions]
        return ()

    def close(self):
        chunk, self.pending = self.pending, []
        return self._score(chunk) if chunk else ()

    def _score(self, chunk) -> list[Output]:
        return [Output(SCORES, s) for s in self.engine.score([w for w, _, _ in chunk])]
