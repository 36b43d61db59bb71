"""``osad replay DIR``: publish a benchmark data set as Samples, the collector's second source.

One entity per machine/service (entity id ``{dataset}/{entity}``, e.g. ``SMD/machine-1-6``);
features ``f01..fNN``; ``seq`` is the row number (train rows first, then test rows, when both
are replayed); ``ts`` = ``--start-ts`` + (seq + 1) * the data set's interval. Entities are
interleaved row by row. ``--rate`` paces rows per second per entity; 0 = as fast as possible.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from osad.core.datasets import DatasetError, Entity, dataset_name, list_entities, load_entity
from osad.core.signature import Ranges, write_ranges_file
from osad.runtime.config import (Config, ConfigError, KafkaConfig, ServiceConfig, non_negative, positive, section,
                                 setting, setup_logging)
from osad.schemas import SAMPLES, Sample

log = logging.getLogger("osad.replay")

#: --start-ts default: the timestamp base of replayed rows (row seq has ts = this + (seq + 1) * interval)
DEFAULT_START_TS = 1_700_000_000.0


@dataclass(frozen=True)
class ReplayConfig(Config):
    """publish a benchmark data set (SMD/ASD/JumpStarter layout) as Samples"""

    dir: str = setting(positional=True,
                       help="data set folder holding train/ (and test/), e.g. ../shared/datasets/SMD")
    kafka: KafkaConfig = section(KafkaConfig)
    service: ServiceConfig = section(ServiceConfig)  # its --log-level (and --metrics-port); no --group
    entity: list[str] = setting([], repeat=",", help="entity to replay (default: all)")
    split: str = setting("both", choices=("train", "test", "both"), help="which rows to publish")
    limit: int | None = setting(None, check=positive, help="at most this many rows per entity")
    skip: int = setting(0, check=non_negative, help="skip this many rows of the split first")
    rate: float = setting(0.0, check=non_negative, help="rows per second per entity (0: as fast as possible)")
    start_ts: float = setting(DEFAULT_START_TS, help="timestamp of row 0 (Unix seconds)")
    write_ranges: str | None = setting(None, help="also write min-max ranges of the train rows it publishes (all "
                                       "train rows with --split test) to this JSON file (for `osad featurizer "
                                       "--ranges`)")
    dry_run: bool = setting(False, help="only load (and --write-ranges); publish nothing")


@dataclass
class ReplayPlan:
    entities: list[Entity]
    split: str  # train | test | both
    limit: int | None  # rows per entity
    offset: int = 0  # first row (of the chosen split) to publish

    def rows(self, e: Entity) -> tuple[np.ndarray, int]:
        """(rows to publish, seq of the first one)."""
        if self.split == "train":
            data, seq0 = e.train, 0
        elif self.split == "test":
            if e.test is None:
                raise DatasetError(f"{e.entity_id} has no test split")
            data, seq0 = e.test, e.train.shape[0]
        else:
            data = e.train if e.test is None else np.vstack([e.train, e.test])
            seq0 = 0
        data = data[self.offset:]
        if self.limit is not None:
            data = data[: self.limit]
        return data, seq0 + self.offset


def load_plan(path: str, names: list[str] | None, split: str, limit: int | None, offset: int = 0) -> ReplayPlan:
    avail = list_entities(path)
    names = names or avail
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise DatasetError(f"{path}: no entity {', '.join(unknown)}; available: {', '.join(avail)}")
    return ReplayPlan([load_entity(path, n) for n in names], split, limit, offset)


def samples(plan: ReplayPlan, start_ts: float, host: str = "replay"):
    """Yield Samples of all entities, interleaved row by row."""
    series = []
    for e in plan.entities:
        data, seq0 = plan.rows(e)
        series.append((e, data, seq0, e.feature_names))
    longest = max((d.shape[0] for _, d, _, _ in series), default=0)
    for i in range(longest):
        for e, data, seq0, names in series:
            if i >= data.shape[0]:
                continue
            seq = seq0 + i
            yield Sample(entity_id=e.entity_id, host=host, pid=None, comm=e.name,
                         ts=start_ts + (seq + 1) * e.interval_s, interval_s=e.interval_s, seq=seq,
                         metrics=dict(zip(names, data[i].tolist())))


def train_rows(plan: ReplayPlan, e: Entity) -> np.ndarray:
    """The train rows this replay publishes (``--skip``/``--limit`` applied); all of them when it
    publishes only test rows."""
    if plan.split == "test":
        return e.train
    data, seq0 = plan.rows(e)
    n = max(0, min(data.shape[0], e.train.shape[0] - seq0))  # seq0: the first row's number in train + test
    return data[:n] if n else e.train


def train_ranges(plan: ReplayPlan) -> dict[str, Ranges]:
    """Min-max ranges per entity fitted on :func:`train_rows` (what ``osad evaluate --limit-train``
    fits on when the replay skips the same head)."""
    return {e.entity_id: Ranges.fit(e.feature_names, train_rows(plan, e)) for e in plan.entities}


def run(args) -> int:
    return replay(ReplayConfig.from_args(args))


def replay(cfg: ReplayConfig) -> int:
    """Load the rows ``cfg`` names, write their ranges if asked, and publish them as Samples."""
    setup_logging(cfg.service.log_level)
    try:
        plan = load_plan(cfg.dir, cfg.entity, cfg.split, cfg.limit, cfg.skip)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    if cfg.write_ranges:
        write_ranges_file(cfg.write_ranges, train_ranges(plan))
        print(f"wrote train-split scaling ranges of {len(plan.entities)} entities to {cfg.write_ranges}",
              file=sys.stderr)
    if cfg.dry_run:
        return 0
    from osad.runtime.kafka import Publisher, ensure_topics  # kafka stays out of `osad --help`

    bootstrap, prefix = cfg.kafka.bootstrap, cfg.kafka.topic_prefix
    ensure_topics(bootstrap, prefix=prefix, security=cfg.kafka)
    pub = Publisher(bootstrap, "osad-replay", prefix=prefix, security=cfg.kafka)
    total = sum(plan.rows(e)[0].shape[0] for e in plan.entities)
    print(f"replaying {total} rows of {len(plan.entities)} entities of {dataset_name(cfg.dir)} "
          f"({cfg.split}) to {SAMPLES.full_name(prefix)} on {bootstrap}"
          + (f" at {cfg.rate} rows/s per entity" if cfg.rate else " as fast as possible"), file=sys.stderr)
    t0 = time.monotonic()
    last_report = t0
    n = 0
    per_row = len(plan.entities)
    for s in samples(plan, cfg.start_ts):
        pub.publish(SAMPLES, s)
        n += 1
        if cfg.rate and n % per_row == 0:
            due = t0 + (n / per_row) / cfg.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.monotonic()
        if now - last_report >= 5:
            last_report = now
            print(f"  {n}/{total} samples ({n / (now - t0):.0f}/s)", file=sys.stderr)
    pub.flush()
    pub.close()
    dt = time.monotonic() - t0
    print(f"published {n} samples in {dt:.1f} s ({n / max(dt, 1e-9):.0f}/s)", file=sys.stderr)
    return 0


def register_replay(sub) -> None:
    ReplayConfig.add_command(sub, "replay", run, exclude=("group",), description=__doc__)
