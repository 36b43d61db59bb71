"""MSCRED signature matrices (Zhang et al., AAAI 2019, section "Characterizing Status with
Signature Matrices") and the min-max scaling they are computed on.

At time t and scale w, M_ij(t) = (1/w) * sum_{d=0}^{w-1} x_i(t-d) * x_j(t-d).

A *window* ending at sample index t stacks ``step`` signature tensors ending at
t - (step-1)*gap, ..., t - gap, t (oldest first), each with one channel per scale, so it needs
``span(scales, gap, step) = max(scales) + (step-1)*gap`` consecutive samples. Windows end at
the indices t with (t + 1) % gap == 0 (t counted from the start of the series, i.e. a Sample's
``seq``), so offline evaluation and the streaming featurizer cut exactly the same windows.

This module is the vectorised reference used offline (training, evaluation) and by tests; the
featurizer keeps the same sums incrementally per entity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DEFAULT_SCALES = (10, 30, 60)
DEFAULT_GAP = 10
DEFAULT_STEP = 5
DEFAULT_CLIP = 10.0
# Beyond this many ranges a value counts as this many (so inf and absurd counters stay finite).
SQUASH_CAP = 1e9


def squash(z: np.ndarray, clip: float, out: np.ndarray | None = None) -> np.ndarray:
    """Soft clip: identity on [-clip, clip]; beyond, ``sign(z) * clip * (1 + ln(|z| / clip))``.

    Continuous and strictly increasing, so a wild value cannot swamp a model (a value 1,000 ranges
    out becomes 56 with clip 10, a billion 217) and yet a bigger change still scores bigger: a syscall
    storm 4,000 ranges out ranks above the CPU it burns at 20 ranges, where a hard clip at 10 would
    tie them and leave the root-cause ranking to noise. ``out`` may be ``z`` (in place).
    """
    if out is None:
        out = np.array(z, dtype=np.float64)
    elif out is not z:
        np.copyto(out, z)
    a = np.abs(out)
    big = a > clip
    if big.any():
        ab = np.minimum(a[big], clip * SQUASH_CAP)
        out[big] = np.sign(out[big]) * clip * (1.0 + np.log(ab / clip))
    return out


def span(scales, gap: int, step: int) -> int:
    """Consecutive samples one window needs."""
    return max(scales) + (step - 1) * gap


def window_ends(n_samples: int, scales=DEFAULT_SCALES, gap: int = DEFAULT_GAP, step: int = DEFAULT_STEP,
                first_seq: int = 0) -> np.ndarray:
    """Indices (into a series whose first row has seq ``first_seq``) where windows end."""
    need = span(scales, gap, step)
    t = np.arange(need - 1, n_samples)
    return t[(t + first_seq + 1) % gap == 0]


def signature_windows(x: np.ndarray, ends: np.ndarray, scales=DEFAULT_SCALES, gap: int = DEFAULT_GAP,
                      step: int = DEFAULT_STEP) -> np.ndarray:
    """Signature tensors [len(ends), step, S, N, N] (float32) of the scaled series x [T, N].

    Computed from exact sums over blocks of ``g = gcd(gap, scales)`` samples in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.int64)
    n = x.shape[1]
    if ends.size == 0:
        return np.zeros((0, step, len(scales), n, n), np.float32)
    if ends.min() - (step - 1) * gap - max(scales) + 1 < 0 or ends.max() >= x.shape[0]:
        raise ValueError("a window end is too close to the start of the series or beyond its end")
    g = int(np.gcd.reduce([gap, *scales]))
    # prefix[j] = sum of x x^T over rows [0, j*g): prefix sums at block boundaries.
    nb = x.shape[0] // g
    blocks = np.einsum("bti,btj->bij", x[: nb * g].reshape(nb, g, n), x[: nb * g].reshape(nb, g, n))
    prefix = np.zeros((nb + 1, n, n))
    np.cumsum(blocks, axis=0, out=prefix[1:])
    out = np.empty((len(ends), step, len(scales), n, n), np.float32)
    tail_fix = (ends + 1) % g != 0  # only possible when gap/scales share no block boundary with the end
    if tail_fix.any():
        raise ValueError("window ends must fall on block boundaries ((end + 1) % gcd(gap, scales) == 0)")
    for k in range(step):
        t_end = ends - (step - 1 - k) * gap + 1  # exclusive end, multiple of g
        for s, w in enumerate(scales):
            out[:, k, s] = (prefix[t_end // g] - prefix[(t_end - w) // g]) / w
    return out


def signature_windows_naive(x: np.ndarray, ends, scales=DEFAULT_SCALES, gap: int = DEFAULT_GAP,
                            step: int = DEFAULT_STEP) -> np.ndarray:
    """The formula evaluated literally, window by window (for tests and as a benchmark baseline)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    out = np.empty((len(ends), step, len(scales), n, n), np.float32)
    for i, t in enumerate(ends):
        for k in range(step):
            te = t - (step - 1 - k) * gap
            for s, w in enumerate(scales):
                seg = x[te - w + 1: te + 1]
                out[i, k, s] = seg.T @ seg / w
    return out


@dataclass(frozen=True)
class Ranges:
    """Per-feature min-max ranges learned on a calibration or training period."""

    features: tuple[str, ...]
    lo: np.ndarray
    hi: np.ndarray
    clip: float = DEFAULT_CLIP

    @classmethod
    def fit(cls, features, x: np.ndarray, clip: float = DEFAULT_CLIP) -> "Ranges":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != len(features):
            raise ValueError(f"need a [T, {len(features)}] calibration array with T > 0, got {x.shape}")
        return cls(tuple(features), np.nanmin(x, axis=0), np.nanmax(x, axis=0), float(clip))

    @property
    def scale_den(self) -> np.ndarray:
        d = self.hi - self.lo
        # A constant feature keeps its offset from the constant in its own units (so a change shows).
        return np.where(d > 1e-12 * np.maximum(1.0, np.abs(self.hi)), d, 1.0)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(x - lo) / (hi - lo), soft-clipped beyond ±clip (:func:`squash`) so one wild value cannot
        swamp a model."""
        z = (np.asarray(x, dtype=np.float64) - self.lo) / self.scale_den
        return squash(z, self.clip, out=z)

    @cached_property
    def scaling_id(self) -> str:
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
        return h[:12]

    def to_dict(self) -> dict:
        return {"features": list(self.features), "min": [float(v) for v in self.lo],
                "max": [float(v) for v in self.hi], "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict, where: str = "scaling ranges") -> "Ranges":
        try:
            feats = tuple(str(f) for f in d["features"])
            lo = np.asarray(d["min"], dtype=np.float64)
            hi = np.asarray(d["max"], dtype=np.float64)
            clip = float(d.get("clip", DEFAULT_CLIP))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: expected {{features, min, max[, clip]}}: {e}") from None
        if not (len(feats) == lo.shape[0] == hi.shape[0]) or lo.ndim != 1:
            raise ValueError(f"{where}: features, min and max must have the same length")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (hi < lo).any():
            raise ValueError(f"{where}: min and max must be finite with min <= max")
        return cls(feats, lo, hi, clip)


def write_ranges_file(path, entities: dict[str, Ranges], default: Ranges | None = None) -> None:
    """Write per-entity ranges as JSON: ``{"entities": {id: ranges}, "default": ranges|null}``."""
    from pathlib import Path

    doc = {"entities": {eid: r.to_dict() for eid, r in entities.items()},
           "default": default.to_dict() if default is not None else None}
    Path(path).write_text(json.dumps(doc, indent=1))


def read_ranges_file(path) -> tuple[dict[str, Ranges], Ranges | None]:
    """Read a file written by :func:`write_ranges_file`; ValueError saying what is wrong otherwise."""
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"ranges file {path} does not exist; write one with `osad replay --write-ranges`") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"ranges file {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entities", {}), dict):
        raise ValueError(f"ranges file {path}: expected {{\"entities\": {{id: ranges}}, \"default\": ranges}}")
    ents = {eid: Ranges.from_dict(d, f"{path}: entity {eid}") for eid, d in doc.get("entities", {}).items()}
    dflt = Ranges.from_dict(doc["default"], f"{path}: default") if doc.get("default") is not None else None
    return ents, dflt
