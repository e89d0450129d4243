"""Extract: the backbone (pretrained self-supervised when none is given) → embeddings.zarr.

Three steps so that the flow can map the middle one over shards:
``prepare_extraction`` (backbone + store, returns the runs of shards still to do),
``extract_block`` (one mapped task per run of whole shards: one writer per shard), ``finish_extraction``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.embeddings.extract import (
    create_embeddings_store,
    extract_rows,
    feature_grid,
    sample_valid_vectors,
    shard_blocks,
)
from fss_core.embeddings.pca import fit_projection, load_projection, save_projection
from fss_core.embeddings.ssl_pretrain import pretrain_small_cnn
from fss_core.models.backbones import build_backbone, checkpoint_sha256
from storage_schemas import EMBEDDINGS, ManifestRow, StoreVersionError, open_store
from tasks.ingest import training_rows
from tasks.keys import build_key
from tasks.tracking import stage_run
from tasks.workspace import source_root, workspace_of

log = logging.getLogger(__name__)

MAX_SHARDS_PER_TASK = 8  # bounds the work a failed task repeats and keeps the progress bar moving


@dataclass(frozen=True)
class BackboneRef:
    """Which backbone to build, from which file (None = random init, never used for extraction)."""

    name: str
    checkpoint: str | None
    sha256: str | None


@dataclass(frozen=True)
class ExtractPlan:
    build_key: str  # the store's key: extractor settings and backbone weights
    output_key: str  # what later stages depend on: the store key and the images in it
    backbone: BackboneRef
    blocks: list[list[int]]  # store rows still to extract, one run of whole shards per mapped task
    paths: list[list[str]]
    total: int


def device_for(cfg: PipelineConfig) -> str:
    wanted = cfg.train.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def resolve_backbone(cfg: PipelineConfig, rows: list[ManifestRow], parent_run_id: str | None = None) -> BackboneRef:
    """The configured checkpoint, or the workspace's self-supervised small CNN (trained once)."""
    e = cfg.extract
    if e.checkpoint is not None:
        path = Path(e.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"extract.checkpoint {path} does not exist")
        return BackboneRef(e.backbone, str(path), checkpoint_sha256(path))
    if e.backbone != "small_cnn":
        raise ValueError(f"extract.backbone={e.backbone} needs extract.checkpoint (weights cannot be downloaded); "
                         "or use backbone small_cnn, which is pretrained on your own images")
    ws = workspace_of(cfg)
    key = hashlib.sha256(e.ssl.model_dump_json().encode()).hexdigest()[:16]
    folder = ws.backbone_dir / f"small_cnn-{key}"
    path = folder / "small_cnn.pth"
    if not path.is_file():
        root = source_root(cfg)
        images = [root / r.path for r in rows]
        with stage_run(cfg, "ssl_pretrain", parent_run_id, key):
            _, report = pretrain_small_cnn(images, image_size=e.ssl.image_size, epochs=e.ssl.epochs,
                                           batch_size=e.ssl.batch_size, seed=e.ssl.seed, device=device_for(cfg),
                                           progress=cfg.runtime.progress, checkpoint_dir=folder)
            for epoch, loss in enumerate(report.losses):
                mlflow.log_metric("ssl_loss", float(loss), step=epoch)
            mlflow.log_metric("ssl_seconds", float(report.seconds))
            mlflow.log_artifact(str(path), "backbone")
    return BackboneRef("small_cnn", str(path), checkpoint_sha256(path))


@functools.lru_cache(maxsize=2)
def _backbone(name: str, checkpoint: str | None):
    model = build_backbone(name, checkpoint=checkpoint)
    model.freeze()
    return model.eval()


