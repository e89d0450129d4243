"""Start real local servers (Prefect, MLflow) for end-to-end tests; stop them afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group; SIGTERM the whole group on exit."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def base_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)
    return env


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real ``prefect server start`` on 127.0.0.1; yields (api_url, env for its clients)."""
    env = base_env(tmp)
    port = free_port()
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp / "prefect-server.log"
    with background(cmd, env, log) as proc:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", 120, proc, log)
        yield api, {**env, "PREFECT_API_URL": api}


@contextlib.contextmanager
def mlflow_server(tmp: Path, backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (1 worker, job runner off); yields its URL."""
    env = {**base_env(tmp), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp / "mlflow-server.log"
    with background(cmd, env, log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", 120, proc, log)
        yield url
