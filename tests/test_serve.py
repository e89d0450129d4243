"""Deployments: a real local Prefect server, `fss serve`, and a run triggered from the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest

from fss_core.data.manifest import read_manifest
from tests.servers import BIN, background, prefect_server
from tests.tiny_config import TINY

pytestmark = pytest.mark.slow


def test_served_pipeline_deployment_runs_to_completion(tmp_path):
    ws = tmp_path / "ws"
    with prefect_server(tmp_path) as (api, env):
        serve_log = tmp_path / "serve.log"
        with background([str(BIN / "fss"), "serve", "--retrain-cron", "0 3 * * *"], env, serve_log):
            # The deployment appears once `serve` has registered it.
            for _ in range(120):
                ls = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True,
                                    text=True, timeout=60)
                if "fss-pipeline/manual" in ls.stdout:
                    break
                subprocess.run(["sleep", "1"])
            else:
                pytest.fail(f"deployment never registered:\n{serve_log.read_text()[-3000:]}")
            params = {"overrides": [f"runtime.workspace={ws}", *TINY, "runtime.n_workers=1"], "until": "cluster"}
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "fss-pipeline/manual", "--params", json.dumps(params),
                 "--watch", "--watch-timeout", "400"],
                env=env, capture_output=True, text=True, timeout=450,
            )
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + serve_log.read_text()[-3000:]
            assert "Completed" in run.stdout + run.stderr
    rows = read_manifest(ws / "manifest.jsonl")
    assert len(rows) == 40
    assert (ws / "clusters.zarr").is_dir()
