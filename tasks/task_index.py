"""Task index: valid pseudo-classes per image, their prototypes and the similarity prior."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
import numpy as np
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.pseudo.task_index import PseudoTaskIndex, build_task_index
from fss_core.pseudo.masks import META_NAME
from storage_schemas import (
    EMBEDDINGS,
    TASKS,
    PseudoMasksMeta,
    StoreKeyError,
    StoreValidationError,
    StoreVersionError,
    open_store,
    read_json_meta,
    store_build,
)
from tasks.keys import build_key
from tasks.tracking import stage_run
from tasks.workspace import workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskIndexResult:
    build_key: str
    occurrences: int
    query_images: int
    clusters_used: int
    cached: bool


# How a pseudo-class's prototype is read off the embedding cells; part of the key, so that an
# index built by an earlier placement (which stretched the image over cells reaching into the
# canvas padding, at strides above 8) is rebuilt.
PROTOTYPE_PLACEMENT = "prototypes-on-canvas-cells"


def _summary(index: PseudoTaskIndex, key: str, cached: bool) -> TaskIndexResult:
    return TaskIndexResult(key, index.num_occurrences, int(len(np.unique(index.occ_image))),
                           int(len(np.unique(index.occ_cluster))), cached)


def run_task_index(cfg: PipelineConfig, pseudo_key: str, image_ids: list[str],
                   parent_run_id: str | None = None) -> TaskIndexResult:
    """Build tasks.zarr from the pseudo masks of ``image_ids``; keyed by the masks and settings."""
    ws = workspace_of(cfg)
    key = build_key("task_index", cfg, pseudo_key, PROTOTYPE_PLACEMENT, *sorted(image_ids))
    try:
        if open_store(ws.tasks, TASKS).attrs.get("build_key") == key:
            log.info("task index: unchanged (build key %s), skipped", key)
            return _summary(PseudoTaskIndex.load(ws.tasks), key, cached=True)
    except StoreVersionError:
        raise
    except StoreValidationError:
        pass
    masks = read_json_meta(ws.pseudo_masks / META_NAME, PseudoMasksMeta)
    if masks.build_key != pseudo_key:
        raise StoreKeyError(f"pseudo masks at {ws.pseudo_masks}: were built with build key {masks.build_key}, "
                            f"this run expects {pseudo_key} (built from another config or other inputs); "
                            f"re-run the pseudo stage")
    p = cfg.pseudo
    with stage_run(cfg, "task_index", parent_run_id, key):
        embeddings = open_store(ws.embeddings, EMBEDDINGS)  # its schema checked, as every stage reads a store
        index = build_task_index(ws.pseudo_masks, embeddings, image_ids, cfg.cluster.num_clusters,
                                 min_area=p.min_area, area_reference=p.area_reference, max_side=p.max_side,
                                 background_span=p.background_span, prior_max=p.prior_max, seed=cfg.cluster.seed)
        if index.num_occurrences == 0:
            raise ValueError("no image has a valid pseudo-class: lower pseudo.min_area or check the pseudo masks")
        with store_build(ws.tasks) as staging:  # never a half-written index under the final name
            index.save(staging, key)
        result = _summary(index, key, cached=False)
        mlflow.log_metrics({"occurrences": result.occurrences, "query_images": result.query_images,
                            "clusters_used": result.clusters_used})
    log.info("task index: %d occurrences over %d images, %d clusters", result.occurrences,
             result.query_images, result.clusters_used)
    return result


@task(name="task-index")
def task_index_task(config: dict, pseudo_key: str, image_ids: list[str],
                    parent_run_id: str | None = None) -> TaskIndexResult:
    return run_task_index(PipelineConfig.model_validate(config), pseudo_key, image_ids, parent_run_id)
