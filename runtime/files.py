"""Files a service reads back at start: why one cannot be read, and moving a bad one aside.

Used for rebuildable state (the featurizer's learned ranges, the detector's calibrations): a file that cannot
be used is renamed, never deleted, and the service starts that entity afresh (docs/reliability.md, "Bad state
on disk").
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (a dangling symbolic link, a folder, ...), or None.

    >>> not_a_file(Path("/"))
    'is a folder, not a file'
    """
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    if path.exists() and not path.is_file():
        return "is not a regular file"
    return None


def move_aside(path: Path) -> Path:
    """Rename a bad file (or folder, or link) to ``NAME.corrupt-<UTC time>`` beside it, never replacing
    anything; returns the new path (OSError if it cannot be renamed)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        dest = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
        if not dest.exists() and not dest.is_symlink():
            os.rename(path, dest)
            return dest
    raise OSError(f"too many {path.name}.corrupt-{stamp}* files beside it")


def set_aside(path: Path, error: Exception) -> tuple[str, str]:
    """Move the bad file ``path`` aside (:func:`move_aside`); returns what was wrong with it (``error`` as a
    phrase) and what became of it, for the caller's one ERROR line."""
    what = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    try:
        moved = f"moved it to {move_aside(path).name} (kept for inspection)"
    except OSError as err:
        moved = f"could not move it aside ({err})"
    return what, moved
