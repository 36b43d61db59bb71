"""A score's statistics on normal validation windows, and the threshold calibrated from them.

MSCRED stores them in its checkpoints (both score kinds); the reference threshold is
``beta * max(validation score)`` (Zhang et al., AAAI 2019, section "Anomaly score": beta = 1.5).

Example::

    >>> import numpy as np
    >>> cal = Calibration({"sse": ScoreStats.of(np.array([1.0, 2.0, 4.0]))})
    >>> cal.threshold("sse"), cal.threshold("broken")
    (6.0, None)
    >>> Calibration.from_dict(cal.to_dict()) == cal
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_BETA = 1.5


@dataclass
class ScoreStats:
    """Statistics of a score on normal validation windows, for threshold calibration."""

    n: int
    max: float
    mean: float
    std: float
    q50: float
    q90: float
    q95: float
    q99: float
    q999: float

    @classmethod
    def of(cls, s: np.ndarray) -> "ScoreStats":
        s = np.asarray(s, np.float64)
        if s.size == 0:
            return cls(0, *([math.nan] * 8))
        q = np.quantile(s, [0.5, 0.9, 0.95, 0.99, 0.999])
        return cls(int(s.size), float(s.max()), float(s.mean()), float(s.std()), *map(float, q))


@dataclass
class Calibration:
    """Validation score statistics per score kind, and the reference threshold beta * max."""

    stats: dict[str, ScoreStats] = field(default_factory=dict)
    beta: float = DEFAULT_BETA

    def threshold(self, kind: str) -> float | None:
        st = self.stats.get(kind)
        if st is None or st.n == 0:
            return None
        return float(self.beta * st.max)

    def to_dict(self) -> dict:
        return {"beta": self.beta, "stats": {k: asdict(v) for k, v in self.stats.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls({k: ScoreStats(**v) for k, v in d.get("stats", {}).items()}, float(d.get("beta", DEFAULT_BETA)))
