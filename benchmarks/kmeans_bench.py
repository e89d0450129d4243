"""k-means benchmark: our Dask k-means against sklearn KMeans(n_init=1), MiniBatchKMeans and dask-ml KMeans.

Every method runs in the same process, on the same data and cores; wall time covers the fit only
(a LocalCluster is started before the clock). Inertia is recomputed exactly (float64) on the full
data from each method's centroids; a time is compared "at equal inertia" only where the inertia is
within 0.5 % of sklearn KMeans'. The table goes to the "k-means" section of docs/benchmarks.md.

    python benchmarks/kmeans_bench.py                       # 2M x 64, K = 32: uniform + 32 blobs
    python benchmarks/kmeans_bench.py --synthetic 2000      # plus features extracted from synthetic images
    python benchmarks/kmeans_bench.py --zarr WS/embeddings.zarr   # plus any embeddings store
    python benchmarks/kmeans_bench.py --quick               # 100k x 32, K = 8, features of 64 images
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs

from fss_core.clustering import kmeans_fit, valid_vectors
from harness import cpu_name, write_section

REPO = Path(__file__).resolve().parents[1]
NUMPY_ROWS = 250_000  # dask-ml block rows
DASK_ML_MAX_ITER = 30  # dask-ml's k-means|| + Lloyd can run for minutes; capped, its time is a lower bound
MINIBATCH_ROWS = 4096  # MiniBatchKMeans batch_size (sklearn's default 1024 converges to a worse inertia)
EQUAL_INERTIA = 0.005  # "equal inertia": within 0.5 % of sklearn KMeans'


def exact_inertia(x: np.ndarray, centroids: np.ndarray, rows: int = 65_536) -> float:
    """Sum over rows of x [n, C] of the squared distance to the nearest centroid, in float64."""
    c = centroids.astype(np.float64)
    cc = (c * c).sum(1)
    total = 0.0
    for start in range(0, len(x), rows):
        xb = x[start:start + rows].astype(np.float64)
        d = (xb * xb).sum(1)[:, None] + cc[None] - 2.0 * xb @ c.T
        total += float(np.maximum(d.min(1), 0.0).sum())
    return total


def synthetic_store(out: Path, images: int, seed: int, long_side: int = 128) -> Path:
    """An embeddings store of ``images`` synthetic images through a random-weight SmallCNN (256-d, stride 8)."""
    import torch
    from PIL import Image

    from fss_core.data.synthetic import synthesize
    from fss_core.embeddings.extract import create_embeddings_store, extract_rows, feature_grid
    from fss_core.models.backbones import build_backbone

    summary = synthesize(out / "data", seed=seed, classes=min(20, images // 2), images=images, size=long_side)
    ids = sorted(summary.train_ids + summary.val_ids)
    paths = [summary.image_dir / f"{i}.jpg" for i in ids]
    hw = np.array([Image.open(p).size[::-1] for p in paths])
    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn").eval()
    store = out / "embeddings.zarr"
    create_embeddings_store(store, ids, hw, channels=256, grid=feature_grid(backbone, long_side),
                            build_key=f"{seed:08x}", extractor="small_cnn (random weights)",
                            stride=8, long_side=long_side)
    extract_rows(store, range(len(ids)), paths, backbone, long_side, batch_size=32, amp=False)
    return store


def datasets(args) -> Iterator[tuple[str, np.ndarray, da.Array | None]]:
    """(name, in-memory features [n, C] float32, lazy zarr-backed array or None), one at a time."""
    rng = np.random.default_rng(args.seed)
    yield f"uniform {args.n // 1000}k x {args.dim}", rng.random((args.n, args.dim), dtype=np.float32), None
    blobs, _ = make_blobs(args.n, args.dim, centers=args.k, random_state=args.seed)
    yield f"{args.k} gaussian blobs {args.n // 1000}k x {args.dim}", blobs.astype(np.float32), None
    stores = [(Path(args.zarr), Path(args.zarr).name)] if args.zarr else []
    if args.synthetic:
        t0 = time.perf_counter()
        stores.append((synthetic_store(args.work / "synthetic", args.synthetic, args.seed),
                       f"SmallCNN features of {args.synthetic} synthetic images"))
        logging.info("synthetic embeddings store built in %.0f s", time.perf_counter() - t0)
    for store, label in stores:
        lazy = valid_vectors(store)
        yield f"{label}, {lazy.shape[0] // 1000}k x {lazy.shape[1]}", lazy.compute(), lazy


def run_methods(name: str, x: np.ndarray, lazy: da.Array | None, args, client: Client | None) -> list[dict]:
    """Fit every method once on x; rows of the result table."""
    rows = []

    def record(method: str, fit):
        t0 = time.perf_counter()
        centroids, n_iter = fit()
        wall = time.perf_counter() - t0
        rows.append(dict(method=method, data=name, wall=wall, n_iter=n_iter,
                         inertia=exact_inertia(x, np.asarray(centroids))))
        logging.info("%-34s %-40s %7.2f s  %3s it  inertia %.6g", method, name, wall, n_iter, rows[-1]["inertia"])

    def sklearn_fit():
        model = KMeans(n_clusters=args.k, n_init=1, random_state=args.seed).fit(x)
        return model.cluster_centers_, model.n_iter_

    def ours(data, on_client):
        def fit():
            result = kmeans_fit(data, args.k, seed=args.seed, client=on_client)
            return result.centroids, result.n_iter
        return fit

    def minibatch_fit():
        model = MiniBatchKMeans(n_clusters=args.k, batch_size=MINIBATCH_ROWS, n_init=1,
                                random_state=args.seed).fit(x)
        return model.cluster_centers_, model.n_steps_

    def dask_ml_fit():
        from dask_ml.cluster import KMeans as DaskMLKMeans
        xd = da.from_array(x, chunks=(NUMPY_ROWS, -1))
        model = DaskMLKMeans(n_clusters=args.k, random_state=args.seed, max_iter=DASK_ML_MAX_ITER).fit(xd)
        return model.cluster_centers_, model.n_iter_

    record("sklearn KMeans(n_init=1)", sklearn_fit)
    record(f"sklearn MiniBatchKMeans(batch_size={MINIBATCH_ROWS})", minibatch_fit)
    with dask.config.set(scheduler="threads"):
        record("ours, threaded scheduler", ours(x, None))
        if lazy is not None:
            record("ours, streamed from zarr, threads", ours(lazy, None))
    if client is not None:
        record("ours, LocalCluster 2 x 1 thread", ours(x, client))
    if not args.skip_dask_ml:
        with dask.config.set(scheduler="threads"):
            record(f"dask-ml KMeans (max_iter={DASK_ML_MAX_ITER}), threads", dask_ml_fit)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["wall"] / base["wall"]
        row["inertia_ratio"] = row["inertia"] / base["inertia"]
    return rows


def markdown(rows: list[dict], args, load_before: tuple, load_after: tuple) -> str:
    """The body of the "k-means" section of docs/benchmarks.md."""
    command = "python benchmarks/kmeans_bench.py " + shlex.join(sys.argv[1:])
    lines = [
        f"Run {datetime.date.today().isoformat()} on {os.cpu_count()} cores ({cpu_name()}, {platform.system()}); "
        f"1-minute load average {load_before[0]:.1f} before and {load_after[0]:.1f} after "
        "(other jobs shared the cores, so absolute times are inflated; compare within the table).",
        f"Command: `{command.strip()}`. K = {args.k}, seed {args.seed}; every method in the same run on the same data.",
        "",
        "Wall time is the fit only (a LocalCluster is started before the clock; sending the in-memory array "
        "to its worker processes is inside it). Inertia is recomputed exactly (float64) on the full data "
        "from each method's centroids. sklearn uses its defaults (k-means++, max_iter 300, tol 1e-4). "
        "Ours uses its defaults: on a 100k-row sample, the best of 3 greedy k-means++ draws (on 256 rows per "
        "cluster) refined by up to 20 Lloyd passes, then full-data Lloyd passes on Dask until a pass improves "
        "the inertia by < 1e-4; \"streamed from zarr\" "
        "reads and decodes the float16 store in every pass (plus once for the init sample) instead of "
        f"holding the array in memory. dask-ml (k-means||) is capped at {DASK_ML_MAX_ITER} iterations, "
        "so its time is a lower bound. MiniBatchKMeans: k-means++, one init, its default stopping (no "
        "improvement in 10 mini-batches); its iterations are mini-batch steps. Iterations: Lloyd iterations over "
        "the full data (ours: Dask passes; the steps on the init sample are not counted). *equal inertia*: "
        f"within {100 * EQUAL_INERTIA:.1f} % of sklearn KMeans' inertia; only then is a time ratio a like-for-like "
        "comparison.",
        "",
        "| method | data | wall s | iterations | inertia | time / sklearn | inertia / sklearn | equal inertia |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        equal = "yes" if r["inertia_ratio"] <= 1 + EQUAL_INERTIA else "no"
        lines.append(f"| {r['method']} | {r['data']} | {r['wall']:.2f} | {r['n_iter']} | {r['inertia']:.6g} "
                     f"| {r['time_ratio']:.2f} | {r['inertia_ratio']:.4f} | {equal} |")
    lines += ["", "Targets (ours = threaded scheduler, the default when no client is given):", ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        by = {r["method"]: r for r in rows if r["data"] == data}
        ours = by["ours, threaded scheduler"]
        line = (f"- {data}: ours takes {ours['time_ratio']:.2f}x sklearn's time at "
                f"{ours['inertia_ratio']:.4f}x its inertia")
        minibatch = [r for m, r in by.items() if m.startswith("sklearn MiniBatchKMeans")]
        if minibatch:
            line += (f"; MiniBatchKMeans takes {minibatch[0]['wall'] / ours['wall']:.2f}x our time at "
                     f"{minibatch[0]['inertia'] / ours['inertia']:.4f}x our inertia")
        dask_ml = [r for m, r in by.items() if m.startswith("dask-ml")]
        if dask_ml:
            line += f"; dask-ml takes {dask_ml[0]['wall'] / ours['wall']:.1f}x our time"
        lines.append(line + ".")
    if not (args.zarr or args.synthetic):
        lines += ["", "Extracted features: none in this run; `--synthetic N` (features of N synthetic images) "
                  "or `--zarr PATH` (any embeddings.zarr) adds them as one more data set."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000, help="rows of the synthetic data sets")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zarr", help="an embeddings store whose valid vectors form one more data set")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="build an embeddings store of this many synthetic images as one more data set")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kmeans_bench"), help="where --synthetic writes")
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster runs")
    parser.add_argument("--skip-dask-ml", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized smoke run: 100k x 32, K = 8, features of 64 synthetic images")
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/benchmarks.md, or build/benchmarks-quick.md with --quick")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.k = min(args.n, 100_000), min(args.dim, 32), min(args.k, 8)
        args.synthetic = min(args.synthetic or 64, 64)
    if args.out is None:
        args.out = REPO / ("build/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.getLogger("dask_ml").setLevel(logging.WARNING)

    load_before = os.getloadavg()
    rows = []
    with contextlib.ExitStack() as stack:
        client = None
        if not args.no_cluster:
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        for name, x, lazy in datasets(args):
            rows += run_methods(name, x, lazy, args, client)
    section = markdown(rows, args, load_before, os.getloadavg())
    write_section(args.out, "k-means", section)
    print(section)


if __name__ == "__main__":
    main()
