"""The alerter service: Scores in, Anomalies out (a thin shell over :class:`osad.alerter.core.Engine`).

Persistence follows the runner's at-least-once contract. The runner asks :meth:`Alerter.retained`
right after every output so far was acknowledged by the broker and before it commits input offsets;
at that point the alerter writes the changed entity states and the new anomaly revisions to the
store (one transaction) and hands the anomalies to the sinks. So a Score whose offset is committed
has its state persisted, and a restart resumes from the store without re-calibrating, without a
second anomaly for the same incident and without forgetting an open one. If the store cannot be
written, the offsets of the Scores since the last good write are retained (not committed) and the
write is retried at the next commit.

Metrics (``bind_metrics``) besides the runtime's: events, anomaly states by status, incidents opened and
closed by severity and scope, sink deliveries, store errors, entities and open incidents, a histogram of
score / threshold of the judged Scores by model family, and two families rendered from the engine's memory
at scrape time (:class:`_StateCollector`), so a series exists exactly while its entity is in memory (at most
``--max-entities``; an entity leaves after ``--idle-timeout-s`` without Scores, when it is the least recently
seen over the cap, or when its partition moves): ``osad_alerter_threshold{entity, host, model}`` (the threshold
each judged stream is judged by) and ``osad_alerter_incident_max_ratio{entity, host, scope, severity}`` (each
open incident's largest score / threshold).
"""

from __future__ import annotations

import logging
import math
import threading
import time

from prometheus_client.core import GaugeMetricFamily

from osad.runtime.service import InputMeta, Output, Transform
from osad.runtime.sinks import Sink
from osad.schemas import ANOMALIES, SCORES, SEVERITIES, Anomaly, Score

from .config import AlerterConfig
from .core import Engine
from .incidents import severity_of
from .store import STATE_TTL_S, Store, StoreError
from .thresholds import model_family

#: anomalies published up to this long before the store's last checkpoint are looked for on the topic too
REPUBLISH_MARGIN_S = 60.0
#: buckets of osad_alerter_score_ratio (score / threshold); 1.5, 3 and 10 are the severity bounds
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 3.0, 10.0, 30.0, 100.0)
SCOPES = ("entity", "host")

log = logging.getLogger("osad.alerter")


