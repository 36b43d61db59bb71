"""The featurizer service: Samples in, SignatureWindows out (a thin shell over featurizer.windows)."""

from __future__ import annotations

import time

from osad.runtime.service import InputMeta, Output, Transform
from osad.schemas import SAMPLES, SIGNATURES, Sample, SignatureWindow

from .ranges import RangesStore
from .windows import WindowConfig, WindowStore


class Featurizer(Transform):
    name = "featurizer"
    input = SAMPLES

    def __init__(self, cfg: WindowConfig, ranges: RangesStore | None = None, features: list[str] | None = None,
                 clock=time.monotonic):
        self.cfg = cfg
        self.ranges = ranges or RangesStore()
        self.store = WindowStore(cfg, ranges_lookup=self.ranges.lookup, ranges_sink=self.ranges.save, features=features)
        self.clock = clock
        self._last_evict = 0.0
        self._events = None
        self._seen: dict[str, int] = {}

    def bind_metrics(self, metrics) -> None:
        self._events = metrics.counter("osad_featurizer_events", "Input policy events (duplicate, late, filled, "
                                       "reset, missing_value, calibrated, evicted_idle, ...)", ("event",))
        self._entities = metrics.gauge("osad_featurizer_entities", "Entities with live window state")

    def process(self, msg: Sample, meta: InputMeta):
        return self.process_batch([(msg, meta)])

    def process_batch(self, batch: list[tuple[Sample, InputMeta]]):
        """Group a poll's samples by entity (keeping each entity's order) and window them in runs."""
        by_entity: dict[str, list] = {}
        for msg, meta in batch:
            by_entity.setdefault(msg.entity_id, []).append((msg, meta))
        now = self.clock()
        out = []
        for eid, rows in by_entity.items():
            items = [(m.seq, m.metrics, meta.offset) for m, meta in rows]
            wins = self.store.add_many(eid, items, partition=rows[-1][1].partition, now=now)
            if not wins:
                continue
            msg = rows[-1][0]  # the latest sample names the process and dates the windows
            st = wins[0][0]
            scaling_id = st.window.ranges.scaling_id
            for _, w in wins:
                out.append(Output(SIGNATURES, SignatureWindow(
                    entity_id=eid, host=msg.host, pid=msg.pid, comm=msg.comm, cgroup=msg.cgroup,
                    container_id=msg.container_id,
                    window_end_ts=msg.ts - (msg.seq - w.end_seq) * msg.interval_s,
                    window_end_seq=w.end_seq, interval_s=msg.interval_s, gap=self.cfg.gap,
                    scales=list(self.cfg.scales), features=list(st.features), scaling_id=scaling_id,
                    tri=w.tri, values=w.values,
                )))
        return out

    def tick(self, now: float):
        mono = self.clock()
        if mono - self._last_evict >= 1.0:
            self._last_evict = mono
            self.store.evict_idle(mono)
            self._export()
        return ()

    def _export(self) -> None:
        if self._events is None:
            return
        for k, v in self.store.counters.items():
            d = v - self._seen.get(k, 0)
            if d:
                self._events.labels(k).inc(d)
                self._seen[k] = v
        self._entities.set(len(self.store.entities))

    def retained(self) -> dict[int, int]:
        return self.store.retained()

    def revoke(self, partitions: set[int]):
        self.store.drop_partitions(partitions)
        return ()
