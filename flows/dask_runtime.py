"""The Dask cluster a pipeline runs on: a LocalCluster by default, or an existing scheduler.

Local workers are forked from a *forkserver*: one process that imports the heavy libraries and
the science once, then forks a worker in a fraction of a second, instead of every worker
importing them again after being spawned. An entry point that knows it will start a local
cluster calls :func:`start_worker_forkserver` before its own imports, so the forkserver's imports
run on another core meanwhile (``fss run`` / ``fss demo``; measured in docs/benchmarks.md,
"orchestration").
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator

from fss_core.config import RuntimeConfig

log = logging.getLogger(__name__)

# What the forkserver imports. Not Prefect, nor anything that imports it (tasks/, flows/): Prefect
# reads its settings when it is imported, and a worker must read them from the environment the
# cluster gives it (PREFECT_API_URL). Those come with the workers' own preload, after the fork.
FORKSERVER_PRELOAD = (
    "flows.forkserver_setup",
    "torch",
    "mlflow",
    # MLflow imports its SQL stores (and alembic) on a process's first call to a sqlite tracking
    # URI: about 0.6 s of every worker's first stage run, on the flow's critical path, if not here.
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "zarr",
    "sklearn.cluster",
    "fss_core.embeddings.extract",
    "fss_core.clustering.kmeans",
    "fss_core.pseudo.masks",
    "fss_core.pseudo.task_index",
    "fss_core.models.fss.network",
    "fss_core.training.trainer",
    "fss_core.evaluation.protocol",
)


def start_worker_forkserver() -> bool:
    """Start the process local Dask workers are forked from, importing :data:`FORKSERVER_PRELOAD`
    in the background; a no-op once it runs. False where the platform has no forkserver (the
    workers are then spawned).

    It starts with the environment Dask gives a worker it spawns
    (``distributed.nanny.pre-spawn-environ``: one OpenMP/MKL/OpenBLAS thread, malloc trimming),
    because torch and NumPy size their thread pools when imported, there, not in the worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    import dask
    import distributed  # noqa: F401  (its defaults, pre-spawn-environ among them, join dask.config)

    worker_env = {k: os.environ.get(k, str(v))
                  for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items() if v is not None}
    saved = {k: os.environ.get(k) for k in worker_env}
    os.environ.update(worker_env)
    try:
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


@contextlib.contextmanager
def dask_cluster(runtime: RuntimeConfig) -> Iterator[str]:
    """Yield a scheduler address; a LocalCluster is started (and stopped) when none is given."""
    if runtime.dask_address:
        log.info("using the Dask scheduler at %s", runtime.dask_address)
        yield runtime.dask_address
        return
    import dask
    from distributed import LocalCluster
    from prefect.client.orchestration import get_client

    # Workers report to the server this process uses; otherwise, with no PREFECT_API_URL set,
    # every worker process would start a temporary server of its own (~10 s each).
    with get_client(sync_client=True) as client:
        env = {"PREFECT_API_URL": client.api_url}
    resources = {runtime.gpu_resource: 1} if runtime.gpu_resource else None
    method = "forkserver" if start_worker_forkserver() else "spawn"
    with dask.config.set({"distributed.worker.multiprocessing-method": method}), LocalCluster(
        n_workers=runtime.n_workers,
        threads_per_worker=runtime.threads_per_worker,
        processes=True,
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        resources=resources,
        env=env,
        # Each worker imports the task modules (Prefect, the tasks) as it starts, all in parallel,
        # instead of in front of each stage's first task on each worker (docs/benchmarks.md).
        preload=[*_configured_preloads(), "flows.worker_setup"],
    ) as cluster:
        log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield cluster.scheduler_address


def _configured_preloads() -> list[str]:
    """Worker preloads of the Dask config (the CLI sets one), kept next to ours."""
    import dask

    configured = dask.config.get("distributed.worker.preload", None) or []
    return [configured] if isinstance(configured, str) else list(configured)
