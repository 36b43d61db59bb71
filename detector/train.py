"""What MSCRED trains on and how: the training settings, and windows from data.

Training settings (:class:`TrainConfig`, the flags of ``osad train``; ``MSCREDScorer.fit`` takes the
same names as keyword arguments). Reference training (Zhang et al., AAAI 2019, section
"Experiments"): Adam, learning rate 2e-4, loss = squared reconstruction error of the last
signature tensor. Here: mini-batches of windows (of one or many entities), the last
``val_fraction`` of each series' windows held out for validation (windows overlapping the
training period are dropped, so no sample is in both), early stopping on the validation loss
(``patience`` epochs), the best epoch's weights kept. The loop itself is
:mod:`osad.detector.mscred_train`; the calibration after it, :meth:`MSCREDScorer.fit`.

Training windows come from a benchmark entity's train split (:func:`dataset_windows`) or from
recorded collector samples (:func:`samples_windows`). Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from osad.core.datasets import load_entity
from osad.core.signature import Ranges, signature_windows, span, window_ends
from osad.runtime.config import Config, in_range, positive, setting
from osad.schemas.messages import Sample


@dataclass(frozen=True)
class TrainConfig(Config):
    """How MSCRED is trained."""

    epochs: int = setting(50, help="most training epochs", check=positive)
    batch_size: int = setting(32, help="windows per optimisation step", check=positive)
    lr: float = setting(2e-4, help="Adam learning rate (paper: 2e-4)", check=positive)
    patience: int = setting(5, help="stop after this many epochs without a better validation loss", check=positive)
    min_delta: float = 1e-3  # relative improvement of the validation loss that counts
    val_fraction: float = setting(0.2, help="share of each series' windows (its end) held out for early stopping "
                                  "and calibration", check=in_range(0, 0.9, lo_open=False))
    seed: int = setting(0, help="seed for initialisation and shuffling (same seed, same model)")
    progress: bool = setting(True, negate=True, flag="--quiet", help="no per-epoch progress on stderr")
    amp: bool = setting(False, help="bfloat16 mixed precision (CUDA, or CPUs with AMX)")


# ------------------------------------------------------------------------------------------
# windows from data
# ------------------------------------------------------------------------------------------


@dataclass
class TrainingWindows:
    """Signature windows for training and validation, and where they came from."""

    train: np.ndarray  # [n, step, S, N, N] float32
    val: np.ndarray  # [m, step, S, N, N] float32
    features: list[str]
    ranges: Ranges
    source: dict


def split_ends(ends: np.ndarray, val_fraction: float, guard: int) -> tuple[np.ndarray, np.ndarray]:
    """Split time-ordered window ends: the last ``val_fraction`` for validation, dropping the
    ``guard`` windows before it (they share samples with the first validation window)."""
    n_val = int(round(len(ends) * val_fraction))
    if val_fraction > 0 and len(ends) >= 2 * (guard + 1):
        n_val = max(n_val, 1)
    cut = len(ends) - n_val
    if n_val == 0 or cut - guard < n_val:  # too few windows to hold any out: train (and calibrate) on all
        return ends, ends[:0]
    return ends[: cut - guard], ends[cut:]


def overlap_windows(scales, gap: int, step: int) -> int:
    """How many consecutive windows share samples with a window (those before a validation split are dropped)."""
    return math.ceil(span(scales, gap, step) / gap) - 1


def _stride(n: int, max_windows: int | None) -> int:
    return 1 if not max_windows or n <= max_windows else math.ceil(n / max_windows)


def series_windows(x_scaled: np.ndarray, scales, gap: int, step: int, val_fraction: float, first_seq: int = 0,
                   stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation windows of one scaled series [T, N] (oldest row first)."""
    ends = window_ends(len(x_scaled), scales, gap, step, first_seq=first_seq)
    tr, va = split_ends(ends, val_fraction, overlap_windows(scales, gap, step))
    tr, va = tr[::stride], va[::stride]
    return (signature_windows(x_scaled, tr, scales, gap, step), signature_windows(x_scaled, va, scales, gap, step))


def dataset_windows(folder, entity: str, scales, gap: int, step: int, val_fraction: float,
                    max_windows: int | None = None) -> TrainingWindows:
    """Windows of a benchmark entity's ``train`` split; scaling ranges fit on that split."""
    ent = load_entity(folder, entity, with_test=False)
    ranges = Ranges.fit(ent.feature_names, ent.train)
    x = ranges.transform(ent.train)
    n_ends = len(window_ends(len(x), scales, gap, step))
    if n_ends == 0:
        raise ValueError(f"{ent.entity_id}: {len(x)} training rows give no window; a window needs "
                         f"{span(scales, gap, step)} consecutive samples (scales {list(scales)}, gap {gap}, step {step})")
    tr, va = series_windows(x, scales, gap, step, val_fraction, stride=_stride(n_ends, max_windows))
    source = {"kind": "dataset", "path": str(folder), "entity": ent.entity_id, "rows": int(len(x))}
    return TrainingWindows(tr, va, ent.feature_names, ranges, source)


