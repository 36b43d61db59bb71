"""Each stream's threshold, chosen without labels.

A stream (one entity's scores from one model) is judged by, in this order:

1. a static override ``--threshold FAMILY=VALUE`` (family = model_id before ':'; an exact model_id
   also matches);
2. the model's own calibrated ``Score.threshold`` (MSCRED carries one), unless
   ``use_model_threshold`` is off;
3. POT (:func:`osad.core.thresholds.pot_threshold`, probability ``q``) fitted on the stream's
   first ``calibration_scores`` scores, which are assumed normal and not judged, leaving out gross
   outliers above ``Q3 + calibration_fence * IQR`` (at most 5% of them; 0 disables). POT falls
   back to mean + 3 std when it cannot fit.

Example::

    >>> from osad.schemas import Score
    >>> cfg = AlerterConfig(calibration_scores=3, static_thresholds={"mscred": 20.0})
    >>> def score(model, value, seq=1):
    ...     return Score(entity_id="h/1@2", host="h", window_end_ts=1.0, window_end_seq=seq, interval_s=1.0, gap=1,
    ...                  model_id=model, score=value, features=["cpu"], contributions=[1.0])
    >>> st = Stream("cs:x")
    >>> threshold_for(cfg, Stream("mscred:ab"), score("mscred:ab", 5.0)), threshold_for(cfg, st, score("cs:x", 1.0))
    (20.0, None)
    >>> [calibrate(cfg, st, score("cs:x", v)) for v in (1.0, 1.2, 1.1)], st.threshold is not None
    ([False, False, True], True)
"""

from __future__ import annotations

import logging
import math

from osad.core.thresholds import pot_threshold
from osad.schemas import Score

from .config import AlerterConfig
from .state import Stream

log = logging.getLogger("osad.alerter")

#: a chosen threshold is never below this (a constant calibration period would give 0)
MIN_THRESHOLD = 1e-9


def model_family(model_id: str) -> str:
    """The part of a model_id before ':'.

    >>> model_family("mscred:ab12"), model_family("cs")
    ('mscred', 'cs')
    """
    return model_id.split(":", 1)[0]


def threshold_for(cfg: AlerterConfig, st: Stream, s: Score) -> float | None:
    """The threshold ``s`` is judged by (rules 1 to 3); None while the stream ``st`` calibrates."""
    static = cfg.static_thresholds
    v = static.get(s.model_id, static.get(model_family(s.model_id)))
    if v is not None:
        return v
    if cfg.use_model_threshold and s.threshold is not None and math.isfinite(s.threshold) and s.threshold > 0:
        return float(s.threshold)
    return st.threshold


def calibrate(cfg: AlerterConfig, st: Stream, s: Score) -> bool:
    """Add ``s`` to the calibration scores of ``st``; fit its threshold once there are enough (True then)."""
    if math.isfinite(s.score):
        st.calib.append(float(s.score))
    if len(st.calib) < cfg.calibration_scores:
        return False
    r = pot_threshold(st.calib, q=cfg.q, fence_k=cfg.calibration_fence or None)
    st.threshold, st.method, st.calib = max(r.value, MIN_THRESHOLD), r.method, []
    out = r.info.get("left_out", 0)
    log.info("threshold for %s of %s is %.6g (%s on %d scores%s)", s.model_id, s.entity_id, st.threshold,
             r.method, cfg.calibration_scores,
             f"; {out} above Q3 + {cfg.calibration_fence:g} IQR = {r.info['fence']:.6g} left out" if out else "")
    return True
