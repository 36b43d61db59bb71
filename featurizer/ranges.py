"""Where an entity's min-max scaling ranges come from, and where learned ones are kept.

* a ranges file (``--ranges``): JSON ``{"entities": {entity_id: {features, min, max[, clip]}},
  "default": {...}}`` (``default`` optional; used for entities not listed). ``osad replay
  --write-ranges`` writes one from a data set's train split; ``osad train`` checkpoints hold the
  same structure.
* the state folder (``--state-dir``): ranges learned online by calibration are persisted there,
  one JSON file per entity, so a restarted (or another) featurizer replica scales identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from osad.core.signature import Ranges, read_ranges_file

log = logging.getLogger("osad.featurizer")


class RangesStore:
    def __init__(self, ranges_file: str | None = None, state_dir: str | None = None):
        self.fixed: dict[str, Ranges] = {}
        self.default: Ranges | None = None
        if ranges_file:
            self._load_file(ranges_file)
        self.state_dir = Path(state_dir) / "ranges" if state_dir else None
        if self.state_dir:
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"--state-dir {state_dir}: cannot create {self.state_dir}: {e}") from None

    def _load_file(self, path: str) -> None:
        self.fixed, self.default = read_ranges_file(path)
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
            if p.exists():
                try:
                    d = json.loads(p.read_text())
                    if d.get("entity_id") == entity_id:
                        return Ranges.from_dict(d, str(p))
                except (OSError, ValueError) as e:
                    log.warning("ignoring unreadable learned ranges %s (%s); the entity calibrates again", p, e)
        return self.default

    def save(self, entity_id: str, ranges: Ranges) -> None:
        if not self.state_dir:
            return
        p = self._path(entity_id)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"entity_id": entity_id, **ranges.to_dict()}))
        os.replace(tmp, p)
