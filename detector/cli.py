"""The detector package's subcommands.

Each command registers itself in its own ``_register_*`` function so several people can add
commands here without touching each other's code. Nothing heavy (torch, scipy) is imported at
module import: ``osad --help`` stays fast. The work is done inside each command's function.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the detector's subcommands to ``osad``."""
    _register_evaluate(subparsers)  # first: needs nothing beyond core, so it registers even if another command cannot
    _register_train(subparsers)
    _register_detect(subparsers)


def _register_detect(sub) -> None:
    from osad.detector.service_cli import register_detect

    register_detect(sub)


# --------------------------------------------------------------------------------------------
# osad train
# --------------------------------------------------------------------------------------------


def _register_train(sub) -> None:
    from osad.detector.train_cli import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train an MSCRED model on normal data and write a checkpoint",
        description="Train MSCRED (Zhang et al., AAAI 2019) on normal windows, calibrate its score on a "
        "held-out validation period, and write a safetensors checkpoint that 'osad detect' loads (--models).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from osad.detector.train_cli import run_train  # imports torch

    return run_train(args)


# --------------------------------------------------------------------------------------------
# osad evaluate
# --------------------------------------------------------------------------------------------


def _register_evaluate(sub) -> None:
    from osad.core.thresholds import DEFAULT_FENCE_K
    from osad.runtime.config import option, positive

    p = sub.add_parser(
        "evaluate",
        help="measure detection quality on a benchmark data set (SMD, ASD, JumpStarter)",
        description="Per entity: fit on train (scaling and model on its head), choose a threshold without "
        "labels on the train tail (POT), score test causally, and report f1, auprc, pa_f1, deployed_f1 and "
        "hitrate@100%/150% for the model and the PCA, L2 and random baselines (same run, same windows). "
        "Writes results.json and one PNG per entity with --out.",
        epilog="Example: osad evaluate ../shared/datasets/SMD --model cs --out runs/smd --jobs 2",
    )
    p.add_argument("dir", metavar="DIR", help="data set folder (holds train/, test/, test_label/), e.g. shared/datasets/SMD")
    # --model/--entities/--out are plain flags: OSAD_MODEL etc. may well be set for the detector service.
    p.add_argument("--model", default="cs",
                   help="model(s) to evaluate, comma-separated: cs, cs-faithful, pca, l2, random, mscred (default: cs)")
    p.add_argument("--entities", default="", help="comma-separated entity names (default: all in DIR)")
    option(p, "--baselines", default="pca,l2,random", help="baselines computed in the same run ('none' for none)")
    p.add_argument("--out", default="", help="folder for results.json and the per-entity PNGs (default: print only)")
    option(p, "--jobs", type=int, default=1, check=positive, help="entities evaluated in parallel (processes)")
    option(p, "--val-fraction", type=float, default=0.2,
           check=lambda v: None if 0 < v < 0.9 else "must be in (0, 0.9)",
           help="share of train (its tail) held out to choose the label-free threshold")
    option(p, "--q", type=float, default=1e-3, check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
           help="POT risk: probability that a normal window exceeds the threshold")
    option(p, "--calibration-fence", type=float, default=DEFAULT_FENCE_K, check=lambda v: None if v >= 0 else "must be 0 (off) or more",
           help="leave out held-out scores above Q3 + this many IQR (at most 5%%) before POT, as 'osad alert' does (0: off)")
    option(p, "--seed", type=int, default=0, help="seed of every random draw (sampling, random baseline)")
    option(p, "--threads", type=int, default=0, help="torch threads per process (0: 1; parallelism comes from --jobs)")
    option(p, "--limit-train", type=int, default=0, help="use only the last N train rows (0: all; quick runs)")
    option(p, "--limit-test", type=int, default=0, help="use only the first N test rows (0: all; quick runs)")
    option(p, "--fit-option", default="", help="KEY=VALUE[,KEY=VALUE] passed to fit() of mscred (e.g. epochs=5)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNGs")
    p.set_defaults(func=_run_evaluate)


def _parse_fit_options(s: str) -> dict:
    out = {}
    for item in (x for x in s.split(",") if x.strip()):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--fit-option {item!r}: expected KEY=VALUE")
        for conv in (int, float):
            try:
                out[k.strip()] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = v.strip()
    return out


def _run_evaluate(args) -> int:
    import sys

    from osad.core.datasets import DatasetError
    from osad.detector.evaluate import EvalConfig, evaluate, format_table, model_names

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    base = [] if args.baselines.strip() in ("", "none") else [b.strip() for b in args.baselines.split(",")]
    known = model_names()
    bad = [m for m in models + base if m not in known]
    if bad:
        print(f"osad evaluate: unknown model {', '.join(bad)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    models += [b for b in base if b not in models]
    try:
        cfg = EvalConfig(val_fraction=args.val_fraction, q=args.q, fence=args.calibration_fence, seed=args.seed, threads=args.threads or None,
                         limit_train=args.limit_train or None, limit_test=args.limit_test or None,
                         fit_options=_parse_fit_options(args.fit_option) or None)
        entities = [e.strip() for e in args.entities.split(",") if e.strip()] or None
        summary = evaluate(args.dir, models, entities, jobs=args.jobs, out=args.out or None, cfg=cfg,
                           plots=not args.no_plots)
    except (DatasetError, ValueError) as e:
        print(f"osad evaluate: {e}", file=sys.stderr)
        return 2
    print(f"## {summary['dataset']} ({len(summary['entities'])} entities)\n")
    print(format_table(summary))
    if args.out:
        print(f"\nwrote {args.out}/results.json" + ("" if args.no_plots else " and one PNG per entity"))
    return 0
