"""``osad featurizer``: Samples -> SignatureWindows."""

from __future__ import annotations

from osad.runtime.config import add_kafka_options, int_list, non_negative, option, positive


def register(sub) -> None:
    p = sub.add_parser("featurizer", help="build MSCRED signature windows from samples (service)",
                       description="Consume Samples, keep a window per entity and publish a SignatureWindow every "
                       "--gap samples: --step signature tensors at --scales, plus the raw scaled window. "
                       "See featurizer/windows.py for the policy on missing, late, duplicate and out-of-order samples.")
    add_kafka_options(p, group_default="osad-featurizer")
    option(p, "--scales", type=int_list, default=[10, 30, 60], help="signature matrix scales w, in samples")
    option(p, "--gap", type=int, default=10, check=positive, help="samples between windows")
    option(p, "--step", type=int, default=5, check=positive, help="signature tensors per window")
    option(p, "--ranges", default=None, help="JSON file of per-entity min-max ranges (e.g. from `osad replay --write-ranges`)")
    option(p, "--state-dir", default="var/featurizer", help="folder where ranges learned by calibration are kept")
    option(p, "--calibration-samples", type=int, default=300, check=positive,
           help="samples buffered to learn an entity's ranges when none are known")
    option(p, "--calibration-warmup", type=int, default=20, check=non_negative,
           help="first samples of an entity left out of its calibration, at most a quarter of them (a process's "
           "start-up is not its normal)")
    option(p, "--range-floor", type=float, default=0.05,
           check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
           help="ranges learned by calibration are at least this share of a metric's level wide (a metric that "
           "hardly moved while calibrating is not anomalous for moving by a few pages)")
    option(p, "--features", type=lambda s: [x for x in s.split(",") if x], default=None,
           help="comma-separated metric names to use as features (default: the entity's first sample's metrics)")
    option(p, "--max-fill", type=int, default=3, check=non_negative, help="longest gap (in samples) filled by carrying the last sample forward")
    option(p, "--idle-timeout-s", type=float, default=300.0, check=positive, help="evict an entity after this long without samples")
    option(p, "--max-entities", type=int, default=10_000, check=positive, help="most entities kept (least recently seen evicted)")
    option(p, "--clip", type=float, default=10.0, check=positive, help="soft-clip scaled values beyond +-clip ranges: z becomes clip*(1+ln(|z|/clip)), order kept")
    p.set_defaults(func=run)


def run(args) -> int:
    from osad.runtime.config import ConfigError, apply_common
    from osad.runtime.service import run_transform

    from .ranges import RangesStore
    from .service import Featurizer
    from .windows import WindowConfig

    apply_common(args)
    try:
        cfg = WindowConfig(scales=tuple(args.scales), gap=args.gap, step=args.step, max_fill=args.max_fill,
                           calibration_samples=args.calibration_samples,
                           calibration_warmup=args.calibration_warmup, range_floor=args.range_floor,
                           idle_timeout_s=args.idle_timeout_s,
                           max_entities=args.max_entities, clip=args.clip)
        ranges = RangesStore(args.ranges, args.state_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return run_transform(Featurizer(cfg, ranges, args.features), args)
