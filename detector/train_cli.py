"""``osad train``: train MSCRED on normal data and write a checkpoint.

Arguments are declared here without importing torch (``osad --help`` stays fast); the work
happens in :func:`run_train`, which imports detector.train / detector.mscred.

Input is either

* a benchmark data-set folder and ``--entity``: trains on that entity's ``train`` split, with
  the min-max scaling ranges fit on that split (``osad train ../shared/datasets/SMD --entity
  machine-1-6``), or
* a JSONL file of Sample messages (``osad collect --output jsonl:PATH``): grouped by entity_id,
  ordered by seq; ``--entity`` (repeatable) picks entities, default all of them, pooled into
  one model.

Output: one safetensors file (``--out``) with the weights and, in its metadata header, the JSON
document described in detector/checkpoint.py (features, scaling ranges, scales, gap, step,
hyper-parameters, validation score statistics, versions, hashes). No sidecar file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  osad train ../shared/datasets/SMD --entity machine-1-6 --out models/machine-1-6.safetensors
  osad train samples.jsonl --epochs 20 --max-windows 5000 --out models/host.safetensors
  osad train ../shared/datasets/ASD --entity omi-1 --epochs 3 --max-windows 500   # a quick try
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from osad.runtime.config import int_list, non_negative, option, positive

    p.epilog = EXAMPLES
    p.add_argument("input", metavar="INPUT",
                   help="a benchmark data-set folder (SMD/ASD/JumpStarter layout; needs --entity) or a JSONL file of "
                        "recorded Sample messages")
    p.add_argument("--entity", action="append", default=[],
                   help="data-set entity to train on (e.g. machine-1-6); for JSONL input an entity_id to include "
                        "(repeatable; default: all)")
    p.add_argument("--out", default="",
                   help="checkpoint to write: one safetensors file, weights plus a JSON metadata document in its "
                        "header (features, scaling ranges, scales, gap, step, validation score statistics; see "
                        "detector/checkpoint.py); no sidecar file (default: mscred-<entity>.safetensors)")
    p.add_argument("--write-ranges", default="", metavar="PATH",
                   help="also write the model's scaling ranges as a featurizer ranges file (for 'osad featurizer "
                        "--ranges PATH', so live windows are scaled exactly as the training windows were): the "
                        "trained entities by id, and the same ranges as the default for any other")
    option(p, "--epochs", type=int, default=50, check=positive, help="most training epochs")
    option(p, "--batch-size", type=int, default=32, check=positive, help="windows per optimisation step")
    option(p, "--lr", type=float, default=2e-4, check=positive, help="Adam learning rate (paper: 2e-4)")
    option(p, "--patience", type=int, default=5, check=positive,
           help="stop after this many epochs without a better validation loss")
    option(p, "--val-fraction", type=float, default=0.2,
           check=lambda v: None if 0 <= v < 0.9 else "must be in [0, 0.9)",
           help="share of each series' windows (its end) held out for early stopping and calibration")
    option(p, "--max-windows", type=int, default=0, check=non_negative,
           help="subsample windows with a stride so at most about this many are used (0: all)")
    option(p, "--seed", type=int, default=0, help="seed for initialisation and shuffling (same seed, same model)")
    option(p, "--scales", type=int_list, default=[10, 30, 60], help="signature scales in samples, comma-separated")
    option(p, "--gap", type=int, default=10, check=positive, help="samples between consecutive windows")
    option(p, "--step", type=int, default=5, check=positive, help="signature tensors per window")
    option(p, "--score", default="sse", choices=["sse", "broken"],
           help="score kind: sse = sum of squared residuals (continuous), broken = number of |R_ij|^2 > theta "
                "(the paper's); both are calibrated, this picks the default the detector uses")
    option(p, "--theta", type=float, default=0.005, check=positive,
           help="broken-element threshold on squared residuals (paper: 0.005)")
    option(p, "--beta", type=float, default=1.5, check=positive,
           help="reference threshold = beta * max(validation score) (paper: 1.5)")
    option(p, "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed precision (CUDA, or CPUs with AMX)")
    option(p, "--threads", type=int, default=0, check=non_negative, help="CPU threads (0: the cores we may use)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")


def run_train(args) -> int:
    from osad.detector.checkpoint import CheckpointError
    from osad.detector.mscred import MSCREDScorer
    from osad.detector.train import TrainConfig, dataset_windows, default_out, fit_with_windows, samples_windows

    inp = Path(args.input)
    scales, gap, step = tuple(args.scales), args.gap, args.step
    try:
        if inp.is_dir():
            if len(args.entity) != 1:
                from osad.core.datasets import list_entities

                names = ", ".join(list_entities(inp)[:30])
                print(f"osad train: {inp} is a data-set folder: name one entity with --entity (one of: {names})",
                      file=sys.stderr)
                return 2
            data = dataset_windows(inp, args.entity[0], scales, gap, step, args.val_fraction, args.max_windows or None)
        elif inp.is_file():
            data = samples_windows(inp, scales, gap, step, args.val_fraction, args.max_windows or None,
                                   entities=args.entity or None)
        else:
            print(f"osad train: {inp}: no such file or folder; give a data-set folder with --entity, or a JSONL "
                  "file of samples", file=sys.stderr)
            return 2
        scorer = MSCREDScorer(data.features, scales=scales, gap=gap, step=step, ranges=data.ranges,
                              score_kind=args.score, theta=args.theta, beta=args.beta, device=args.device,
                              amp=args.amp, threads=args.threads or None)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                          val_fraction=args.val_fraction, seed=args.seed, progress=not args.quiet, amp=args.amp)
        fit_with_windows(scorer, data, cfg)
        out = Path(args.out) if args.out else default_out(data.source)
        content = scorer.save(out)
        if args.write_ranges:
            from osad.core.signature import write_ranges_file

            ids = data.source.get("entities") or [data.source["entity"]]
            write_ranges_file(args.write_ranges, {e: data.ranges for e in ids}, default=data.ranges)
            print(f"wrote {args.write_ranges}: scaling ranges ({data.ranges.scaling_id}) for {len(ids)} entities and "
                  "as the default", file=sys.stderr)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"osad train: {e}", file=sys.stderr)
        return 2
    st = scorer.calibration.stats[scorer.score_kind]
    print(f"wrote {out}: {scorer.model_id}, {len(data.features)} features, trained on {len(data.train)} windows "
          f"(val {len(data.val)}), best epoch {scorer.train_info['best_epoch']}, val {scorer.score_kind} max "
          f"{st.max:.4g} -> threshold {scorer.threshold:.4g}, content {content[:12]}")
    return 0
