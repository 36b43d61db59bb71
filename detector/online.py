"""``osad detect --train-online``: MSCRED trained in the background on an entity's first windows.

For an entity that no checkpoint matches, the detector keeps its first ``train_windows``
windows (assumed normal: start the detector while the process behaves as usual), trains an
MSCRED model on them in a background thread, saves it as a checkpoint in the models folder
(``online-<hash>.safetensors``, restricted to that entity's scaling) and the checkpoint folder
picks it up like any other: from then on the entity's windows get MSCRED scores too. One model
trains at a time; at most ``train_max_models`` entities get an online model.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osad.runtime.config import Config, positive, setting
from osad.schemas import SignatureWindow

from .base import WindowBatch

log = logging.getLogger("osad.detector.online")


def _enough_windows(v: int) -> str | None:
    return None if v >= 20 else ("must be at least 20 (training holds out a validation tail separated by a "
                                 "window's span)")


@dataclass(frozen=True)
class OnlineConfig(Config):
    """How entities without a checkpoint get an MSCRED model of their own."""

    train_windows: int = setting(100, help="windows per entity for online training", check=_enough_windows)
    train_epochs: int = setting(5, help="epochs of online training", check=positive)
    train_max_models: int = setting(20, help="most entities that get an online model (each costs ~20 MB and "
                                    "training time)", check=positive)
    batch_size: int = 16  # windows per optimisation step


class OnlineTrainer:
    def __init__(self, folder: str | Path, cfg: OnlineConfig, device: str | None = None):
        self.folder = Path(folder)
        self.cfg = cfg
        self.device = device
        self.buffers: dict[str, list[SignatureWindow]] = {}
        self.started: set[str] = set()
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._queue: list[str] = []
        self._lock = threading.Lock()

    def path_for(self, entity_id: str) -> Path:
        return self.folder / f"online-{hashlib.sha1(entity_id.encode()).hexdigest()[:16]}.safetensors"

    def observe(self, w: SignatureWindow) -> None:
        """A window that no checkpoint matched."""
        eid = w.entity_id
        if eid in self.started:
            return
        if eid not in self.buffers and len(self.started) + len(self.buffers) >= self.cfg.train_max_models:
            return
        buf = self.buffers.setdefault(eid, [])
        buf.append(w)
        if len(buf) >= self.cfg.train_windows:
            self.started.add(eid)
            with self._lock:
                self._queue.append(eid)
            self._kick()

    def _kick(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="osad-online-train", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                eid = self._queue.pop(0)
            wins = self.buffers.pop(eid)
            try:
                self._train(eid, wins)
                self.done.add(eid)
            except Exception as e:  # keep the service going; say why
                self.failed[eid] = str(e)
                log.error("online training for %s failed: %s", eid, e)

    def _train(self, eid: str, wins: list[SignatureWindow]) -> None:
        from .mscred import MSCREDScorer  # torch: only once a model trains

        w0 = wins[0]
        sig = np.stack([w.signatures for w in wins])
        vals = np.stack([w.values for w in wins])
        log.info("training MSCRED online for %s on %d windows (%d features)", eid, len(wins), len(w0.features))
        sc = MSCREDScorer(w0.features, scales=tuple(w0.scales), gap=w0.gap, step=w0.step, device=self.device)
        sc.fit(WindowBatch(sig, vals), epochs=self.cfg.train_epochs, batch_size=self.cfg.batch_size, progress=False)
        sc.annotate(source="online", entity_id=eid, scaling_id=w0.scaling_id, windows=len(wins))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(eid)
        sc.save(path)
        log.info("online MSCRED for %s saved to %s (%s)", eid, path, sc.model_id)
