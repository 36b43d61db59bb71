"""``osad evaluate``: detection quality of scorers on a benchmark data set (see detector/evaluate.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from osad.core.datasets import DatasetError
from osad.runtime.config import Config, positive, section, setting

from . import registry
from .evaluate import EvalConfig, evaluate, format_incident_table, format_table


@dataclass(frozen=True)
class EvaluateCommand(Config):
    """measure detection quality on a benchmark data set (SMD, ASD, JumpStarter)

    Per entity: fit on train (scaling and model on its head), choose a threshold without labels on the train
    tail (POT), score test causally, and report f1, auprc, pa_f1, deployed_f1 and hitrate@100%/150% for the
    model and the PCA, L2 and random baselines (same run, same windows); then vus_pr, vus_roc and, at the
    label-free threshold by the alerter's incident rule, event recall, detection delay and false incidents
    (per day). Writes results.json and one PNG per entity with --out.
    """

    dir: str = setting(positional=True, metavar="DIR", help="data set folder (holds train/, test/, test_label/), e.g. "
                       "shared/datasets/SMD")
    # --model, --entities and --out read no environment variable: OSAD_MODEL etc. may well be set for the detector
    model: str = setting("cs", env="OSAD_EVALUATE_MODEL", help="model(s) to evaluate, comma-separated: "
                         + ", ".join(registry.SCORERS))
    entities: str = setting("", env="OSAD_EVALUATE_ENTITIES", help="comma-separated entity names (default: all in DIR)")
    baselines: str = setting("pca,l2,random", help="baselines computed in the same run ('none' for none)")
    out: str = setting("", env="OSAD_EVALUATE_OUT",
                       help="folder for results.json and the per-entity PNGs (default: print only)")
    jobs: int = setting(1, help="entities evaluated in parallel (processes)", check=positive)
    protocol: EvalConfig = section(EvalConfig)
    plots: bool = setting(True, negate=True, flag="--no-plots", help="do not write PNGs")

    @property
    def models(self) -> list[str]:
        """--model, then the baselines not among them."""
        models = [m.strip() for m in self.model.split(",") if m.strip()]
        base = [] if self.baselines.strip() in ("", "none") else [b.strip() for b in self.baselines.split(",")]
        return models + [b for b in base if b not in models]


def register_evaluate(sub) -> None:
    EvaluateCommand.add_command(
        sub,
        "evaluate",
        run_evaluate,
        epilog="Example: osad evaluate ../shared/datasets/SMD --model cs --out runs/smd --jobs 2",
    )


def run_evaluate(args) -> int:
    cfg = EvaluateCommand.from_args(args)
    models = cfg.models
    bad = [m for m in models if m not in registry.SCORERS]
    if bad:
        print(f"osad evaluate: unknown model {', '.join(bad)}; choose from {', '.join(registry.SCORERS)}",
              file=sys.stderr)
        return 2
    try:
        entities = [e.strip() for e in cfg.entities.split(",") if e.strip()] or None
        summary = evaluate(cfg.dir, models, entities, jobs=cfg.jobs, out=cfg.out or None, cfg=cfg.protocol,
                           plots=cfg.plots)
    except (DatasetError, ValueError) as e:
        print(f"osad evaluate: {e}", file=sys.stderr)
        return 2
    print(f"## {summary['dataset']} ({len(summary['entities'])} entities)\n")
    print(format_table(summary))
    print(f"\n### VUS, and incidents at the label-free threshold (alerter's rule: open after "
          f"{cfg.protocol.open_after}, close after {cfg.protocol.close_after} windows)\n")
    print(format_incident_table(summary))
    if cfg.out:
        print(f"\nwrote {cfg.out}/results.json" + ("" if not cfg.plots else " and one PNG per entity"))
    return 0
