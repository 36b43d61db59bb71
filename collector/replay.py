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
from osad.schemas import SAMPLES, Sample

log = logging.getLogger("osad.replay")

#: --start-ts default: the timestamp base of replayed rows (row seq has ts = this + (seq + 1) * interval)
DEFAULT_START_TS = 1_700_000_000.0


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
    from osad.runtime.config import ConfigError, apply_common
    from osad.runtime.kafka import Publisher, ensure_topics

    apply_common(args)
    try:
        plan = load_plan(args.dir, args.entity, args.split, args.limit, args.skip)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    if args.write_ranges:
        write_ranges_file(args.write_ranges, train_ranges(plan))
        print(f"wrote train-split scaling ranges of {len(plan.entities)} entities to {args.write_ranges}",
              file=sys.stderr)
    if args.dry_run:
        return 0
    ensure_topics(args.bootstrap, prefix=args.topic_prefix)
    pub = Publisher(args.bootstrap, "osad-replay", prefix=args.topic_prefix)
    total = sum(plan.rows(e)[0].shape[0] for e in plan.entities)
    print(f"replaying {total} rows of {len(plan.entities)} entities of {dataset_name(args.dir)} "
          f"({args.split}) to {SAMPLES.full_name(args.topic_prefix)} on {args.bootstrap}"
          + (f" at {args.rate} rows/s per entity" if args.rate else " as fast as possible"), file=sys.stderr)
    t0 = time.monotonic()
    last_report = t0
    n = 0
    per_row = len(plan.entities)
    for s in samples(plan, args.start_ts):
        pub.publish(SAMPLES, s)
        n += 1
        if args.rate and n % per_row == 0:
            due = t0 + (n / per_row) / args.rate
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
    from osad.runtime.config import add_kafka_options, non_negative, option

    p = sub.add_parser("replay", help="publish a benchmark data set (SMD/ASD/JumpStarter layout) as Samples",
                       description=__doc__)
    p.add_argument("dir", help="data set folder holding train/ (and test/), e.g. ../shared/datasets/SMD")
    add_kafka_options(p)
    option(p, "--entity", action="append", default=None, help="entity to replay (repeatable; default: all)")
    option(p, "--split", default="both", choices=["train", "test", "both"], help="which rows to publish")
    option(p, "--limit", type=int, default=None, check=lambda v: None if v > 0 else "must be > 0",
           help="at most this many rows per entity")
    option(p, "--skip", type=int, default=0, check=non_negative, help="skip this many rows of the split first")
    option(p, "--rate", type=float, default=0.0, check=non_negative, help="rows per second per entity (0: as fast as possible)")
    option(p, "--start-ts", type=float, default=DEFAULT_START_TS, help="timestamp of row 0 (Unix seconds)")
    option(p, "--write-ranges", default=None, help="also write min-max ranges of the train rows it publishes (all train rows with --split test) to this JSON file (for `osad featurizer --ranges`)")
    p.add_argument("--dry-run", action="store_true", help="only load (and --write-ranges); publish nothing")
    p.set_defaults(func=run)
