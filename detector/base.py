"""The one small interface every scorer implements (MSCRED, compressed sensing, baselines).

The detector service only knows this interface, so it never cares which model it runs.

A scorer sees *windows*: the self-contained inputs built by the featurizer. One window is

* ``signatures``: float32 [step, S, N, N] multi-scale signature matrices (MSCRED's input), and
* ``values``: float32 [T, N], the last T = max(scales) min-max scaled samples, oldest first.

A batch stacks windows of many entities with the same feature set: [B, step, S, N, N] and
[B, T, N]. ``score`` returns one score per window (higher = more anomalous, causal: it uses the
window only) and a per-feature contribution [B, N] (non-negative; ranks root-cause features).

Example::

    >>> import numpy as np
    >>> from detector.base import WindowBatch
    >>> b = WindowBatch(signatures=np.zeros((2, 5, 3, 4, 4), np.float32), values=np.zeros((2, 60, 4), np.float32))
    >>> b.size, b.n_features
    (2, 4)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class WindowBatch:
    signatures: np.ndarray  # [B, step, S, N, N] float32
    values: np.ndarray  # [B, T, N] float32

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.values.shape[-1])


@dataclass
class ScoreBatch:
    scores: np.ndarray  # [B] float64
    contributions: np.ndarray  # [B, N] float64, >= 0
    detail: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B], model-specific extras


class Scorer(ABC):
    """fit on normal windows, then score batches. ``model_id`` names the scorer and its state."""

    #: True when the scorer can score before any fit (compressed sensing, L2 with defaults).
    needs_fit: bool = True

    @property
    @abstractmethod
    def model_id(self) -> str: ...

    @abstractmethod
    def fit(self, windows: WindowBatch) -> "Scorer":
        """Learn what normal looks like from normal windows. Returns self."""

    @abstractmethod
    def score(self, windows: WindowBatch) -> ScoreBatch:
        """Score a batch of windows (causal: each window alone)."""
