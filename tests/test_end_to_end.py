"""The whole pipeline on tiny synthetic data: caching by build key, and a changed setting
re-running exactly its stage and the ones after it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fss_core.config import load_config
from fss_core.data.manifest import read_manifest
from fss_core.data.synthetic import append_train_images
from tests.tiny_config import TINY

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e") / "ws"


def _run(workspace, *extra):
    from flows.pipeline import pipeline

    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY, *extra])
    return pipeline(config=cfg.model_dump(mode="json"))


def _mtime(path):
    return max(p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file())


def test_first_run_builds_every_stage(workspace):
    r = _run(workspace)
    assert r["ingest"].ok == 40
    train_images = [row for row in read_manifest(workspace / "manifest.jsonl") if row.split == "train"]
    assert r["extracted"] == len(train_images) > 0  # the train split only: val images are never embedded
    assert not r["cluster"].cached and r["cluster"].num_clusters == 8
    q = r["pseudo_quality"]
    assert q.num_images > 0 and q.miou > q.random_baseline_miou
    assert r["task_index"].occurrences > 0 and not r["train"].cached
    assert (workspace / "models").is_dir()
    rows = r["evaluate"].rows
    assert {row.method for row in rows} == {"unsupervised", "baseline"}
    assert all(0.0 <= row.miou <= 1.0 for row in rows)
    assert r["evaluated_results"] == len(rows)  # computed by the per-fold tasks, gathered by evaluate
    _assert_tracked(workspace)


def _assert_tracked(workspace):
    """One parent run with the resolved config, and a nested run per stage that did work."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import experiment_name, tracking_uri

    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY])
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(experiment_name(cfg)).experiment_id])
    parents = [r for r in runs if r.data.tags.get("fss.kind") == "pipeline"]
    assert len(parents) == 1
    nested = {r.data.tags["fss.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"ingest", "ssl_pretrain", "extract", "cluster", "pseudo", "task_index", "train", "evaluate"} <= set(nested)
    assert nested["pseudo"].data.metrics["pseudo_miou"] > nested["pseudo"].data.metrics["random_baseline_miou"]
    assert "train_loss" in nested["train"].data.metrics
    saved = client.download_artifacts(parents[0].info.run_id, "config/resolved_config.yaml", str(workspace.parent))
    assert load_config(saved) == cfg
    assert any((workspace / "runs").iterdir())  # also next to the workspace, with the git commit


def test_unchanged_rerun_recomputes_nothing(workspace):
    before = _mtime(workspace / "embeddings.zarr"), _mtime(workspace / "pseudo_masks")
    r = _run(workspace)
    assert r["ingest"].added == 0 and r["extracted"] == 0 and r["evaluated_results"] == 0
    assert r["cluster"].cached and r["task_index"].cached and r["train"].cached and r["evaluate"].cached
    assert (_mtime(workspace / "embeddings.zarr"), _mtime(workspace / "pseudo_masks")) == before
    # The cached model still knows the validation score that chose its weights (what ranks a model
    # registered without labelled val images): the best val_miou its training run logged.
    assert r["train"].best_score == pytest.approx(max(_train_metric(workspace, "val_miou")))
    assert r["train"].best_epoch is not None


def _train_metric(workspace, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from tasks.tracking import experiment_name, tracking_uri

    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY])
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(experiment_name(cfg)).experiment_id],
                              "tags.`fss.stage` = 'train'")
    assert len(runs) == 1
    return [m.value for m in client.get_metric_history(runs[0].info.run_id, key)]


def test_a_new_shot_count_scores_only_that_shot_count(workspace):
    """Adding 2-shot episodes to a 1-shot evaluation computes the 2-shot results of each method
    and reads the 1-shot ones back; the table then holds both."""
    r = _run(workspace, "evaluate.shots=[1, 2]")
    assert r["train"].cached and not r["evaluate"].cached
    assert r["evaluated_results"] == 2  # the model and the baseline, fold 0, 2 shots
    assert {(row.method, row.shots) for row in r["evaluate"].rows} == {
        (m, s) for m in ("unsupervised", "baseline") for s in (1, 2)}


def test_a_corrected_val_label_is_scored_again(workspace):
    """Evaluation reads the val labels: correcting one re-scores every result on them, while
    the unsupervised model, which never reads a label, is kept."""
    from fss_core.data.images import load_label, save_label

    data = workspace / "data" / "synthetic"
    first_val = (data / "lists" / "val.txt").read_text().split()[1]
    label = load_label(data / first_val)
    label[: label.shape[0] // 4] = 0  # the annotator removes the top quarter's objects
    save_label(data / first_val, label)
    r = _run(workspace)
    assert r["train"].cached and not r["evaluate"].cached
    assert r["evaluated_results"] == 2  # the model and the baseline, fold 0, 1 shot


def test_changed_cluster_setting_reruns_cluster_and_later_stages_only(workspace):
    embeddings_before = _mtime(workspace / "embeddings.zarr")
    r = _run(workspace, "cluster.num_clusters=6")
    assert r["extracted"] == 0 and _mtime(workspace / "embeddings.zarr") == embeddings_before
    assert not r["cluster"].cached and r["cluster"].num_clusters == 6
    assert not r["task_index"].cached and not r["train"].cached and not r["evaluate"].cached


def test_retrain_embeds_only_new_images_and_starts_from_the_champion(workspace):
    from flows.retrain import retrain
    from storage_schemas import CLUSTERS, EMBEDDINGS, open_store

    overrides = [f"runtime.workspace={workspace}", *TINY, "cluster.num_clusters=6", "retrain.epochs=1"]
    r = _run(workspace, "cluster.num_clusters=6")
    assert r["register"].version >= 1
    quiet = retrain(overrides=overrides)
    assert quiet["retrained"] is False and quiet["new_images"] == 0

    known = len(open_store(workspace / "embeddings.zarr", EMBEDDINGS).attrs["image_ids"])
    new = max(1, known // 10)
    append_train_images(workspace / "data" / "synthetic", new, classes=4, size=64)
    old_features = open_store(workspace / "embeddings.zarr", EMBEDDINGS)["features"][:known]

    result = retrain(overrides=overrides)
    assert result["retrained"] is True and result["new_images"] == new
    assert result["extracted"] == new  # only the new images were embedded
    emb = open_store(workspace / "embeddings.zarr", EMBEDDINGS)
    assert len(emb.attrs["image_ids"]) == known + new
    assert (emb["features"][:known] == old_features).all()  # old rows untouched
    assert open_store(workspace / "clusters.zarr", CLUSTERS).attrs["warm_start_parent"] == r["cluster"].build_key
    assert not result["train"].cached
    assert result["register"].version == r["register"].version + 1

    # The registered model has seen every image; one rewritten under the same id is new again,
    # embedded alone, and clustering and the stages after it rebuild.
    assert retrain(overrides=overrides)["new_images"] == 0
    row = next(row for row in read_manifest(workspace / "manifest.jsonl") if row.split == "train")
    path = workspace / "data" / "synthetic" / row.path
    Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(path, quality=95)
    changed = retrain(overrides=[*overrides, "retrain.min_new_fraction=0"])  # 1 image in 30 is enough
    assert changed["retrained"] is True and changed["new_images"] == 1 and changed["extracted"] == 1
    assert not changed["cluster"].cached and not changed["train"].cached
