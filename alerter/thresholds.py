"""Each stream's threshold, chosen without labels.

A stream (one entity's scores from one model) is judged by, in this order:

1. a static override ``--threshold FAMILY=VALUE`` (family = model_id before ':'; an exact model_id
   also matches);
2. the model's own calibrated ``Score.threshold`` (MSCRED carries one), unless
   ``use_model_threshold`` is off;
3. its own threshold, without labels (:class:`osad.core.thresholds.StreamThreshold`): none for its first
   ``arm_scores`` scores (assumed normal, not judged); then a provisional, conservative one from the scores so
   far, tightening as they grow; at ``calibration_scores`` normal scores POT (probability ``q``, leaving out
   gross outliers above ``Q3 + calibration_fence * IQR``, at most 5% of them; mean + 3 std when it cannot fit);
   from then on, with ``adapt``, drift-aware POT (DSPOT) that follows the stream's normal level. Only scores the
   engine judged normal (under threshold, no incident or host event open) calibrate or adapt it.

Example::

    >>> from osad.schemas import Score
    >>> cfg = AlerterConfig(calibration_scores=3, arm_scores=0, static_thresholds={"mscred": 20.0})
    >>> def score(model, value, seq=1):
    ...     return Score(entity_id="h/1@2", host="h", window_end_ts=1.0, window_end_seq=seq, interval_s=1.0, gap=1,
    ...                  model_id=model, score=value, features=["cpu"], contributions=[1.0])
    >>> st = Stream("cs:x")
    >>> given_threshold(cfg, score("mscred:ab", 5.0)), given_threshold(cfg, score("cs:x", 1.0)), st.threshold
    (20.0, None, None)
    >>> [learn(cfg, st, score("cs:x", v), True) for v in (1.0, 1.2, 1.1)], st.threshold is not None
    ([None, None, 'calibrated'], True)
"""

from __future__ import annotations

import logging
import math

from osad.core.thresholds import ADAPT_DEPTH, ADAPT_MAX_PEAKS, ADAPT_Q, ADAPT_RATE, StreamThreshold, MIN_VALUE
from osad.schemas import Score

from .config import AlerterConfig
from .state import Stream

log = logging.getLogger("osad.alerter")

#: a chosen threshold is never below this (a constant calibration period would give 0)
MIN_THRESHOLD = MIN_VALUE


def model_family(model_id: str) -> str:
    """The part of a model_id before ':'.

    >>> model_family("mscred:ab12"), model_family("cs")
    ('mscred', 'cs')
    """
    return model_id.split(":", 1)[0]


def given_threshold(cfg: AlerterConfig, s: Score) -> float | None:
    """The threshold of rules 1 and 2 for ``s`` (a static override, the model's own), or None."""
    static = cfg.static_thresholds
    v = static.get(s.model_id, static.get(model_family(s.model_id)))
    if v is not None:
        return v
    if cfg.use_model_threshold and s.threshold is not None and math.isfinite(s.threshold) and s.threshold > 0:
        return float(s.threshold)
    return None



def tracker_for(cfg: AlerterConfig, st: Stream) -> StreamThreshold:
    """The stream's own threshold tracker (made with the configured settings when first needed)."""
    if st.tracker is None:
        st.tracker = StreamThreshold(calibration=cfg.calibration_scores, q=cfg.q, fence_k=cfg.calibration_fence or None,
                                     arm=cfg.arm_scores, adapt=adapt_settings() if cfg.adapt else None)
    return st.tracker


def adapt_settings() -> dict:
    """The adaptive phase's DSPOT settings (osad.core.thresholds, where each is declared and explained)."""
    return dict(depth=ADAPT_DEPTH, q=ADAPT_Q, rate=ADAPT_RATE, max_peaks=ADAPT_MAX_PEAKS)


def learn(cfg: AlerterConfig, st: Stream, s: Score, normal: bool) -> str | None:
    """Give ``s`` (already judged) to the stream's own threshold; ``normal``: the engine judged it normal (under
    threshold, no incident or host event of the entity open), so it may calibrate or adapt the threshold.
    Returns "armed" or "calibrated" when that happened with ``s``."""
    tr = tracker_for(cfg, st)
    event = tr.update(s.score, learn=normal)
    st.threshold, st.method = tr.value, tr.method
    if event == "calibrated":
        info = tr.info
        out = info.get("left_out", 0)
        log.info("threshold for %s of %s is %.6g (%s on %d scores%s)", s.model_id, s.entity_id, st.threshold,
                 tr.method, cfg.calibration_scores,
                 f"; {out} above Q3 + {cfg.calibration_fence:g} IQR = {info['fence']:.6g} left out" if out else "")
    elif event == "armed":
        log.info("provisional threshold for %s of %s is %.6g (after %d scores; calibrated at %d)", s.model_id,
                 s.entity_id, st.threshold, cfg.arm_scores, cfg.calibration_scores)
    return event
