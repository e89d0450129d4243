"""Pseudo masks: nearest centroid on the valid cells + superpixel vote, one PNG per image,
mapped over shards; then the quality report against ground truth where it exists."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.data.folds import num_classes_of
from fss_core.embeddings.extract import shard_blocks
from fss_core.pseudo.masks import QUALITY_NAME, finish_pseudo_masks, start_pseudo_masks, write_pseudo_masks
from fss_core.pseudo.quality import evaluate_pseudo_masks, format_table
from storage_schemas import CLUSTERS, EMBEDDINGS, FelzenszwalbParams, PseudoMasksMeta, StoreKeyError, open_store
from tasks.ingest import training_rows
from tasks.keys import build_key
from tasks.tracking import stage_run
from tasks.workspace import atomic_write_text, source_root, workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoPlan:
    build_key: str
    complete: bool
    blocks: list[list[int]]
    paths: list[list[str]]
    image_ids: list[str]


@dataclass(frozen=True)
class QualitySummary:
    """Hungarian-matched mIoU of the pseudo masks vs ground truth, and of random masks."""

    miou: float | None
    random_baseline_miou: float | None
    pixel_accuracy: float | None
    num_images: int


def dataset_num_classes(cfg: PipelineConfig) -> int:
    """Foreground classes of the configured dataset (the synthetic data's, by default)."""
    d = cfg.data
    if d.fold_scheme != "generic":
        return num_classes_of(d.fold_scheme)
    if d.num_classes:
        return d.num_classes
    if d.source is None:
        return d.synthetic.classes
    raise ValueError("data.num_classes is required for data.fold_scheme=generic on a real dataset")


def felzenszwalb_params(cfg: PipelineConfig) -> FelzenszwalbParams:
    p = cfg.pseudo
    return FelzenszwalbParams(scale=p.felzenszwalb_scale, sigma=p.felzenszwalb_sigma, min_size=p.felzenszwalb_min_size)


def prepare_pseudo(cfg: PipelineConfig, cluster_key: str) -> PseudoPlan:
    ws = workspace_of(cfg)
    key = build_key("pseudo", cfg, cluster_key)
    emb = open_store(ws.embeddings, EMBEDDINGS)
    ids = list(emb.attrs["image_ids"])
    complete = start_pseudo_masks(ws.pseudo_masks, key)
    if complete:
        return PseudoPlan(key, True, [], [], ids)
    root = source_root(cfg)
    path_of = {r.image_id: str(root / r.path) for r in training_rows(cfg)}
    blocks = [list(b) for b in shard_blocks(len(ids), cfg.extract.shard_size)]
    return PseudoPlan(key, False, blocks, [[path_of[ids[i]] for i in b] for b in blocks], ids)


def pseudo_block(cfg: PipelineConfig, plan_key: str, rows: list[int], paths: list[str]) -> int:
    """One shard of images: the unit of a mapped task."""
    ws = workspace_of(cfg)
    clusters = open_store(ws.clusters, CLUSTERS)
    stored_key = clusters.attrs["build_key"]
    if build_key("pseudo", cfg, stored_key) != plan_key:
        raise StoreKeyError(f"clusters store at {ws.clusters}: was built with build key {stored_key}, but the "
                            f"pseudo masks being written (build {plan_key}) come from other clusters (another "
                            f"config or other inputs); re-run the cluster stage")
    centroids = np.asarray(clusters["centroids"][:])
    return write_pseudo_masks(rows, ws.embeddings, centroids, paths, ws.pseudo_masks, felzenszwalb_params(cfg),
                              plan_key, area_reference=cfg.pseudo.area_reference, max_side=cfg.pseudo.max_side)


def finish_pseudo(cfg: PipelineConfig, plan: PseudoPlan, parent_run_id: str | None = None) -> QualitySummary:
    """Mark the masks complete and report their quality (cached with them).

    The cached report records the build key of the masks it was measured on, and is used only
    for that build: a report of any other build is measured again.
    """
    ws = workspace_of(cfg)
    quality_path = ws.pseudo_masks / QUALITY_NAME
    if plan.complete:
        cached = _cached_quality(quality_path, plan.build_key)
        if cached is not None:
            return cached
    finish_pseudo_masks(ws.pseudo_masks, PseudoMasksMeta(build_key=plan.build_key, num_clusters=cfg.cluster.num_clusters,
                                                         felzenszwalb=felzenszwalb_params(cfg),
                                                         image_count=len(plan.image_ids)), plan.image_ids)
    root = source_root(cfg)
    labelled = [_Labelled(r.image_id, root / r.label_path) for r in training_rows(cfg) if r.label_path]
    with stage_run(cfg, "pseudo", parent_run_id, plan.build_key):
        if not labelled:
            summary = QualitySummary(None, None, None, 0)
            table = "no ground truth: quality not measured"
        else:
            report = evaluate_pseudo_masks(ws.pseudo_masks, labelled, cfg.cluster.num_clusters,
                                           dataset_num_classes(cfg) + 1, seed=cfg.cluster.seed)
            summary = QualitySummary(report.miou, report.random_baseline_miou, report.pixel_accuracy,
                                     report.num_images)
            table = format_table(report)
            mlflow.log_metrics({"pseudo_miou": report.miou, "random_baseline_miou": report.random_baseline_miou,
                                "pixel_accuracy": report.pixel_accuracy})
            mlflow.log_dict({str(k): v for k, v in report.per_class.items()}, "quality/per_class_iou.json")
        mlflow.log_text(table, "quality/report.txt")
    atomic_write_text(quality_path, json.dumps({"build_key": plan.build_key, "summary": asdict(summary),
                                                "table": table}, indent=1))
    log.info("pseudo-mask quality:\n%s", table)
    return summary


def _cached_quality(path: Path, key: str) -> QualitySummary | None:
    """The quality report at ``path`` if it was measured on the masks of build ``key``, else None."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("build_key") != key:
        log.info("pseudo-mask quality report %s belongs to another build; measuring it again", path)
        return None
    return QualitySummary(**report["summary"])


@dataclass(frozen=True)
class _Labelled:
    image_id: str
    label_path: Path


@task(name="pseudo-prepare")
def pseudo_prepare_task(config: dict, cluster_key: str) -> PseudoPlan:
    return prepare_pseudo(PipelineConfig.model_validate(config), cluster_key)


@task(name="pseudo-shard", retries=1)
def pseudo_shard_task(config: dict, plan_key: str, rows: list[int], paths: list[str]) -> int:
    return pseudo_block(PipelineConfig.model_validate(config), plan_key, rows, paths)


@task(name="pseudo-finish")
def pseudo_finish_task(config: dict, plan: PseudoPlan, written: list[int],
                       parent_run_id: str | None = None) -> QualitySummary:
    return finish_pseudo(PipelineConfig.model_validate(config), plan, parent_run_id)
