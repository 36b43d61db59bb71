"""Host-wide events: several processes of one host that deviate together make one incident of the host.

When several processes of one host deviate together with the same root-cause profile, the cause is
most likely the host (CPU contention, steal time on a VM, a noisy neighbour), not each process.
Such windows make one incident of the host (``scope='host'``, entity_id ``host:<host>``,
``members`` = the processes) instead of one per process; a process whose profile differs (the
culprit that spins while the others wait for a CPU) keeps its own incident. The rules are in
:meth:`HostEvents.group`; a process due to open an incident waits up to ``host_hold`` windows while
such an event may be forming (:meth:`HostEvents.stirs`), as the process with the lowest threshold
crosses first; ``host_min_entities=0`` turns them off. They see the entities held by one alerter:
run one alerter per group of hosts (the default, one alerter) for them to apply.

A host event's times ("seqs") are window end times in milliseconds, as windows of different
processes have unrelated sequence numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Mapping

from osad.schemas import Anomaly, Score

from . import contention
from .config import AlerterConfig
from .incidents import add_evidence, changed, new_incident, publish, should_close
from .state import EntityState, Evidence, HostState, Incident, Memory

#: weight of one window in an entity's running rate of each feature leading its contributions
TOP_FREQ_ALPHA = 0.02
#: windows an entity must have had before its usual leading features are trusted
TOP_FREQ_MIN_WINDOWS = 20


class HostEvents:
    """The host-wide events over the entities in ``memory``; ``counters`` counts host_opened,
    host_updated and host_closed."""

    def __init__(self, cfg: AlerterConfig, memory: Memory, counters: Counter):
        self.cfg = cfg
        self.memory = memory
        self.counters = counters

    # -- what each entity's windows say ---------------------------------------------------------
    def remember(self, ent: EntityState, ev: Evidence, s: Score) -> None:
        """Keep the recent over-threshold windows' weights: the entity's current root-cause profile."""
        ent.last_over_ts = max(ent.last_over_ts, ev.end_ts)
        ent.recent = self._recent_plus(ent.recent, [ev.end_ts, ev.weights], s, most=8 * self.cfg.open_after)

    def track_top(self, ent: EntityState, s: Score, learn: bool) -> None:
        """Remember which feature leads this score's contributions; with ``learn`` (the score is under
        threshold and no host-wide event is open), learn how often each feature leads."""
        top = _top_feature(s)
        if top is None:
            return
        ent.recent_top = self._recent_plus(ent.recent_top, [s.window_end_ts, top], s, most=4 * self.cfg.open_after)
        if learn:
            a = TOP_FREQ_ALPHA
            for f in list(ent.top_freq):
                ent.top_freq[f] *= 1 - a
                if ent.top_freq[f] < 1e-4:
                    del ent.top_freq[f]
            ent.top_freq[top] = ent.top_freq.get(top, 0.0) + a
            ent.top_n += 1

    def _recent_plus(self, rows: list, row: list, s: Score, most: int) -> list:
        """``rows`` ([window_end_ts, ...], oldest first) with ``row`` added, keeping the rows of the last
        ``2 * open_after`` windows, at most ``most``."""
        keep_from = row[0] - 2 * self.cfg.open_after * s.gap * s.interval_s
        return [r for r in rows if r[0] >= keep_from][-(most - 1):] + [row]

    # -- whether an event forms -----------------------------------------------------------------
    def group(self, ent: EntityState, hs: HostState, s: Score) -> list[EntityState] | None:
        """The entities to fold into a host-wide event with ``ent`` (which is over), or None.

        An open event takes ``ent`` while its recent profile is like the event's (cosine similarity
        at least ``host_similarity``, or the same leading feature). Otherwise an event forms when,
        among the host's judged entities that reported lately (at least ``host_min_entities``), at
        least ``host_min_entities`` and ``host_share`` of them moved together within the same
        ``open_after`` windows (with one window of slack, as windows of different processes need not
        be aligned), either way:

        * *together over*: they were over threshold, with profiles similar to ``ent``'s;
        * *a shared lead*: the feature that leads ``ent``'s profile led most of their recent windows,
          over threshold or not, and at least ``host_lift`` times as many entities as usual (each
          entity's usual rate is learnt from its windows under threshold). This is how contention
          looks: every process waits more for a CPU, a few cross their thresholds.

        Entities with an incident of their own count but keep it.
        """
        cfg = self.cfg
        view = self._view(ent, s)
        if view is None or self._runs_more(ent):
            return None
        w, since, mine, lead = view
        if hs.incident is not None:
            ev = hs.incident.evidence
            alike = _cosine(mine, ev) >= cfg.host_similarity or (ev and lead == _lead(ev))
            return [ent] if alike else None
        active = self._active(hs, since - w)
        need = self._need(len(active))
        if len(active) < need:
            return None
        together = [p for p in active if p is ent or (p.last_over_ts >= since - w and
                                                      _cosine(_profile(p, since - w), mine) >= cfg.host_similarity)]
        if len(together) >= need:
            return [p for p in together if p.incident is None and not self._runs_more(p)]
        shared = [p for p in active if _leads(p, lead, since - w)]
        usual = sum(_usual_lead(p, lead) for p in active)
        if ent in shared and len(shared) >= need and len(shared) >= cfg.host_lift * usual:
            return [p for p in shared if p.incident is None and not self._runs_more(p)]
        return None

    def _runs_more(self, ent: EntityState) -> bool:
        """``ent``'s CPU use rose as a culprit's does (osad.alerter.contention): never part of a host event,
        even when its profile is like the event's (contention led by ``on_cpu_ns``, which fell in the others)."""
        return contention.is_culprit(ent, self.cfg.contention_z, forming=True)

    def stirs(self, ent: EntityState, hs: HostState, s: Score) -> bool:
        """Whether ``ent``, due to open an incident of its own, should wait (up to ``host_hold`` windows)
        because a host-wide event may be forming: no event is open, and with ``ent`` at least half
        of the entities a host event needs (and ``host_min_entities``) show the start of one. A peer
        shows it when it was over threshold lately with a profile like ``ent``'s, or when ``ent``'s
        leading feature led its latest window and usually leads fewer than half of them. The entities
        that cross first (those with the lowest thresholds) are the ones this keeps out of incidents
        of their own."""
        if hs.incident is not None:
            return False
        view = self._view(ent, s)
        if view is None or self._runs_more(ent):
            return False
        w, since, mine, lead = view
        cfg, since = self.cfg, since - w
        active = self._active(hs, since)
        need = self._need(len(active))
        stirring = 1 + sum(1 for p in active if p is not ent and (
            (p.last_over_ts >= since and _cosine(_profile(p, since), mine) >= cfg.host_similarity)
            or (p.recent_top and p.recent_top[-1][0] >= since and p.recent_top[-1][1] == lead
                and _usual_lead(p, lead) < 0.5)))
        return stirring >= max(cfg.host_min_entities, math.ceil(need / 2))

    def _view(self, ent: EntityState, s: Score):
        """What judging ``ent`` against its host needs: the window length, the start of the last
        ``open_after`` windows, and ``ent``'s profile over them and its leading feature; None while
        ``ent`` has no profile."""
        w = s.gap * s.interval_s
        since = recent_since(self.cfg, s)
        mine = _profile(ent, since)
        return (w, since, mine, _lead(mine)) if mine else None

    def _active(self, hs: HostState, since: float) -> list[EntityState]:
        """The host's entities that are judged (past calibration) and reported at or after ``since``."""
        return [p for p in self.memory.peers(hs.host) if p.last_ts >= since
                and any(st.judged_threshold is not None for st in p.streams.values())]

    def _need(self, active: int) -> int:
        """How many entities a host event needs, among ``active`` judged entities of the host."""
        return max(self.cfg.host_min_entities, math.ceil(self.cfg.host_share * active))

    # -- the event's life -----------------------------------------------------------------------
    def fold(self, hs: HostState, members: list[EntityState], s: Score) -> list[Anomaly]:
        """Fold the members' windows over threshold into the host's event (opened if none is)."""
        t = _ms(s.window_end_ts)
        evs = [replace(ev, seq=_ms(ev.end_ts)) for m in members for st in m.streams.values() for ev in st.pending]
        inc, opened = hs.incident, False
        if inc is None:
            evs.sort(key=lambda e: (e.seq, e.model_id))
            inc = hs.incident = new_incident(hs.key, evs, hs.last_closed_seq, t, s.window_end_ts)
            hs.members, opened = [], True
        else:
            for ev in evs:
                add_evidence(inc, ev)
        dirty = self.memory.dirty
        for m in members:
            for st in m.streams.values():
                st.pending = []
            m.host_event = inc.anomaly_id
            if m.entity_id not in hs.members:
                hs.members.append(m.entity_id)
            dirty.add(m.entity_id)
        dirty.add(hs.key)
        if t > inc.last_seq:
            inc.last_seq, inc.last_ts = t, s.window_end_ts
        if opened:
            self.counters["host_opened"] += 1
            return [self._publish(hs, inc, "open", t)]
        if t > inc.published_seq and changed(self.cfg, inc):
            self.counters["host_updated"] += 1
            return [self._publish(hs, inc, "update", t)]
        return []

    def check(self, ent: EntityState, hs: HostState, s: Score) -> list[Anomaly]:
        """After a score of ``ent``: it leaves the host's event once under threshold for ``close_after``
        windows (or when it opened its own incident); the event closes when no member is in it or none
        was over for ``close_after`` windows (and a half, for unaligned windows)."""
        inc = hs.incident
        left = ent.host_event is not None and (inc is None or ent.host_event != inc.anomaly_id
                                               or ent.incident is not None or should_close(self.cfg, ent))
        if left:
            ent.host_event = None
        if inc is None:
            return []
        # whether any member is still in it can only change when one leaves
        entities = self.memory.entities
        held = not left or any((m := entities.get(e)) is not None and m.host_event == inc.anomaly_id
                               for e in hs.members)
        quiet = s.window_end_ts - inc.last_over_ts > (self.cfg.close_after + 0.5) * s.gap * s.interval_s
        return self.close(hs) if quiet or not held else []

    def close(self, hs: HostState, why: str = "") -> list[Anomaly]:
        """Close the host's open event; its members are in it no more."""
        inc, hs.incident = hs.incident, None
        hs.last_closed_seq = max(hs.last_closed_seq, inc.last_seq)
        entities, dirty = self.memory.entities, self.memory.dirty
        for e in hs.members:
            m = entities.get(e)
            if m is not None and m.host_event == inc.anomaly_id:
                m.host_event = None
                dirty.add(e)
        dirty.add(hs.key)
        self.counters["host_closed"] += 1
        return [self._publish(hs, inc, "closed", inc.last_seq, why)]

    def _publish(self, hs: HostState, inc: Incident, status: str, seq: int, why: str = "") -> Anomaly:
        names = [self.memory.name(e) for e in hs.members]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lead = (f"host {hs.host}: {len(names)} watched processes deviate together with the same profile ({shown}), "
                "a common cause on the host (e.g. CPU contention) rather than one process's own behaviour")
        return publish(self.cfg, hs.key, {"host": hs.host}, inc, status, seq, lead, why, scope="host",
                       members=list(hs.members), first_window_seq=None)


def recent_since(cfg: AlerterConfig, s: Score) -> float:
    """The start of the last ``open_after`` windows of ``s``'s entity (half a window of slack)."""
    return s.window_end_ts - (cfg.open_after - 0.5) * s.gap * s.interval_s


def _usual_lead(ent: EntityState, feature: str) -> float:
    """How often ``feature`` leads ``ent``'s windows under threshold (1 until enough were seen)."""
    if ent.top_n < TOP_FREQ_MIN_WINDOWS:
        return 1.0
    return ent.top_freq.get(feature, 0.0) / (1.0 - (1.0 - TOP_FREQ_ALPHA) ** ent.top_n)  # unbiased from 0


def _ms(ts: float) -> int:
    """A window end time as the integer "seq" of host-wide events (milliseconds)."""
    return int(round(ts * 1000))


def _profile(ent: EntityState, since: float) -> dict[str, float]:
    """Summed weights of ``ent``'s windows over threshold that end at or after ``since``."""
    out: dict[str, float] = {}
    for ts, weights in ent.recent:
        if ts >= since:
            for f, v in weights.items():
                out[f] = out.get(f, 0.0) + v
    return out


def _lead(profile: Mapping[str, float]) -> str:
    """The feature with the largest weight (ties: the last name)."""
    return max(profile, key=lambda f: (profile[f], f))


def _top_feature(s: Score) -> str | None:
    best, top = 0.0, None
    for f, c in zip(s.features, s.contributions):
        if math.isfinite(c) and c > best:
            best, top = c, f
    return top


def _leads(ent: EntityState, feature: str, since: float) -> bool:
    """``feature`` led at least half of ``ent``'s windows ending at or after ``since``."""
    tops = [f for ts, f in ent.recent_top if ts >= since]
    return bool(tops) and 2 * tops.count(feature) >= len(tops)


def _cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Cosine similarity of two non-negative feature profiles (0 when either is empty).

    >>> round(_cosine({"cpu": 1.0}, {"cpu": 2.0, "mem": 0.0}), 6), _cosine({"cpu": 1.0}, {"mem": 1.0})
    (1.0, 0.0)
    """
    dot = sum(v * b.get(f, 0.0) for f, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0
