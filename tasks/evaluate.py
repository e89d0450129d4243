"""Evaluate: the few-shot protocol on every configured fold and shot count, for the trained
model and the training-free prototype baseline; the comparison table goes to MLflow."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.data.folds import fold_split
from fss_core.evaluation.baseline import PrototypeBaseline
from fss_core.evaluation.protocol import ModelPredictor, default_episodes, run_protocol
from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import load_bundle
from tasks.extract import BackboneRef, device_for
from tasks.keys import build_key
from tasks.pseudo import dataset_num_classes
from tasks.tracking import stage_run
from tasks.train import TrainOutcome, fss_backbone, records
from tasks.workspace import atomic_write_text, workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRow:
    method: str
    fold: int
    shots: int
    miou: float
    miou_std: float
    fbiou: float
    fbiou_std: float


@dataclass(frozen=True)
class EvaluationSummary:
    build_key: str
    rows: list[EvalRow]
    table: str
    cached: bool

    def mean(self, method: str, shots: int, metric: str = "miou") -> float:
        values = [getattr(r, metric) for r in self.rows if r.method == method and r.shots == shots]
        return float(np.mean(values)) if values else float("nan")


def comparison_table(rows: list[EvalRow]) -> str:
    """Methods × (fold, shots) mIoU in %, mean ± std over seeds, with the mean over folds."""
    folds = sorted({r.fold for r in rows})
    shots = sorted({r.shots for r in rows})
    head = ["method", "shots", *[f"fold{f}" for f in folds], "mean"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for method in dict.fromkeys(r.method for r in rows):
        for s in shots:
            cells = {r.fold: r for r in rows if r.method == method and r.shots == s}
            vals = [f"{100 * cells[f].miou:.1f} ± {100 * cells[f].miou_std:.1f}" if f in cells else "-" for f in folds]
            mean = np.mean([cells[f].miou for f in cells]) if cells else float("nan")
            lines.append(" | ".join([method, str(s), *vals, f"{100 * mean:.1f}"]))
    return "\n".join(lines)


def run_evaluate(cfg: PipelineConfig, trained: TrainOutcome, extraction: BackboneRef,
                 parent_run_id: str | None = None) -> EvaluationSummary:
    ws = workspace_of(cfg)
    e = cfg.evaluate
    key = build_key("evaluate", cfg, trained.build_key)
    out = ws.evaluation / key
    summary_path = out / "summary.json"
    if summary_path.is_file():
        saved = json.loads(summary_path.read_text())
        return EvaluationSummary(key, [EvalRow(**r) for r in saved["rows"]], saved["table"], cached=True)
    val = records(cfg, "val")
    if not val:
        log.warning("evaluate: no labelled images in the val split; only pseudo-task validation is available")
        return EvaluationSummary(key, [], "no labelled val images: not evaluated", cached=False)
    device = device_for(cfg)
    model, spec = load_bundle(trained.bundle)
    name, ckpt = fss_backbone(cfg, extraction)
    backbone = build_backbone(name, checkpoint=ckpt)
    backbone.freeze()
    methods = {trained.mode: ModelPredictor(model, device),
               "baseline": PrototypeBaseline(backbone, threshold=e.baseline_threshold, device=device)}
    n_classes = dataset_num_classes(cfg)
    n_episodes = e.episodes or default_episodes(cfg.data.fold_scheme)
    # The 2·32·32 px rule is defined at 473²; scale it to the evaluation input size.
    min_area = max(1, round(cfg.pseudo.min_area * (spec.image_size / cfg.pseudo.area_reference) ** 2))
    rows = []
    with stage_run(cfg, "evaluate", parent_run_id, key):
        for fold in e.folds:
            split = fold_split(cfg.data.fold_scheme, fold, n_classes)
            for shots in e.shots:
                for method, predictor in methods.items():
                    folder = out / method / f"fold{fold}" / f"{shots}shot"
                    overlays = e.overlays if method != "baseline" else 0
                    m = run_protocol(predictor, val, split, shots, n_episodes, e.seeds, spec.image_size, min_area,
                                     folder, n_overlays=overlays, progress=cfg.runtime.progress)
                    row = EvalRow(method, fold, shots, m["miou"], m["miou_std"], m["fbiou"], m["fbiou_std"])
                    rows.append(row)
                    tag = f"{method}_fold{fold}_{shots}shot"
                    mlflow.log_metrics({f"{tag}_miou": row.miou, f"{tag}_fbiou": row.fbiou})
                    if overlays:
                        first = folder / f"seed{e.seeds[0]}" / "overlays"
                        if first.is_dir():
                            mlflow.log_artifacts(str(first), f"overlays/{tag}")
        summary = EvaluationSummary(key, rows, comparison_table(rows), cached=False)
        for method in methods:
            for shots in e.shots:
                mlflow.log_metric(f"{method}_mean_{shots}shot_miou", summary.mean(method, shots))
        mlflow.log_text(summary.table, "evaluation/comparison.md")
    atomic_write_text(summary_path, json.dumps({"rows": [asdict(r) for r in rows], "table": summary.table}, indent=1))
    log.info("evaluation (mIoU %%, mean ± std over %d seeds):\n%s", len(e.seeds), summary.table)
    return summary


@task(name="evaluate")
def evaluate_task(config: dict, trained: TrainOutcome, extraction: BackboneRef,
                  parent_run_id: str | None = None) -> EvaluationSummary:
    return run_evaluate(PipelineConfig.model_validate(config), trained, extraction, parent_run_id)
