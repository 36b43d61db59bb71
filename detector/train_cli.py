"""``osad train``: train MSCRED on normal data and write a checkpoint.

Arguments are declared here without importing torch (``osad --help`` stays fast); the work
happens in :func:`run_train`, which imports the MSCRED scorer.

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
from dataclasses import dataclass
from pathlib import Path

from osad.core.datasets import list_entities
from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, write_ranges_file
from osad.runtime.config import Config, int_list, non_negative, positive, section, setting

from .registry import ScorerOptions, create
from .train import TrainConfig, dataset_windows, default_out, samples_windows

EXAMPLES = """examples:
  osad train ../shared/datasets/SMD --entity machine-1-6 --out models/machine-1-6.safetensors
  osad train samples.jsonl --epochs 20 --max-windows 5000 --out models/host.safetensors
  osad train ../shared/datasets/ASD --entity omi-1 --epochs 3 --max-windows 500   # a quick try
"""


@dataclass(frozen=True)
class TrainCommand(Config):
    """train an MSCRED model on normal data and write a checkpoint

    Train MSCRED (Zhang et al., AAAI 2019) on normal windows, calibrate its score on a held-out validation
    period, and write a safetensors checkpoint that 'osad detect' loads (--models).
    """

    input: str = setting(positional=True, metavar="INPUT", help="a benchmark data-set folder (SMD/ASD/JumpStarter "
                         "layout; needs --entity) or a JSONL file of recorded Sample messages")
    # --entity, --out and --write-ranges read no environment variable (as before: OSAD_ENTITY is replay's)
    entity: list[str] = setting([], repeat=",", env="OSAD_TRAIN_ENTITY",
                                help="data-set entity to train on (e.g. machine-1-6); "
                                "for JSONL input an entity_id to include (default: all)")
    out: str = setting("", env="OSAD_TRAIN_OUT",
                       help="checkpoint to write: one safetensors file, weights plus a JSON metadata "
                       "document in its header (features, scaling ranges, scales, gap, step, validation score "
                       "statistics; see detector/checkpoint.py); no sidecar file (default: "
                       "mscred-<entity>.safetensors)")
    write_ranges: str = setting("", env="OSAD_TRAIN_WRITE_RANGES", metavar="PATH",
                                help="also write the model's scaling ranges as a "
                                "featurizer ranges file (for 'osad featurizer --ranges PATH', so live windows are "
                                "scaled exactly as the training windows were): the trained entities by id, and the "
                                "same ranges as the default for any other")
    train: TrainConfig = section(TrainConfig)
    max_windows: int = setting(0, help="subsample windows with a stride so at most about this many are used (0: all)",
                               check=non_negative)
    scales: list[int] = setting(list(DEFAULT_SCALES), parse=int_list,
                                help="signature scales in samples, comma-separated")
    gap: int = setting(DEFAULT_GAP, help="samples between consecutive windows", check=positive)
    step: int = setting(DEFAULT_STEP, help="signature tensors per window", check=positive)
    score: str = setting("sse", choices=("sse", "broken"), help="score kind: sse = sum of squared residuals "
                         "(continuous), broken = number of |R_ij|^2 > theta (the paper's); both are calibrated, this "
                         "picks the default the detector uses")
    theta: float = setting(0.005, help="broken-element threshold on squared residuals (paper: 0.005)", check=positive)
    beta: float = setting(1.5, help="reference threshold = beta * max(validation score) (paper: 1.5)", check=positive)
    device: str = setting("auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    threads: int = setting(0, help="CPU threads (0: the cores we may use)", check=non_negative)


def register_train(sub) -> None:
    TrainCommand.add_command(sub, "train", run_train, epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def run_train(args) -> int:
    from .checkpoint import CheckpointError  # torch: only when a model is trained

    cfg = TrainCommand.from_args(args)
    inp = Path(cfg.input)
    scales, gap, step = tuple(cfg.scales), cfg.gap, cfg.step
    val_fraction, max_windows = cfg.train.val_fraction, cfg.max_windows or None
    try:
        if inp.is_dir():
            if len(cfg.entity) != 1:
                names = ", ".join(list_entities(inp)[:30])
                print(f"osad train: {inp} is a data-set folder: name one entity with --entity (one of: {names})",
                      file=sys.stderr)
                return 2
            data = dataset_windows(inp, cfg.entity[0], scales, gap, step, val_fraction, max_windows)
        elif inp.is_file():
            data = samples_windows(inp, scales, gap, step, val_fraction, max_windows, entities=cfg.entity or None)
        else:
            print(f"osad train: {inp}: no such file or folder; give a data-set folder with --entity, or a JSONL "
                  "file of samples", file=sys.stderr)
            return 2
        scorer = create("mscred", ScorerOptions(
            features=data.features, scales=scales, gap=gap, step=step, ranges=data.ranges, device=cfg.device,
            amp=cfg.train.amp, threads=cfg.threads or None,
            extra={"score_kind": cfg.score, "theta": cfg.theta, "beta": cfg.beta}))
        scorer.fit_training_windows(data, cfg.train)
        out = Path(cfg.out) if cfg.out else default_out(data.source)
        content = scorer.save(out)
        if cfg.write_ranges:
            ids = data.source.get("entities") or [data.source["entity"]]
            write_ranges_file(cfg.write_ranges, {e: data.ranges for e in ids}, default=data.ranges)
            print(f"wrote {cfg.write_ranges}: scaling ranges ({data.ranges.scaling_id}) for {len(ids)} entities and "
                  "as the default", file=sys.stderr)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"osad train: {e}", file=sys.stderr)
        return 2
    st = scorer.calibration.stats[scorer.score_kind]
    print(f"wrote {out}: {scorer.model_id}, {len(data.features)} features, trained on {len(data.train)} windows "
          f"(val {len(data.val)}), best epoch {scorer.train_info['best_epoch']}, val {scorer.score_kind} max "
          f"{st.max:.4g} -> threshold {scorer.threshold:.4g}, content {content[:12]}")
    return 0
