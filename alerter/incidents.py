"""Incidents: opening, updating and closing them, their root cause and severity, the Anomaly published.

One incident per entity at a time (OR across models):

* **open**: some model of the entity has ``open_after`` consecutive windows over its threshold;
* **update**: while open, at most once per window, when the top root-cause features, the severity,
  the set of models over threshold change, or the max ratio grew by more than ``update_min_change``
  (relative) since the last published state (:func:`changed`);
* **closed**: every judged model of the entity has had ``close_after`` consecutive windows under its
  threshold (a model that has not reported for ``stale_windows`` windows does not hold it open;
  :func:`should_close`), or the entity sent nothing for ``idle_timeout_s``.

Severity from the incident's max ratio (score / threshold): low < 1.5 <= medium < 3 <= high < 10 <= critical.

Root cause: for every score over threshold in the incident (including the windows of the run that
opened it), the model's non-negative contributions are normalised to sum 1 and weighted by its
ratio (:func:`evidence_of`); these are summed per feature over the incident's windows. The top
``top_k`` features are reported with their share of that total (:func:`top_features`).

Idempotency: ``anomaly_id`` hashes (entity_id, window_end_seq of the incident's first anomalous
window) (:func:`anomaly_id_for`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

from osad.schemas import SEVERITIES, Anomaly, RootCause, Score, Severity

from .config import AlerterConfig
from .state import REF_FIELDS, EntityState, Evidence, Incident
from .thresholds import model_family

#: ratio bounds between consecutive severities: low < 1.5 <= medium < 3 <= high < 10 <= critical
SEVERITY_BOUNDS = (1.5, 3.0, 10.0)


def severity_of(ratio: float) -> Severity:
    """Severity of an incident whose largest score / threshold is ``ratio``.

    >>> [severity_of(r) for r in (1.2, 1.5, 2.9, 3.0, 9.9, 10.0)]
    ['low', 'medium', 'medium', 'high', 'high', 'critical']
    """
    for name, bound in zip(SEVERITIES, SEVERITY_BOUNDS):
        if ratio < bound:
            return name
    return SEVERITIES[-1]


def anomaly_id_for(entity_id: str, first_seq: int) -> str:
    """Deterministic id of the incident whose first anomalous window ends at ``first_seq``."""
    return hashlib.sha256(f"{entity_id}\x00{first_seq}".encode()).hexdigest()[:32]


def evidence_of(s: Score, threshold: float) -> Evidence:
    """What the score ``s``, over ``threshold``, adds to an incident."""
    ratio = s.score / threshold
    return Evidence(s.window_end_seq, s.window_end_ts, s.window_end_ts - s.gap * s.interval_s, ratio, s.score,
                    threshold, s.model_id, _weights(s, ratio))


def _weights(s: Score, ratio: float) -> dict[str, float]:
    c = [x if math.isfinite(x) and x > 0 else 0.0 for x in s.contributions]
    total = sum(c)
    if total <= 0:
        return {}
    return {f: ratio * x / total for f, x in zip(s.features, c) if x > 0}


def add_evidence(inc: Incident, ev: Evidence) -> None:
    for f, w in ev.weights.items():
        inc.evidence[f] = inc.evidence.get(f, 0.0) + w
    if ev.model_id not in inc.models:
        inc.models = sorted(inc.models + [ev.model_id])
    if ev.ratio > inc.max_ratio:
        inc.max_ratio, inc.best_score, inc.best_threshold = ev.ratio, ev.score, ev.threshold
    if ev.seq >= inc.last_over_seq:
        inc.last_over_seq, inc.last_over_ts = ev.seq, ev.end_ts
    if ev.seq not in inc.recent_over_seqs:
        inc.windows_over += 1
        inc.recent_over_seqs = sorted(inc.recent_over_seqs + [ev.seq])[-64:]


def new_incident(key: str, evs: list[Evidence], last_closed_seq: int, last_seq: int, last_ts: float) -> Incident:
    """The incident of ``key`` (an entity id or a host key) made of ``evs`` (sorted, oldest first),
    whose newest window is (``last_seq``, ``last_ts``); its first seq is after ``last_closed_seq``."""
    first = max(evs[0].seq, last_closed_seq + 1)
    inc = Incident(anomaly_id=anomaly_id_for(key, first), first_seq=first, start_ts=evs[0].start_ts,
                   last_seq=last_seq, last_ts=last_ts, last_over_seq=evs[0].seq, last_over_ts=evs[0].end_ts)
    for ev in evs:
        add_evidence(inc, ev)
    return inc


def open_incident(ent: EntityState, s: Score) -> Incident:
    """Open ``ent``'s incident from the pending windows of its streams over threshold (``s`` the newest)."""
    evs = sorted((ev for st in ent.streams.values() if st.over_run > 0 for ev in st.pending),
                 key=lambda e: (e.seq, e.model_id))
    inc = new_incident(ent.entity_id, evs, ent.last_closed_seq, s.window_end_seq, s.window_end_ts)
    for st in ent.streams.values():
        st.pending = []
    ent.incident = inc
    return inc