def prepare_extraction(cfg: PipelineConfig, parent_run_id: str | None = None) -> ExtractPlan:
    """Make sure the store exists (extended with new images), return the shards left to do."""
    ws = workspace_of(cfg)
    e = cfg.extract
    rows = training_rows(cfg)
    if len(rows) < 2:
        raise ValueError(f"need at least 2 readable training images, the manifest has {len(rows)}")
    ref = resolve_backbone(cfg, rows, parent_run_id)
    backbone = _backbone(ref.name, ref.checkpoint)
    store_key = build_key("extract", cfg, ref.sha256)
    by_id = {r.image_id: r for r in rows}
    ordered = _row_order(ws.embeddings, store_key, list(by_id))
    grid = feature_grid(backbone, e.long_side)
    stride = backbone.strides[backbone.embedding_layer]
    channels = e.pca_dim or backbone.channels[backbone.embedding_layer]
    image_hw = np.array([[by_id[i].height, by_id[i].width] for i in ordered], dtype=np.int32)
    group = create_embeddings_store(ws.embeddings, ordered, image_hw, channels, grid, build_key=store_key,
                                    extractor=ref.name, stride=stride, long_side=e.long_side,
                                    checkpoint_sha256=ref.sha256, pca=e.pca_dim, shard_size=e.shard_size)
    root = source_root(cfg)
    if e.pca_dim and load_projection(group) is None:
        sample = [root / by_id[i].path for i in ordered[: min(len(ordered), 256)]]
        vectors = sample_valid_vectors(sample, backbone, e.long_side, e.batch_size, 200_000, seed=cfg.cluster.seed)
        save_projection(group, fit_projection(vectors, e.pca_dim, seed=cfg.cluster.seed))
    done = np.asarray(group["done"][:])
    todo = [b for b in shard_blocks(len(ordered), e.shard_size) if not done[b.start:b.stop].all()]
    blocks, paths = [], []
    for run in task_runs(todo, cfg.runtime.n_workers * cfg.runtime.threads_per_worker):
        blocks.append(list(run))
        paths.append([str(root / by_id[ordered[i]].path) for i in run])
    ids_digest = hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:16]
    return ExtractPlan(store_key, build_key("extract", cfg, ref.sha256, ids_digest), ref, blocks, paths, len(ordered))


def task_runs(shards: list[range], workers: int) -> list[range]:
    """Group the shards left to extract into row ranges, one mapped task each.

    A task hides its decoding and writing behind the forward pass except at its start and end,
    so fewer, longer tasks lose less; there are as many tasks as keep ``workers`` equally busy
    (a multiple of it, each at most ``MAX_SHARDS_PER_TASK`` shards, sizes within one shard).
    A range spans whole shards from its first to its last (done shards between are skipped by
    :func:`extract_rows`), so each shard still has exactly one writer.
    """
    if not shards:
        return []
    workers = max(1, workers)
    tasks = max(workers, math.ceil(len(shards) / MAX_SHARDS_PER_TASK))
    tasks = min(len(shards), math.ceil(tasks / workers) * workers)
    return [range(group[0].start, group[-1].stop)
            for group in (shards[i * len(shards) // tasks:(i + 1) * len(shards) // tasks] for i in range(tasks))]


def _row_order(path: Path, key: str, manifest_ids: list[str]) -> list[str]:
    """Rows of the store: its existing rows first (when its key still holds), new images after."""
    try:
        group = open_store(path, EMBEDDINGS)
    except StoreVersionError:
        raise  # another code version's store: refused, not rebuilt over
    except Exception:  # no store yet, or an unreadable or half-created one: it is rebuilt
        return manifest_ids
    old = list(group.attrs.get("image_ids", [])) if group.attrs.get("build_key") == key else []
    present = set(manifest_ids)
    if any(i not in present for i in old):
        return manifest_ids  # images were removed: rebuild in manifest order
    known = set(old)
    return old + [i for i in manifest_ids if i not in known]


def extract_block(cfg: PipelineConfig, ref: BackboneRef, rows: list[int], paths: list[str]) -> int:
    """One run of whole shards of the store: the unit of a mapped task (exactly one writer per shard)."""
    backbone = _backbone(ref.name, ref.checkpoint)
    e = cfg.extract
    return extract_rows(workspace_of(cfg).embeddings, rows, paths, backbone, e.long_side, e.batch_size,
                        device=device_for(cfg), progress=False)


def finish_extraction(cfg: PipelineConfig, plan: ExtractPlan, computed: list[int],
                      parent_run_id: str | None = None) -> ExtractPlan:
    group = open_store(workspace_of(cfg).embeddings, EMBEDDINGS, build_key=plan.build_key)
    missing = int((~np.asarray(group["done"][:])).sum())
    if missing:
        raise RuntimeError(f"embeddings store has {missing} images not extracted after all shards ran")
    if sum(computed):
        with stage_run(cfg, "extract", parent_run_id, plan.output_key):
            mlflow.log_metrics({"images_extracted": sum(computed), "images_total": plan.total})
            mlflow.set_tag("backbone", plan.backbone.name)
    log.info("extract: %d images computed, %d in the store", sum(computed), plan.total)
    return plan


@task(name="extract-prepare")
def extract_prepare_task(config: dict, ingest_key: str, parent_run_id: str | None = None) -> ExtractPlan:
    return prepare_extraction(PipelineConfig.model_validate(config), parent_run_id)


@task(name="extract-shard", retries=1)
def extract_shard_task(config: dict, ref: BackboneRef, rows: list[int], paths: list[str]) -> int:
    return extract_block(PipelineConfig.model_validate(config), ref, rows, paths)


@task(name="extract-finish")
def extract_finish_task(config: dict, plan: ExtractPlan, computed: list[int],
                        parent_run_id: str | None = None) -> ExtractPlan:
    return finish_extraction(PipelineConfig.model_validate(config), plan, computed, parent_run_id)
