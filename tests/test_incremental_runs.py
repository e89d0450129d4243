"""Incremental runs on a workspace that already holds embeddings: an image whose content changed
is extracted again and rebuilds the later stages; a retrain killed part-way still sees its new
images as new on the next run."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fss_core.config import load_config
from fss_core.data.synthetic import append_train_images
from storage_schemas import CLUSTERS, EMBEDDINGS, open_store
from tasks.extract import extract_block, finish_extraction, prepare_extraction
from tasks.ingest import run_ingest, training_rows
from tasks.registry import RegisteredVersion
from tasks.workspace import source_root
from tests.tiny_config import TINY

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 5  # images appended before a retrain


def _config(ws: Path):
    return load_config(None, [*TINY, f"runtime.workspace={ws}", "runtime.n_workers=1"])


def _extract(cfg):
    """Prepare, extract every run of rows, finish: what the pipeline's extract stage does."""
    plan = prepare_extraction(cfg)
    computed = [extract_block(cfg, plan.backbone, rows, paths) for rows, paths in zip(plan.blocks, plan.paths)]
    return finish_extraction(cfg, plan, computed), sum(computed)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A workspace whose training images are ingested and all extracted (a finished pipeline's store)."""
    ws = tmp_path_factory.mktemp("incremental") / "ws"
    cfg = _config(ws)
    run_ingest(cfg)
    _extract(cfg)
    return ws


@pytest.fixture
def workspace(extracted, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(extracted, ws)
    return ws


def _change_content(cfg, index: int = 0) -> str:
    """Rewrite a training image with other pixels (same id, same size); returns its id."""
    row = training_rows(cfg)[index]
    path = source_root(cfg) / row.path
    Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(path, quality=95)
    return row.image_id


# --------------------------------------------------------------------------- a changed image


def test_a_changed_image_is_extracted_again_alone_and_changes_the_output_key(workspace):
    cfg = _config(workspace)
    before, computed = _extract(cfg)
    assert computed == 0
    features = open_store(workspace / "embeddings.zarr", EMBEDDINGS)["features"][:]

    changed = _change_content(cfg)
    assert run_ingest(cfg).changed == 1
    plan, computed = _extract(cfg)
    assert computed == 1
    assert plan.build_key == before.build_key  # the same store, one row recomputed
    assert plan.output_key != before.output_key  # clustering and the later stages rebuild

    store = open_store(workspace / "embeddings.zarr", EMBEDDINGS)
    row = store.attrs["image_ids"].index(changed)
    after = store["features"][:]
    assert not np.array_equal(after[row], features[row])
    kept = np.arange(len(after)) != row
    np.testing.assert_array_equal(after[kept], features[kept])
    assert store.attrs["image_sha256"][row] == next(r.sha256 for r in training_rows(cfg) if r.image_id == changed)

    again, computed = _extract(cfg)
    assert computed == 0 and again.output_key == plan.output_key


def test_retrain_counts_a_changed_image_as_new(workspace):
    from flows.retrain import new_images

    cfg = _config(workspace)
    known = len(training_rows(cfg))
    assert new_images(cfg) == (0, known)
    _change_content(cfg)
    assert new_images(cfg) == (1, known)


# --------------------------------------------------------------------------- a killed retrain


class Killed(BaseException):
    """Stands for the SIGKILL of the retrain's process: nothing after it runs."""


def _retrain_until(ws: Path, monkeypatch, stage: str) -> dict | None:
    """Run the retrain flow with its stages replaced by the extract stage and a registered model,
    killed after ``stage`` ("prepare": the store lists the new images, none computed; "extract":
    all computed; "register": model version 2 registered, the flow killed before it returns;
    "done": not killed, the flow's result is returned)."""
    import flows.retrain as retrain_flow

    def stages(config, parent_run_id=None, warm_start=False, init_bundle=None):
        cfg = _config(ws)
        if stage == "prepare":
            prepare_extraction(cfg)
        else:
            _extract(cfg)
        if stage in ("register", "done"):
            _registered(ws, 2, "unsupervised-retrained")
        if stage != "done":
            raise Killed
        return {"register": RegisteredVersion("fss", 2, "models:/fss/2", 0.5, True)}

    class Stages:
        def with_options(self, **_):
            return stages

    @contextlib.contextmanager
    def cluster_and_run(cfg, run_name="pipeline"):
        yield "tcp://nowhere:8786", SimpleNamespace(info=SimpleNamespace(run_id="pipeline-run"))

    champion = ws / "models" / "champion"
    monkeypatch.setattr(retrain_flow, "champion_bundle", lambda cfg, dest: champion)
    monkeypatch.setattr(retrain_flow, "cluster_and_run", cluster_and_run)
    monkeypatch.setattr(retrain_flow, "stages", Stages())
    monkeypatch.setattr(retrain_flow, "DaskTaskRunner", lambda **_: None)
    overrides = [*TINY, f"runtime.workspace={ws}", "runtime.n_workers=1"]
    if stage == "done":
        return retrain_flow.retrain.fn(overrides=overrides)
    with pytest.raises(Killed):
        retrain_flow.retrain.fn(overrides=overrides)
    return None


def _registered(ws: Path, version: int, name: str = "unsupervised-first") -> None:
    """A model trained on the workspace's current training images and registered, as the train
    and register stages leave its bundle."""
    bundle = ws / "models" / name
    bundle.mkdir(parents=True)
    images = {r.image_id: r.sha256 for r in training_rows(_config(ws))}
    (bundle / "training.json").write_text(json.dumps({"best_epoch": 0, "best_score": 0.5, "images": images}))
    (bundle / "registered.json").write_text(json.dumps({"version": version}))


def _registered_then_new_images(ws: Path):
    """A registered model trained on the workspace's images, then ``NEW`` images arriving:
    (config, number of images the model was trained on)."""
    cfg = _config(ws)
    _registered(ws, 1)
    known = len(training_rows(cfg))
    append_train_images(ws / "data" / "synthetic", NEW, classes=4, size=64)
    return cfg, known


@pytest.mark.parametrize("stage", ["prepare", "extract"])
def test_new_images_stay_new_after_a_retrain_killed_before_it_registered_a_model(workspace, monkeypatch, stage):
    from flows.retrain import enough, new_images

    cfg, known = _registered_then_new_images(workspace)
    assert new_images(cfg) == (NEW, known)

    _retrain_until(workspace, monkeypatch, stage)
    store = open_store(workspace / "embeddings.zarr", EMBEDDINGS)
    assert len(store.attrs["image_ids"]) == known + NEW  # the killed run did extend the store
    assert new_images(cfg) == (NEW, known)
    assert enough(cfg, NEW, known)


@pytest.mark.parametrize("stage", ["register", "done"])
def test_images_a_registered_model_was_trained_on_are_no_longer_new(workspace, monkeypatch, stage):
    from flows.retrain import new_images

    cfg, known = _registered_then_new_images(workspace)
    result = _retrain_until(workspace, monkeypatch, stage)
    if stage == "done":
        assert result["retrained"] is True and result["new_images"] == NEW
    assert new_images(cfg) == (0, known + NEW)


def test_a_warm_start_from_centroids_of_another_k_starts_afresh(workspace):
    """Retraining after cluster.num_clusters changed: the stored centroids cannot start the new
    fit, so it starts from k-means++ (and says so) instead of failing."""
    from tasks.cluster import run_cluster

    cfg = _config(workspace)
    plan, _ = _extract(cfg)
    first = run_cluster(cfg, plan.output_key)
    other_k = _config(workspace).model_copy(update={"cluster": cfg.cluster.model_copy(update={"num_clusters": 5})})
    second = run_cluster(other_k, plan.output_key, warm_start=True)
    assert (first.num_clusters, second.num_clusters) == (8, 5) and not second.cached
    assert open_store(workspace / "clusters.zarr", CLUSTERS).attrs["warm_start_parent"] is None
