"""L2 k-means of pixel embeddings on Dask (Stage B of the pipeline).

The features live in ``embeddings.zarr`` (``features[N, C, G, G]`` float16, ``valid_hw[N, 2]``,
``done[N]``). :func:`valid_vectors` turns the feature cells that cover image content into a lazy
``[n, C]`` float32 Dask array whose blocks are read from zarr inside the Dask tasks, so the data
never has to fit in memory. :func:`kmeans_fit` runs Lloyd's algorithm on any ``[n, C]`` array:
each pass maps every block to its per-cluster sums, counts and inertia on the workers and reduces
those ``K × C`` partial results on the client.

Unlike the reference (faiss on the first 100 batches, then mini-batch updates that silently drop a
trailing partial block, padding cells included), every valid vector counts and padding cells are
never read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import zarr
from distributed import Client, default_client
from threadpoolctl import threadpool_limits

from storage_schemas.stores import IMAGES_PER_BLOCK

log = logging.getLogger(__name__)

NUMPY_BLOCK_ROWS = 131_072  # rows per Dask block when kmeans_fit is given an in-memory array
_STEP_ROWS = 16_384  # rows per BLAS call inside a block: keeps the [rows, K] distances cache-sized
_INIT_RUNS = 3  # k-means++ draws on the sample: a single draw can miss a well-separated cluster
_SEED_ROWS_PER_CLUSTER = 256  # k-means++ draws use this many sampled rows per cluster (as faiss trains)
_INIT_MAX_ITER = 20  # Lloyd passes on the sample; the full-data passes finish the job


@dataclass
class KMeansResult:
    """A fitted k-means.

    ``centroids`` [K, C] float32 are the last centroids whose ``inertia`` (sum of squared
    distances of all ``n_points`` vectors to their nearest centroid) was measured on the full
    data; ``history`` holds that inertia for every Lloyd pass, ``n_iter`` passes in all.
    """

    centroids: np.ndarray
    inertia: float
    n_iter: int
    n_points: int
    converged: bool
    history: list[float] = field(default_factory=list)


# --- reading the embeddings store -------------------------------------------------------------

def _open_embeddings(group_or_path: zarr.Group | str | os.PathLike) -> tuple[zarr.Group, str]:
    """The embeddings group and a name for error messages."""
    if isinstance(group_or_path, zarr.Group):
        return group_or_path, str(group_or_path.store_path)
    try:
        return zarr.open_group(os.fspath(group_or_path), mode="r"), os.fspath(group_or_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"embeddings store not found: {os.fspath(group_or_path)}") from err


def _embeddings_arrays(group: zarr.Group, where: str) -> tuple[zarr.Array, np.ndarray, np.ndarray]:
    """``features`` (lazy), ``valid_hw`` [N, 2] and ``done`` [N], checked against each other."""
    arrays = {}
    for name in ("features", "valid_hw", "done"):
        if name not in group:
            raise ValueError(f"{where}: embeddings store has no array {name!r}")
        arrays[name] = group[name]
    features = arrays["features"]
    if features.ndim != 4:
        raise ValueError(f"{where}/features: expected [N, C, G, G], got shape {features.shape}")
    n, _, grid_h, grid_w = features.shape
    valid_hw = np.asarray(arrays["valid_hw"][:], dtype=np.int64)
    done = np.asarray(arrays["done"][:])
    if valid_hw.shape != (n, 2):
        raise ValueError(f"{where}/valid_hw: expected shape ({n}, 2), got {valid_hw.shape}")
    if done.shape != (n,) or done.dtype != bool:
        raise ValueError(f"{where}/done: expected bool shape ({n},), got {done.dtype} {done.shape}")
    bad = (valid_hw < 0).any(axis=1) | (valid_hw[:, 0] > grid_h) | (valid_hw[:, 1] > grid_w)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}/valid_hw[{i}] = {valid_hw[i].tolist()} lies outside the "
                         f"{grid_h}x{grid_w} feature grid")
    return features, valid_hw, done


def _select_images(valid_hw: np.ndarray, done: np.ndarray, sample_images: int | None, seed: int) -> np.ndarray:
    """Done images with at least one valid cell, at most ``sample_images`` of them drawn with ``seed``."""
    candidates = np.flatnonzero(done & (valid_hw.prod(axis=1) > 0))
    if sample_images is not None:
        if sample_images < 1:
            raise ValueError(f"sample_images must be >= 1, got {sample_images}")
        if sample_images < len(candidates):
            rng = np.random.default_rng(seed)
            candidates = np.sort(rng.choice(candidates, size=sample_images, replace=False))
    return candidates


def clustering_images(group_or_path: zarr.Group | str | os.PathLike,
                      sample_images: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices [m] (sorted) of the images that :func:`valid_vectors` reads.

    These are the done images with at least one valid cell; when ``sample_images`` is given and
    smaller, that many of them drawn without replacement with ``seed``.
    """
    group, where = _open_embeddings(group_or_path)
    _, valid_hw, done = _embeddings_arrays(group, where)
    return _select_images(valid_hw, done, sample_images, seed)


