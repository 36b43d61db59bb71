"""The one interface every scorer implements (MSCRED, compressed sensing, baselines).

The detector's engine and ``osad evaluate`` only know this interface, so they never care which
model they run. Everything they use is stated here; nothing is probed with ``getattr``.

A scorer sees *windows*: the self-contained inputs built by the featurizer. One window is

* ``signatures``: float32 [step, S, N, N] multi-scale signature matrices (MSCRED's input), and
* ``values``: float32 [T, N], the last T = max(scales) min-max scaled samples, oldest first.

A batch stacks windows of many entities with the same feature set: [B, step, S, N, N] and
[B, T, N]. A scorer that reads values only (``uses_signatures = False``) is handed batches whose
``signatures`` is None. ``score`` returns one score per window (higher = more anomalous, causal:
it uses the window only) and a per-feature contribution [B, N] (non-negative; ranks root-cause
features).

The contract, for each scorer:

* ``model_id``: names the scorer and its state (its Scores carry it);
* ``uses_signatures`` / ``needs_fit``: the input it reads, and whether it can score before a fit;
* ``window``: the windows it takes (:class:`WindowSpec`: the gap its score covers, and the
  features, scales and step when it is bound to them, as a trained MSCRED is);
* ``threshold``: its own calibrated alarm threshold, or None (the alerter then fits one);
* ``scaling_id``: the min-max scaling it is restricted to, or None (any);
* ``train_info``: how it was fitted (empty when that is nothing worth recording);
* ``options()`` and ``clone(**overrides)``: its constructor options, and a new, unfitted scorer
  with the same options except those given (``scorer.clone(gap=5)``);
* ``fit(windows)`` and ``score(windows)``.

Example::

    >>> import numpy as np
    >>> from osad.detector.base import WindowBatch
    >>> b = WindowBatch(signatures=np.zeros((2, 5, 3, 4, 4), np.float32), values=np.zeros((2, 60, 4), np.float32))
    >>> b.size, b.n_features
    (2, 4)
    >>> WindowBatch(None, np.zeros((3, 60, 4), np.float32)).size  # values only
    3
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass
class WindowBatch:
    signatures: np.ndarray | None  # [B, step, S, N, N] float32; None for scorers that read values only
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


@dataclass(frozen=True)
class WindowSpec:
    """The windows a scorer takes: ``gap`` (the newest samples its score covers) always; ``features``,
    ``scales`` and ``step`` when it is bound to them (None: any)."""

    gap: int
    features: tuple[str, ...] | None = None
    scales: tuple[int, ...] | None = None
    step: int | None = None


class Scorer(ABC):
    """fit on normal windows, then score batches (see the module docstring for the whole contract)."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Names the scorer and its state."""

    @property
    @abstractmethod
    def uses_signatures(self) -> bool:
        """True: fit/score read ``WindowBatch.signatures``; False: values only (signatures may be None)."""

    @property
    @abstractmethod
    def needs_fit(self) -> bool:
        """True when the scorer cannot score before :meth:`fit`."""

    @property
    @abstractmethod
    def window(self) -> WindowSpec:
        """The windows this scorer takes."""

    @property
    def threshold(self) -> float | None:
        """The scorer's own calibrated threshold; None: it has none (the alerter fits one)."""
        return None

    @property
    def scaling_id(self) -> str | None:
        """The min-max scaling this scorer is restricted to; None: any."""
        return None

    @property
    def train_info(self) -> Mapping[str, Any]:
        """How the scorer was fitted (what a checkpoint records); empty when there is nothing to say."""
        return {}

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The constructor options this scorer was made with (``type(self)(**options())`` is an
        unfitted copy)."""

    def clone(self, **overrides) -> "Scorer":
        """A new, unfitted scorer with the same options except ``overrides``."""
        return type(self)(**{**self.options(), **overrides})

    @abstractmethod
    def fit(self, windows: WindowBatch) -> "Scorer":
        """Learn what normal looks like from normal windows. Returns self."""

    @abstractmethod
    def score(self, windows: WindowBatch) -> ScoreBatch:
        """Score a batch of windows (causal: each window alone)."""
