"""Shared fixtures. Prefect state goes to a per-session folder, never the user's home."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fss-test-prefect-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)  # each run (and test process) leaves none
os.environ["PREFECT_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (flows' heartbeats off: they cost ~1 s each)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors run faster on one torch thread than on two contended ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
