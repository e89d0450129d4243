"""Retraining on new data: when enough new unlabeled images have arrived, extract only
those, re-cluster warm-started from the last centroids, rebuild the task index, fine-tune
from the ``champion`` model, evaluate, and move ``champion`` only if the new model is better."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect_dask import DaskTaskRunner

from flows.pipeline import cluster_and_run, stages
from fss_core.config import PipelineConfig, load_config
from storage_schemas import EMBEDDINGS, StoreValidationError, open_store
from tasks.ingest import run_ingest, training_rows
from tasks.registry import champion_bundle
from tasks.workspace import save_resolved_config, workspace_lock, workspace_of

log = logging.getLogger(__name__)


def new_images(cfg: PipelineConfig) -> tuple[int, int]:
    """(training images not yet embedded, images already embedded) after re-ingesting the source."""
    run_ingest(cfg)
    try:
        known = set(open_store(workspace_of(cfg).embeddings, EMBEDDINGS).attrs["image_ids"])
    except StoreValidationError:
        known = set()
    rows = training_rows(cfg)
    return sum(r.image_id not in known for r in rows), len(known)


def enough(cfg: PipelineConfig, new: int, known: int) -> bool:
    r = cfg.retrain
    return new >= r.min_new_images and new >= r.min_new_fraction * known


@flow(name="fss-retrain", log_prints=True)
def retrain(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dask_address: str | None = None,
    config: dict | None = None,
) -> dict[str, Any]:
    """Check the source for new images; retrain from the champion when there are enough."""
    cfg = load_config(config_path, overrides, base=config)
    if dask_address:
        cfg.runtime.dask_address = dask_address
    ws = workspace_of(cfg)
    with workspace_lock(ws.root, what="fss-retrain flow"):
        return _retrain(cfg, ws)


def _retrain(cfg: PipelineConfig, ws) -> dict[str, Any]:
    new, known = new_images(cfg)
    if not enough(cfg, new, known):
        log.info("retrain: %d new images for %d known; below the threshold, nothing to do", new, known)
        return {"retrained": False, "new_images": new, "known_images": known}
    start = champion_bundle(cfg, ws.models / "champion")
    if start is None:
        raise RuntimeError("no champion model is registered yet: run the pipeline (fss run) first")
    cfg.train.epochs = cfg.retrain.epochs
    log.info("retrain: %d new images (%d known); fine-tuning from the champion", new, known)
    save_resolved_config(cfg, ws)
    with cluster_and_run(cfg, run_name="retrain") as (address, run):
        results = stages.with_options(task_runner=DaskTaskRunner(address=address))(
            cfg.model_dump(mode="json"), run.info.run_id, warm_start=True, init_bundle=str(start))
    return {"retrained": True, "new_images": new, "known_images": known, **results}
