"""MSCRED checkpoints: one safetensors file, weights plus JSON metadata in its header.

This module reads and writes files and hands back their parts (:class:`CheckpointParts`: the
network's config and weights, the windows it takes, the scaling ranges, the score calibration,
how it was trained, the metadata document); :meth:`osad.detector.mscred.MSCREDScorer.from_checkpoint`
assembles a scorer from them and :meth:`~osad.detector.mscred.MSCREDScorer.save` hands its parts here.

Layout (no pickle anywhere; torch.load is never used):

* tensors: the model's ``state_dict`` (float32), by parameter name;
* header metadata (safetensors allows str -> str): ``format`` = ``"osad.mscred"``,
  ``format_version`` = ``"1"`` and ``osad`` = one JSON document with

  - ``features``, ``scales``, ``gap``, ``step``: the windows the model takes;
  - ``ranges``: the min-max scaling ranges (``core.signature.Ranges.to_dict``) or null;
  - ``model``: hyper-parameters (``MSCREDConfig.to_dict``);
  - ``score``: ``{kind, theta}``; ``calibration``: validation score statistics per kind
    (n, max, mean, std, q50 ... q999) and ``beta`` (threshold = beta * max);
  - ``train``: how it was trained (data, windows, epochs, losses, seed, time);
  - ``versions``: osad, torch, safetensors, python;
  - ``weights_sha256``: hash of the tensors; ``content_hash``: hash of the weights hash and
    all other metadata. Loading recomputes both, so a flipped byte or an edited header is found.

The whole document is also readable without torch: ``python -c "import json,
safetensors; print(json.loads(safetensors.safe_open('m.safetensors','np').metadata()['osad']))"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from osad import __version__
from osad.core.signature import Ranges

from .mscred_net import MSCREDConfig, weights_hash
from .score_stats import Calibration

FORMAT = "osad.mscred"
FORMAT_VERSION = 1
_REQUIRED = ("features", "scales", "gap", "step", "model", "score", "weights_sha256", "content_hash")
RETRAIN = "re-run 'osad train' to write it again"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the text names the file, what is wrong and what to do."""


@dataclass
class CheckpointParts:
    """What a checkpoint holds, parsed (metadata checked, weights verified against their hash)."""

    features: list[str]
    scales: tuple[int, ...]
    gap: int
    step: int
    ranges: Ranges | None
    config: MSCREDConfig
    score_kind: str
    theta: float
    calibration: Calibration
    train_info: dict
    weights: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # the metadata document as read (empty before writing)


def _content_hash(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_metadata(parts: CheckpointParts) -> dict:
    """The metadata document of ``parts`` (versions, creation time and both hashes included)."""
    meta = {
        "features": list(parts.features),
        "scales": list(parts.scales),
        "gap": parts.gap,
        "step": parts.step,
        "ranges": parts.ranges.to_dict() if parts.ranges is not None else None,
        "model": parts.config.to_dict(),
        "score": {"kind": parts.score_kind, "theta": parts.theta},
        "calibration": parts.calibration.to_dict(),
        "train": parts.train_info,
        "versions": {"osad": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
                     "python": platform.python_version()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights_sha256": weights_hash(parts.weights),
    }
    meta["content_hash"] = _content_hash(meta)
    return meta


def save_checkpoint(parts: CheckpointParts, path) -> str:
    """Write ``parts`` to ``path`` atomically (temp file + rename). Returns the content hash."""
    path = Path(path)
    meta = build_metadata(parts)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in parts.weights.items()}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "osad": json.dumps(meta, sort_keys=True, allow_nan=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta["content_hash"]


def read_metadata(path) -> dict:
    """The checkpoint's metadata document, validated (format, required keys, content hash)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"checkpoint {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                              f"point it at a file 'osad train' wrote, or train one with 'osad train ... --out {path}'")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with 'osad train ... --out {path}'")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .safetensors file 'osad train' wrote")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e}); check that this user may read "
                              "it") from None
    if len(head) < 8:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({len(head)} bytes); it may be "
                              f"truncated or corrupt: {RETRAIN}")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) types
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); it may be truncated or "
                              f"corrupt: {RETRAIN}") from None
    if header.get("format") != FORMAT or "osad" not in header:
        raise CheckpointError(f"checkpoint {path} is a safetensors file but not an osad MSCRED checkpoint (no "
                              f"'{FORMAT}' metadata); give a file written by 'osad train'")
    try:
        version = int(header.get("format_version", ""))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {header.get('format_version')!r}; this osad reads "
                              f"version {FORMAT_VERSION}: {RETRAIN} with this osad")
    try:
        meta = json.loads(header["osad"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: its metadata is not valid JSON ({e}); {RETRAIN}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata is not a JSON object; {RETRAIN}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: metadata lacks {missing}; {RETRAIN}")
    if _content_hash(meta) != meta["content_hash"]:
        raise CheckpointError(f"checkpoint {path}: metadata does not match its content hash (edited or corrupt); "
                              f"{RETRAIN}")
    return meta


def inconsistent(path, e: Exception) -> CheckpointError:
    """The error for metadata that parses but does not describe a usable model."""
    return CheckpointError(f"checkpoint {path}: inconsistent metadata ({e}); {RETRAIN}")


def load_checkpoint(path) -> CheckpointParts:
    """Read and verify a checkpoint: its metadata (format, hash), its parts and its weights (hash)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        cfg = MSCREDConfig.from_dict(meta["model"])
        ranges = Ranges.from_dict(meta["ranges"], where=f"checkpoint {path} ranges") if meta.get("ranges") else None
        calibration = Calibration.from_dict(meta.get("calibration") or {})
        features = [str(f) for f in meta["features"]]
        if len(features) != cfg.n_features:
            raise ValueError(f"{len(features)} feature names for a model of {cfg.n_features} features")
        if ranges is not None and list(ranges.features) != features:
            raise ValueError("scaling ranges are for other features than the model")
        parts = CheckpointParts(features=features, scales=tuple(int(s) for s in meta["scales"]), gap=int(meta["gap"]),
                                step=int(meta["step"]), ranges=ranges, config=cfg, score_kind=meta["score"]["kind"],
                                theta=float(meta["score"]["theta"]), calibration=calibration,
                                train_info=meta.get("train") or {}, weights={}, meta=meta)
    except (KeyError, TypeError, ValueError) as e:
        raise inconsistent(path, e) from None
    try:
        parts.weights = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); it may be truncated or "
                              f"corrupt: {RETRAIN}") from None
    if weights_hash(parts.weights) != meta["weights_sha256"]:
        raise CheckpointError(f"checkpoint {path}: the weights do not match the hash recorded when it was written "
                              f"(corrupt file); {RETRAIN}")
    return parts


def check_weights_fit(path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` has exactly the names and shapes of ``expected``
    (the state_dict of the model the checkpoint's metadata describes)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [f"{k} {list(tensors[k].shape)} != {list(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"checkpoint {path}: its tensors do not fit the model its metadata describes "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {bad_shape[:5]}); "
                              f"{RETRAIN}")
