"""Per-entity compressed-sensing calibrations on disk (``osad detect --state-dir``).

The engine calibrates each entity's compressed sensing on its first windows
(:class:`~osad.detector.cs.CalibratedCSScorer`). Kept only in memory, that calibration is lost when a
detector restarts, and a replica that takes over an entity's partition after a rebalance must collect
the windows again, scoring meanwhile with the jump-start model. With a state folder the engine saves
each calibration when it is made and looks for one before it starts collecting: a restarted detector,
or another replica sharing the folder (compose's ``detector-state`` volume), goes on with the same
calibration at once. The folder also backs the engine's bounded in-memory LRU: an entity dropped from
memory is read back when it returns.

One file per entity, ``<sha256(entity id)[:40]>.npz`` (numpy's zip of arrays, read without pickle):
the fitted arrays and a JSON ``meta`` (entity id, features, gap, scaling id, the unfitted scorer's
``model_id``). A calibration is used only when all of those match the window in hand and the
configured scorer: a changed option, feature set or featurizer scaling makes the entity calibrate
again (and the new file replaces the old). Files are written atomically (a temporary file, then
``os.replace``), so a crash or two replicas writing at once leave either file whole. An unreadable file
is reported and moved aside to ``*.corrupt``; the entity calibrates again: no window is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .cs import CalibratedCSScorer

log = logging.getLogger("osad.detector")

FORMAT = 1


class CalibrationStore:
    """Saves and restores fitted :class:`CalibratedCSScorer` s, one file per entity in ``folder``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--state-dir {self.folder}: cannot create it ({e.strerror}); give a writable folder") from None
        if not os.access(self.folder, os.W_OK):
            raise OSError(f"--state-dir {self.folder}: not writable by this user; give a writable folder")
        self.saved = self.restored = self.rejected = self.corrupt = 0

    def path(self, entity_id: str) -> Path:
        return self.folder / (hashlib.sha256(entity_id.encode()).hexdigest()[:40] + ".npz")

    @staticmethod
    def _meta(entity_id: str, template: CalibratedCSScorer, features, scaling_id: str) -> dict:
        return {"format": FORMAT, "entity_id": entity_id, "features": list(features), "gap": template.cs.gap,
                "scaling_id": scaling_id or "", "model_id": template.clone().model_id}

    def save(self, entity_id: str, scorer: CalibratedCSScorer, features, scaling_id: str = "") -> None:
        meta = self._meta(entity_id, scorer, features, scaling_id)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **scorer.state())
            os.replace(tmp, self.path(entity_id))
            self.saved += 1
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, entity_id: str, template: CalibratedCSScorer, features, scaling_id: str = "") \
            -> CalibratedCSScorer | None:
        """The entity's saved calibration as a fitted copy of ``template`` (the unfitted scorer, with the
        gap of the windows in hand), or None: none saved, made for something else, or unreadable."""
        path = self.path(entity_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
            want = self._meta(entity_id, template, features, scaling_id)
            if meta != want:
                diff = sorted(k for k in want if meta.get(k) != want[k])
                log.info("calibration of %s in %s is for another %s; calibrating again", entity_id, path,
                         "/".join(diff))
                self.rejected += 1
                return None
            scorer = template.with_state(arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            bad = path.with_suffix(".corrupt")
            log.warning("calibration file %s of %s is unreadable (%s); moved to %s, calibrating again", path,
                        entity_id, e, bad.name)
            try:
                os.replace(path, bad)
            except OSError:
                pass
            self.corrupt += 1
            return None
        self.restored += 1
        return scorer
