"""The Dask cluster a pipeline runs on: a LocalCluster by default, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from fss_core.config import RuntimeConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_cluster(runtime: RuntimeConfig) -> Iterator[str]:
    """Yield a scheduler address; a LocalCluster is started (and stopped) when none is given."""
    if runtime.dask_address:
        log.info("using the Dask scheduler at %s", runtime.dask_address)
        yield runtime.dask_address
        return
    from distributed import LocalCluster
    from prefect.client.orchestration import get_client

    # Workers report to the server this process uses; otherwise, with no PREFECT_API_URL set,
    # every worker process would start a temporary server of its own (~10 s each).
    with get_client(sync_client=True) as client:
        env = {"PREFECT_API_URL": client.api_url}
    resources = {runtime.gpu_resource: 1} if runtime.gpu_resource else None
    with LocalCluster(
        n_workers=runtime.n_workers,
        threads_per_worker=runtime.threads_per_worker,
        processes=True,
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        resources=resources,
        env=env,
        # Each worker imports every task module (torch, MLflow, Prefect, the science) as it starts,
        # all in parallel, instead of in front of each stage's first task on each worker (measured
        # in docs/benchmarks.md, "orchestration").
        preload=[*_configured_preloads(), "flows.pipeline"],
    ) as cluster:
        log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield cluster.scheduler_address


def _configured_preloads() -> list[str]:
    """Worker preloads of the Dask config (the CLI sets one), kept next to ours."""
    import dask

    configured = dask.config.get("distributed.worker.preload", None) or []
    return [configured] if isinstance(configured, str) else list(configured)
