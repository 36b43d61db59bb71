"""Where an entity's min-max scaling ranges come from, and where learned ones are kept.

* a ranges file (``--ranges``): JSON ``{"entities": {entity_id: {features, min, max[, clip]}},
  "default": {...}}`` (``default`` optional; used for entities not listed). ``osad replay
  --write-ranges`` writes one from a data set's train split; ``osad train`` checkpoints hold the
  same structure.
* the state folder (``--state-dir``): ranges learned online by calibration are persisted there,
  one JSON file per entity, so a restarted (or another) featurizer replica scales identically.

Bad files. The ranges file is the operator's: one that cannot be used (missing, a folder, truncated,
not JSON, the wrong structure, a clip that is not a positive number) stops the featurizer before it
starts, with a message naming the file, what is wrong and what to do (``ValueError``; the command
turns it into exit code 2, which ``osad up`` does not restart). A learned file is rebuildable: one that
cannot be used is reported (ERROR), moved aside to ``NAME.corrupt-<UTC time>`` (kept for inspection,
never deleted) and the entity calibrates again, as if the file were absent; other entities are not
affected. A learned file that cannot be written (a full disk, a read-only folder) is reported and the
entity goes on with its ranges in memory; only a restart would calibrate it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

from osad.core.signature import Ranges, read_ranges_file
from osad.runtime.files import move_aside, not_a_file, set_aside

log = logging.getLogger("osad.featurizer")

#: what to do about a ranges file that cannot be used
RANGES_WAY_OUT = ("write it {again}(`osad replay DATASET --dry-run --write-ranges {path}`), give another --ranges, "
                  "or start without --ranges (each entity then calibrates its ranges online)")


def check_ranges(r: Ranges, where: str) -> Ranges:
    """``r``, or ValueError when its clip is not a positive finite number (the scaling would give NaN)."""
    if not (math.isfinite(r.clip) and r.clip > 0):
        raise ValueError(f"{where}: clip must be a positive number, got {r.clip}")
    return r


class RangesStore:
    def __init__(self, ranges_file: str | None = None, state_dir: str | None = None):
        self.fixed: dict[str, Ranges] = {}
        self.default: Ranges | None = None
        self.corrupt = 0  # learned files found unusable (each moved aside)
        if ranges_file:
            self._load_file(ranges_file)
        self.state_dir = Path(state_dir) / "ranges" if state_dir else None
        if self.state_dir:
            try:
                if Path(state_dir).is_dir() and (self.state_dir.is_symlink() or self.state_dir.exists()) \
                        and not self.state_dir.is_dir():  # our own subfolder: rebuildable
                    bad = move_aside(self.state_dir)
                    log.error("learned ranges folder %s %s; moved it to %s (kept for inspection); every entity "
                              "without a --ranges entry calibrates again", self.state_dir,
                              not_a_file(self.state_dir) or "is not a folder", bad.name)
                self.state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"--state-dir {state_dir}: cannot create {self.state_dir}: {e}; give a writable "
                                 "folder") from None

    def _load_file(self, path: str) -> None:
        p = Path(path)
        why = not_a_file(p)
        if why:
            raise ValueError(f"ranges file {path} {why}: {RANGES_WAY_OUT.format(path=path, again='')}")
        if not p.exists():
            raise ValueError(f"ranges file {path} does not exist: {RANGES_WAY_OUT.format(path=path, again='')}")
        try:
            fixed, default = read_ranges_file(path)
            for eid, r in fixed.items():
                check_ranges(r, f"ranges file {path}: entity {eid}")
            if default is not None:
                check_ranges(default, f"ranges file {path}: default")
        except Exception as e:  # whatever the file holds: say so, never a traceback
            msg = str(e) if isinstance(e, ValueError) else f"ranges file {path}: unusable ({type(e).__name__}: {e})"
            raise ValueError(f"{msg}. It may be truncated or damaged: "
                             f"{RANGES_WAY_OUT.format(path=path, again='again ')}") from None
        self.fixed, self.default = fixed, default
        log.info("loaded scaling ranges for %d entities%s from %s", len(self.fixed),
                 " and a default" if self.default else "", path)

    def _path(self, entity_id: str) -> Path:
        h = hashlib.sha1(entity_id.encode()).hexdigest()[:20]
        return self.state_dir / f"{h}.json"

    def lookup(self, entity_id: str) -> Ranges | None:
        r = self.fixed.get(entity_id)
        if r is not None:
            return r
        if self.state_dir:
            p = self._path(entity_id)
            if p.exists() or p.is_symlink():
                try:
                    return self._read_learned(p, entity_id)
                except Exception as e:  # rebuildable: any fault means "calibrate again", never a crash
                    self._bad(p, entity_id, e)
        return self.default

    @staticmethod
    def _read_learned(p: Path, entity_id: str) -> Ranges:
        why = not_a_file(p)
        if why:
            raise ValueError(why)
        try:
            d = json.loads(p.read_text())
        except ValueError as e:  # also a UnicodeDecodeError
            raise ValueError(f"not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"holds a JSON {type(d).__name__}, not an object")
        if "entity_id" not in d:
            raise ValueError("has no entity_id")
        if d["entity_id"] != entity_id:
            raise ValueError(f"holds the ranges of entity {d['entity_id']!r}")
        return check_ranges(Ranges.from_dict(d, "learned ranges"), "learned ranges")

    def _bad(self, p: Path, entity_id: str, e: Exception) -> None:
        self.corrupt += 1
        what, moved = set_aside(p, e)
        log.error("learned scaling ranges %s of entity %s are unreadable (%s); %s; the entity calibrates again, as if "
                  "the file were absent", p, entity_id, what, moved)

    def save(self, entity_id: str, ranges: Ranges) -> None:
        if not self.state_dir:
            return
        p = self._path(entity_id)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".tmp-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"entity_id": entity_id, **ranges.to_dict()}))
            os.replace(tmp, p)
        except OSError as e:  # a full disk, a read-only folder: windowing goes on with the ranges in memory
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            log.error("cannot save the learned scaling ranges of %s to %s (%s); the entity goes on with them in "
                      "memory, but a restarted featurizer would calibrate it again", entity_id, p, e)
