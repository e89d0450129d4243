"""Retraining on new data: when enough new unlabeled images have arrived, extract only
those, re-cluster warm-started from the last centroids, rebuild the task index, fine-tune
from the ``champion`` model, evaluate, and move ``champion`` only if the new model is better.

"New" means not yet trained on by the workspace's last registered model: an image it has not
seen, or one whose content changed since (see :func:`trained_images`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect_dask import DaskTaskRunner

from flows.pipeline import cluster_and_run, stages
from fss_core.config import PipelineConfig, load_config
from storage_schemas import ManifestRow
from tasks.extract import embedded_images
from tasks.ingest import run_ingest, training_rows
from tasks.register import RECORD
from tasks.registry import champion_bundle
from tasks.train import TRAINING_RECORD
from tasks.workspace import Workspace, save_resolved_config, workspace_lock, workspace_of

log = logging.getLogger(__name__)


def new_images(cfg: PipelineConfig) -> tuple[int, int]:
    """(training images the last registered model was not trained on, images it was trained on),
    after re-ingesting the source. An image is new when its id is not among the trained images,
    or when its sha256 differs from the one it was trained with (its content changed)."""
    run_ingest(cfg)
    trained = trained_images(cfg)
    return sum(_is_new(row, trained) for row in training_rows(cfg)), len(trained)


def _is_new(row: ManifestRow, trained: dict[str, str | None]) -> bool:
    if row.image_id not in trained:
        return True
    sha = trained[row.image_id]
    return sha is not None and sha != row.sha256  # None: a store that predates shas, trusted


def trained_images(cfg: PipelineConfig) -> dict[str, str | None]:
    """The images (id → sha256) the workspace's last registered model was trained on: the list
    its bundle keeps (``training.json``, written with the model). A run killed before it
    registers a model therefore leaves its new images new, whatever it had extracted. For a
    bundle trained before bundles kept that list, the embeddings store's done rows."""
    bundle = last_registered_bundle(workspace_of(cfg))
    record = bundle / TRAINING_RECORD if bundle is not None else None
    if record is not None and record.is_file():
        images = json.loads(record.read_text()).get("images")
        if images is not None:
            return images
    return embedded_images(cfg)


def last_registered_bundle(ws: Workspace) -> Path | None:
    """The bundle of the highest model version registered from the workspace (None: none yet)."""
    registered = [(json.loads(p.read_text())["version"], p.parent) for p in ws.models.glob(f"*/{RECORD}")]
    return max(registered)[1] if registered else None


def enough(cfg: PipelineConfig, new: int, known: int) -> bool:
    r = cfg.retrain
    return new >= r.min_new_images and new >= r.min_new_fraction * known


@flow(name="fss-retrain", log_prints=True)
def retrain(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dask_address: str | None = None,
    config: dict | None = None,
    serve_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Check the source for new images; retrain from the champion when there are enough.

    ``serve_overrides`` are the settings ``fss serve`` was started with (workspace, tracking
    store), applied before ``overrides``: a run from the UI that sets its own overrides keeps them."""
    cfg = load_config(config_path, [*(serve_overrides or []), *(overrides or [])], base=config)
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
