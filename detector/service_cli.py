"""``osad detect``: the detector service."""

from __future__ import annotations

from osad.runtime.config import add_kafka_options, option, positive


def register_detect(sub) -> None:
    p = sub.add_parser(
        "detect", help="score signature windows with compressed sensing and MSCRED (service)",
        description="Consume SignatureWindows, batch them across entities and publish one Score per window per "
        "model: compressed sensing for every window from the first one (no training needed), and MSCRED for "
        "windows that a checkpoint in --models matches (same features, scales, gap, step and scaling). New or "
        "replaced checkpoints are picked up while running. Replicas in one --group share the partitions.")
    add_kafka_options(p, group_default="osad-detector")
    option(p, "--models", default="var/models", help="folder of MSCRED checkpoints (*.safetensors from osad train)")
    option(p, "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where MSCRED runs (auto: CUDA if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16) for MSCRED on CUDA")
    option(p, "--threads", type=int, default=0, help="CPU threads for MSCRED (0: the cores this process may use)")
    option(p, "--max-batch", type=int, default=64, check=positive, help="most windows per model call")
    option(p, "--max-wait-ms", type=float, default=20.0, check=positive,
           help="longest a window waits for its batch to fill")
    option(p, "--reload-s", type=float, default=10.0, check=positive, help="how often --models is re-scanned")
    p.add_argument("--no-cs", action="store_true", help="do not score with compressed sensing")
    option(p, "--cs-calibrate", type=int, default=30, check=lambda v: None if v == 0 or v >= 5 else "0 or at least 5",
           help="after this many windows of an entity (assumed normal), score it with compressed sensing "
           "calibrated on them (per-metric normal range + PCA level term; model cs-calibrated) instead of the "
           "window-relative jump-start score (0: never)")
    p.add_argument("--train-online", action="store_true",
                   help="train MSCRED in the background on the first windows of entities no checkpoint matches "
                   "(they are assumed normal) and save the model into --models")
    option(p, "--train-windows", type=int, default=100, check=lambda v: None if v >= 20 else "must be at least 20 "
           "(training holds out a validation tail separated by a window's span)",
           help="windows per entity for online training")
    option(p, "--train-epochs", type=int, default=5, check=positive, help="epochs of online training")
    option(p, "--train-max-models", type=int, default=20, check=positive,
           help="most entities that get an online model (each costs ~20 MB and training time)")
    p.set_defaults(func=run)


def run(args) -> int:
    from osad.runtime.config import apply_common
    from osad.runtime.service import run_transform

    from .cs import CSScorer
    from .service import Detector, ModelRegistry

    apply_common(args)
    device = None if args.device == "auto" else args.device
    registry = ModelRegistry(args.models, device=device, amp=args.amp, reload_s=args.reload_s,
                             threads=args.threads or None)
    registry.scan(force=True)
    trainer = None
    if args.train_online:
        from .online import OnlineConfig, OnlineTrainer

        trainer = OnlineTrainer(args.models, OnlineConfig(args.train_windows, args.train_epochs, args.train_max_models),
                                device=device)
    det = Detector(None if args.no_cs else CSScorer(gap=10), registry, max_batch=args.max_batch,
                   max_wait_ms=args.max_wait_ms, trainer=trainer, cs_calibrate=args.cs_calibrate)
    return run_transform(det, args)
