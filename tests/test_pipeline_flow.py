"""The pipeline flow under a real Prefect (test) server, Dask LocalCluster and MLflow sqlite."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from fss_core.config import load_config
from fss_core.data.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _tiny(tmp_path, *extra):
    return load_config(None, [
        f"runtime.workspace={tmp_path / 'ws'}", "runtime.n_workers=1",
        "data.synthetic.images=12", "data.synthetic.classes=4", "data.synthetic.size=64", *extra,
    ])


def test_pipeline_ingests_synthetic_data_and_tracks_the_run(tmp_path):
    from flows.pipeline import pipeline
    from tasks.tracking import experiment_name, tracking_uri

    cfg = _tiny(tmp_path)
    results = pipeline(config=cfg.model_dump(mode="json"))
    ingest = results["ingest"]
    assert ingest.total == 12 and ingest.ok == 12 and ingest.added == 12

    ws = tmp_path / "ws"
    rows = read_manifest(ws / "manifest.jsonl")
    assert len(rows) == 12 and all(r.status == "ok" for r in rows)
    assert {r.split for r in rows} == {"train", "val"}

    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(experiment_name(cfg))
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("fss.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("fss.stage") == "ingest"]
    assert len(parent) == 1 and len(stages) == 1
    assert stages[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert stages[0].data.metrics["ok"] == 12
    saved = client.download_artifacts(parent[0].info.run_id, "config/resolved_config.yaml", str(tmp_path))
    assert load_config(saved) == cfg
    assert any((ws / "runs").iterdir())  # resolved config + commit also next to the workspace


def test_rerun_after_new_images_adds_exactly_those(tmp_path):
    from fss_core.data.images import save_rgb
    from tasks.ingest import run_ingest

    src = tmp_path / "folder"
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(5):
        save_rgb(src / f"a{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", f"data.source={src}", "data.layout=folder"])
    first = run_ingest(cfg)
    assert (first.total, first.added) == (5, 5)
    for i in range(3):
        save_rgb(src / "new" / f"b{i}.jpg", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    (src / "broken.jpg").write_bytes(b"not an image at all")
    (src / "empty.png").write_bytes(b"")
    second = run_ingest(cfg)
    assert second.added == 5  # 3 images + 2 bad files, recorded (as skipped), never dropped
    assert second.total == 10 and second.ok == 8 and second.skipped == 2
    assert second.build_key != first.build_key
    rows = {r.image_id: r for r in read_manifest(tmp_path / "ws" / "manifest.jsonl")}
    assert rows["broken"].status == "skipped" and rows["broken"].reason
    assert rows["empty"].status == "skipped" and rows["empty"].reason != rows["broken"].reason
    third = run_ingest(cfg)
    assert third.added == 0 and third.build_key == second.build_key
    json.dumps(third.__dict__)  # plain, loggable
