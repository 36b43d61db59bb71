"""``osad detect``: the detector service."""

from __future__ import annotations

from dataclasses import dataclass

from osad.runtime.config import Config, ConfigError, KafkaConfig, ServiceConfig, section, setting, setup_logging
from osad.runtime.service import run_transform

from .calibrations import CalibrationStore
from .engine import Engine, EngineConfig
from .folder import CheckpointFolder, ModelsConfig
from .online import OnlineConfig, OnlineTrainer
from .registry import create
from .service import BatchConfig, Detector


@dataclass(frozen=True)
class DetectConfig(Config):
    """score signature windows with compressed sensing and MSCRED (service)

    Consume SignatureWindows, batch them across entities and publish one Score per window per model: compressed
    sensing for every window from the first one (no training needed), and MSCRED for windows that a checkpoint
    in --models matches (same features, scales, gap, step and scaling). New or replaced checkpoints are picked
    up while running. Replicas in one --group share the partitions.
    """

    kafka: KafkaConfig = section(KafkaConfig)
    service: ServiceConfig = section(ServiceConfig, group="osad-detector")
    checkpoints: ModelsConfig = section(ModelsConfig)
    batching: BatchConfig = section(BatchConfig)
    cs: bool = setting(True, negate=True, flag="--no-cs", help="do not score with compressed sensing")
    engine: EngineConfig = section(EngineConfig)
    state_dir: str = setting("", metavar="DIR", help="keep each entity's compressed-sensing calibration in DIR, so a "
                             "restarted detector, or a replica sharing DIR that takes over the entity, goes on with "
                             "it instead of calibrating again (empty: memory only)")
    train_online: bool = setting(False, help="train MSCRED in the background on the first windows of entities no "
                                 "checkpoint matches (they are assumed normal) and save the model into --models")
    online: OnlineConfig = section(OnlineConfig)


def register_detect(sub) -> None:
    DetectConfig.add_command(sub, "detect", run)


def build_detector(cfg: DetectConfig) -> Detector:
    """The detector transform ``cfg`` describes, its checkpoint folder scanned once."""
    folder = CheckpointFolder(cfg.checkpoints)
    folder.scan(force=True)
    trainer = OnlineTrainer(cfg.checkpoints.models, cfg.online, device=cfg.checkpoints.torch_device) \
        if cfg.train_online else None
    try:
        store = CalibrationStore(cfg.state_dir) if cfg.state_dir and cfg.cs else None
    except OSError as e:
        raise ConfigError(str(e)) from None
    engine = Engine(create("cs-faithful") if cfg.cs else None, cfg.engine, folder=folder, trainer=trainer,
                    store=store)
    return Detector(engine, cfg.batching)


def run(args) -> int:
    cfg = DetectConfig.from_args(args)
    setup_logging(cfg.service.log_level)  # before the first scan, which logs what it loads
    return run_transform(build_detector(cfg), cfg.kafka, cfg.service)
