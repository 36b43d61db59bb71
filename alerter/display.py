"""How the alerter's commands show an anomaly's times and ratio in text.

>>> utc_ts(1700000000.0), utc_ts(None)
('2023-11-14 22:13:20', '-')
"""

from __future__ import annotations

import time

from osad.schemas import Anomaly


def utc_ts(t: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` for none."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def ratio_text(a: Anomaly) -> str:
    """The anomaly's largest score / threshold, e.g. ``3.00x`` (``nanx`` when it cannot be told)."""
    r = a.max_ratio if a.max_ratio is not None else (a.score / a.threshold if a.threshold else float("nan"))
    return f"{r:.2f}x"
