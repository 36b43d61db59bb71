"""The folder of MSCRED checkpoints the detector scores with (``osad detect --models``).

Checkpoints (``*.safetensors`` from ``osad train`` or the online trainer) are loaded lazily and
the folder is re-scanned every ``reload_s`` seconds: new or replaced files are loaded, removed
ones unloaded, without a restart; a corrupt one is reported once and skipped.

A window is scored by the checkpoint that matches it (:meth:`CheckpointFolder.match`): same
feature names, scales, gap and step, and, when the model is restricted to a scaling, the
window's scaling id. Among those, one made for a scaling wins over one for any, then the newest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from osad.runtime.config import Config, positive, setting
from osad.schemas import SignatureWindow

from .base import Scorer

log = logging.getLogger("osad.detector")


@dataclass(frozen=True)
class ModelsConfig(Config):
    """Where the MSCRED checkpoints are and how they run."""

    models: str = setting("var/models", help="folder of MSCRED checkpoints (*.safetensors from osad train)")
    device: str = setting("auto", help="where MSCRED runs (auto: CUDA if available)", choices=("auto", "cpu", "cuda"))
    amp: bool = setting(False, help="mixed precision (bfloat16) for MSCRED on CUDA")
    threads: int = setting(0, help="CPU threads for MSCRED (0: the cores this process may use)")
    reload_s: float = setting(10.0, help="how often --models is re-scanned", check=positive)

    @property
    def torch_device(self) -> str | None:
        """The device as the scorers take it (None: auto)."""
        return None if self.device == "auto" else self.device


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint: its file, the file's (mtime, size) when loaded, the scorer, and what it
    matches: ``key`` (features, scales, gap, step) and ``scaling_id`` (None: any scaling)."""

    path: Path
    stamp: tuple[float, int]
    scorer: Scorer
    key: tuple
    scaling_id: str | None

    @classmethod
    def of(cls, path: Path, stamp: tuple[float, int], scorer: Scorer) -> "Checkpoint":
        w = scorer.window
        return cls(path, stamp, scorer, (w.features, w.scales, w.gap, w.step), scorer.scaling_id)


def window_key(w: SignatureWindow) -> tuple:
    """(features, scales, gap, step) of a window, as :attr:`Checkpoint.key` names them."""
    return (tuple(w.features), tuple(w.scales), w.gap, w.step)


class CheckpointFolder:
    """MSCRED checkpoints in a folder, loaded lazily and reloaded when they change.

    ``loader`` (path -> Scorer) replaces :meth:`MSCREDScorer.from_checkpoint` (tests)."""

    def __init__(self, cfg: ModelsConfig | None = None, loader: Callable[[Path], Scorer] | None = None):
        self.cfg = cfg or ModelsConfig()
        self.folder = Path(self.cfg.models) if self.cfg.models else None
        self.models: dict[Path, Checkpoint] = {}
        self._bad: dict[Path, tuple] = {}
        self._last_scan = -1e18
        self._loader = loader or self._load_mscred
        self.loaded_total = 0

    def _load_mscred(self, path: Path) -> Scorer:
        from .mscred import MSCREDScorer  # torch: only once there is a checkpoint

        return MSCREDScorer.from_checkpoint(path, device=self.cfg.torch_device, amp=self.cfg.amp,
                                            threads=self.cfg.threads or None)

    def scan(self, now: float | None = None, force: bool = False) -> None:
        """Load new or replaced checkpoints and unload removed ones, at most every ``reload_s`` (or now)."""
        now = time.monotonic() if now is None else now
        if self.folder is None or (not force and now - self._last_scan < self.cfg.reload_s):
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
                sc = self._loader(p)
            except Exception as e:  # CheckpointError says what is wrong and what to do
                self._bad[p] = stamp
                log.error("skipping checkpoint %s: %s", p, e)
                continue
            self.models[p] = Checkpoint.of(p, stamp, sc)
            self._bad.pop(p, None)
            self.loaded_total += 1
            log.info("loaded %s from %s (%d features)%s", sc.model_id, p.name, len(sc.window.features or ()),
                     " (replaced)" if cur else "")
        for p in set(self.models) - seen:
            log.info("checkpoint %s was removed; its model is unloaded", p.name)
            del self.models[p]

    def match(self, w: SignatureWindow) -> Checkpoint | None:
        """The checkpoint that scores ``w``, or None."""
        key = window_key(w)
        best = None
        for m in self.models.values():
            if m.key != key or (m.scaling_id is not None and w.scaling_id and m.scaling_id != w.scaling_id):
                continue
            # prefer a checkpoint made for this scaling, then the newest
            rank = (m.scaling_id is not None, m.stamp[0])
            if best is None or rank > best[0]:
                best = (rank, m)
        return best[1] if best else None