class Alerter(Transform):
    name = "alerter"
    input = SCORES

    def __init__(self, cfg: AlerterConfig, store: Store, sinks: list[Sink] | tuple = (), clock=time.time,
                 sweep_every_s: float = 60.0, state_ttl_s: float = STATE_TTL_S, published=None):
        self.cfg = cfg
        self.store = store
        self.sinks = list(sinks)
        self.clock = clock
        self.engine = Engine(cfg, load=self._load)
        self.sweep_every_s, self.state_ttl_s = sweep_every_s, state_ttl_s
        self._last_sweep = clock()
        self._partition: dict[str, int] = {}
        self._unsaved_states: dict[str, dict | None] = {}
        self._unsaved: dict[str, Anomaly] = {}  # anomaly_id -> newest revision not yet in the store
        self._to_sinks: list[Anomaly] = []
        self._unsaved_from: dict[int, int] = {}  # partition -> oldest offset whose effect is not in the store
        self._store_problem: tuple[float, str, str] | None = None  # (since, reason, error) while writes fail
        self._m = None
        self._seen: dict = {}
        # published(since_ts) -> {(anomaly_id, revision)} on the anomalies topic since then (alerter/cli.py reads
        # the topic); asked once after each assignment, lazily, before the first anomaly is published
        self._published_lookup = published
        self._published: set = set()
        self._look_again = published is not None
        # the runner may call revoke/retained from the consumer's IO thread during a rebalance
        self._lock = threading.RLock()

    def bind_metrics(self, metrics) -> None:
        self._m = {
            "events": metrics.counter("osad_alerter_events", "Alerter events (duplicate, calibrated, opened, updated, "
                                      "closed, closed_idle, loaded, evicted_idle, evicted_cap, "
                                      "held, host_opened, host_updated, host_closed, victim_joined, victim_held, "
                                      "republish_skipped)", ("event",)),
            "anomalies": metrics.counter("osad_alerter_anomalies", "Anomaly states published", ("status",)),
            "sink": metrics.counter("osad_alerter_sink", "Sink deliveries (sent, retried, failed, dropped)",
                                    ("sink", "result")),
            "store_errors": metrics.counter("osad_alerter_store_errors", "Failed store writes or reads"),
            "entities": metrics.gauge("osad_alerter_entities", "Entities held in memory"),
            "open": metrics.gauge("osad_alerter_open_incidents", "Open incidents held in memory"),
            "opened": metrics.counter("osad_alerter_incidents_opened", "Incidents opened (anomalies published "
                                      "with status open), by severity at opening and scope (entity, host)",
                                      ("severity", "scope")),
            "closed": metrics.counter("osad_alerter_incidents_closed", "Incidents closed, by final severity and "
                                      "scope (entity, host)", ("severity", "scope")),
            "ratio": metrics.histogram("osad_alerter_score_ratio", "Score / threshold of the judged Scores, by "
                                       "model family (over 1: over threshold)", RATIO_BUCKETS, ("model",)),
        }
        for sev in SEVERITIES:  # every series exists from the start, so the first increment shows in rate()
            for scope in SCOPES:
                self._m["opened"].labels(sev, scope)
                self._m["closed"].labels(sev, scope)
        metrics.add_collector(_StateCollector(self, metrics.service))

    # -- transform ---------------------------------------------------------------------------
    def process(self, msg: Score, meta: InputMeta):
        with self._lock:
            self._partition[msg.entity_id] = meta.partition
            self._unsaved_from.setdefault(meta.partition, meta.offset)
            if self._m is None:
                return self._out(self.engine.observe(msg, self.clock()))
            c = self.engine.counters
            before = c["duplicate"], c["calibrated"]
            out = self._out(self.engine.observe(msg, self.clock()))
            if (c["duplicate"], c["calibrated"]) == before:  # neither a duplicate nor calibration's last score
                self._observe_ratio(msg)
            return out

    def _observe_ratio(self, msg: Score) -> None:
        ent = self.engine.entities.get(msg.entity_id)
        st = ent.streams.get(msg.model_id) if ent is not None else None
        thr = st.judged_threshold if st is not None and st.last_seq == msg.window_end_seq else None
        if thr is not None and math.isfinite(msg.score):  # judged (a calibrating stream has no judged threshold)
            self._m["ratio"].labels(model_family(msg.model_id)).observe(msg.score / thr)

    def tick(self, now: float):
        with self._lock:
            out = self.engine.tick(now)
            if now - self._last_sweep >= self.sweep_every_s:
                self._last_sweep = now
                out += self._sweep(now)
            self._export()
            return self._out(out)

    def acknowledged(self) -> None:
        """Every anomaly so far is on the topic: write state and anomalies to the store now."""
        with self._lock:
            self._saved = self.checkpoint()

    def retained(self) -> dict[int, int]:
        """Nothing once the store has everything; else the Scores not yet saved are read again after a restart."""
        with self._lock:
            return {} if getattr(self, "_saved", False) else dict(self._unsaved_from)

    def assigned(self, partitions: set[int]) -> None:
        """Scores not committed before are read again now; the anomalies they give may be on the topic already
        (this process, or the partitions' previous owner, published them and died before its checkpoint)."""
        self._look_again = self._published_lookup is not None

    def _already_published(self, a: Anomaly) -> bool:
        if self._look_again:
            self._look_again = False
            since = self.store.last_saved_at()
            # what was published after the last checkpoint (a margin for clocks); no checkpoint yet: everything
            since = (since - REPUBLISH_MARGIN_S) if since is not None else 0.0
            try:
                self._published = self._published_lookup(since)
            except Exception as e:  # noqa: BLE001 - then a repeat is possible, as before; say so
                log.warning("could not read the anomalies already published (%s); a restart may repeat one", e)
            else:
                log.info("%d anomaly revisions were published since the last checkpoint; they will not be "
                         "published again", len(self._published))
        return (a.anomaly_id, a.revision) in self._published

    def revoke(self, partitions: set[int]):
        with self._lock:
            gone = [e for e, p in self._partition.items() if p in partitions]
            self._unsaved_states.update(self.engine.take_dirty())  # written by the checkpoint that follows
            self.engine.drop(gone)  # the next owner loads them from the store
            for e in gone:
                del self._partition[e]
            for p in partitions:
                self._unsaved_from.pop(p, None)
            return ()

    def close(self):
        return ()  # open incidents stay open: their state is persisted by the final commit

    def health(self) -> dict:
        """/healthz's ``store`` entry: whether the latest write reached the store (read without the lock,
        which a write waiting on the disk may hold)."""
        p = self._store_problem
        if p is None:
            return {"store": {"ok": True}}
        since, reason, error = p
        return {"store": {"ok": False, "problem": reason, "error": error,
                          "failing_for_s": round(max(0.0, self.clock() - since), 1)}}

    def shutdown(self, sink_timeout_s: float = 5.0) -> None:
        """After the runner stopped: last write, drain the sinks, close the store."""
        self.checkpoint()
        for s in self.sinks:
            s.close(sink_timeout_s)
        self._export()
        self.store.close()

    # -- persistence -------------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """Hand new anomalies to the sinks and write states and anomalies to the store. False if the store failed."""
        with self._lock:
            return self._checkpoint()

    def _checkpoint(self) -> bool:
        to_sinks, self._to_sinks = self._to_sinks, []
        for a in to_sinks:
            for s in self.sinks:
                s.send(a)
        self._unsaved_states.update(self.engine.take_dirty())
        if self._unsaved or self._unsaved_states:
            try:
                self.store.save(self._unsaved.values(), self._unsaved_states, now=self.clock())
            except StoreError as e:
                log.error("store write failed (will retry; input offsets are not committed meanwhile): %s", e)
                if self._m:
                    self._m["store_errors"].inc()
                since = self._store_problem[0] if self._store_problem else self.clock()
                self._store_problem = (since, getattr(e, "reason", "error"), str(e))
                return False
        self._store_problem = None
        self._unsaved.clear()
        self._unsaved_states.clear()
        self._unsaved_from.clear()
        live = self.engine.entities
        if len(self._partition) > 2 * len(live) + 1000:
            self._partition = {e: p for e, p in self._partition.items() if e in live}
        return True

    def _load(self, entity_id: str) -> dict | None:
        if entity_id in self._unsaved_states:
            return self._unsaved_states[entity_id]
        delay = 0.5
        for attempt in range(3):
            try:
                return self.store.load_state(entity_id)
            except StoreError as e:
                if self._m:
                    self._m["store_errors"].inc()
                if attempt == 2:
                    raise StoreError(f"cannot load the alerter state of {entity_id}: {e}") from None
                time.sleep(delay)
                delay *= 2
        return None

    def _sweep(self, now: float) -> list[Anomaly]:
        """Close incidents that no alerter holds (their entity went quiet while none ran); prune old states."""
        out: list[Anomaly] = []
        try:
            for snap in self.store.stale_open_states(now - 2 * self.cfg.idle_timeout_s):
                out += self.engine.close_stale(snap)
            self.store.prune_states(now - self.state_ttl_s)
        except (StoreError, ValueError, KeyError, TypeError) as e:
            log.warning("sweeping stale incidents failed: %s", e)
        return out

    def _out(self, anomalies: list[Anomaly]) -> list[Output]:
        out = []
        for a in anomalies:
            cur = self._unsaved.get(a.anomaly_id)
            if cur is None or a.revision > cur.revision:
                self._unsaved[a.anomaly_id] = a
            if self._published_lookup is not None and self._already_published(a):
                self.engine.counters["republish_skipped"] += 1
                log.info("anomaly %s rev %d is on the topic already (published before a restart); not again",
                         a.anomaly_id[:12], a.revision)
                continue
            self._to_sinks.append(a)
            if self._m:
                self._m["anomalies"].labels(a.status).inc()
                if a.status in ("open", "closed"):
                    self._m["opened" if a.status == "open" else "closed"].labels(a.severity, a.scope).inc()
            log.info("anomaly %s rev %d %s %s: %s", a.anomaly_id[:12], a.revision, a.status, a.severity, a.summary)
            out.append(Output(ANOMALIES, a, key=a.entity_id))
        return out

    def _export(self) -> None:
        if self._m is None:
            return
        for k, v in self.engine.counters.items():
            d = v - self._seen.get(("e", k), 0)
            if d:
                self._m["events"].labels(k).inc(d)
                self._seen[("e", k)] = v
        for s in self.sinks:
            for k, v in list(s.counts.items()):
                d = v - self._seen.get((s.name, k), 0)
                if d:
                    self._m["sink"].labels(s.name, k).inc(d)
                    self._seen[(s.name, k)] = v
        self._m["entities"].set(len(self.engine.entities))
        self._m["open"].set(self.engine.open_incidents())


