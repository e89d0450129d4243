"""The Dask client a task uses for its own parallel work (k-means partial sums, …)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client


@contextlib.contextmanager
def cluster_client() -> Iterator[Client | None]:
    """Inside a task on a Dask worker: a client of that same cluster (the worker thread secedes,
    so the task's own work can use every worker). Elsewhere: None (the current scheduler)."""
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        yield None
        return
    from distributed import worker_client

    with worker_client() as client:
        yield client
