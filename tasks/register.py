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
from tasks.tracking import tracking_uri
from tasks.train import TrainOutcome
from tasks.workspace import atomic_write_text

log = logging.getLogger(__name__)
RECORD = "registered.json"


def model_score(trained: TrainOutcome, evaluation: EvaluationSummary | None) -> tuple[dict[str, float], str | None]:
    """What ranks models, and under which key: the mean novel-class mIoU over folds at the
    fewest evaluated shots (``miou_1shot`` by default); without labelled val images, the
    validation score that selected the checkpoint (``val_score``: held-out pseudo episodes for
    an unsupervised model); with neither, no score (key None). The metrics also carry the
    other shot counts and the baseline's figures, for the register run."""
    metrics: dict[str, float] = {}
    key = None
    if evaluation is not None:
        for shots in sorted({r.shots for r in evaluation.rows}):
            for name, method in (("miou", trained.mode), ("baseline_miou", "baseline")):
                value = evaluation.mean(method, shots)
                if not math.isnan(value):
                    metrics[f"{name}_{shots}shot"] = value
                    if key is None and name == "miou":
                        key = f"miou_{shots}shot"
    if key is None and trained.best_score is not None and math.isfinite(trained.best_score):
        metrics["val_score"] = float(trained.best_score)
        key = "val_score"
    return metrics, key


def run_register(cfg: PipelineConfig, trained: TrainOutcome, evaluation: EvaluationSummary | None,
                 parent_run_id: str | None = None) -> RegisteredVersion:
    """Register a bundle once per tracking store: a re-run of an unchanged pipeline returns the
    recorded version; a run against another store (or a record without one) registers it there."""
    record = Path(trained.bundle) / RECORD
    store = tracking_uri(cfg)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.pop("tracking_uri", None) == store:
            return RegisteredVersion(**saved)
        log.info("register: %s was registered in another tracking store; registering it in %s", trained.bundle, store)
    metrics, score_key = model_score(trained, evaluation)
    if score_key is None:
        log.warning("register: no score for %s (no labelled val images and no validation episodes); "
                    "it is registered unscored", trained.bundle)
    version = register_model(cfg, trained.bundle, metrics, parent_run_id, score_key=score_key,
                             bundle_key=trained.build_key)
    atomic_write_text(record, json.dumps({**asdict(version), "tracking_uri": store}))
    return version


@task(name="register")
def register_task(config: dict, trained: TrainOutcome, evaluation: EvaluationSummary | None,
                  parent_run_id: str | None = None) -> RegisteredVersion:
    return run_register(PipelineConfig.model_validate(config), trained, evaluation, parent_run_id)
