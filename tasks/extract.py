"""Extract: the backbone (pretrained self-supervised when none is given) → embeddings.zarr.

Three steps so that the flow can map the middle one over runs of rows:
``prepare_extraction`` (backbone + store, returns the runs of rows still to do, equal in size),
``extract_block`` (one mapped task per run; a shard two runs share is written under a
cluster-wide lock, one writer at a time), ``finish_extraction``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import distributed
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
    stored_images,
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
SNAP_TOLERANCE = 0.1  # a task boundary moves to a shard boundary when that unbalances the tasks by at most this


@dataclass(frozen=True)
class BackboneRef:
    """Which backbone to build, from which file (None = random init, never used for extraction)."""

    name: str
    checkpoint: str | None
    sha256: str | None


@dataclass(frozen=True)
class ExtractPlan:
    build_key: str  # the store's key: extractor settings and backbone weights
    output_key: str  # what later stages depend on: the store key and the images in it (ids and content)
    backbone: BackboneRef
    blocks: list[list[int]]  # store rows still to extract, one contiguous run per mapped task
    paths: list[list[str]]
    total: int


# The projection's sample and its randomized SVD are seeded by a constant, not by a setting of a later
# stage: the store's build key (extract settings, backbone weights) then names its content.
PCA_SEED = 0


def device_for(cfg: PipelineConfig) -> str:
    wanted = cfg.train.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def small_cnn_checkpoint(cfg: PipelineConfig) -> Path:
    """Where the workspace keeps the small CNN pretrained on its images with ``extract.ssl``."""
    key = hashlib.sha256(cfg.extract.ssl.model_dump_json().encode()).hexdigest()[:16]
    return workspace_of(cfg).backbone_dir / f"small_cnn-{key}" / "small_cnn.pth"


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
    path = small_cnn_checkpoint(cfg)
    folder = path.parent
    if not path.is_file():
        root = source_root(cfg)
        images = [root / r.path for r in rows]
        with stage_run(cfg, "ssl_pretrain", parent_run_id, folder.name.removeprefix("small_cnn-")):
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
    """Make sure the store exists (extended with new images), return the shards left to do.

    Each row records the manifest's sha256 of its image: a row whose image was rewritten since it
    was extracted is done again, alone. The output key names the store key and every image's id
    and sha256, so new or changed images rebuild clustering and the stages after it."""
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
                                    checkpoint_sha256=ref.sha256, pca=e.pca_dim, shard_size=e.shard_size,
                                    image_sha256=[by_id[i].sha256 for i in ordered])
    root = source_root(cfg)
    if e.pca_dim and load_projection(group) is None:
        sample = [root / by_id[i].path for i in ordered[: min(len(ordered), 256)]]
        vectors = sample_valid_vectors(sample, backbone, e.long_side, e.batch_size, 200_000, seed=PCA_SEED)
        save_projection(group, fit_projection(vectors, e.pca_dim, seed=PCA_SEED))
    todo = np.flatnonzero(~np.asarray(group["done"][:])).tolist()
    blocks, paths = [], []
    for run in task_runs(todo, e.shard_size, cfg.runtime.n_workers * cfg.runtime.threads_per_worker, e.batch_size):
        blocks.append(list(run))
        paths.append([str(root / by_id[ordered[i]].path) for i in run])
    ids_digest = hashlib.sha256("\n".join(f"{i}\t{by_id[i].sha256}" for i in ordered).encode()).hexdigest()[:16]
    return ExtractPlan(store_key, build_key("extract", cfg, ref.sha256, ids_digest), ref, blocks, paths, len(ordered))


def task_runs(todo: list[int], shard: int, workers: int, min_rows: int = 1) -> list[range]:
    """Split the rows left to extract (``todo``, increasing) into contiguous runs, one mapped task each.

    The runs hold equal numbers of rows to compute, so that ``workers`` finish together: the
    stage lasts as long as its longest task, and rows left over from a previous run (a partly
    filled last shard, new images) rarely fill whole shards evenly. There are as many runs as
    keep ``workers`` equally busy (a multiple of it, each at most ``MAX_SHARDS_PER_TASK`` shards
    of rows, at least ``min_rows`` rows where there are that many). A task hides its decoding and
    writing behind the forward pass except at its start and end, so fewer, longer tasks lose less.

    A boundary between runs moves to the nearest shard boundary where that unbalances the runs by
    at most ``SNAP_TOLERANCE`` of a run; otherwise the shard it falls in has two writers, which
    :func:`extract_block` serialises with a lock. Done rows between two todo rows of a run are
    spanned (:func:`extract_rows` skips them).
    """
    if not todo:
        return []
    workers, min_rows = max(1, workers), max(1, min_rows)
    tasks = max(workers, math.ceil(len(todo) / (MAX_SHARDS_PER_TASK * shard)))
    tasks = math.ceil(tasks / workers) * workers
    tasks = max(1, min(tasks, len(todo) // min_rows))
    cuts = [0]
    for i in range(1, tasks):
        ideal = i * len(todo) // tasks  # index into todo of the next run's first row
        row = todo[ideal]
        snapped = [bisect_left(todo, b) for b in (row // shard * shard, -(-row // shard) * shard)]
        best = min(snapped, key=lambda c: abs(c - ideal))
        if abs(best - ideal) <= SNAP_TOLERANCE * len(todo) / tasks:
            ideal = best
        if cuts[-1] < ideal < len(todo):
            cuts.append(ideal)
    cuts.append(len(todo))
    return [range(todo[lo], todo[hi - 1] + 1) for lo, hi in zip(cuts, cuts[1:])]


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


def embedded_images(cfg: PipelineConfig) -> dict[str, str | None]:
    """The images the workspace's embeddings store holds features of: id → sha256 of the image
    they were computed from (None for rows of a store that predates recording it)."""
    return stored_images(workspace_of(cfg).embeddings)


def extract_block(cfg: PipelineConfig, ref: BackboneRef, rows: list[int], paths: list[str]) -> int:
    """One run of rows of the store: the unit of a mapped task. A shard it shares with another
    run is written under that shard's lock, so each shard has one writer at a time."""
    backbone = _backbone(ref.name, ref.checkpoint)
    e = cfg.extract
    store = workspace_of(cfg).embeddings
    return extract_rows(store, rows, paths, backbone, e.long_side, e.batch_size, device=device_for(cfg),
                        progress=False, shard_lock=functools.partial(shard_lock, store.resolve()))


_locks: dict[str, object] = {}
_locks_guard = threading.Lock()


def shard_lock(store: Path, shard: int):
    """The lock of one shard of an embeddings store, shared by every writer of the store.

    On a Dask worker it is the cluster's lock of that name (held through the scheduler, so
    writers in every worker process, on every machine, exclude each other; it is released when
    its holder dies). Elsewhere (tasks called in-process) it is a lock of this process. One
    object per name and process: a cluster lock keeps a lease-refresh callback for as long as it
    lives, so a worker serving many runs must not make a new one per task.
    """
    name = f"fss-embeddings-shard:{store}:{shard}"
    with _locks_guard:
        if name not in _locks:
            try:
                distributed.get_worker()
                _locks[name] = distributed.Lock(name)
            except ValueError:  # not on a Dask worker
                _locks[name] = threading.Lock()
        return _locks[name]


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
