"""The alerter engine's rules, declared once: ``osad alert``'s flags, ``OSAD_*`` variables, checks and help.

:class:`AlerterConfig` is what :class:`osad.alerter.core.Engine` runs with; built in code
(``AlerterConfig(calibration_scores=20)``) or from ``osad alert``'s arguments (``from_args``), it
is checked the same way. The service's own settings (store, webhooks, ...) are in
:mod:`osad.alerter.cli`.

Example::

    >>> AlerterConfig(static_thresholds=[("mscred", 20.0)]).static_thresholds
    {'mscred': 20.0}
    >>> AlerterConfig(host_share=0)
    Traceback (most recent call last):
    ...
    osad.runtime.config.ConfigError: --host-share (OSAD_HOST_SHARE) = 0: must be in (0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from osad.core.thresholds import ARM_SCORES, DEFAULT_FENCE_K
from osad.runtime.config import Config, at_least, in_range, non_negative, positive, setting

THRESHOLDS, INCIDENTS, HOST_EVENTS = "thresholds", "incidents", "host-wide events"


def parse_threshold_override(text: str) -> tuple[str, float]:
    """``FAMILY=VALUE`` -> (family, value); ValueError says what is wrong.

    >>> parse_threshold_override("mscred=12.5")
    ('mscred', 12.5)
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{text!r}: write MODEL_FAMILY=VALUE, e.g. mscred=20 or cs-jumpstarter=0.8 "
                         "(the family is the model_id before ':')")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number; write MODEL_FAMILY=VALUE, e.g. mscred=20") from None
    if not _valid_threshold(v):
        raise ValueError(f"{text!r}: the threshold must be a finite number greater than 0")
    return name, v


def _valid_threshold(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _check(ok, message: str):
    """A check from a predicate and the message it gives a value that fails it."""
    return lambda v: None if ok(v) else message


@dataclass(frozen=True)
class AlerterConfig(Config):
    """Thresholds, incidents and host-wide events (see the module docstring of osad.alerter.core)."""

    group_descriptions = {HOST_EVENTS: "several processes of one host that deviate together (e.g. all waiting "
                          "for a CPU) make one host event (entity host:<host>) instead of one incident each"}

    # -- thresholds ---------------------------------------------------------------------------
    calibration_scores: int = setting(
        100, group=THRESHOLDS,
        check=_check(lambda v: v >= 2, "must be at least 2 (POT needs 20 or more; fewer use mean + 3 std)"),
        help="each (entity, model)'s first scores, assumed normal, on which its POT threshold is fitted")
    arm_scores: int = setting(
        ARM_SCORES, group=THRESHOLDS, check=non_negative,
        help="after this many scores of an (entity, model), judge it with a provisional, conservative threshold "
        "(tightening as scores come) until its POT calibration; 0: judge nothing before calibration_scores")
    adapt: bool = setting(
        False, group=THRESHOLDS,
        help="after calibration, let each threshold follow its stream's normal level (drift-aware POT, DSPOT, "
        "learning only from windows judged normal, at a bounded speed) instead of keeping it (frozen POT). Off by "
        "default: on the benchmark sets, chosen leaving each set out, it did worse than frozen POT on two of three "
        "(docs/thresholds.md)")
    q: float = setting(1e-3, group=THRESHOLDS, check=in_range(0, 1),
                       help="POT risk: the probability that a normal score exceeds the threshold")
    calibration_fence: float = setting(
        DEFAULT_FENCE_K, group=THRESHOLDS, check=_check(lambda v: v >= 0, "must be 0 (off) or more"),
        help="before POT, leave out calibration scores above Q3 + this many IQR (at most 5% of them), so a "
        "one-off spike while calibrating cannot lift the threshold out of reach (0: off)")
    use_model_threshold: bool = setting(
        True, group=THRESHOLDS, flag="--no-model-threshold", negate=True,
        help="ignore the thresholds models carry in their Scores (MSCRED's) and calibrate instead")
    #: model family (or exact model_id) -> threshold; given as (family, value) pairs or a mapping
    static_thresholds: Mapping[str, float] = setting(
        {}, group=THRESHOLDS, flag="--threshold", repeat=",", parse=parse_threshold_override,
        metavar="MODEL_FAMILY=VALUE",
        help="static threshold for a model family (model_id before ':', e.g. mscred=20); wins over the other rules")

    # -- incidents ----------------------------------------------------------------------------
    open_after: int = setting(
        2, group=INCIDENTS, check=positive,
        help="an incident opens when some model has this many consecutive windows over its threshold")
    close_after: int = setting(
        3, group=INCIDENTS, check=positive,
        help="it closes when every model of the entity has had this many consecutive windows under threshold")
    top_k: int = setting(5, group=INCIDENTS, check=positive, help="root-cause features reported per anomaly")
    update_min_change: float = setting(
        0.1, group=INCIDENTS, check=non_negative,
        help="publish an update when the max score/threshold ratio grew by more than this fraction (also when "
        "the top features, the severity or the models change; at most once per window)")
    stale_windows: int = setting(
        30, group=INCIDENTS, check=positive,
        help="a model that has not scored an entity for this many windows does not hold its incident open")
    idle_timeout_s: float = setting(
        600.0, group=INCIDENTS, check=positive,
        help="close the incident of, and forget, an entity without scores for this long")
    max_entities: int = setting(
        10_000, group=INCIDENTS, check=positive,
        help="most entities held in memory (least recently seen leave first; their state stays in the store)")

    # -- host-wide events ---------------------------------------------------------------------
    host_min_entities: int = setting(
        3, group=HOST_EVENTS, check=_check(lambda v: v == 0 or v >= 2, "must be 0 (off) or at least 2"),
        help="fewest processes that make a host event; 0 turns host events off")
    host_share: float = setting(0.5, group=HOST_EVENTS, check=in_range(0, 1, hi_open=False),
                                help="...and at least this share of the host's watched processes")
    host_similarity: float = setting(
        0.7, group=HOST_EVENTS, check=in_range(0, 1, hi_open=False),
        help="processes over threshold together belong to one event when their root-cause profiles have at least "
        "this cosine similarity")
    host_lift: float = setting(
        2.0, group=HOST_EVENTS, check=at_least(1),
        help="a feature leading most processes' windows at once is a host event when it leads at least this many "
        "times as many processes as usual")
    host_hold: int = setting(
        2, group=HOST_EVENTS, check=_check(lambda v: v >= 0, "must be 0 (no waiting) or more"),
        help="a process due to open an incident waits up to this many more windows while at least half as "
        "many processes of its host as a host event needs show the start of one (the first to cross, the "
        "one with the lowest threshold, then joins the event instead); 0 never waits")

    contention_z: float = setting(
        3.0, group=HOST_EVENTS, check=non_negative,
        help="culprit and victims: a process whose run-queue wait rose this many spreads above its usual level "
        "while its own CPU use and work did not rise is a victim of CPU contention: it joins the incident of a "
        "process of its host whose CPU use rose as much (the culprit, which names it), or with another victim "
        "makes a host event, and opens no incident of its own; 0 turns this off")

    def __post_init__(self):
        # --threshold gives (family, value) pairs; the engine looks thresholds up by family
        object.__setattr__(self, "static_thresholds", dict(self.static_thresholds))
        super().__post_init__()

    def validate(self) -> str | None:
        for family, v in self.static_thresholds.items():
            if not _valid_threshold(v):
                return (f"--threshold {family}={v}: a static threshold must be a finite number greater than 0 "
                        "(e.g. mscred=20)")
        return None
