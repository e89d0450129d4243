"""Cluster: Dask k-means of the valid pixel embeddings into clusters.zarr."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import dask
import mlflow
import numpy as np
from prefect import task

from fss_core.clustering.kmeans import assign, clustering_images, kmeans_fit, valid_vectors
from fss_core.config import PipelineConfig
from storage_schemas import (
    CLUSTERS,
    EMBEDDINGS,
    ClustersAttrs,
    StoreValidationError,
    StoreVersionError,
    create_store,
    open_store,
    store_build,
    write_unit,
)
from tasks.dask_client import cluster_client
from tasks.keys import build_key
from tasks.tracking import stage_run
from tasks.workspace import workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterResult:
    build_key: str
    num_clusters: int
    inertia: float
    iterations: int
    points_used: int
    images_sampled: int
    converged: bool
    cached: bool


def _stored(path, key: str) -> ClusterResult | None:
    try:
        group = open_store(path, CLUSTERS)
    except StoreVersionError:
        raise
    except StoreValidationError:
        return None
    a = group.attrs.asdict()
    if a.get("build_key") != key:
        return None
    return ClusterResult(key, a["num_clusters"], a["inertia"], a["iterations"], a["points_used"],
                         a["images_sampled"], a["converged"], cached=True)


def previous_centroids(cfg: PipelineConfig) -> tuple[np.ndarray, str] | None:
    """The current clusters store's centroids and key, for a warm start on new data."""
    try:
        group = open_store(workspace_of(cfg).clusters, CLUSTERS)
    except StoreVersionError:
        raise
    except StoreValidationError:
        return None
    return np.asarray(group["centroids"][:]), group.attrs["build_key"]


def run_cluster(cfg: PipelineConfig, embeddings_key: str, parent_run_id: str | None = None,
                warm_start: bool = False) -> ClusterResult:
    """Fit k-means on the embeddings store (valid cells only) and store centroids + assignments."""
    ws = workspace_of(cfg)
    key = build_key("cluster", cfg, embeddings_key)
    cached = _stored(ws.clusters, key)
    if cached is not None:
        log.info("cluster: unchanged (build key %s), skipped", key)
        return cached
    c = cfg.cluster
    emb = open_store(ws.embeddings, EMBEDDINGS)
    parent = previous_centroids(cfg) if warm_start else None
    if parent is not None and parent[0].shape != (c.num_clusters, emb["features"].shape[1]):
        log.warning("cluster: the stored centroids are %s, this run fits %d clusters of %d channels; "
                    "no warm start, k-means++ instead", "x".join(map(str, parent[0].shape)), c.num_clusters,
                    emb["features"].shape[1])
        parent = None
    init = parent[0] if parent is not None else "k-means++"
    with stage_run(cfg, "cluster", parent_run_id, key), cluster_client() as client:
        x = valid_vectors(emb, sample_images=c.sample_images, seed=c.seed)
        sampled = len(clustering_images(emb, c.sample_images, c.seed))
        fit = kmeans_fit(x, c.num_clusters, seed=c.seed, max_iter=c.max_iter, tol=c.tol, init=init,
                         init_sample=c.init_sample, client=client)
        attrs = ClustersAttrs(
            build_key=key, created_at=dt.datetime.now(dt.timezone.utc), num_clusters=c.num_clusters, seed=c.seed,
            iterations=fit.n_iter, inertia=float(fit.inertia), points_used=fit.n_points, images_sampled=sampled,
            warm_start_parent=parent[1] if parent is not None else None, converged=fit.converged,
            image_ids=list(emb.attrs["image_ids"]),
        )
        n, _, g, _ = emb["features"].shape
        with store_build(ws.clusters) as staging:  # readers never see a store without its assignments
            group = create_store(staging, CLUSTERS, sizes={"cluster": c.num_clusters,
                                 "channel": fit.centroids.shape[1], "image": n, "row": g, "col": g}, attrs=attrs)
            group["centroids"][:] = fit.centroids.astype(np.float32)
            _write_assignments(ws.embeddings, staging, n, write_unit(group["assignments"])[0], client)
        mlflow.log_metrics({"inertia": float(fit.inertia), "iterations": fit.n_iter, "points": fit.n_points,
                            "images_sampled": sampled, "converged": float(fit.converged)})
        for i, value in enumerate(fit.history):
            mlflow.log_metric("inertia_per_pass", float(value), step=i)
    log.info("cluster: K=%d inertia %.4g after %d passes on %d vectors", c.num_clusters, fit.inertia,
             fit.n_iter, fit.n_points)
    return ClusterResult(key, c.num_clusters, float(fit.inertia), fit.n_iter, fit.n_points, sampled,
                         fit.converged, cached=False)


def assign_rows(embeddings_path: str, clusters_path: str, start: int, stop: int) -> int:
    """Nearest centroid of every cell of images [start, stop) → ``assignments`` (-1 on padding).

    The unit of work of one Dask task: one shard of the clusters store, so one writer per shard.
    """
    emb = open_store(embeddings_path, EMBEDDINGS)
    group = open_store(clusters_path, CLUSTERS, mode="r+")
    centroids = np.asarray(group["centroids"][:])
    features = np.asarray(emb["features"][start:stop], dtype=np.float32)  # [B, C, G, G]
    valid = np.asarray(emb["valid_hw"][start:stop])
    b, ch, g, _ = features.shape
    labels = assign(np.moveaxis(features, 1, -1).reshape(-1, ch), centroids).reshape(b, g, g).astype(np.int16)
    inside = (np.arange(g)[None, :, None] < valid[:, 0, None, None]) & (np.arange(g)[None, None, :] < valid[:, 1, None, None])
    labels[~inside] = -1
    group["assignments"][start:stop] = labels
    return stop - start


def _write_assignments(emb_path, clusters_path, n: int, unit: int, client) -> None:
    jobs = [dask.delayed(assign_rows)(str(emb_path), str(clusters_path), s, min(s + unit, n))
            for s in range(0, n, unit)]
    (client.compute(jobs, sync=True) if client is not None else dask.compute(*jobs))


@task(name="cluster")
def cluster_task(config: dict, embeddings_key: str, parent_run_id: str | None = None,
                 warm_start: bool = False) -> ClusterResult:
    return run_cluster(PipelineConfig.model_validate(config), embeddings_key, parent_run_id, warm_start)
