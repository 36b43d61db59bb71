"""Read the benchmark data sets in their published layouts.

* SMD / ASD layout: ``{train,test,test_label,interpretation_label}/<entity>.txt``
* JumpStarter layout: ``{train,test,test_label}/<entity>.csv``

Values: comma-separated numbers, no header, one row per time step. ``interpretation_label``
lines are ``start-end:d1,d2,...`` (0-based inclusive test rows, 1-based feature numbers).
Features have no names in these sets; osad names them ``f01``, ``f02``, ... (1-based, so a
feature's name matches its number in interpretation labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_EXTS = (".txt", ".csv")
# Sampling intervals of the published sets (see shared/datasets/README.md); used for timestamps.
_INTERVALS = {"SMD": 60.0, "ASD": 300.0, "JumpStarter": 300.0, "Dataset2": 300.0}


class DatasetError(ValueError):
    """A data set folder is missing or malformed; the text says which file and what to do."""


@dataclass
class Entity:
    name: str
    dataset: str
    train: np.ndarray  # [T_train, N] float64
    test: np.ndarray | None = None  # [T_test, N]
    test_label: np.ndarray | None = None  # [T_test] int8
    interpretation: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (start, end, 0-based features)
    interval_s: float = 60.0

    @property
    def n_features(self) -> int:
        return int(self.train.shape[1])

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.n_features)

    @property
    def entity_id(self) -> str:
        return f"{self.dataset}/{self.name}"


def feature_names(n: int) -> list[str]:
    return [f"f{i + 1:02d}" for i in range(n)]


def _read_matrix(path: Path) -> np.ndarray:
    try:
        a = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DatasetError(f"{path}: not a comma-separated numeric table ({e})") from None
    if a.size == 0:
        raise DatasetError(f"{path}: file is empty")
    return a


def _find(folder: Path, name: str) -> Path | None:
    for ext in _EXTS:
        p = folder / (name + ext)
        if p.exists():
            return p
    return None


def resolve_root(path: str | Path) -> Path:
    """The folder that holds train/ (accepts a data set folder or its single sub-folder, e.g. JumpStarter)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; give a data set folder that holds train/ (and test/): a slice "
                           "of SMD and ASD is in the repository (tests/data/datasets/SMD, .../ASD); the full sets "
                           "are in ../shared/datasets where that exists, or come from their publishers (see "
                           "docs/evaluation.md)")
    if (root / "train").is_dir():
        return root
    subs = [d for d in sorted(root.iterdir()) if (d / "train").is_dir()]
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise DatasetError(f"{root}: has no train/ folder (SMD/ASD/JumpStarter layout expected)")
    raise DatasetError(f"{root}: holds several data sets ({', '.join(d.name for d in subs)}); name one")


def list_entities(path: str | Path) -> list[str]:
    root = resolve_root(path)
    return sorted(p.stem for p in (root / "train").iterdir() if p.suffix in _EXTS)


def dataset_name(path: str | Path) -> str:
    root = resolve_root(path)
    return root.parent.name if root.name.startswith("Dataset") else root.name


def load_entity(path: str | Path, name: str, with_test: bool = True) -> Entity:
    root = resolve_root(path)
    train_p = _find(root / "train", name)
    if train_p is None:
        raise DatasetError(f"{root}/train has no file for entity {name!r}; entities: {', '.join(list_entities(root))}")
    ds = dataset_name(root)
    ent = Entity(name=name, dataset=ds, train=_read_matrix(train_p), interval_s=_INTERVALS.get(ds, _INTERVALS.get(root.name, 60.0)))
    if not with_test:
        return ent
    test_p = _find(root / "test", name)
    if test_p is not None:
        ent.test = _read_matrix(test_p)
        if ent.test.shape[1] != ent.n_features:
            raise DatasetError(f"{test_p}: {ent.test.shape[1]} columns, train has {ent.n_features}")
        lab_p = _find(root / "test_label", name)
        if lab_p is not None:
            lab = _read_matrix(lab_p).reshape(-1)
            if lab.shape[0] != ent.test.shape[0]:
                raise DatasetError(f"{lab_p}: {lab.shape[0]} labels for {ent.test.shape[0]} test rows")
            ent.test_label = (lab > 0).astype(np.int8)
    ip = root / "interpretation_label" / (name + ".txt")
    if ip.exists():
        ent.interpretation = parse_interpretation(ip.read_text(), ent.n_features, str(ip))
    return ent


def parse_interpretation(text: str, n_features: int, where: str = "interpretation_label") -> list[tuple[int, int, list[int]]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            span, feats = line.split(":")
            a, b = span.split("-")
            fs = [int(x) - 1 for x in feats.split(",") if x.strip()]
        except ValueError:
            raise DatasetError(f"{where}:{lineno}: expected 'start-end:d1,d2,...', got {line!r}") from None
        if any(f < 0 or f >= n_features for f in fs):
            raise DatasetError(f"{where}:{lineno}: feature number outside 1..{n_features}")
        out.append((int(a), int(b), fs))
    return out
