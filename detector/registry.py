"""Every scorer by name: what ``osad detect``, ``osad evaluate --model`` and ``osad train`` choose from.

Adding a scorer = its module (a :class:`~osad.detector.base.Scorer`) + one line in
:data:`SCORERS`. A factory gets the :class:`ScorerOptions` of the windows it will score (gap,
scales, step, features, scaling ranges), the seed and where to run, and returns a fresh,
unfitted scorer.

Example::

    >>> create("cs-faithful", ScorerOptions(gap=5)).model_id
    'cs-jumpstarter:rate=0.4:group=window:sbd=0.01:seed=0'
    >>> create("pca").window.gap
    10
    >>> sorted(SCORERS) == sorted(names())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges

from .base import Scorer
from .baselines import L2Scorer, PCAScorer, RandomScorer
from .cs import CalibratedCSScorer, CSScorer


@dataclass(frozen=True)
class ScorerOptions:
    """What a factory may use; each scorer takes the options it has (``extra``: its own constructor
    options, e.g. MSCRED's ``score_kind``)."""

    gap: int = DEFAULT_GAP
    scales: tuple[int, ...] = DEFAULT_SCALES
    step: int = DEFAULT_STEP
    seed: int = 0
    features: Sequence[str] | None = None
    ranges: Ranges | None = None
    threads: int | None = None
    device: str | None = None  # None: auto
    amp: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerEntry:
    """One scorer: a one-line description, its factory, and whether its ``fit`` takes training
    options (``osad evaluate --fit-option``)."""

    description: str
    factory: Callable[[ScorerOptions], Scorer]
    fit_options: bool = False


def _mscred(o: ScorerOptions) -> Scorer:
    try:
        from .mscred import MSCREDScorer  # torch: only when MSCRED is asked for
    except ImportError as e:
        raise ValueError(f"--model mscred needs osad.detector.mscred.MSCREDScorer, which cannot be imported ({e}); "
                         "install the detector extra (pip install -e '.[detector]') or pick another model") from None
    return MSCREDScorer(features=None if o.features is None else list(o.features), scales=o.scales, gap=o.gap,
                        step=o.step, ranges=o.ranges, threads=o.threads, device=o.device, amp=o.amp, **o.extra)


SCORERS: dict[str, ScorerEntry] = {
    "cs": ScorerEntry("compressed sensing (JumpStarter) + train-fitted normalisation (default CS, see "
                      "docs/evaluation.md)", lambda o: CalibratedCSScorer(gap=o.gap, seed=o.seed, **o.extra)),
    "cs-faithful": ScorerEntry("compressed sensing as in JumpStarter, no training at all",
                               lambda o: CSScorer(gap=o.gap, seed=o.seed, **o.extra)),
    "pca": ScorerEntry("PCA reconstruction error (90% variance), fit on train",
                       lambda o: PCAScorer(gap=o.gap, **o.extra)),
    "l2": ScorerEntry("L2 distance from the train mean", lambda o: L2Scorer(gap=o.gap)),
    "random": ScorerEntry("uniform random score", lambda o: RandomScorer(seed=o.seed, gap=o.gap)),
    "mscred": ScorerEntry("MSCRED (osad.detector.mscred.MSCREDScorer), trained on the train head", _mscred,
                          fit_options=True),
}


def names() -> dict[str, str]:
    """Scorer name -> one-line description."""
    return {name: e.description for name, e in SCORERS.items()}


def entry(name: str) -> ScorerEntry:
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(SCORERS)}") from None


def create(name: str, options: ScorerOptions = ScorerOptions()) -> Scorer:
    """A fresh, unfitted scorer by name."""
    return entry(name).factory(options)
