"""Reference scorers that every evaluation reports next to our models (see docs/evaluation.md).

They score the ``gap`` newest rows of each window (the samples a window's score applies to) and
give per-feature contributions, behind the same :class:`~detector.base.Scorer` interface:

* :class:`PCAScorer`: reconstruction error of principal component analysis fitted on the training
  rows, keeping the components that cover 90% of the variance (the classic subspace detector of
  Shyu et al., "A novel anomaly detection scheme based on principal component classifier", 2003;
  the strong simple baseline of Sarfraz et al., "Position: Quo Vadis, Unsupervised Time Series
  Anomaly Detection?", ICML 2024).
* :class:`L2Scorer`: Euclidean distance from the mean of the training rows.
* :class:`RandomScorer`: uniform random scores (what chance looks like under each metric).

Example::

    >>> import numpy as np
    >>> from osad.detector.base import WindowBatch
    >>> rng = np.random.default_rng(0)
    >>> train = WindowBatch(None, rng.normal(0.5, 0.05, (50, 60, 3)))
    >>> test = rng.normal(0.5, 0.05, (2, 60, 3)); test[1, -5:, 2] += 1.0
    >>> out = L2Scorer().fit(train).score(WindowBatch(None, test))
    >>> bool(out.scores[1] > out.scores[0]), int(out.contributions[1].argmax())
    (True, 2)
"""

from __future__ import annotations

import numpy as np

from osad.core.signature import DEFAULT_GAP
from .base import Scorer, ScoreBatch, WindowBatch, WindowSpec

__all__ = ["PCAScorer", "L2Scorer", "RandomScorer", "newest_rows", "training_rows"]


def newest_rows(windows: WindowBatch, gap: int) -> np.ndarray:
    """The ``gap`` newest rows of each window: [B, gap, N] float64."""
    v = np.asarray(windows.values, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"window values must be [B, T, N], got shape {v.shape}")
    return v[:, -min(gap, v.shape[1]):, :]


def training_rows(windows: WindowBatch, gap: int) -> np.ndarray:
    """Rows to fit on: the newest ``gap`` rows of every window (consecutive windows tile the series)."""
    r = newest_rows(windows, gap)
    if r.shape[0] == 0:
        raise ValueError("no training windows: give at least one window to fit on")
    return r.reshape(-1, r.shape[-1])


class PCAScorer(Scorer):
    """PCA reconstruction error: score = mean over the newest rows of ``||x - x_hat||^2``.

    ``variance`` (0.9) is the share of the training variance the kept components cover;
    contributions are the per-feature squared errors averaged over the newest rows.
    """

    needs_fit = True
    uses_signatures = False

    def __init__(self, variance: float = 0.9, gap: int = DEFAULT_GAP):
        if not 0 < variance <= 1:
            raise ValueError(f"variance must be in (0, 1], got {variance}")
        self.variance, self.gap = variance, gap
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None  # [k, N]

    @property
    def model_id(self) -> str:
        k = None if self.components_ is None else self.components_.shape[0]
        return f"pca:var={self.variance}:k={k}"

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap)

    def options(self) -> dict:
        return dict(variance=self.variance, gap=self.gap)

    def fit(self, windows: WindowBatch) -> "PCAScorer":
        x = training_rows(windows, self.gap)
        self.mean_ = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        var = s ** 2
        total = var.sum()
        k = vt.shape[0] if total <= 0 else int(np.searchsorted(np.cumsum(var) / total, self.variance - 1e-12) + 1)
        self.components_ = vt[: min(k, vt.shape[0])]
        return self

    def score(self, windows: WindowBatch) -> ScoreBatch:
        if self.components_ is None:
            raise RuntimeError("PCAScorer: call fit() on normal windows before score()")
        x = newest_rows(windows, self.gap) - self.mean_
        rec = (x @ self.components_.T) @ self.components_
        err = (x - rec) ** 2  # [B, gap, N]
        contrib = err.mean(axis=1)
        return ScoreBatch(contrib.sum(axis=1), contrib)


class L2Scorer(Scorer):
    """Distance from the training mean: score = mean over the newest rows of ``||x - mean||_2``.

    Before any fit the centre is the mean of the window's older rows (so it can score at once).
    Contributions: per-feature ``|x - mean|`` averaged over the newest rows.
    """

    needs_fit = False
    uses_signatures = False

    def __init__(self, gap: int = DEFAULT_GAP):
        self.gap = gap
        self.mean_: np.ndarray | None = None

    @property
    def model_id(self) -> str:
        return "l2:" + ("train-mean" if self.mean_ is not None else "window-mean")

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap)

    def options(self) -> dict:
        return dict(gap=self.gap)

    def fit(self, windows: WindowBatch) -> "L2Scorer":
        self.mean_ = training_rows(windows, self.gap).mean(axis=0)
        return self

    def score(self, windows: WindowBatch) -> ScoreBatch:
        x = newest_rows(windows, self.gap)
        if self.mean_ is not None:
            centre = self.mean_
        else:
            v = np.asarray(windows.values, dtype=np.float64)
            old = v[:, : max(1, v.shape[1] - x.shape[1]), :]
            centre = old.mean(axis=1, keepdims=True)
        d = x - centre
        return ScoreBatch(np.linalg.norm(d, axis=2).mean(axis=1), np.abs(d).mean(axis=1))


class RandomScorer(Scorer):
    """Uniform random scores and contributions from a seeded generator (chance level); ``gap`` only
    says which samples a score stands for."""

    needs_fit = False
    uses_signatures = False

    def __init__(self, seed: int = 0, gap: int = DEFAULT_GAP):
        self.seed, self.gap = seed, gap
        self._rng = np.random.default_rng(seed)

    @property
    def model_id(self) -> str:
        return f"random:seed={self.seed}"

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap)

    def options(self) -> dict:
        return dict(seed=self.seed, gap=self.gap)

    def fit(self, windows: WindowBatch) -> "RandomScorer":
        return self

    def score(self, windows: WindowBatch) -> ScoreBatch:
        b, n = windows.size, windows.n_features
        return ScoreBatch(self._rng.random(b), self._rng.random((b, n)))