def _read_valid_cells(features: zarr.Array, images: np.ndarray, valid_hw: np.ndarray) -> np.ndarray:
    """Valid cells of ``images`` as vectors [sum(r*c), C] float32, image by image, row-major."""
    runs = np.split(images, np.flatnonzero(np.diff(images) != 1) + 1)
    # one slice per run of consecutive images: much faster than an orthogonal (index-array) read
    block = np.concatenate([features[run[0]:run[-1] + 1] for run in runs])  # [B, C, G, G]
    channels = block.shape[1]
    parts = [np.asarray(f[:, :r, :c], dtype=np.float32).reshape(channels, -1).T
             for f, (r, c) in zip(block, valid_hw)]
    return np.ascontiguousarray(np.concatenate(parts))


def valid_vectors(group_or_path: zarr.Group | str | os.PathLike,
                  images_per_block: int = IMAGES_PER_BLOCK,
                  sample_images: int | None = None, seed: int = 0) -> da.Array:
    """Valid feature cells of an embeddings store as a lazy array [n, C] float32.

    Rows are the cells ``[:r, :c]`` (``valid_hw``) of the images of :func:`clustering_images`,
    in image order, row-major within an image; padding cells and images not ``done`` are never
    read. Each Dask block holds the selected images among ``images_per_block`` consecutive store
    rows (one shard, by default) and is read from zarr inside its task. Block sizes are known.
    """
    if images_per_block < 1:
        raise ValueError(f"images_per_block must be >= 1, got {images_per_block}")
    group, where = _open_embeddings(group_or_path)
    features, valid_hw, done = _embeddings_arrays(group, where)
    images = _select_images(valid_hw, done, sample_images, seed)
    if len(images) == 0:
        raise ValueError(f"{where}: no done image with valid feature cells to cluster")
    channels = features.shape[1]
    runs = np.split(images, np.flatnonzero(np.diff(images // images_per_block)) + 1)
    blocks = []
    for members in runs:
        hw = valid_hw[members]
        task = dask.delayed(_read_valid_cells)(features, members, hw)
        blocks.append(da.from_delayed(task, shape=(int(hw.prod(axis=1).sum()), channels), dtype=np.float32))
    log.info("%s: %d images, %d valid vectors of dim %d in %d blocks", where, len(images),
             sum(b.shape[0] for b in blocks), channels, len(blocks))
    return da.concatenate(blocks)


# --- nearest centroids --------------------------------------------------------------------------

def _nearest(x: np.ndarray, centroids: np.ndarray, sq_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid [n] and squared distance to it [n] float64 for rows x [n, C] float32."""
    scores = x @ (-2.0 * centroids).T  # [n, K]; ‖x‖² is the same for every k, so it is left out
    scores += sq_norms
    labels = scores.argmin(axis=1)
    diff = np.take(centroids, labels, axis=0)
    np.subtract(x, diff, out=diff)  # the distance itself, free of the expansion's cancellation
    return labels, np.einsum("ij,ij->i", diff, diff).astype(np.float64)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (L2) of each row: x [n, C], centroids [K, C] -> labels [n] int64."""
    x = np.asarray(x, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    labels = np.empty(len(x), dtype=np.int64)
    sq_norms = np.einsum("ij,ij->i", centroids, centroids)
    for start in range(0, len(x), _STEP_ROWS):
        labels[start:start + _STEP_ROWS] = _nearest(x[start:start + _STEP_ROWS], centroids, sq_norms)[0]
    return labels


def nearest_centroid_scores(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Reference assignment score map: features [C, h, w], centroids [K, C] -> [K, h, w] float32.

    ``s_k = -(1 - 2<f, c_k> + ‖c_k‖²)``: minus the squared distance for unit
    ``f``, so ``argmax_k`` is the nearest centroid. Pseudo masks upsample this map, then argmax.
    """
    channels, h, w = features.shape
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != channels:
        raise ValueError(f"centroids must be [K, {channels}], got shape {centroids.shape}")
    flat = np.asarray(features, dtype=np.float32).reshape(channels, h * w)
    scores = 2.0 * (centroids @ flat) - np.einsum("kc,kc->k", centroids, centroids)[:, None] - 1.0
    return scores.reshape(len(centroids), h, w)


# --- Lloyd passes on Dask ---------------------------------------------------------------------

def _block_stats(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One block's Lloyd statistics: per-cluster sums [K, C] f64, counts [K] and inertia."""
    x = np.asarray(x, dtype=np.float32)
    k, channels = centroids.shape
    sq_norms = np.einsum("ij,ij->i", centroids, centroids)
    sums = np.zeros((k, channels))
    counts = np.zeros(k, dtype=np.int64)
    inertia = 0.0
    for start in range(0, len(x), _STEP_ROWS):
        step = x[start:start + _STEP_ROWS]
        labels, sq_dist = _nearest(step, centroids, sq_norms)
        one_hot = np.zeros((k, len(step)), dtype=np.float32)
        one_hot[labels, np.arange(len(step))] = 1.0
        sums += one_hot @ step  # one-hot.T @ x through BLAS: as fast as the distances
        counts += np.bincount(labels, minlength=k)
        inertia += float(sq_dist.sum())
    return sums, counts, inertia


def _farthest_rows(x: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` rows of x [n, C] farthest from their nearest centroid, farthest first."""
    x = np.asarray(x, dtype=np.float32)
    _, sq_dist = _nearest(x, centroids, np.einsum("ij,ij->i", centroids, centroids))
    return x[np.argsort(-sq_dist, kind="stable")[:m]]


def _compute(client: Client | None, tasks: list) -> list:
    """Results of Dask tasks on ``client``, or on the current default scheduler."""
    if client is None:
        return list(dask.compute(*tasks))
    return client.compute(tasks, sync=True)


def _current_client(client: Client | None) -> Client | None:
    """``client``, else the default distributed client if one is running."""
    if client is not None:
        return client
    try:
        return default_client()
    except ValueError:
        return None


def _dask_blocks(x: da.Array) -> da.Array:
    """x as a Dask array [n, C] with one block along C and known block sizes."""
    if x.ndim != 2:
        raise ValueError(f"features must be [n, C], got shape {x.shape}")
    if np.isnan(x.shape[0]):
        log.info("computing the block sizes of the features (one read of the data)")
        x = x.compute_chunk_sizes()
    return x.rechunk({1: -1})


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Greedy k-means++ seeds [k, C] from rows x [n, C] and their potential (sum of squared distances).

    Each step draws ``2 + ln k`` candidates with probability proportional to the squared distance
    to the seeds so far and keeps the one that lowers the potential most.
    """
    n = len(x)
    trials = 2 + int(np.log(k))
    sq_norms = np.einsum("ij,ij->i", x, x)

    def sq_dist_to(rows: np.ndarray) -> np.ndarray:  # [len(rows), n]
        return np.maximum(sq_norms[rows, None] + sq_norms[None] - 2.0 * (x @ x[rows].T).T, 0.0)

    chosen = [int(rng.integers(n))]
    closest = sq_dist_to(np.array(chosen))[0]
    for _ in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        candidates = np.minimum(np.searchsorted(cumulative, rng.uniform(size=trials) * cumulative[-1]), n - 1)
        dist = np.minimum(closest, sq_dist_to(candidates))
        best = int(np.argmin(dist.sum(axis=1, dtype=np.float64)))
        chosen.append(int(candidates[best]))
        closest = dist[best]
    return x[chosen].copy(), float(closest.sum(dtype=np.float64))


def _sample_init(sample: np.ndarray, k: int, rng: np.random.Generator, tol: float) -> np.ndarray:
    """Init centroids [k, C] from sampled rows [m, C]: the best of a few k-means++ draws, refined by Lloyd.

    A draw that misses a well-separated cluster leaves that cluster's rows far from every seed,
    so keeping the draw of lowest potential guards against it; Lloyd on the sample then does
    most of the work of the full-data passes at a fraction of their cost.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    # each draw reads its rows k times: draw on a random subset of the sample (the sample is in row order)
    subset = rng.choice(len(sample), size=min(len(sample), _SEED_ROWS_PER_CLUSTER * k), replace=False)
    seed_rows = sample[np.sort(subset)]
    seeds, potential = min((_kmeans_plusplus(seed_rows, k, rng) for _ in range(_INIT_RUNS)), key=lambda d: d[1])
    blocks = [sample[i:i + _STEP_ROWS] for i in range(0, len(sample), _STEP_ROWS)]
    with dask.config.set(scheduler="threads"):  # the sample is local: never ship it to a cluster
        centroids, history, _, _ = _lloyd(blocks, seeds, _INIT_MAX_ITER, tol, None)
    log.info("k-means++ on %d rows: potential %.6g; %d Lloyd passes on %d sampled rows: inertia %.6g",
             len(seed_rows), potential, len(history), len(sample), history[-1])
    return centroids


def _reseed_empty(centroids: np.ndarray, new: np.ndarray, empty: np.ndarray, blocks: list,
                  block_inertia: list[float], client: Client | None) -> None:
    """Move the empty clusters of ``new`` onto the rows farthest from ``centroids``.

    The rows come from the block with the largest inertia (then the next ones if it is too small),
    so the choice is deterministic.
    """
    wanted = len(empty)
    chosen = []
    for b in np.argsort(-np.asarray(block_inertia), kind="stable"):
        (rows,) = _compute(client, [dask.delayed(_farthest_rows)(blocks[b], centroids, wanted)])
        chosen.append(rows)
        wanted -= len(rows)
        if wanted == 0:
            break
    new[empty] = np.concatenate(chosen)
    log.info("re-seeded %d empty clusters on the farthest rows", len(empty))


def _lloyd(blocks: list, centroids: np.ndarray, max_iter: int, tol: float,
           client: Client | None) -> tuple[np.ndarray, list[float], int, bool]:
    """Lloyd passes from ``centroids``: (last measured centroids, inertia per pass, n, converged)."""
    history: list[float] = []
    for _ in range(max_iter):
        shared = dask.delayed(centroids)  # one graph key: sent once per worker, not per block
        stats = _compute(client, [dask.delayed(_block_stats)(b, shared) for b in blocks])
        sums = np.sum([s for s, _, _ in stats], axis=0)
        counts = np.sum([c for _, c, _ in stats], axis=0)
        block_inertia = [i for _, _, i in stats]
        history.append(float(np.sum(block_inertia)))
        log.debug("k-means pass %d: inertia %.8g", len(history), history[-1])
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-1]:
            return centroids, history, int(counts.sum()), True
        new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            _reseed_empty(centroids, new, empty, blocks, block_inertia, client)
        if np.array_equal(new, centroids):
            return centroids, history, int(counts.sum()), True
        if len(history) < max_iter:  # the last pass's update is unmeasured, so it is not returned
            centroids = new
    return centroids, history, int(counts.sum()), False


def kmeans_fit(x: da.Array | np.ndarray, k: int, seed: int = 0, max_iter: int = 50,
               tol: float = 1e-4, init: str | np.ndarray = "k-means++", init_sample: int = 100_000,
               client: Client | None = None) -> KMeansResult:
    """L2 k-means of the rows of x [n, C] with Lloyd passes on Dask.

    Init: ``"k-means++"`` draws ``init_sample`` rows with ``seed``, takes the best of 3 greedy
    k-means++ draws on 256 of them per cluster and refines it with up to 20 Lloyd passes on all; an array
    [K, C] warm-starts from those centroids (e.g. the previous fit, when new data arrives).
    Each pass computes, per Dask block and on the workers, the distances to the centroids, the
    nearest one, the per-cluster sums and counts and the block inertia; only these ``K × C``
    results travel to the client. It stops when a pass lowers the inertia by less
    than ``tol`` (relative), when the centroids stop moving, or after ``max_iter`` passes. An
    empty cluster is re-seeded on the farthest row of the block with the largest inertia.
    Deterministic for a given seed and data blocking.

    ``client``: a ``distributed.Client``; None uses the default one if running, else the current
    Dask scheduler. An in-memory array is split into blocks of ``NUMPY_BLOCK_ROWS`` rows (and sent
    to the client's workers once); a Dask array keeps its blocks, which are re-read each pass, so
    data that does not fit in memory stays streamed.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_iter < 1 or tol < 0 or init_sample < 1:
        raise ValueError(f"need max_iter >= 1, tol >= 0, init_sample >= 1; got {max_iter}, {tol}, {init_sample}")
    client = _current_client(client)
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise ValueError(f"features must be [n, C], got shape {x.shape}")
        blocks = [x[i:i + NUMPY_BLOCK_ROWS] for i in range(0, len(x), NUMPY_BLOCK_ROWS)]
        if client is not None:
            blocks = client.scatter(blocks, hash=False)  # sent to the workers once, not every pass
    else:
        x = _dask_blocks(x)
        blocks = list(x.to_delayed().ravel())
    n, channels = x.shape
    if n < k:
        raise ValueError(f"k = {k} clusters need at least {k} vectors, got {n}")

    if isinstance(init, str):
        if init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or an array [K, C], got {init!r}")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=init_sample, replace=False)) if init_sample < n else slice(None)
        sample = x[rows] if isinstance(x, np.ndarray) else _compute(client, [x[rows]])[0]
    else:
        centroids = np.array(init, dtype=np.float32)
        if centroids.shape != (k, channels) or not np.isfinite(centroids).all():
            raise ValueError(f"init centroids must be finite [{k}, {channels}], got shape {centroids.shape}")

    # one BLAS thread per task: the Dask threads/workers are the parallelism (no oversubscription)
    with threadpool_limits(limits=1, user_api="blas"):
        if isinstance(init, str):
            centroids = _sample_init(sample, k, rng, tol)
        centroids, history, n_points, converged = _lloyd(blocks, centroids, max_iter, tol, client)
    log.info("k-means K=%d on %d vectors: %d passes, inertia %.6g, converged=%s",
             k, n_points, len(history), history[-1], converged)
    return KMeansResult(centroids=centroids, inertia=history[-1], n_iter=len(history),
                        n_points=n_points, converged=converged, history=history)