class _StateCollector:
    """``osad_alerter_threshold`` and ``osad_alerter_incident_max_ratio``, rendered from the engine's memory
    when /metrics is scraped (under the alerter's lock): nothing to remove when an entity leaves memory."""

    def __init__(self, alerter: Alerter, service: str):
        self.alerter, self.service = alerter, service

    def _families(self):
        thr = GaugeMetricFamily("osad_alerter_threshold", "Threshold each judged stream (entity, model family) is "
                                "judged by; streams still calibrating have none",
                                labels=["service", "entity", "host", "model"])
        ratio = GaugeMetricFamily("osad_alerter_incident_max_ratio", "Largest score / threshold of each open "
                                  "incident (entity or host-wide event), with its severity",
                                  labels=["service", "entity", "host", "scope", "severity"])
        return thr, ratio

    def describe(self):
        return list(self._families())

    def collect(self):
        thr, ratio = self._families()
        al = self.alerter
        stale = al.cfg.stale_windows
        with al._lock:
            for eid, ent in al.engine.entities.items():
                host = str(ent.ref.get("host") or "")
                live: dict[str, tuple[int, float]] = {}  # family -> (last seq, threshold) of its newest stream
                for st in ent.streams.values():
                    if st.judged_threshold is None or st.last_seq is None \
                            or ent.max_seq - st.last_seq > stale * max(st.gap, 1):
                        continue
                    fam = model_family(st.model_id)
                    if fam not in live or st.last_seq > live[fam][0]:
                        live[fam] = (st.last_seq, st.judged_threshold)
                for fam, (_, value) in sorted(live.items()):
                    thr.add_metric([self.service, eid, host, fam], value)
                if ent.incident is not None:
                    inc = ent.incident
                    ratio.add_metric([self.service, eid, host, "entity", severity_of(inc.max_ratio)], inc.max_ratio)
            for hs in al.engine.hosts.values():
                if hs.incident is not None:
                    inc = hs.incident
                    ratio.add_metric([self.service, hs.key, hs.host, "host", severity_of(inc.max_ratio)],
                                     inc.max_ratio)
        yield thr
        yield ratio