def read_samples(path, entities=None) -> dict[str, list[dict]]:
    """Sample messages from a JSONL file (as ``osad collect --output jsonl:PATH`` writes), grouped by
    entity_id. Each line is validated as a :class:`schemas.messages.Sample`."""
    wanted = set(entities) if entities else None
    out: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                s = Sample.model_validate_json(line)
            except ValidationError as e:
                first = e.errors()[0]
                raise ValueError(f"{path}:{lineno}: not a Sample message ({first.get('loc')}: {first.get('msg')}); "
                                 "give a file recorded with 'osad collect --output jsonl:PATH'") from None
            if wanted is None or s.entity_id in wanted:
                out.setdefault(s.entity_id, []).append({"seq": s.seq, "metrics": s.metrics})
    if wanted:
        absent = sorted(wanted - set(out))
        if absent:
            raise ValueError(f"{path}: no samples for entities {absent}; entities in the file: {sorted(out)[:20]}")
    if not out:
        raise ValueError(f"{path}: holds no Sample messages")
    return out


def samples_matrix(rows: list[dict], features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(seqs [T], values [T, N]) of one entity in seq order, duplicates dropped; an absent metric is NaN."""
    by_seq = {}
    for r in rows:
        by_seq.setdefault(r["seq"], r["metrics"])
    seqs = np.array(sorted(by_seq), dtype=np.int64)
    x = np.full((len(seqs), len(features)), np.nan)
    col = {f: j for j, f in enumerate(features)}
    for i, q in enumerate(seqs):
        for name, v in by_seq[q].items():
            j = col.get(name)
            if j is not None:
                x[i, j] = v
    return seqs, x


def _ffill(x: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along time; values before a feature's first observation take ``fill``."""
    x = x.copy()
    for j in range(x.shape[1]):
        col = x[:, j]
        idx = np.where(np.isnan(col), 0, np.arange(len(col)))
        np.maximum.accumulate(idx, out=idx)
        col[:] = col[idx]
        col[np.isnan(col)] = fill[j]
    return x


def samples_windows(path, scales, gap: int, step: int, val_fraction: float, max_windows: int | None = None,
                    entities=None, features=None) -> TrainingWindows:
    """Windows of recorded samples: one series per entity (split where seq jumps), features = the
    sorted union of metric names (or ``features``), scaling ranges fit on all entities together.

    A metric absent from a sample is carried forward from the entity's previous sample (or is
    the training minimum before its first appearance). Each entity's last ``val_fraction`` of
    windows is held out for validation.
    """
    groups = read_samples(path, entities)
    if features is None:
        features = sorted({name for rows in groups.values() for r in rows for name in r["metrics"]})
    if not features:
        raise ValueError(f"{path}: the samples carry no metrics")
    mats = {e: samples_matrix(rows, features) for e, rows in groups.items()}
    allx = np.concatenate([x for _, x in mats.values()])
    if np.isnan(allx).all(axis=0).any():
        never = [f for f, m in zip(features, np.isnan(allx).all(axis=0)) if m]
        raise ValueError(f"{path}: features {never} never appear in the samples; leave them out of --features")
    ranges = Ranges.fit(features, allx)
    need = span(scales, gap, step)
    g = int(np.gcd.reduce([gap, *scales]))
    pieces = []  # (entity, first_seq, scaled segment)
    for e, (seqs, x) in mats.items():
        x = ranges.transform(_ffill(x, ranges.lo))
        cuts = np.flatnonzero(np.diff(seqs) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(seqs)]):
            a += int(-seqs[a] % g)  # start on a block boundary of seq, so windows end where the featurizer's do
            if b - a >= need:
                pieces.append((e, int(seqs[a]), x[a:b]))
    if not pieces:
        raise ValueError(f"{path}: no entity has {need} consecutive samples (one window's span for scales "
                         f"{list(scales)}, gap {gap}, step {step}); record longer")
    total = sum(len(window_ends(len(x), scales, gap, step, first_seq=q)) for _, q, x in pieces)
    stride = _stride(total, max_windows)
    trs, vas = [], []
    for _, q, x in pieces:
        tr, va = series_windows(x, scales, gap, step, val_fraction, first_seq=q, stride=stride)
        trs.append(tr)
        vas.append(va)
    source = {"kind": "samples", "path": str(path), "entities": sorted(groups), "segments": len(pieces),
              "rows": int(sum(len(x) for _, _, x in pieces))}
    return TrainingWindows(np.concatenate(trs), np.concatenate(vas), list(features), ranges, source)


def default_out(source: dict) -> Path:
    name = source.get("entity") or Path(source.get("path", "model")).stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return Path(f"mscred-{safe}.safetensors")