def should_close(cfg: AlerterConfig, ent: EntityState) -> bool:
    """Every judged, recently reporting model of ``ent`` has had ``close_after`` windows under threshold."""
    judged = [st for st in ent.streams.values() if st.judged_threshold is not None and st.last_seq is not None
              and ent.max_seq - st.last_seq <= cfg.stale_windows * max(st.gap, 1)]
    return bool(judged) and all(st.under_run >= cfg.close_after for st in judged)


def top_features(inc: Incident, top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` features with the most evidence, with their share of all of it."""
    total = sum(inc.evidence.values())
    ranked = sorted(inc.evidence.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return [(f, v / total if total > 0 else 0.0) for f, v in ranked]


def changed(cfg: AlerterConfig, inc: Incident) -> bool:
    """Whether ``inc`` changed enough since it was last published to publish an update."""
    return ([f for f, _ in top_features(inc, cfg.top_k)] != inc.published_top
            or severity_of(inc.max_ratio) != inc.published_severity
            or inc.models != inc.published_models
            or inc.affected != inc.published_affected
            or inc.max_ratio > inc.published_ratio * (1.0 + cfg.update_min_change))


def publish(cfg: AlerterConfig, entity_id: str, ref: dict, inc: Incident, status: str, seq: int, lead: str,
            why: str = "", note: str = "", **extra) -> Anomaly:
    """The next revision of ``inc`` as an Anomaly (``lead`` starts its summary, ``note`` follows its top
    features; ``why`` says why it closed); ``inc`` remembers what was published."""
    inc.revision += 1
    top = top_features(inc, cfg.top_k)
    sev = severity_of(inc.max_ratio)
    inc.published_seq, inc.published_ratio, inc.published_severity = seq, inc.max_ratio, sev
    inc.published_top, inc.published_models = [f for f, _ in top], list(inc.models)
    inc.published_affected = list(inc.affected)
    families = ", ".join(dict.fromkeys(model_family(m) for m in inc.models))  # `models` has the full ids
    summary = (f"{lead}: {families} over threshold in {inc.windows_over} window(s), "
               f"max {inc.max_ratio:.2f}x threshold ({sev})")
    if top:
        summary += "; top features: " + ", ".join(f for f, _ in top[:3])
    summary += note
    if status == "closed":
        summary += "; closed" + (f" ({why})" if why else "")
    fields = {"first_window_seq": inc.first_seq, **extra}
    return Anomaly(
        entity_id=entity_id, **{k: ref.get(k) for k in REF_FIELDS if ref.get(k) is not None},
        anomaly_id=inc.anomaly_id, revision=inc.revision, status=status, severity=sev,
        start_ts=inc.start_ts, last_ts=inc.last_ts, end_ts=inc.last_over_ts if status == "closed" else None,
        score=inc.best_score, threshold=inc.best_threshold, models=list(inc.models),
        root_causes=[RootCause(feature=f, contribution=round(v, 6)) for f, v in top], summary=summary,
        max_ratio=inc.max_ratio, windows_over=inc.windows_over, **fields,
    )


def publish_entity(cfg: AlerterConfig, ent: EntityState, inc: Incident, status: str, seq: int,
                   why: str = "", name: Callable[[str], str] | None = None) -> Anomaly:
    """The next revision of an entity's own incident (``name``: how its summary calls the processes it
    slowed, by entity id)."""
    note = ""
    if inc.affected:
        shown = [name(e) if name else e for e in inc.affected]
        note = "; slowing " + ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
    return publish(cfg, ent.entity_id, ent.ref, inc, status, seq, ent.ref.get("comm") or ent.entity_id, why,
                   note=note, affected=list(inc.affected))
