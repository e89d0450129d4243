"""The MLflow UI shows the pipeline's runs and registered model: a real `mlflow server` on the
workspace's store, rendered in headless Chromium. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fss_core.config import load_config
from tasks.registry import register_model
from tasks.tracking import pipeline_run, tracking_uri
from tasks.workspace import workspace_of
from tests.servers import mlflow_server
from tests.test_registry import tiny_bundle

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
RUN_NAME = "ui-check-pipeline"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000", "--window-size=1400,900"]


def render(url: str, screenshot: Path, profile: Path) -> str:
    """The DOM of ``url`` once the page has settled; a screenshot of it is saved on the way."""
    proc = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"chromium failed on {url}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_ui_shows_the_runs_and_the_registered_model(tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure_chromium.sh to install Debian's chromium")
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}"])
    with pipeline_run(cfg, run_name=RUN_NAME) as parent:
        registered = register_model(cfg, tiny_bundle(tmp_path / "bundle", seed=0), {"miou_1shot": 0.42},
                                    parent.info.run_id)
    ARTIFACTS.mkdir(exist_ok=True)
    runs_png, model_png = ARTIFACTS / "mlflow-ui-runs.png", ARTIFACTS / "mlflow-ui-model.png"
    for png in (runs_png, model_png):
        png.unlink(missing_ok=True)

    with mlflow_server(tmp_path, tracking_uri(cfg), workspace_of(cfg).mlflow_artifacts) as url:
        runs_dom = render(f"{url}/#/experiments/{parent.info.experiment_id}/runs", runs_png, tmp_path / "chrome")
        model_dom = render(f"{url}/#/models/{registered.name}", model_png, tmp_path / "chrome")

    assert RUN_NAME in runs_dom, f"run {RUN_NAME!r} not on the experiment's runs page; screenshot: {runs_png}"
    assert registered.name in model_dom, f"model {registered.name!r} not on its page; screenshot: {model_png}"
    assert "champion" in model_dom and "Version 1" in model_dom, \
        f"version 1 or its alias 'champion' not shown; screenshot: {model_png}"
    for png in (runs_png, model_png):
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no screenshot at {png}"
