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
``os.replace``), so a crash or two replicas writing at once leave either file whole. A file that cannot
be used (truncated, not an npz, its ``meta`` not the JSON object this module writes, arrays of the wrong
shape or not finite, a folder or a dangling link in its place) is reported (ERROR, naming the file and
what is wrong) and moved aside to ``NAME.corrupt-<UTC time>`` (kept for inspection, never deleted); that
entity calibrates again, as if the file were absent, the others are not affected, and no window is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from osad.runtime.files import not_a_file, set_aside

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
        gap of the windows in hand), or None: none saved, made for something else, or unusable (then
        moved aside). Never raises for what the file holds."""
        path = self.path(entity_id)
        if not (path.exists() or path.is_symlink()):
            return None
        want = self._meta(entity_id, template, features, scaling_id)
        try:
            meta, arrays = self._read(path)
            if set(meta) != set(want):
                raise ValueError(f"its meta has keys {sorted(meta)}, not {sorted(want)}")
            if meta != want:
                diff = sorted(k for k in want if meta.get(k) != want[k])
                log.info("calibration of %s in %s is for another %s; calibrating again", entity_id, path,
                         "/".join(diff))
                self.rejected += 1
                return None
            scorer = template.with_state(arrays)
            bad = sorted(k for k in template.STATE if not np.isfinite(getattr(scorer, k)).all())
            if bad:
                raise ValueError(f"its arrays {', '.join(bad)} hold NaN or infinite values")
        except Exception as e:  # rebuildable: whatever is wrong, calibrate again (never crash the detector)
            self._bad(path, entity_id, e)
            return None
        self.restored += 1
        return scorer

    @staticmethod
    def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
        why = not_a_file(path) or (None if path.is_file() else "does not exist")
        if why:
            raise ValueError(f"it {why}")
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # every npz is a zip file
            raise ValueError("it is empty" if not head else f"it is not an npz (zip) file: it starts with {head!r}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files:
                    raise ValueError(f"it holds no meta (arrays: {sorted(z.files)[:8]})")
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except ValueError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ...: not a whole npz
            raise ValueError(f"it is not a readable npz file ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"its meta is a JSON {type(meta).__name__}, not an object")
        return meta, arrays

    def _bad(self, path: Path, entity_id: str, e: Exception) -> None:
        self.corrupt += 1
        what, moved = set_aside(path, e)
        log.error("calibration file %s of %s is unreadable (%s); %s; the entity calibrates again, as if the file were "
                  "absent", path, entity_id, what, moved)
