"""Evaluate: the few-shot protocol on every configured fold and shot count, for the trained model,
the training-free prototype baseline and the ``compare.*`` models; the comparison table (one row
per method, 1- and 5-shot per fold and their mean over folds) goes to MLflow."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.data.folds import fold_split
from fss_core.evaluation.baseline import PrototypeBaseline
from fss_core.evaluation.protocol import (
    METRICS_FILE,
    ModelPredictor,
    Predictor,
    default_episodes,
    run_protocol,
)
from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import load_bundle
from tasks.compare import ComparedModel, method_label, method_order
from tasks.extract import BackboneRef, device_for
from tasks.ingest import labels_digest
from tasks.keys import build_key
from tasks.pseudo import dataset_num_classes
from tasks.tracking import flatten, stage_run
from tasks.train import TrainOutcome, fss_backbone, records
from tasks.workspace import atomic_write_text, workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRow:
    """One method on one fold and shot count: mean and std over seeds, per-seed mIoU, and the
    folder holding its ``metrics.json``."""

    method: str
    fold: int
    shots: int
    miou: float | None
    miou_std: float | None
    fbiou: float | None
    fbiou_std: float | None
    miou_seeds: list[float | None] = field(default_factory=list)
    folder: str = ""


@dataclass(frozen=True)
class EvaluationSummary:
    build_key: str
    rows: list[EvalRow]
    table: str
    cached: bool

    def mean(self, method: str, shots: int, metric: str = "miou") -> float:
        values = [getattr(r, metric) for r in self.rows if r.method == method and r.shots == shots]
        values = [np.nan if v is None else v for v in values]
        return float(np.mean(values)) if values else float("nan")


def _methods(rows: Sequence[EvalRow]) -> list[str]:
    return sorted(dict.fromkeys(r.method for r in rows), key=method_order)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def fold_mean(rows: Sequence[EvalRow]) -> tuple[float | None, float | None]:
    """Mean over folds of a method's mIoU, and the std over seeds of the per-seed fold means
    (None when the folds do not share their seeds' results)."""
    values = [r.miou for r in rows]
    if not rows or any(v is None for v in values):
        return None, None
    per_seed = [r.miou_seeds for r in rows]
    if len({len(s) for s in per_seed}) != 1 or not per_seed[0] or any(v is None for s in per_seed for v in s):
        return float(np.mean(values)), None
    return float(np.mean(values)), float(np.std(np.mean(np.array(per_seed, dtype=float), axis=0)))


def comparison_table(rows: Sequence[EvalRow]) -> str:
    """One row per method; per fold and shot count the mIoU in %, mean ± std over seeds; then per
    shot count the mean over folds (± the std over seeds of the per-seed fold means)."""
    folds = sorted({r.fold for r in rows})
    shots = sorted({r.shots for r in rows})
    head = ["method", *[f"fold{f} {s}-shot" for f in folds for s in shots], *[f"mean {s}-shot" for s in shots]]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for method in _methods(rows):
        cells = {(r.fold, r.shots): r for r in rows if r.method == method}
        values = []
        for f in folds:
            for s in shots:
                r = cells.get((f, s))
                values.append("-" if r is None else f"{_percent(r.miou)} ± {_percent(r.miou_std)}")
        for s in shots:
            mean, std = fold_mean([r for (_, rs), r in cells.items() if rs == s])
            values.append(_percent(mean) + ("" if std is None else f" ± {_percent(std)}"))
        lines.append(" | ".join([method_label(method), *values]))
    return "\n".join(lines)


def comparison_csv(rows: Sequence[EvalRow]) -> str:
    """The table's numbers at full precision (fractions, not %): one line per method, fold and
    shot count, then per method and shot count a ``mean`` line over folds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "fold", "shots", "miou", "miou_std", "fbiou", "fbiou_std", "seeds"])
    for method in _methods(rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: (r.shots, r.fold))
        for r in mine:
            writer.writerow([method, r.fold, r.shots, r.miou, r.miou_std, r.fbiou, r.fbiou_std, len(r.miou_seeds)])
        for s in sorted({r.shots for r in mine}):
            same = [r for r in mine if r.shots == s]
            mean, std = fold_mean(same)
            fb = [r.fbiou for r in same]
            writer.writerow([method, "mean", s, mean, std, None if None in fb else float(np.mean(fb)), None,
                             len(same[0].miou_seeds)])
    return out.getvalue()


@dataclass
class _Method:
    """A method to evaluate on some folds; its predictor is built only if a result is missing."""

    name: str
    folds: list[int]
    model_key: str
    build: Callable[[], tuple[Predictor, int]]  # → (predictor, evaluation image size)
    overlays: bool
    _built: tuple[Predictor, int] | None = None

    def predictor(self) -> tuple[Predictor, int]:
        if self._built is None:
            self._built = self.build()
        return self._built


def _methods_to_evaluate(cfg: PipelineConfig, trained: TrainOutcome, extraction: BackboneRef,
                         compared: Sequence[ComparedModel]) -> list[_Method]:
    """The trained model and the baseline on every fold, each comparison model on its own fold."""
    device = device_for(cfg)

    def model(bundle: str) -> Callable[[], tuple[Predictor, int]]:
        def build():
            net, spec = load_bundle(bundle)
            return ModelPredictor(net, device), spec.image_size
        return build

    def baseline():
        name, ckpt = fss_backbone(cfg, extraction)
        backbone = build_backbone(name, checkpoint=ckpt)
        backbone.freeze()
        _, size = methods[0].predictor()  # the baseline sees images at the trained model's size
        return PrototypeBaseline(backbone, threshold=cfg.evaluate.baseline_threshold, device=device), size

    folds = list(cfg.evaluate.folds)
    methods = [_Method(trained.mode, folds, trained.build_key, model(trained.bundle), True)]
    methods += [_Method(c.method, [c.fold], c.trained.build_key, model(c.trained.bundle), True)
                for c in sorted(compared, key=lambda c: (method_order(c.method), c.fold))]
    methods.append(_Method("baseline", folds, trained.build_key, baseline, False))
    return methods


def _result_folder(cfg: PipelineConfig, method: _Method, fold: int, shots: int, val_key: str) -> Path:
    """Where one method's result on one fold and shot count lives; ``val_key`` names the
    labelled val images it is scored on (:func:`tasks.ingest.labels_digest`)."""
    return (workspace_of(cfg).evaluation / build_key("evaluate_result", cfg, method.model_key, val_key) / method.name
            / f"fold{fold}" / f"{shots}shot")


def run_evaluate_fold(cfg: PipelineConfig, trained: TrainOutcome, extraction: BackboneRef, fold: int,
                      compared: Sequence[ComparedModel] = ()) -> int:
    """Compute every missing result of one fold (all methods and shot counts) into its folder,
    so folds can run in parallel before :func:`run_evaluate` gathers them. Returns how many
    results were computed (0 when all were there)."""
    val = records(cfg, "val")
    if not val:
        return 0
    methods = [m for m in _methods_to_evaluate(cfg, trained, extraction, compared) if fold in m.folds]
    split = fold_split(cfg.data.fold_scheme, fold, dataset_num_classes(cfg))
    n_episodes = cfg.evaluate.episodes or default_episodes(cfg.data.fold_scheme)
    computed = 0
    val_key = labels_digest(cfg, "val")
    for shots in cfg.evaluate.shots:
        for method in methods:
            folder = _result_folder(cfg, method, fold, shots, val_key)
            if not (folder / METRICS_FILE).is_file():
                # no per-episode bars: folds run side by side and their bars would interleave
                _evaluated(cfg, method, folder, val, split, shots, n_episodes, progress=False)
                computed += 1
    return computed


def run_evaluate(cfg: PipelineConfig, trained: TrainOutcome, extraction: BackboneRef,
                 parent_run_id: str | None = None, compared: Sequence[ComparedModel] = ()) -> EvaluationSummary:
    """Evaluate the trained model and the baseline on every fold in ``evaluate.folds``, and each
    comparison model on its own fold, at every ``evaluate.shots``.

    A method's results live in ``evaluation/<key>/<method>/fold{f}/{s}shot/`` where ``key`` names
    the model they score (the baseline's is the trained model's) and the evaluate settings other
    than the lists of folds and shots, so a model that did not change is never evaluated again on
    a fold and shot count it was scored on; the table and its ``summary.json`` live under the
    key of all the models and every evaluate setting together.
    """
    ws = workspace_of(cfg)
    e = cfg.evaluate
    val_key = labels_digest(cfg, "val")
    key = build_key("evaluate", cfg, trained.build_key, val_key, *(c.trained.build_key for c in compared))
    out = ws.evaluation / key
    summary_path = out / "summary.json"
    if summary_path.is_file():
        saved = json.loads(summary_path.read_text())
        return EvaluationSummary(key, [EvalRow(**r) for r in saved["rows"]], saved["table"], cached=True)
    val = records(cfg, "val")
    if not val:
        log.warning("evaluate: no labelled images in the val split; only pseudo-task validation is available")
        return EvaluationSummary(key, [], "no labelled val images: not evaluated", cached=False)
    methods = _methods_to_evaluate(cfg, trained, extraction, compared)
    n_classes = dataset_num_classes(cfg)
    n_episodes = e.episodes or default_episodes(cfg.data.fold_scheme)
    rows = []
    with stage_run(cfg, "evaluate", parent_run_id, key):
        if compared:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten("compare", cfg.compare.model_dump(mode="json")).items()})
        for fold in e.folds:
            split = fold_split(cfg.data.fold_scheme, fold, n_classes)
            for shots in e.shots:
                for method in (m for m in methods if fold in m.folds):
                    folder = _result_folder(cfg, method, fold, shots, val_key)
                    m = _evaluated(cfg, method, folder, val, split, shots, n_episodes)
                    row = EvalRow(method.name, fold, shots, m["miou"], m["miou_std"], m["fbiou"], m["fbiou_std"],
                                  [s["miou"] for s in m["seeds"]], str(folder))
                    rows.append(row)
                    tag = f"{method.name}_fold{fold}_{shots}shot"
                    mlflow.log_metrics({f"{tag}_{k}": getattr(row, k) for k in ("miou", "miou_std", "fbiou")
                                        if getattr(row, k) is not None})
                    first = folder / f"seed{e.seeds[0]}" / "overlays"
                    if method.overlays and e.overlays and first.is_dir():
                        mlflow.log_artifacts(str(first), f"overlays/{tag}")
        summary = EvaluationSummary(key, rows, comparison_table(rows), cached=False)
        for name in _methods(rows):
            for shots in e.shots:
                mean, std = fold_mean([r for r in rows if r.method == name and r.shots == shots])
                if mean is not None:
                    mlflow.log_metric(f"{name}_mean_{shots}shot_miou", mean)
                if std is not None:
                    mlflow.log_metric(f"{name}_mean_{shots}shot_miou_std", std)
        csv_text = comparison_csv(rows)
        mlflow.log_text(summary.table, "evaluation/comparison.md")
        mlflow.log_text(csv_text, "evaluation/comparison.csv")
    atomic_write_text(out / "comparison.md", summary.table + "\n")
    atomic_write_text(out / "comparison.csv", csv_text)
    atomic_write_text(summary_path, json.dumps({"rows": [asdict(r) for r in rows], "table": summary.table}, indent=1))
    log.info("evaluation (mIoU %%, mean ± std over %d seeds):\n%s", len(e.seeds), summary.table)
    return summary


def _evaluated(cfg: PipelineConfig, method: _Method, folder: Path, val, split, shots: int, n_episodes: int,
               progress: bool | None = None) -> dict:
    """The protocol's aggregate ``metrics.json`` in ``folder``: read back when there, else computed."""
    done = folder / METRICS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    e = cfg.evaluate
    predictor, size = method.predictor()
    return run_protocol(predictor, val, split, shots, n_episodes, e.seeds, size, e.min_area, folder,
                        n_overlays=e.overlays if method.overlays else 0,
                        progress=cfg.runtime.progress if progress is None else progress,
                        area_reference=e.area_reference)


@task(name="evaluate-fold", task_run_name="evaluate-fold{fold}")
def evaluate_fold_task(config: dict, trained: TrainOutcome, extraction: BackboneRef, fold: int,
                       compared: Sequence[ComparedModel] = ()) -> int:
    return run_evaluate_fold(PipelineConfig.model_validate(config), trained, extraction, fold, list(compared))


@task(name="evaluate")
def evaluate_task(config: dict, trained: TrainOutcome, extraction: BackboneRef,
                  parent_run_id: str | None = None, compared: Sequence[ComparedModel] = ()) -> EvaluationSummary:
    return run_evaluate(PipelineConfig.model_validate(config), trained, extraction, parent_run_id, list(compared))
