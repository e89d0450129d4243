"""Register: log the trained model to MLflow as a pyfunc model and move the aliases."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

from prefect import task

from fss_core.config import PipelineConfig
from tasks.evaluate import EvaluationSummary
from tasks.registry import RegisteredVersion, register_model
from tasks.train import TrainOutcome
from tasks.workspace import atomic_write_text

log = logging.getLogger(__name__)
RECORD = "registered.json"


def model_score(trained: TrainOutcome, evaluation: EvaluationSummary | None) -> dict[str, float]:
    """What ranks models: mean novel-class 1-shot mIoU over folds; without labelled val images,
    the held-out pseudo-episode score that selected the checkpoint."""
    if evaluation is not None and evaluation.rows:
        metrics = {"miou_1shot": evaluation.mean(trained.mode, 1), "baseline_miou_1shot": evaluation.mean("baseline", 1)}
        return {k: v for k, v in metrics.items() if not math.isnan(v)}
    return {"miou_1shot": float(trained.best_score or 0.0)}


def run_register(cfg: PipelineConfig, trained: TrainOutcome, evaluation: EvaluationSummary | None,
                 parent_run_id: str | None = None) -> RegisteredVersion:
    """Register a bundle once: a re-run of an unchanged pipeline returns the recorded version."""
    record = Path(trained.bundle) / RECORD
    if record.is_file():
        return RegisteredVersion(**json.loads(record.read_text()))
    version = register_model(cfg, trained.bundle, model_score(trained, evaluation), parent_run_id)
    atomic_write_text(record, json.dumps(asdict(version)))
    return version


@task(name="register")
def register_task(config: dict, trained: TrainOutcome, evaluation: EvaluationSummary | None,
                  parent_run_id: str | None = None) -> RegisteredVersion:
    return run_register(PipelineConfig.model_validate(config), trained, evaluation, parent_run_id)
