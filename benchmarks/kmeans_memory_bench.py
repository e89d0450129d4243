"""Peak memory of the Dask k-means when the features are 2x larger than the memory of the Dask workers.

An embeddings store of synthetic float16 features (gaussian blobs, L2-normalised, every cell valid)
is written so that its valid vectors as float32 ``[n, C]`` — what k-means reads — hold twice the
memory limit given to all workers together. The fit then runs as the cluster stage runs it: as one
task on a worker, which opens a client of the same cluster (``tasks.dask_client.cluster_client``),
reads the store lazily (:func:`fss_core.clustering.valid_vectors`) and maps the Lloyd passes over the
blocks. The baseline is what holding the features would take: their float32 size.

The section "k-means memory" of docs/benchmarks.md.

    python benchmarks/kmeans_memory_bench.py            # 2 workers x 600 MB, 2.4 GB of features
    python benchmarks/kmeans_memory_bench.py --quick    # 1 worker x 500 MB, 1 GB of features
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import PeakMemory, RunInfo, add_common_arguments, mib, out_path, table, verdict, write_section

GRID = 16  # feature cells per side (a 128 px canvas at stride 8)
CHANNELS = 256
CLUSTERS = 32


def write_store(path: Path, images: int, seed: int) -> None:
    """An embeddings store of ``images`` rows of blob features [C, G, G], every cell valid, all done."""
    from fss_core.embeddings.extract import create_embeddings_store
    from storage_schemas import EMBEDDINGS, open_store
    from storage_schemas.stores import IMAGES_PER_BLOCK

    create_embeddings_store(path, [f"im{i:06d}" for i in range(images)], np.full((images, 2), 128), CHANNELS, GRID,
                            build_key="3e3c0000", extractor="synthetic blobs", stride=8, long_side=128)
    group = open_store(path, EMBEDDINGS, mode="r+")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, CHANNELS)).astype(np.float32)
    for start in range(0, images, IMAGES_PER_BLOCK):
        stop = min(start + IMAGES_PER_BLOCK, images)
        cells = (stop - start) * GRID * GRID
        x = centres[rng.integers(CLUSTERS, size=cells)] + 0.5 * rng.standard_normal((cells, CHANNELS), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        group["features"][start:stop] = x.reshape(stop - start, GRID, GRID, CHANNELS).transpose(0, 3, 1, 2)
        group["done"][start:stop] = True


def fit_on_worker(store: str, k: int, seed: int, max_iter: int) -> dict:
    """The cluster stage's fit, run inside a Dask task (its client is the worker's own)."""
    from fss_core.clustering import kmeans_fit, valid_vectors
    from tasks.dask_client import cluster_client

    start = time.perf_counter()
    with cluster_client() as client:
        fit = kmeans_fit(valid_vectors(store), k, seed=seed, max_iter=max_iter, client=client)
    return dict(wall=time.perf_counter() - start, inertia=fit.inertia, n_iter=fit.n_iter, points=fit.n_points)


def worker_pids(client) -> dict[str, int]:
    import os

    return client.run(os.getpid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--workers", type=int, default=None, help="Dask workers (default 2, quick 1)")
    parser.add_argument("--worker-mb", type=int, default=None, help="memory limit per worker in MB (default 600, quick 500)")
    parser.add_argument("--max-iter", type=int, default=5, help="Lloyd passes over the full data at most")
    parser.add_argument("--ratio", type=float, default=2.0, help="features / memory of all workers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from distributed import Client, LocalCluster

    workers = args.workers or (1 if args.quick else 2)
    worker_bytes = (args.worker_mb or (500 if args.quick else 600)) * 10**6
    given = workers * worker_bytes
    per_image = GRID * GRID * CHANNELS * 4  # float32 bytes of one image's valid vectors
    images = int(np.ceil(args.ratio * given / per_image))
    features = images * per_image
    info = RunInfo()
    work = args.work or Path(tempfile.mkdtemp(prefix="kmeans-memory-"))
    store = work / "embeddings.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    write_store(store, images, seed=0)
    print(f"store of {images} images ({mib(features):.0f} MiB as float32) written in {time.perf_counter() - t0:.0f} s",
          flush=True)

    with LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=worker_bytes, dashboard_address=None,
                      processes=True) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("fss_core.clustering.kmeans"))  # imports before the baseline reading
        pids_before = worker_pids(client)
        idle = client.run(lambda: __import__("psutil").Process().memory_info().rss)
        with PeakMemory(interval=0.01) as memory:
            result = client.submit(fit_on_worker, str(store), CLUSTERS, 0, args.max_iter, pure=False).result()
        pids_after = worker_pids(client)
    restarted = sorted(set(pids_before.values()) ^ set(pids_after.values()))
    info.finish()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    peak_worker = memory.peak_children
    rows = [[f"{mib(features):.0f}", f"{workers} x {mib(worker_bytes):.0f}", f"{features / given:.2f}",
             f"{mib(max(idle.values())):.0f}", f"{mib(peak_worker):.0f}", f"**{peak_worker / worker_bytes:.2f}**",
             verdict(peak_worker < worker_bytes and not restarted), f"{mib(memory.peak_descendants):.0f}",
             f"{memory.peak_descendants / features:.2f}", "none" if not restarted else f"{len(restarted)} pids changed",
             f"{result['wall']:.1f}", result["n_iter"], f"{result['points'] / 1e6:.2f}M"]]
    body = "\n".join([
        info.line("kmeans_memory_bench.py"),
        "",
        f"Synthetic store: {images} images of [{CHANNELS}, {GRID}, {GRID}] float16 features (gaussian blobs, every "
        f"cell valid); K = {CLUSTERS}, seed 0, at most {args.max_iter} Lloyd passes. The fit runs as the cluster "
        "stage runs it: one task on a worker, with a client of the same cluster (the k-means++ sample is held in "
        "that worker), blocks read from zarr inside the tasks. Memory is RSS sampled every 10 ms: the largest "
        "single worker process, and the cluster's processes (nannies and workers) summed. *features* is the "
        "float32 size of the valid vectors, what an in-memory fit would hold. *idle worker*: a worker's RSS after "
        "importing the k-means code, before the fit (the Python, NumPy, zarr and Dask floor every worker pays).",
        "",
        *table(["features MiB", "workers x limit MiB", "features / worker memory", "idle worker MiB",
                "peak worker MiB", "peak worker / limit", "within limit", "peak of cluster processes MiB",
                "cluster processes / features", "worker restarts", "fit s", "passes", "vectors"], rows,
               "rlrrrrlrrlrrr"),
    ])
    write_section(out_path(args), "k-means memory", body)
    print(body)


if __name__ == "__main__":
    main()
