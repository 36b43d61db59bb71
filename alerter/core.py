"""The alerter's logic, pure: Scores in, Anomalies out, no Kafka and no database.

:class:`Engine` runs one Score at a time through the parts, each a module of its own:

* :mod:`~osad.alerter.config`: the rules' settings (:class:`AlerterConfig`);
* :mod:`~osad.alerter.state`: what is remembered per stream (one (entity, model) pair), entity
  and host, and its persisted form;
* :mod:`~osad.alerter.thresholds`: each stream's threshold, without labels (a static override,
  the model's own, or POT on the stream's first scores);
* :mod:`~osad.alerter.incidents`: one incident per entity, opened, updated and closed; severity,
  root cause and the published Anomaly;
* :mod:`~osad.alerter.host_events`: processes of one host that deviate together make one
  incident of the host.

A score is *over* when ``score > threshold``; its *ratio* is ``score / threshold``. A Score whose
window_end_seq is not after its stream's last one is a duplicate and ignored.

Example::

    >>> from osad.schemas import Score
    >>> eng = Engine(AlerterConfig(calibration_scores=20))
    >>> def score(seq, value, contrib=(1.0, 1.0)):
    ...     return Score(entity_id="h/1@2", host="h", window_end_ts=float(seq), window_end_seq=seq, interval_s=1.0,
    ...                  gap=1, model_id="cs-jumpstarter:x", score=value, features=["cpu", "mem"],
    ...                  contributions=list(contrib))
    >>> out = [a for i in range(20) for a in eng.observe(score(i, 1.0 + 0.01 * (i % 7)), now=0.0)]
    >>> out += eng.observe(score(20, 5.0, (0.1, 0.9)), now=0.0) + eng.observe(score(21, 6.0, (0.1, 0.9)), now=0.0)
    >>> [(a.status, a.severity, a.root_causes[0].feature) for a in out]
    [('open', 'high', 'mem')]
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Callable

from osad.schemas import Anomaly, Score

from . import contention
from .config import AlerterConfig, parse_threshold_override
from .host_events import HostEvents, recent_since
from .incidents import (SEVERITY_BOUNDS, add_evidence, anomaly_id_for, changed, evidence_of, open_incident,
                        publish_entity, severity_of, should_close)
from .state import STATE_VERSION, EntityState, Evidence, HostState, Incident, Memory, Stream, host_key
from .thresholds import MIN_THRESHOLD, given_threshold, learn, model_family

__all__ = ["Engine", "AlerterConfig", "parse_threshold_override", "anomaly_id_for", "severity_of", "model_family",
           "host_key", "EntityState", "HostState", "Incident", "Evidence", "Stream", "SEVERITY_BOUNDS",
           "MIN_THRESHOLD", "STATE_VERSION"]


class Engine:
    """Per-entity incidents over a stream of Scores.

    ``load(entity_id)`` returns a persisted state (:meth:`EntityState.to_dict`) or None; it is asked
    the first time an entity is seen. :meth:`take_dirty` hands over the states to persist.
    ``counters`` counts events (duplicate, armed, calibrated, opened, updated, closed, closed_idle,
    evicted_idle, evicted_cap, loaded, held, host_opened, host_updated, host_closed, victim_joined, victim_held).
    """

    def __init__(self, cfg: AlerterConfig | None = None, load: Callable[[str], dict | None] | None = None):
        self.cfg = cfg or AlerterConfig()
        self.counters: Counter = Counter()
        self.memory = Memory(self.cfg.max_entities, load, self.counters)
        self.host_events = HostEvents(self.cfg, self.memory, self.counters)

    @property
    def entities(self) -> OrderedDict[str, EntityState]:
        """The entities in memory, least recently seen first."""
        return self.memory.entities

    @property
    def hosts(self) -> dict[str, HostState]:
        return self.memory.hosts

    def drop(self, entity_ids) -> dict[str, dict]:
        """Forget these entities (e.g. their partitions moved); returns their states to persist."""
        return self.memory.drop(entity_ids)

    def take_dirty(self) -> dict[str, dict]:
        """States changed since the last call (entity id -> state dict), to persist."""
        return self.memory.take_dirty()

    def open_incidents(self) -> int:
        return self.memory.open_incidents()

    # -- scores -----------------------------------------------------------------------------
    def observe(self, s: Score, now: float) -> list[Anomaly]:
        """One Score; returns the Anomaly states to publish (0 or 1)."""
        cfg, mem, hosts = self.cfg, self.memory, self.host_events
        ent = mem.entity(s, now)
        st = ent.streams.get(s.model_id)
        if st is None:
            self._prune_streams(ent)
            st = ent.streams[s.model_id] = Stream(s.model_id)
        seq = s.window_end_seq
        if st.last_seq is not None and seq <= st.last_seq:
            self.counters["duplicate"] += 1
            return []
        mem.dirty.add(ent.entity_id)
        st.last_seq, st.gap = seq, s.gap
        ent.max_seq = max(ent.max_seq, seq)
        ent.last_ts = max(ent.last_ts, s.window_end_ts)
        hs = mem.host(ent.ref["host"], now) if cfg.host_min_entities != 0 else None
        given = given_threshold(cfg, s)
        thr = st.threshold if given is None else given
        over = thr is not None and math.isfinite(s.score) and s.score > thr
        if given is None:  # the stream's own threshold: it calibrates and adapts on the windows judged normal
            normal = (not over and ent.incident is None and ent.host_event is None and ent.affected_by is None)
            event = learn(cfg, st, s, normal)
            if event:
                self.counters[event] += 1
        if hs is not None:
            hosts.track_top(ent, s, learn=not over and hs.incident is None)
        if cfg.contention_z > 0:
            contention.measure(ent, s, learn=not over and ent.incident is None and ent.affected_by is None
                               and (hs is None or hs.incident is None))
        if thr is None:
            return []  # calibrating: not judged
        st.judged_threshold = thr
        inc = ent.incident
        opened = False
        if over:
            ev = evidence_of(s, thr)
            st.over_run += 1
            st.under_run = 0
            hosts.remember(ent, ev, s)
            if inc is None:
                st.pending = (st.pending + [ev])[-(cfg.open_after + cfg.host_hold):]
                due = st.over_run >= cfg.open_after
                if cfg.contention_z > 0 and (due or ent.host_event):
                    handled = self._victim(ent, hs, s)
                    if handled is not None:
                        return handled
                if hs is not None and (ent.host_event or due):
                    group = hosts.group(ent, hs, s)
                    if group:
                        return hosts.fold(hs, group, s)
                    if due and st.over_run < cfg.open_after + cfg.host_hold and hosts.stirs(ent, hs, s):
                        self.counters["held"] += 1
                        due = False
                if due:
                    inc, opened = open_incident(ent, s), True
            else:
                add_evidence(inc, ev)
        else:
            st.over_run = 0
            st.under_run += 1
            st.pending = []
            if ent.affected_by is not None and should_close(cfg, ent):
                ent.affected_by = None
        out = hosts.check(ent, hs, s) if hs is not None else []
        if inc is None:
            return out
        if seq > inc.last_seq:
            inc.last_seq, inc.last_ts = seq, s.window_end_ts
        if contention.is_culprit(ent, cfg.contention_z):
            self._name_slowed(ent, inc, s)
        if opened:
            self.counters["opened"] += 1
            return out + [publish_entity(cfg, ent, inc, "open", seq, name=mem.name)]
        if should_close(cfg, ent):
            ent.incident = None
            ent.last_closed_seq = max(ent.last_closed_seq, inc.last_seq)
            self.counters["closed"] += 1
            return out + [publish_entity(cfg, ent, inc, "closed", seq, name=mem.name)]
        if seq > inc.published_seq and changed(cfg, inc):
            self.counters["updated"] += 1
            return out + [publish_entity(cfg, ent, inc, "update", seq, name=mem.name)]
        return out

    # -- culprit and victims (osad.alerter.contention) ------------------------------------------
    def _victim(self, ent: EntityState, hs: HostState | None, s: Score) -> list[Anomaly] | None:
        """``ent`` (over threshold, no incident of its own, due to open one or in a host event) as a victim
        of CPU contention: the Anomalies to publish, or None when it is not one."""
        mem, z, since = self.memory, self.cfg.contention_z, recent_since(self.cfg, s)
        recent = ent.victim_ts >= since - s.gap * s.interval_s
        joined = mem.entities.get(ent.affected_by) if ent.affected_by else None
        if joined is not None and (joined.incident is None or ent.entity_id not in joined.incident.affected):
            joined = None  # that incident closed
        # a joined victim's pending windows are with its culprit: judged by the newest one's evidence
        evidence = contention.evidence_of_pending(ent)
        if not contention.is_victim(ent, evidence, z, recent):
            ent.affected_by = None  # no victim (any more): judged as a process of its own
            return None
        ent.victim_ts = s.window_end_ts
        mem.dirty.add(ent.entity_id)
        culprit = joined or contention.culprit_of(ent, mem.peers(ent.ref["host"]), z, since)
        if culprit is not None:
            if ent.entity_id not in culprit.incident.affected:
                culprit.incident.affected.append(ent.entity_id)
                mem.dirty.add(culprit.entity_id)
            if ent.affected_by != culprit.entity_id:
                ent.affected_by = culprit.entity_id
                self.counters["victim_joined"] += 1
            for st in ent.streams.values():
                st.pending = st.pending[-1:]  # the newest window judges the next one
            return []
        if contention.culprit_of(ent, mem.peers(ent.ref["host"]), z, since, forming=True) is not None:
            self.counters["victim_held"] += 1  # a peer's CPU use rose: its incident is about to open
            return []
        if hs is not None:
            if hs.incident is not None:
                return self.host_events.fold(hs, [ent], s)
            others = [p for p in mem.peers(hs.host) if p is not ent and p.victim_ts >= since
                      and p.incident is None and p.host_event is None and p.affected_by is None]
            if others:  # contention from outside the watched processes: a host event of two or more
                return self.host_events.fold(hs, [ent] + others, s)
        self.counters["victim_held"] += 1
        return []

    def _name_slowed(self, culprit: EntityState, inc: Incident, s: Score) -> None:
        """Add to the culprit's incident the neighbours its CPU use slows now (over threshold or not)."""
        since = recent_since(self.cfg, s)
        for p in self.memory.peers(culprit.ref["host"]):
            if (p is not culprit and p.last_ts >= since and p.incident is None and p.entity_id not in inc.affected
                    and contention.slowed(p, self.cfg.contention_z)):
                inc.affected.append(p.entity_id)

    def _prune_streams(self, ent: EntityState) -> None:
        """A new model joins: forget models that stopped reporting long ago (e.g. a replaced checkpoint)."""
        for mid, st in list(ent.streams.items()):
            if st.last_seq is not None and ent.max_seq - st.last_seq > 10 * self.cfg.stale_windows * max(st.gap, 1):
                del ent.streams[mid]

    # -- time and absence -------------------------------------------------------------------
    def tick(self, now: float) -> list[Anomaly]:
        """Close the incidents of entities idle for ``idle_timeout_s`` and forget those entities."""
        mem = self.memory
        out = []
        limit = now - self.cfg.idle_timeout_s
        for eid, ent in list(mem.entities.items()):
            if ent.last_seen > limit:
                break  # ordered by last seen: the rest are newer
            out += self.close_idle(eid)
            mem.forget(eid, ent)
            self.counters["evicted_idle"] += 1
        for host, hs in list(mem.hosts.items()):
            if hs.last_seen > limit:
                continue
            if hs.incident is not None:
                out += self.host_events.close(hs, why="no scores")
            if not mem.by_host.get(host):
                mem.by_host.pop(host, None)
                mem.forget_host(hs)
        return out

    def close_idle(self, eid: str) -> list[Anomaly]:
        ent = self.entities.get(eid)
        if ent is None or ent.incident is None:
            return []
        inc, ent.incident = ent.incident, None
        ent.last_closed_seq = max(ent.last_closed_seq, inc.last_seq)
        self.memory.dirty.add(eid)
        self.counters["closed_idle"] += 1
        return [publish_entity(self.cfg, ent, inc, "closed", inc.last_seq, why="no scores",
                               name=self.memory.name)]

    def close_stale(self, snapshot: dict) -> list[Anomaly]:
        """Close the incident of a persisted state that no Score brought (an entity that went away
        while no alerter ran). Nothing happens when the entity is in memory (it is live here)."""
        mem = self.memory
        if snapshot.get("kind") == "host":
            hs = HostState.from_dict(snapshot)
            if hs.host in mem.hosts or hs.incident is None or hs.key in mem.evicted:
                return []
            out = self.host_events.close(hs, why="no scores")
            mem.hand_over(hs.key, hs.to_dict())
            return out
        ent = EntityState.from_dict(snapshot)
        eid = ent.entity_id
        if eid in mem.entities or eid in mem.evicted or ent.incident is None:
            return []
        mem.entities[eid] = ent
        out = self.close_idle(eid)
        mem.forget(eid, ent)
        return out
