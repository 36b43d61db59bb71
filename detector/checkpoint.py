"""MSCRED checkpoints: one safetensors file, weights plus JSON metadata in its header.

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
from pathlib import Path

FORMAT = "osad.mscred"
FORMAT_VERSION = 1
_REQUIRED = ("features", "scales", "gap", "step", "model", "score", "weights_sha256", "content_hash")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the text names the file, what is wrong and what to do."""


def _content_hash(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_metadata(scorer) -> dict:
    import safetensors
    import torch

    from osad.detector.mscred import weights_hash
    from osad import __version__

    state = scorer.model.state_dict()
    meta = {
        "features": list(scorer.features),
        "scales": list(scorer.scales),
        "gap": scorer.gap,
        "step": scorer.step,
        "ranges": scorer.ranges.to_dict() if scorer.ranges is not None else None,
        "model": scorer.config.to_dict(),
        "score": {"kind": scorer.score_kind, "theta": scorer.theta},
        "calibration": scorer.calibration.to_dict(),
        "train": scorer.train_info,
        "versions": {"osad": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
                     "python": platform.python_version()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights_sha256": weights_hash(state),
    }
    meta["content_hash"] = _content_hash(meta)
    return meta


def save_checkpoint(scorer, path) -> str:
    """Write ``scorer`` to ``path`` atomically (temp file + rename). Returns the content hash."""
    from safetensors.torch import save_file

    if scorer.model is None:
        raise CheckpointError("nothing to save: the MSCRED scorer has not been trained")
    path = Path(path)
    meta = build_metadata(scorer)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in scorer.model.state_dict().items()}
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
    from safetensors import safe_open

    path = Path(path)
    retrain = "re-run 'osad train' to write it again"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with 'osad train ... --out {path}'")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .safetensors file 'osad train' wrote")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) types
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); it may be truncated or "
                              f"corrupt: {retrain}") from None
    if header.get("format") != FORMAT or "osad" not in header:
        raise CheckpointError(f"checkpoint {path} is a safetensors file but not an osad MSCRED checkpoint (no "
                              f"'{FORMAT}' metadata); give a file written by 'osad train'")
    try:
        version = int(header.get("format_version", ""))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {header.get('format_version')!r}; this osad reads "
                              f"version {FORMAT_VERSION}: {retrain} with this osad")
    try:
        meta = json.loads(header["osad"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: its metadata is not valid JSON ({e}); {retrain}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata is not a JSON object; {retrain}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: metadata lacks {missing}; {retrain}")
    if _content_hash(meta) != meta["content_hash"]:
        raise CheckpointError(f"checkpoint {path}: metadata does not match its content hash (edited or corrupt); "
                              f"{retrain}")
    return meta


def load_checkpoint(path, *, device=None, amp: bool = False, score_kind: str | None = None, threads=None,
                    batch_size: int = 256):
    """Load and verify a checkpoint; returns a ready :class:`~detector.mscred.MSCREDScorer`."""
    import torch
    from safetensors.torch import load_file

    from osad.core.signature import Ranges
    from osad.detector.mscred import Calibration, MSCREDConfig, MSCREDScorer, pick_device, weights_hash

    path = Path(path)
    retrain = "re-run 'osad train' to write it again"
    meta = read_metadata(path)
    device = pick_device(device)  # its own error (no CUDA) is not the checkpoint's fault
    try:
        cfg = MSCREDConfig.from_dict(meta["model"])
        ranges = Ranges.from_dict(meta["ranges"], where=f"checkpoint {path} ranges") if meta.get("ranges") else None
        calibration = Calibration.from_dict(meta.get("calibration") or {})
        features = [str(f) for f in meta["features"]]
        if len(features) != cfg.n_features:
            raise ValueError(f"{len(features)} feature names for a model of {cfg.n_features} features")
        if ranges is not None and list(ranges.features) != features:
            raise ValueError("scaling ranges are for other features than the model")
        scorer = MSCREDScorer(features, scales=meta["scales"], gap=meta["gap"], step=meta["step"], ranges=ranges,
                              config=cfg, score_kind=score_kind or meta["score"]["kind"],
                              theta=meta["score"]["theta"], beta=calibration.beta, device=device, amp=amp,
                              threads=threads, batch_size=batch_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: inconsistent metadata ({e}); {retrain}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); it may be truncated or "
                              f"corrupt: {retrain}") from None
    expected = scorer.model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [f"{k} {list(tensors[k].shape)} != {list(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"checkpoint {path}: its tensors do not fit the model its metadata describes "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {bad_shape[:5]}); {retrain}")
    if weights_hash(tensors) != meta["weights_sha256"]:
        raise CheckpointError(f"checkpoint {path}: the weights do not match the hash recorded when it was written "
                              f"(corrupt file); {retrain}")
    with torch.no_grad():
        scorer.model.load_state_dict(tensors, strict=True)
    scorer.calibration = calibration
    scorer.train_info = meta.get("train") or {}
    scorer.checkpoint_meta = meta
    scorer.checkpoint_path = str(path)
    return scorer
