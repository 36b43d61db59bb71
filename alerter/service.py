"""The alerter service: Scores in, Anomalies out (a thin shell over :class:`osad.alerter.core.Engine`).

Persistence follows the runner's at-least-once contract. The runner asks :meth:`Alerter.retained`
right after every output so far was acknowledged by the broker and before it commits input offsets;
at that point the alerter writes the changed entity states and the new anomaly revisions to the
store (one transaction) and hands the anomalies to the sinks. So a Score whose offset is committed
has its state persisted, and a restart resumes from the store without re-calibrating, without a
second anomaly for the same incident and without forgetting an open one. If the store cannot be
written, the offsets of the Scores since the last good write are retained (not committed) and the
write is retried at the next commit.
"""

from __future__ import annotations

import logging
import threading
import time

from osad.runtime.service import InputMeta, Output, Transform
from osad.runtime.sinks import Sink
from osad.schemas import ANOMALIES, SCORES, Anomaly, Score

from .config import AlerterConfig
from .core import Engine
from .store import STATE_TTL_S, Store, StoreError

log = logging.getLogger("osad.alerter")


class Alerter(Transform):
    name = "alerter"
    input = SCORES

    def __init__(self, cfg: AlerterConfig, store: Store, sinks: list[Sink] | tuple = (), clock=time.time,
                 sweep_every_s: float = 60.0, state_ttl_s: float = STATE_TTL_S):
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
        self._m = None
        self._seen: dict = {}
        # the runner may call revoke/retained from the consumer's IO thread during a rebalance
        self._lock = threading.RLock()

    def bind_metrics(self, metrics) -> None:
        self._m = {
            "events": metrics.counter("osad_alerter_events", "Alerter events (duplicate, calibrated, opened, updated, "
                                      "closed, closed_idle, loaded, evicted_idle, evicted_cap, "
                                      "held, host_opened, host_updated, host_closed)", ("event",)),
            "anomalies": metrics.counter("osad_alerter_anomalies", "Anomaly states published", ("status",)),
            "sink": metrics.counter("osad_alerter_sink", "Sink deliveries (sent, retried, failed, dropped)",
                                    ("sink", "result")),
            "store_errors": metrics.counter("osad_alerter_store_errors", "Failed store writes or reads"),
            "entities": metrics.gauge("osad_alerter_entities", "Entities held in memory"),
            "open": metrics.gauge("osad_alerter_open_incidents", "Open incidents held in memory"),
        }

    # -- transform ---------------------------------------------------------------------------
    def process(self, msg: Score, meta: InputMeta):
        with self._lock:
            self._partition[msg.entity_id] = meta.partition
            self._unsaved_from.setdefault(meta.partition, meta.offset)
            return self._out(self.engine.observe(msg, self.clock()))

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
                return False
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
            self._to_sinks.append(a)
            if self._m:
                self._m["anomalies"].labels(a.status).inc()
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
