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
    ) as cluster:
        log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield cluster.scheduler_address
