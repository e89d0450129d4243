"""Untrusted files and network exposure: weights files load tensors only (a pickled callable is
refused and never runs), and the servers the CLI starts listen on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fss_cli.main import app
from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import SPEC_FILE, WEIGHTS_FILE, ModelSpec, load_bundle
from fss_core.models.fss.network import FSSModelConfig
from fss_core.torch_files import UnsafeCheckpointError
from fss_core.training import load_model_weights, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["fss_core", "tasks", "flows", "fss_cli", "storage_schemas", "benchmarks", "scripts"]


class RunsCode:
    """Pickles as "call os.system(...)": what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    """A checkpoint whose unpickling would run a shell command, and the file that command creates."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "epoch": 3, "payload": RunsCode(marker)}, path)
    return path, marker


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for folder in SOURCES:
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(r"torch\.load\(", text):
                depth, end = 0, match.end() - 1
                for end in range(match.end() - 1, len(text)):
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                calls.append((path.relative_to(REPO), text[match.start(): end + 1]))
    assert calls, "expected the weights loader at least"
    unsafe = [f"{path}: {call}" for path, call in calls if not re.search(r"weights_only\s*=\s*True", call)]
    assert not unsafe


def test_a_training_checkpoint_with_pickled_code_is_refused_and_nothing_runs(hostile, tmp_path):
    path, marker = hostile
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: besides tensors it holds pickled 'posix.system'")
    assert "torch.save(model.state_dict(), path)" in message and "\n" not in message
    with pytest.raises(UnsafeCheckpointError):
        load_model_weights(path, torch.nn.Linear(2, 1))
    assert not marker.exists()


def test_a_pickled_function_in_backbone_weights_is_refused(tmp_path):
    path = tmp_path / "backbone.pth"
    state = build_backbone("small_cnn").state_dict()
    torch.save({**state, "on_load": print}, path)
    with pytest.raises(UnsafeCheckpointError, match="holds pickled 'print'"):
        build_backbone("small_cnn", checkpoint=path)


def test_a_model_bundle_with_pickled_code_is_refused_by_the_library_and_the_cli(hostile, tmp_path):
    path, marker = hostile
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = ModelSpec("small_cnn", 41, FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6))
    (bundle / SPEC_FILE).write_text(spec.to_json())
    (bundle / WEIGHTS_FILE).write_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_bundle(bundle)

    image, mask = tmp_path / "s.png", tmp_path / "m.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(mask)
    result = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--support", f"{image}:{mask}",
                                      "--query", str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {bundle / WEIGHTS_FILE}: refused: besides tensors it holds pickled")
    assert not marker.exists()


class FakeServer:
    """Stands in for the server processes ``fss ui`` starts (other subprocesses run for real)."""

    started: list[list[str]] = []
    real = None

    def __new__(cls, args, **kwargs):
        if Path(str(args[0])).name not in ("mlflow", "prefect"):
            return cls.real(args, **kwargs)
        cls.started.append(list(args))
        return super().__new__(cls)

    def poll(self):
        raise KeyboardInterrupt  # Ctrl-C: the command stops both servers at once

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return 0


@pytest.mark.parametrize("extra, host", [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")])
def test_ui_servers_listen_on_localhost_unless_told_otherwise(monkeypatch, tmp_path, extra, host):
    import subprocess

    FakeServer.started, FakeServer.real = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    result = CliRunner().invoke(app, ["ui", "-w", str(tmp_path / "ws"), *extra])
    assert result.exit_code == 0, result.output
    assert len(FakeServer.started) == 2  # the MLflow UI and the Prefect server
    for args in FakeServer.started:
        assert args[args.index("--host") + 1] == host
    assert f"http://{host}:5000" in result.stdout


def test_the_local_dask_cluster_listens_on_localhost(monkeypatch):
    import distributed
    import prefect.client.orchestration as orchestration

    from flows.dask_runtime import dask_cluster
    from fss_core.config import RuntimeConfig

    seen = {}

    class FakeCluster:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            self.scheduler_address, self.dashboard_link = "tcp://127.0.0.1:1", "http://127.0.0.1:2"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeClient:
        api_url = "http://127.0.0.1:4200/api"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: FakeClient())
    with dask_cluster(RuntimeConfig()):
        pass
    assert seen["host"] == "127.0.0.1"
    assert seen["dashboard_address"].startswith("127.0.0.1:")
