"""Label-free alarm thresholds from scores on a normal period (shared by evaluation and the alerter).

* :func:`pot_threshold` / :class:`SPOT`: extreme value theory after Siffer et al., "Anomaly Detection
  in Streams with Extreme Value Theory", KDD 2017. The Pickands-Balkema-de Haan theorem says that
  the excesses over a high initial threshold ``t`` follow a generalized Pareto distribution (GPD)
  ``P(X - t > y | X > t) = (1 + gamma * y / sigma) ** (-1 / gamma)``. Fitting (gamma, sigma) on the
  normal scores' excesses gives the threshold ``z_q`` that a normal score exceeds with probability
  ``q``:
  ``z_q = t + sigma / gamma * ((q * n / N_t) ** (-gamma) - 1)`` (``t - sigma * log(q n / N_t)`` for
  gamma = 0), with ``n`` scores of which ``N_t`` exceed ``t``. The GPD is fitted by maximum
  likelihood with Grimshaw's reduction to one variable (as in the paper): with ``x = gamma / sigma``
  the likelihood equations reduce to ``u(x) v(x) = 1``,
  ``u(x) = mean(1 / (1 + x Y))``, ``v(x) = 1 + mean(log(1 + x Y))``, then ``gamma = v(x) - 1`` and
  ``sigma = gamma / x``; every root (and the exponential case x -> 0) is a candidate and the one of
  highest likelihood wins.
* :func:`sigma_threshold`: ``mean + k * std`` (OSdetector's rule, k = 3): the fallback when there are
  too few peaks for a GPD fit.
* :class:`DSPOT`: drift-aware streaming POT (the paper's DSPOT): POT on the residual of each score
  against the mean of the last ``depth`` normal scores, with guards (learns only from scores judged
  normal, at a bounded speed, can be frozen, state as a plain dict). See docs/thresholds.md.

Example::

    >>> import numpy as np
    >>> normal = np.random.default_rng(0).exponential(1.0, 20000)
    >>> r = pot_threshold(normal, q=1e-3)
    >>> r.method, round(r.value, 1)  # exact 1e-3 quantile of Exp(1): log(1000) = 6.9
    ('pot', 6.9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_FENCE_K", "DSPOT", "Threshold", "fence", "fit_gpd", "pot_threshold", "sigma_threshold", "SPOT"]


@dataclass
class Threshold:
    """A chosen alarm threshold: flag a score ``>= value``."""

    value: float
    method: str  # "pot" or "sigma"
    info: dict = field(default_factory=dict)


def _gpd_loglik(y: np.ndarray, gamma: float, sigma: float) -> float:
    if sigma <= 0:
        return -math.inf
    if abs(gamma) < 1e-12:
        return float(-y.size * math.log(sigma) - y.sum() / sigma)
    z = 1.0 + gamma * y / sigma
    if (z <= 0).any():
        return -math.inf
    return float(-y.size * math.log(sigma) - (1.0 + 1.0 / gamma) * np.log(z).sum())


def _grimshaw_w(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """u(x) v(x) - 1 for each x (vectorised)."""
    s = 1.0 + np.multiply.outer(x, y)
    return np.mean(1.0 / s, axis=1) * (1.0 + np.mean(np.log(s), axis=1)) - 1.0


def _roots(y: np.ndarray, grid: np.ndarray, iters: int = 80) -> list[float]:
    """Roots of u v - 1 between consecutive points of ``grid`` (sign changes, then bisection)."""
    grid = np.sort(grid)
    if grid.size < 2:
        return []
    w = _grimshaw_w(y, grid)
    out = []
    for i in np.nonzero(np.sign(w[:-1]) * np.sign(w[1:]) < 0)[0]:
        a, b, wa = grid[i], grid[i + 1], w[i]
        for _ in range(iters):
            m = 0.5 * (a + b)
            wm = _grimshaw_w(y, np.array([m]))[0]
            if np.sign(wm) == np.sign(wa):
                a, wa = m, wm
            else:
                b = m
        out.append(0.5 * (a + b))
    return out


def fit_gpd(excesses) -> tuple[float, float]:
    """Maximum-likelihood (gamma, sigma) of a generalized Pareto distribution on positive excesses.

    Grimshaw's method (see the module docstring). Raises ``ValueError`` when the excesses cannot
    be fitted (fewer than 2, or all equal).

    >>> import numpy as np
    >>> g, s = fit_gpd(np.random.default_rng(1).exponential(2.0, 5000))
    >>> abs(g) < 0.05, round(s, 1)
    (True, 2.0)
    """
    y = np.asarray(excesses, dtype=np.float64).reshape(-1)
    y = y[np.isfinite(y)]
    if y.size < 2 or (y < 0).any():
        raise ValueError("need at least 2 non-negative excesses to fit a generalized Pareto distribution")
    y = np.maximum(y, 0.0)
    ymin, ymax, ymean = y.min(), y.max(), y.mean()
    if ymax <= 0 or ymax - ymin <= 1e-12 * max(1.0, ymax):
        raise ValueError("all excesses are equal: a generalized Pareto distribution cannot be fitted")
    eps = 1e-8 / ymax
    cands = [(0.0, ymean)]  # exponential case
    # roots lie in (-1/ymax, 0) and (0, 2 (mean - min) / min^2]; log-spaced grids cover every scale
    hi_pos = 2.0 * (ymean - ymin) / (ymin * ymin) if ymin > 0 else 1e8 / ymax
    neg = -np.geomspace(eps, 1.0 / ymax - eps, 256)
    pos = np.geomspace(eps, max(hi_pos, 2 * eps), 256)
    for x in _roots(y, neg) + _roots(y, pos):
        s = 1.0 + x * y
        if (s <= 0).any():
            continue
        gamma = float(np.mean(np.log(s)))  # v(x) - 1
        if abs(x) > 0 and abs(gamma) > 0:
            cands.append((gamma, gamma / x))
    best = max(cands, key=lambda gs: _gpd_loglik(y, *gs))
    return float(best[0]), float(best[1])


def sigma_threshold(scores, k: float = 3.0) -> Threshold:
    """``mean + k * std`` of the normal scores (OSdetector's rule with k = 3)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite scores to choose a threshold from; score a normal period first")
    mu, sd = float(s.mean()), float(s.std())
    return Threshold(mu + k * sd, "sigma", {"mean": mu, "std": sd, "k": k, "n": int(s.size)})


def _init_threshold(s: np.ndarray, level: float, min_peaks: int) -> tuple[float, np.ndarray]:
    n_peaks = max(min_peaks, int(math.ceil((1.0 - level) * s.size)))
    srt = np.sort(s)
    t = float(srt[s.size - n_peaks - 1]) if n_peaks < s.size else float(srt[0])
    return t, s[s > t] - t


def _z_q(t: float, gamma: float, sigma: float, q: float, n: int, n_t: int) -> float:
    r = q * n / n_t
    if abs(gamma) < 1e-12:
        return t - sigma * math.log(r)
    return t + sigma / gamma * (r ** (-gamma) - 1.0)


#: how far out (in IQRs above Q3) a calibration score must be to be left out; shared by the alerter
#: and the offline evaluation, so both fit the same threshold (see :func:`fence`)
DEFAULT_FENCE_K = 6.0


def fence(scores, k: float = DEFAULT_FENCE_K, max_share: float = 0.05) -> tuple[np.ndarray, float, int]:
    """Leave out gross outliers: scores above ``Q3 + k * IQR``, when they are at most ``max_share``
    of all (else they are a mode of normal behaviour, not a spike, and all are kept).

    A short calibration period, assumed normal, can still hold a one-off spike (a process's
    start-up, a burst of load). On 60 scores the GPD takes that spike for a heavy tail and puts the
    threshold far above every other score (400 among scores of 5-9 gives 128,000), which blinds the
    stream for good. Quartiles do not move with a spike. Capping at the fence instead of leaving
    out is not enough: the capped score still reads as a heavy tail (144 instead of 58). k = 6 is
    twice Tukey's "far out" fence: with k = 3 the label-free threshold on SMD came out lower and
    its deployed f1 fell from 0.520 to 0.486. Returns the kept scores, the fence and how many were
    left out.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size < 4:
        return s, math.inf, 0
    q1, q3 = np.percentile(s, [25, 75])
    if not q3 > q1:  # a (nearly) constant period: no spread to judge outliers by
        return s, math.inf, 0
    f = float(q3 + k * (q3 - q1))
    out = s > f
    n = int(out.sum())
    if n == 0 or n > max_share * s.size:
        return s, f, 0
    return s[~out], f, n


def pot_threshold(scores, q: float = 1e-3, level: float = 0.98, min_peaks: int = 10,
                  fallback_k: float = 3.0, fence_k: float | None = None) -> Threshold:
    """Threshold that a normal score exceeds with probability ``q`` (POT, Siffer et al. KDD 2017).

    ``scores`` come from a normal period (train tail / validation); ``level`` sets the initial
    threshold ``t`` as that quantile, lowered when needed so that at least ``min_peaks`` scores
    exceed it. Falls back to :func:`sigma_threshold` (``mean + fallback_k * std``) when there are
    fewer than ``2 * min_peaks`` scores, the excesses cannot be fitted, or the result is not finite;
    ``method`` says which rule was used. With ``fence_k``, gross outliers above
    ``Q3 + fence_k * IQR`` are first left out (:func:`fence`; ``info["left_out"]`` counts them).
    """
    if not 0 < q < 1:
        raise ValueError(f"q must be a probability in (0, 1), got {q}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if fence_k is not None:
        kept, f, n = fence(s, fence_k)
        r = pot_threshold(kept, q, level, min_peaks, fallback_k)
        r.info.update(fence=f, left_out=n)
        return r
    if s.size < 2 * min_peaks:
        r = sigma_threshold(s, fallback_k)
        r.info["why"] = f"only {s.size} scores; POT needs at least {2 * min_peaks}"
        return r
    t, peaks = _init_threshold(s, level, min_peaks)
    try:
        gamma, sigma = fit_gpd(peaks)
        z = _z_q(t, gamma, sigma, q, s.size, peaks.size)
    except (ValueError, OverflowError, ZeroDivisionError) as e:
        r = sigma_threshold(s, fallback_k)
        r.info["why"] = str(e)
        return r
    if not math.isfinite(z):
        r = sigma_threshold(s, fallback_k)
        r.info["why"] = "POT threshold not finite"
        return r
    return Threshold(float(z), "pot", {"t": t, "gamma": gamma, "sigma": sigma, "n": int(s.size),
                                       "n_peaks": int(peaks.size), "q": q})


class SPOT:
    """Streaming POT (Siffer et al. KDD 2017, algorithm SPOT): calibrate, then update online.

    ``fit`` on a normal calibration period; then ``step(x)`` returns True for an alarm
    (``x >= threshold``, not learned from), learns ``x`` as a peak when it exceeds the initial
    threshold ``t`` (and refits the GPD), and otherwise only counts it.

    >>> import numpy as np
    >>> spot = SPOT(q=1e-3).fit(np.random.default_rng(0).exponential(1.0, 5000))
    >>> spot.step(0.5), spot.step(50.0)
    (False, True)
    """

    def __init__(self, q: float = 1e-3, level: float = 0.98, min_peaks: int = 10, fallback_k: float = 3.0):
        self.q, self.level, self.min_peaks, self.fallback_k = q, level, min_peaks, fallback_k
        self.t = math.nan
        self.peaks: list[float] = []
        self.n = 0
        self.threshold: Threshold | None = None

    def fit(self, scores) -> "SPOT":
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        self.threshold = pot_threshold(s, self.q, self.level, self.min_peaks, self.fallback_k)
        self.n = int(s.size)
        if self.threshold.method == "pot":
            self.t = self.threshold.info["t"]
            self.peaks = (s[s > self.t] - self.t).tolist()
        else:
            self.t, self.peaks = math.nan, []
        return self

    @property
    def value(self) -> float:
        if self.threshold is None:
            raise RuntimeError("SPOT: call fit() on a normal calibration period first")
        return self.threshold.value

    def step(self, x: float) -> bool:
        """Process one score; True = alarm."""
        z = self.value
        if x >= z:
            return True
        self.n += 1
        if math.isfinite(self.t) and x > self.t:
            self.peaks.append(float(x) - self.t)
            try:
                gamma, sigma = fit_gpd(self.peaks)
                zq = _z_q(self.t, gamma, sigma, self.q, self.n, len(self.peaks))
                if math.isfinite(zq):
                    self.threshold = Threshold(zq, "pot", {"t": self.t, "gamma": gamma, "sigma": sigma,
                                                          "n": self.n, "n_peaks": len(self.peaks), "q": self.q})
            except ValueError:
                pass
        return False


class DSPOT:
    """Drift-aware streaming POT (Siffer et al., KDD 2017, algorithm DSPOT), with guards.

    The paper's idea: a score stream whose normal level drifts is not stationary, but its residual
    ``x_i - M_i`` against the local level ``M_i`` (the mean of the last ``depth`` normal scores) is;
    POT/SPOT runs on the residuals and the alarm threshold is ``M_i + z_q``. Here:

    * ``mode="add"`` is the paper's DSPOT. ``mode="mul"`` runs the same on ``log(x + eps)``: a level
      that doubles also doubles its spread (non-negative scores drift that way), and the threshold
      ``exp(M + z) - eps`` then scales with the level instead of shifting by a constant.
    * ``fit(calibration)``: gross outliers are fenced out first (:func:`fence`, as
      :func:`pot_threshold`); the first ``depth`` scores (fewer when the period is short, keeping at
      least ``2 * min_peaks`` residuals) seed the level; the residuals of the rest against their
      preceding moving average fit POT (:func:`pot_threshold`, probability ``q``; its ``mean + k
      sigma`` fallback when the residuals are too few or cannot be fitted, then no peak is learned).
    * ``step(x, learn=True) -> bool``: alarm when ``x >= threshold`` (the threshold in force before
      ``x``). Guards: (1) only scores judged normal (no alarm) are learned; (2) learning is off while
      ``frozen`` is set, for one call with ``learn=False``, and for ``hold`` scores after every alarm
      (the alerter's "incident open"); (3) speed cap: the threshold moves by at most ``max_step``
      per learned score, ``max_step = rate * z0`` with ``z0`` the calibrated residual threshold
      (in ``mode="mul"`` the cap holds in log space: the threshold changes by at most a factor
      ``exp(rate * z0)`` per step). The level and the residual quantile each move towards their
      new target by at most half the cap; what is left over is caught up on later steps.
    * ``center="median"``: the level is the window's median instead of its mean. ``memory=N``:
      forgetting; POT is refitted on the last N learned residuals only (on every peak and every
      N/10 scores) instead of on every peak since calibration (the paper). ``max_peaks=N``: bounded state; past N
      peaks the older half is forgotten (and the score count scaled by the same share).
    * ``run(scores)`` -> (thresholds, alarms) is ``step`` over an array (identical results).
    * ``to_dict()`` / ``from_dict(d)``: the whole state as JSON-ready plain values.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> d = DSPOT(q=1e-3, depth=20).fit(rng.normal(10, 1, 500))
    >>> d.step(11.0), d.step(30.0)
    (False, True)
    """

    def __init__(self, q: float = 1e-3, depth: int = 20, mode: str = "add", rate: float = 0.05, hold: int = 0,
                 center: str = "mean", memory: int | None = None, level: float = 0.98, min_peaks: int = 10, fallback_k: float = 3.0,
                 fence_k: float | None = DEFAULT_FENCE_K, max_peaks: int | None = None):
        if not 0 < q < 1:
            raise ValueError(f"q must be a probability in (0, 1), got {q}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if mode not in ("add", "mul"):
            raise ValueError(f"mode must be 'add' or 'mul', got {mode!r}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0 (math.inf: no cap), got {rate}")
        if hold < 0:
            raise ValueError(f"hold must be >= 0, got {hold}")
        if center not in ("mean", "median"):
            raise ValueError(f"center must be 'mean' or 'median', got {center!r}")
        self.q, self.depth, self.mode, self.rate, self.hold = q, int(depth), mode, float(rate), int(hold)
        if memory is not None and memory < 2 * min_peaks:
            raise ValueError(f"memory must be None or >= 2 * min_peaks = {2 * min_peaks}, got {memory}")
        self.center, self.memory = center, None if memory is None else int(memory)
        if max_peaks is not None and max_peaks < 2 * min_peaks:
            raise ValueError(f"max_peaks must be None or >= 2 * min_peaks = {2 * min_peaks}, got {max_peaks}")
        self.max_peaks = None if max_peaks is None else int(max_peaks)
        self.resid: list[float] = []  # with memory: the last `memory` learned residuals
        self._c = np.mean if center == "mean" else np.median
        self.level, self.min_peaks, self.fallback_k, self.fence_k = level, min_peaks, fallback_k, fence_k
        self.frozen = False
        self.fitted = False
        self.eps = 0.0
        self.window: list[float] = []  # last `depth` normal values (transformed)
        self.base = math.nan  # level in force (follows mean(window) at bounded speed)
        self.t = math.nan  # POT's initial threshold on the residuals (nan: sigma fallback, no peaks)
        self.peaks: list[float] = []
        self.n = 0
        self.z = math.nan  # residual threshold in force
        self.z_target = math.nan  # latest fitted residual threshold
        self.z0 = math.nan
        self.method = ""
        self.hold_left = 0
        self.alarms = 0
        self.learned = 0

    # -- transforms
    def _fwd(self, x):
        return np.log(np.maximum(x, 0.0) + self.eps) if self.mode == "mul" else x

    def _inv(self, y: float) -> float:
        return math.exp(y) - self.eps if self.mode == "mul" else y

    @property
    def max_step(self) -> float:
        """Most the (transformed) threshold moves per learned score."""
        return self.rate * abs(self.z0) if math.isfinite(self.z0) and self.z0 != 0 else math.inf

    @property
    def threshold(self) -> float:
        if not self.fitted:
            raise RuntimeError("DSPOT: call fit() on a normal calibration period first")
        return self._inv(self.base + self.z)

    value = threshold

    def fit(self, scores) -> "DSPOT":
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        if s.size == 0:
            raise ValueError("no finite scores to calibrate on; score a normal period first")
        if self.fence_k is not None:
            s, _, _ = fence(s, self.fence_k)
        if self.mode == "mul":
            self.eps = max(float(np.median(np.abs(s))), 1e-12)
        y = np.asarray(self._fwd(s), np.float64)
        d = max(1, min(self.depth, y.size - 2 * self.min_peaks))
        if y.size <= d:  # too short for residuals: a constant level, sigma rule on the deviations
            d = max(1, y.size - 1) if y.size > 1 else 1
        # residual of y[i] against the mean of the `depth` values before it (the seed uses what there is)
        res = []
        win = list(y[:d])
        for i in range(d, y.size):
            res.append(y[i] - float(self._c(win)))
            win.append(float(y[i]))
            if len(win) > self.depth:
                win.pop(0)
        res = np.asarray(res) if res else np.zeros(1)
        thr = pot_threshold(res, self.q, self.level, self.min_peaks, self.fallback_k)
        self.method = thr.method
        self.n = int(res.size)
        if thr.method == "pot":
            self.t = float(thr.info["t"])
            self.peaks = (res[res > self.t] - self.t).tolist()
        else:
            self.t, self.peaks = math.nan, []
        self.resid = [float(v) for v in res[-self.memory:]] if self.memory else []
        self.window = [float(v) for v in win[-self.depth:]]
        self.base = float(self._c(self.window))
        self.z = self.z_target = self.z0 = float(thr.value)
        self.hold_left = 0
        self.fitted = True
        return self

    def _refit(self) -> None:
        try:
            gamma, sigma = fit_gpd(self.peaks)
            zq = _z_q(self.t, gamma, sigma, self.q, self.n, len(self.peaks))
        except (ValueError, OverflowError, ZeroDivisionError):
            return
        if math.isfinite(zq):
            self.z_target = float(zq)

    def step(self, x: float, learn: bool = True) -> bool:
        """Process one score; True = alarm. ``learn=False`` (or ``frozen``): compare only."""
        thr = self.threshold
        x = float(x)
        alarm = bool(x >= thr)
        if alarm:
            self.alarms += 1
            self.hold_left = self.hold
            return True
        if self.hold_left > 0:
            self.hold_left -= 1
            return False
        if self.frozen or not learn or not math.isfinite(x):
            return False
        self.learn(x)
        return False

    def learn(self, x: float) -> None:
        """Learn ``x`` as a normal score (the caller judged it: below the threshold, no incident open)."""
        x = float(x)
        if not math.isfinite(x):
            return
        y = float(self._fwd(x))
        r = y - self.base
        self.n += 1
        if self.memory:  # forget: POT on the last `memory` residuals, refitted on a peak or every memory/10
            self.resid.append(r)
            if len(self.resid) > self.memory:
                self.resid.pop(0)
            if (math.isfinite(self.t) and r > self.t) or (self.learned + 1) % max(10, self.memory // 10) == 0:
                thr = pot_threshold(self.resid, self.q, self.level, self.min_peaks, self.fallback_k)
                self.method, self.z_target = thr.method, float(thr.value)
                self.t = float(thr.info["t"]) if thr.method == "pot" else math.nan
        elif math.isfinite(self.t) and r > self.t:
            self.peaks.append(r - self.t)
            if self.max_peaks and len(self.peaks) > self.max_peaks:  # bounded: forget the older half
                keep = self.max_peaks // 2
                self.n = max(int(round(self.n * keep / len(self.peaks))), keep + 1)
                self.peaks = self.peaks[-keep:]
            self._refit()
        self.window.append(y)
        if len(self.window) > self.depth:
            self.window.pop(0)
        half = self.max_step / 2.0
        target = float(self._c(self.window))
        self.base += min(max(target - self.base, -half), half)
        self.z += min(max(self.z_target - self.z, -half), half)
        self.learned += 1

    def run(self, scores, learn=True) -> tuple[np.ndarray, np.ndarray]:
        """``step`` over ``scores``: (threshold in force before each score, alarm of each score).
        ``learn``: one bool, or one per score."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        lr = np.broadcast_to(np.asarray(learn, bool), s.shape)
        thr = np.empty(s.size)
        al = np.zeros(s.size, bool)
        for i in range(s.size):
            thr[i] = self.threshold
            al[i] = self.step(s[i], bool(lr[i]))
        return thr, al

    # -- state
    _PARAMS = ("q", "depth", "mode", "rate", "hold", "center", "memory", "level", "min_peaks", "fallback_k", "fence_k",
               "max_peaks")
    _STATE = ("frozen", "fitted", "eps", "window", "base", "t", "peaks", "resid", "n", "z", "z_target", "z0", "method",
              "hold_left", "alarms", "learned")

    def to_dict(self) -> dict:
        """Parameters and state as plain JSON-ready values (non-finite floats as None)."""
        def enc(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            if isinstance(v, list):
                return [float(e) for e in v]
            return v
        return {"kind": "dspot", "version": 1, **{k: enc(getattr(self, k)) for k in self._PARAMS + self._STATE}}

    @classmethod
    def from_dict(cls, d: dict) -> "DSPOT":
        if d.get("kind") != "dspot":
            raise ValueError("not a DSPOT state")

        def dec(v):
            if v is None:
                return math.nan
            if v == "inf":
                return math.inf
            if v == "-inf":
                return -math.inf
            return v
        o = cls(**{k: (dec(d[k]) if k in ("rate", "fallback_k") else d[k]) for k in cls._PARAMS if k in d})
        for k in cls._STATE:
            v = d[k]
            if k in ("window", "peaks", "resid"):
                v = [float(e) for e in v]
            elif k in ("eps", "base", "t", "z", "z_target", "z0"):
                v = float(dec(v))
            setattr(o, k, v)
        return o


#: a threshold is never below this (a constant calibration period would give 0)
MIN_VALUE = 1e-9
#: scores a stream needs before its first (provisional) threshold: about 2.5 minutes of windows at the defaults
ARM_SCORES = 16
#: the provisional threshold is the largest fenced score so far times ``1 + PROVISIONAL_SPREAD * (ARM_SCORES / n) **
#: PROVISIONAL_DECAY`` (n scores seen): 3.5x the maximum at 16 scores, 2.5x at 100. Chosen without labels, on the
#: train tails of SMD, ASD and JumpStarter (every stretch of n consecutive tail scores, against POT on the whole
#: tail): the 90th percentile of POT / max is 3.56 at 16 scores, 3.06 at 32, 2.64 at 64 (each set within 0.5 of it),
#: so the provisional threshold is at or above the calibrated one in about 9 stretches of 10: conservative.
PROVISIONAL_SPREAD, PROVISIONAL_DECAY = 2.5, 0.3
#: the adaptive phase's DSPOT settings (docs/thresholds.md says how they were chosen)
ADAPT_DEPTH, ADAPT_Q, ADAPT_RATE = 100, 1e-2, 0.02
#: most peaks an adapting stream keeps: past this, the older half is forgotten (bounded state, weeks of scores)
ADAPT_MAX_PEAKS = 400


def provisional_threshold(scores, fence_k: float | None = DEFAULT_FENCE_K) -> float:
    """A conservative threshold from a stream's first few normal scores (see :data:`PROVISIONAL_SPREAD`).

    >>> round(provisional_threshold([1.0] * 15 + [2.0]), 3)
    7.0
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite scores")
    if fence_k is not None:
        s, _, _ = fence(s, fence_k)
    factor = 1.0 + PROVISIONAL_SPREAD * (ARM_SCORES / max(s.size, 1)) ** PROVISIONAL_DECAY
    return float(max(s.max(), 0.0) * factor)


class StreamThreshold:
    """One score stream's label-free threshold through its life: the alerter's and ``osad evaluate``'s.

    1. **arming**: no threshold; the first ``arm`` finite scores are taken as normal;
    2. **provisional** (from ``arm`` scores; skipped when ``arm`` is 0): :func:`provisional_threshold` of the
       normal scores so far, recomputed with each: conservative at first, tightening as they grow;
    3. **calibrated** (at ``calibration`` normal scores): POT (:func:`pot_threshold`, risk ``q``, fence
       ``fence_k``) on them. With ``adapt`` off it stays there (frozen); with ``adapt`` on, a :class:`DSPOT`
       fitted on the same scores follows the stream's level from then on (``adapt`` = its settings).

    :meth:`update` takes each score after it was judged against :attr:`value` (the threshold in force before
    it), with ``learn``: whether the caller judged it normal (not over the threshold, no incident open). Only
    learned scores calibrate or adapt the threshold, so a fault is never learnt as normal; DSPOT's own speed cap
    bounds how fast it moves. State: :meth:`to_dict` / :meth:`from_dict`, plain JSON, bounded
    (``ADAPT_MAX_PEAKS``).

    >>> t = StreamThreshold(calibration=40, arm=16, adapt=None)
    >>> [t.update(1.0 + 0.1 * (i % 5)) for i in range(16)][-1], round(t.value, 2), t.method
    ('armed', 4.9, 'provisional')
    >>> [t.update(1.0 + 0.1 * (i % 5)) for i in range(24)][-1], t.method  # (40 scores: too few for POT)
    ('calibrated', 'sigma')
    """

    def __init__(self, calibration: int = 100, q: float = 1e-3, fence_k: float | None = DEFAULT_FENCE_K,
                 arm: int = ARM_SCORES, adapt: dict | None = None):
        if calibration < 2:
            raise ValueError(f"calibration must be at least 2 scores, got {calibration}")
        self.calibration, self.q, self.fence_k = int(calibration), q, fence_k
        self.arm = min(int(arm), self.calibration)
        self.adapt = dict(adapt) if adapt else None
        self.calib: list[float] = []
        self.value: float | None = None
        self.method = ""
        self.info: dict = {}  # what POT said at calibration (its fence, peaks, ...)
        self.dspot: DSPOT | None = None

    @property
    def phase(self) -> str:
        """arming, provisional, calibrated (frozen) or adapting."""
        if self.value is None:
            return "arming"
        if self.method == "provisional":
            return "provisional"
        return "adapting" if self.dspot is not None else "calibrated"

    def fit(self, scores) -> "StreamThreshold":
        """Calibrate at once on ``scores`` (assumed normal), e.g. a held-out train tail."""
        self.calib = [float(x) for x in np.asarray(scores, np.float64).reshape(-1) if math.isfinite(x)]
        self._calibrate()
        return self

    def update(self, x: float, learn: bool = True) -> str | None:
        """Take score ``x`` (judged against :attr:`value` before this call); "armed" or "calibrated" when
        that happened with it."""
        x = float(x)
        if not math.isfinite(x) or (not learn and self.value is not None):
            return None
        if self.dspot is not None:
            self.dspot.learn(x)
            self.value = max(self.dspot.threshold, MIN_VALUE)
            return None
        if self.method not in ("", "provisional"):
            return None  # frozen
        self.calib.append(x)
        if len(self.calib) >= self.calibration:
            self._calibrate()
            return "calibrated"
        if self.arm and len(self.calib) >= self.arm:
            first = self.value is None
            self.value, self.method = max(provisional_threshold(self.calib, self.fence_k), MIN_VALUE), "provisional"
            return "armed" if first else None
        return None

    def _calibrate(self) -> None:
        if not self.calib:
            raise ValueError("no finite scores to calibrate on")
        r = pot_threshold(self.calib, q=self.q, fence_k=self.fence_k)
        self.value, self.method, self.info = max(r.value, MIN_VALUE), r.method, r.info
        if self.adapt is not None:
            self.dspot = DSPOT(fence_k=self.fence_k, **self.adapt).fit(self.calib)
            self.value = max(self.dspot.threshold, MIN_VALUE)
            self.method = "dspot"
        self.calib = []

    def to_dict(self) -> dict:
        """Settings and state, plain JSON (a restored tracker continues with the settings it started with)."""
        return {"calibration": self.calibration, "q": self.q, "fence_k": self.fence_k, "arm": self.arm,
                "adapt": self.adapt, "calib": list(self.calib), "value": self.value, "method": self.method,
                "dspot": None if self.dspot is None else self.dspot.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamThreshold":
        t = cls(calibration=d["calibration"], q=d["q"], fence_k=d["fence_k"], arm=d["arm"], adapt=d.get("adapt"))
        t.calib = [float(x) for x in d.get("calib") or []]
        t.value = None if d.get("value") is None else float(d["value"])
        t.method = d.get("method") or ""
        t.dspot = DSPOT.from_dict(d["dspot"]) if d.get("dspot") else None
        return t


def judge_stream(tracker: StreamThreshold, scores, open_after: int, close_after: int) -> np.ndarray:
    """Step a score stream through ``tracker`` as the alerter's engine does for one (entity, model): each score is
    over when ``score > threshold in force``; it is learnt only when it is not over and no incident is open
    (an incident opens at ``open_after`` consecutive scores over and closes at ``close_after`` under, the
    alerter's rule, :func:`osad.core.metrics.incidents_from_alarms`). Returns the threshold each score was judged
    by (NaN while arming). Pure; ``tracker`` is advanced.

    >>> t = StreamThreshold(calibration=30, arm=0).fit(np.linspace(1.0, 2.0, 30))
    >>> judge_stream(t, [1.5, 9.0, 9.0, 1.5], 2, 3).round(3).tolist()
    [2.757, 2.757, 2.757, 2.757]
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.full(s.size, math.nan)
    over_run = under_run = 0
    incident = False
    for i, x in enumerate(s):
        thr = tracker.value
        over = thr is not None and math.isfinite(x) and x > thr
        if thr is not None:
            out[i] = thr
        tracker.update(x, learn=not over and not incident)
        if over:
            over_run, under_run = over_run + 1, 0
            incident = incident or over_run >= open_after
        else:
            over_run, under_run = 0, under_run + 1
            incident = incident and under_run < close_after
    return out
