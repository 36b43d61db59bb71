"""``osad featurizer``: Samples -> SignatureWindows.

Its options are :class:`FeaturizerConfig`: the broker and service settings, the window settings
(:class:`~osad.featurizer.windows.WindowConfig`, which the core reads as it is) and where scaling
ranges come from.
"""

from __future__ import annotations

from dataclasses import dataclass

from osad.runtime.config import (Config, ConfigError, KafkaConfig, ServiceConfig, section, setting,
                                 setup_logging)

from .windows import WindowConfig


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


@dataclass(frozen=True)
class FeaturizerConfig(Config):
    """build MSCRED signature windows from samples (service)

    Consume Samples, keep a window per entity and publish a SignatureWindow every --gap samples: --step
    signature tensors at --scales, plus the raw scaled window. See featurizer/windows.py for the policy on
    missing, late, duplicate and out-of-order samples.
    """

    kafka: KafkaConfig = section(KafkaConfig)
    service: ServiceConfig = section(ServiceConfig, group="osad-featurizer")
    windows: WindowConfig = section(WindowConfig)
    ranges: str | None = setting(None, help="JSON file of per-entity min-max ranges (e.g. from `osad replay "
                                 "--write-ranges`)")
    state_dir: str = setting("var/featurizer", help="folder where ranges learned by calibration are kept")
    features: list[str] | None = setting(None, parse=_names, help="comma-separated metric names to use as features "
                                         "(default: the entity's first sample's metrics)")


def register(sub) -> None:
    FeaturizerConfig.add_command(sub, "featurizer", run)


def run(args) -> int:
    from osad.runtime.service import run_transform  # kafka stays out of `osad --help`

    from .ranges import RangesStore
    from .service import Featurizer

    cfg = FeaturizerConfig.from_args(args)
    setup_logging(cfg.service.log_level)  # before the ranges file is read: it logs what it loaded
    try:
        ranges = RangesStore(cfg.ranges, cfg.state_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return run_transform(Featurizer(cfg.windows, ranges, cfg.features), cfg.kafka, cfg.service)
