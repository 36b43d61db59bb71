"""The detector service: SignatureWindows in, Scores out (a thin shell over the scorers).

* **Batching across entities**: windows wait in a queue until ``max_batch`` are there or the
  oldest has waited ``max_wait_ms``; one model call then scores windows of many entities.
* **Cold start**: the compressed-sensing scorer needs no training, so every window gets a
  ``cs`` Score from the first one on.
* **MSCRED** joins for a window as soon as a checkpoint in ``--models`` matches it (same feature
  names, scales, gap, step and, when the checkpoint carries ranges, the same scaling id). The
  folder is re-scanned every ``reload_s`` seconds: new or replaced checkpoints are picked up
  without a restart; a corrupt one is reported once and skipped.
* **Replicas** share the signatures topic's partitions through the consumer group.

Offsets of queued (not yet scored) windows are never committed, so a crash loses none.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osad.runtime.service import InputMeta, Output, Transform
from osad.schemas import SCORES, SIGNATURES, Score, SignatureWindow
from osad.schemas.wire import unpack_symmetric

from .base import Scorer, WindowBatch

log = logging.getLogger("osad.detector")


@dataclass
class _Model:
    path: Path
    stamp: tuple[float, int]
    scorer: Scorer
    key: tuple  # (features, scales, gap, step)
    scaling_id: str | None  # None: matches any scaling


class ModelRegistry:
    """MSCRED checkpoints in a folder, loaded lazily and reloaded when they change."""

    def __init__(self, folder: str | None, device: str | None = None, amp: bool = False, reload_s: float = 10.0,
                 loader=None, threads: int | None = None):
        self.folder = Path(folder) if folder else None
        self.device, self.amp, self.reload_s, self.threads = device, amp, reload_s, threads
        self.models: dict[Path, _Model] = {}
        self._bad: dict[Path, tuple] = {}
        self._last_scan = -1e18
        self._loader = loader
        self.loaded_total = 0

    def _load(self, path: Path):
        if self._loader:
            return self._loader(path)
        from .mscred import MSCREDScorer

        return MSCREDScorer.from_checkpoint(path, device=self.device, amp=self.amp, threads=self.threads)

    def scan(self, now: float | None = None, force: bool = False) -> None:
        now = time.monotonic() if now is None else now
        if self.folder is None or (not force and now - self._last_scan < self.reload_s):
            return
        self._last_scan = now
        if not self.folder.is_dir():
            return
        seen = set()
        for p in sorted(self.folder.glob("*.safetensors")):
            seen.add(p)
            try:
                st = p.stat()
            except OSError:
                continue
            stamp = (st.st_mtime, st.st_size)
            cur = self.models.get(p)
            if (cur and cur.stamp == stamp) or self._bad.get(p) == stamp:
                continue
            try:
                sc = self._load(p)
            except Exception as e:  # CheckpointError says what is wrong and what to do
                self._bad[p] = stamp
                log.error("skipping checkpoint %s: %s", p, e)
                continue
            if getattr(sc, "ranges", None) is not None:
                sid = sc.ranges.scaling_id
            else:  # e.g. trained online on one entity's windows: only for that scaling
                sid = (getattr(sc, "train_info", None) or {}).get("scaling_id") or None
            self.models[p] = _Model(p, stamp, sc, (tuple(sc.features), tuple(sc.scales), sc.gap, sc.step), sid)
            self._bad.pop(p, None)
            self.loaded_total += 1
            log.info("loaded %s from %s (%d features)%s", sc.model_id, p.name, len(sc.features),
                     " (replaced)" if cur else "")
        for p in set(self.models) - seen:
            log.info("checkpoint %s was removed; its model is unloaded", p.name)
            del self.models[p]

    def match(self, w: SignatureWindow) -> _Model | None:
        key = (tuple(w.features), tuple(w.scales), w.gap, w.step)
        best = None
        for m in self.models.values():
            if m.key != key or (m.scaling_id is not None and w.scaling_id and m.scaling_id != w.scaling_id):
                continue
            # prefer a checkpoint made for this scaling, then the newest
            rank = (m.scaling_id is not None, m.stamp[0])
            if best is None or rank > best[0]:
                best = (rank, m)
        return best[1] if best else None


class Detector(Transform):
    name = "detector"
    input = SIGNATURES

    def __init__(self, cs: Scorer | None, registry: ModelRegistry | None = None, max_batch: int = 64,
                 max_wait_ms: float = 20.0, clock=time.monotonic, trainer=None, cs_calibrate: int = 0,
                 cs_max_entities: int = 10_000):
        self.cs = cs
        # per entity: compressed sensing with its normal range learned on its first windows
        self.cs_calibrate = cs_calibrate
        self.cs_max_entities = cs_max_entities
        self._cal_buf: dict[str, list[np.ndarray]] = {}
        self._cal: "OrderedDict[str, Scorer]" = OrderedDict()
        self.trainer = trainer  # detector.online.OnlineTrainer, with --train-online
        self._cs_by_gap: dict[int, Scorer] = {}
        self.registry = registry or ModelRegistry(None)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.clock = clock
        self.pending: list[tuple[SignatureWindow, InputMeta, float]] = []
        self._m = None
        self._seen_done: set[str] = set()

    def bind_metrics(self, metrics) -> None:
        self._m = {
            "batch": metrics.histogram("osad_detector_batch_windows", "Windows per model call",
                                       (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
            "model_s": metrics.histogram("osad_detector_model_seconds", "Time of one model call",
                                         (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)),
            "scored": metrics.counter("osad_detector_scores", "Scores published by model family", ("model",)),
            "models": metrics.gauge("osad_detector_checkpoints", "MSCRED checkpoints loaded"),
        }

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
        self.registry.scan(force=bool(self.trainer and self.trainer.done - self._seen_done))
        if self.trainer:
            self._seen_done = set(self.trainer.done)
        if self._m:
            self._m["models"].set(len(self.registry.models))
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

    # -- scoring -----------------------------------------------------------------------------
    def _score(self, chunk) -> list[Output]:
        wins = [w for w, _, _ in chunk]
        out: list[Output] = []
        if self.cs is not None:
            by_n: dict[tuple, list[int]] = {}
            for i, w in enumerate(wins):
                by_n.setdefault((len(w.features), w.values.shape[0], w.gap), []).append(i)
            for (_, _, gap), idx in by_n.items():
                out += self._score_cs(gap, [wins[i] for i in idx])
        by_model: dict[Path, list[int]] = {}
        models = {}
        for i, w in enumerate(wins):
            m = self.registry.match(w)
            if m is not None:
                by_model.setdefault(m.path, []).append(i)
                models[m.path] = m
            elif self.trainer is not None:
                self.trainer.observe(w)
        for path, idx in by_model.items():
            out += self._run(models[path].scorer, [wins[i] for i in idx], signatures=True)
        return out

    def _score_cs(self, gap: int, wins: list[SignatureWindow]) -> list[Output]:
        """Jump-start compressed sensing for entities still calibrating; afterwards each entity's own
        calibrated scorer (fitted on its first ``cs_calibrate`` windows, assumed normal)."""
        if not self.cs_calibrate:
            return self._run(self._cs_for(gap), wins, signatures=False)
        # In arrival order: an entity's windows before and including its cs_calibrate-th are scored by
        # the jump-start scorer and kept; the fit happens right there, so its later windows, even in
        # this same batch, get the calibrated scorer.
        fresh: list[SignatureWindow] = []
        by_entity: dict[str, list[SignatureWindow]] = {}
        for w in wins:
            eid = w.entity_id
            if eid in self._cal:
                by_entity.setdefault(eid, []).append(w)
                continue
            fresh.append(w)
            buf = self._cal_buf.setdefault(eid, [])
            if buf and buf[0].shape != w.values.shape:
                buf.clear()  # the entity's feature set changed: start again
            buf.append(w.values)
            if len(buf) >= self.cs_calibrate:
                self._fit_entity(eid, gap, self._cal_buf.pop(eid))
        out = self._run(self._cs_for(gap), fresh, signatures=False) if fresh else []
        for eid, ws in by_entity.items():
            if eid in self._cal:  # (an entity fitted in this batch may already be evicted again)
                self._cal.move_to_end(eid)
                out += self._run(self._cal[eid], ws, signatures=False)
            else:
                out += self._run(self._cs_for(gap), ws, signatures=False)
        return out

    def _fit_entity(self, eid: str, gap: int, values: list[np.ndarray]) -> None:
        from .cs import CalibratedCSScorer

        sc = CalibratedCSScorer(gap=gap)
        try:
            sc.fit(WindowBatch(np.empty((len(values), 0), np.float32), np.stack(values)))
        except Exception as e:  # keep scoring with the jump-start scorer; say why
            log.warning("could not calibrate compressed sensing for %s: %s", eid, e)
            return
        self._cal[eid] = sc
        while len(self._cal) > self.cs_max_entities:
            self._cal.popitem(last=False)
        log.info("compressed sensing calibrated for %s on %d windows", eid, len(values))

    def _cs_for(self, gap: int) -> Scorer:
        """The compressed-sensing scorer for windows of this gap (it scores the newest gap points)."""
        if getattr(self.cs, "gap", gap) == gap:
            return self.cs
        if gap not in self._cs_by_gap:
            import copy

            sc = copy.copy(self.cs)
            sc.gap = gap
            self._cs_by_gap[gap] = sc
        return self._cs_by_gap[gap]

    def _run(self, scorer: Scorer, wins: list[SignatureWindow], signatures: bool) -> list[Output]:
        n = len(wins[0].features)
        values = np.stack([w.values for w in wins])
        if signatures:
            sig = unpack_symmetric(np.stack([w.tri for w in wins]), n)
        else:
            sig = np.empty((len(wins), 0), np.float32)
        t0 = time.perf_counter()
        res = scorer.score(WindowBatch(signatures=sig, values=values))
        if self._m:
            self._m["model_s"].observe(time.perf_counter() - t0)
            self._m["batch"].observe(len(wins))
            self._m["scored"].labels(scorer.model_id.split(":")[0]).inc(len(wins))
        thr = getattr(scorer, "threshold", None)
        thr = float(thr) if isinstance(thr, (int, float)) and np.isfinite(thr) else None
        mid = scorer.model_id
        scores = np.asarray(res.scores, np.float64)
        contrib = np.nan_to_num(np.asarray(res.contributions, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        bad = ~np.isfinite(scores)
        if bad.any():  # never publish NaN: it would not survive JSON; say so instead
            log.warning("%s produced %d non-finite scores; published as 0 with detail.invalid=1", mid, int(bad.sum()))
            scores = np.where(bad, 0.0, scores)
        out = []
        for i, w in enumerate(wins):
            detail = {k: float(v[i]) for k, v in res.detail.items() if np.isfinite(v[i])}
            if bad[i]:
                detail["invalid"] = 1.0
            out.append(Output(SCORES, Score(
                entity_id=w.entity_id, host=w.host, pid=w.pid, comm=w.comm, cgroup=w.cgroup,
                container_id=w.container_id, window_end_ts=w.window_end_ts, window_end_seq=w.window_end_seq,
                interval_s=w.interval_s, gap=w.gap, model_id=mid, score=float(scores[i]), threshold=thr,
                features=list(w.features), contributions=contrib[i].tolist(), detail=detail,
            )))
        return out


def models_dir_default() -> str:
    return os.environ.get("OSAD_MODELS", "var/models")
