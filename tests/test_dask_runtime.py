"""The local Dask cluster: workers forked ready from the forkserver, reporting to the flow's
Prefect server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.dask_runtime import FORKSERVER_PRELOAD, dask_cluster
from fss_core.config import RuntimeConfig


def test_the_forkserver_never_imports_prefect():
    """Prefect fixes its settings when imported; imported before the fork, every worker would
    keep the forkserver's (no PREFECT_API_URL) and start a temporary server of its own."""
    code = (f"import importlib, sys\nfor m in {list(FORKSERVER_PRELOAD)!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks', 'flows')\n"
            "             and m not in ('flows', 'flows.forkserver_setup'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="no forkserver on Windows")
def test_local_workers_are_forked_like_spawned_ones_with_the_stack_loaded(prefect_harness):
    """Forked from the forkserver, loaded, and otherwise as Dask would spawn them: one torch
    thread, random states of their own, reporting to the flow's Prefect server."""
    from multiprocessing import forkserver

    from distributed import Client
    from prefect.client.orchestration import get_client

    def facts():
        import gc
        import os

        from prefect.settings import PREFECT_API_URL

        import numpy as np
        import torch

        return {"parent": os.getppid(), "api_url": PREFECT_API_URL.value(),
                "loaded": [m for m in ("torch", "fss_core.training.trainer", "tasks.train") if m in sys.modules],
                "threads": torch.get_num_threads(), "collector": gc.isenabled(), "torch_draw": float(torch.rand(1)),
                "numpy_draw": float(np.random.random_sample())}

    with get_client(sync_client=True) as client:
        api_url = client.api_url
    with dask_cluster(RuntimeConfig(n_workers=2, threads_per_worker=1)) as address, Client(address) as dask_client:
        workers = list(dask_client.run(facts).values())
    assert len(workers) == 2
    for worker in workers:
        assert worker["parent"] == forkserver._forkserver._forkserver_pid  # forked, not spawned
        assert worker["api_url"] == str(api_url)
        assert worker["loaded"] == ["torch", "fss_core.training.trainer", "tasks.train"]
        # as a spawned worker: Dask's one-thread environment, its own random states, the
        # garbage collector on
        assert worker["threads"] == 1
        assert worker["collector"]
    assert workers[0]["torch_draw"] != workers[1]["torch_draw"]
    assert workers[0]["numpy_draw"] != workers[1]["numpy_draw"]
