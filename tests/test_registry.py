"""The trained model in MLflow: pyfunc model on base64 images, a fresh-process load, registry aliases."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fss_core.config import load_config
from fss_core.inference.predict import PredictInputError, predict
from fss_core.models.backbones import build_backbone
from fss_core.models.fss import FSSModelConfig, FSSNetwork
from fss_core.models.fss.bundle import ModelSpec, load_bundle, save_bundle
from tasks.pyfunc_model import log_fss_model
from tasks.registry import champion_bundle, champion_score, register_model, registered_model_name
from tasks.tracking import ensure_experiment, pipeline_run

IMAGE_SIZE = 41
TINY = FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6)

# The model's code must come from its own copy: the child runs without the site hooks that make
# the project importable (no .pth files), from another cwd, with only the venv's site-packages.
FRESH_PROCESS = """
import json, sys
sys.path.append(sys.argv[1])
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(json.loads(sys.argv[3]))
import fss_core
print(json.dumps({"fss_core": fss_core.__file__, "rows": out.to_dict("records")}))
"""


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_bundle(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_bundle(folder, FSSNetwork(build_backbone("small_cnn"), TINY), ModelSpec("small_cnn", IMAGE_SIZE, TINY))


def b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_array(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a red box, and the box's 0/1 mask."""
    rgb = np.random.default_rng(seed).integers(80, 160, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (220, 40, 40)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 1
    return rgb, mask


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One workspace (one sqlite store: creating it costs seconds) for the whole module."""
    return tmp_path_factory.mktemp("registry-ws")


@pytest.fixture(scope="module")
def logged(workspace):
    """A tiny model bundle logged as a pyfunc model: (bundle folder, model info)."""
    cfg = load_config(None, [f"runtime.workspace={workspace}"])
    bundle = tiny_bundle(workspace / "bundles" / "logged", seed=0)
    with mlflow.start_run(experiment_id=ensure_experiment(cfg)):
        info = log_fss_model(bundle)
    return bundle, info


def test_pyfunc_segments_base64_queries_like_the_library(logged):
    bundle, info = logged
    supports = [scene(30, 40, seed=1), scene(36, 24, seed=2)]
    queries = [scene(25, 33, seed=3)[0], scene(50, 20, seed=4)[0], scene(21, 21, seed=5)[0]]
    rows = [{"query": b64_png(q), "support_images": [b64_png(i) for i, _ in supports[:n]],
             "support_masks": [b64_png(m * 255) for _, m in supports[:n]]} for q, n in zip(queries, (2, 1, 2))]
    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame(rows))

    model, spec = load_bundle(bundle)
    expected = [predict(model, supports[:n], [q], image_size=spec.image_size)[0] for q, n in zip(queries, (2, 1, 2))]
    assert list(out.columns) == ["mask", "height", "width"] and len(out) == 3
    for row, query, truth in zip(out.to_dict("records"), queries, expected):
        mask = png_array(row["mask"])
        assert mask.shape == query.shape[:2] == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, truth)
    # JSON records (what `mlflow models serve` receives) give the same answer.
    as_records = mlflow.pyfunc.load_model(info.model_uri).predict(json.loads(json.dumps(rows)))
    assert as_records["mask"].tolist() == out["mask"].tolist()


def test_model_loads_in_a_fresh_process_from_its_own_code(logged, tmp_path):
    _, info = logged
    rgb, mask = scene(30, 40, seed=1)
    query = scene(27, 35, seed=6)[0]
    record = {"query": b64_png(query), "support_images": [b64_png(rgb)], "support_masks": [b64_png(mask)]}
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", FRESH_PROCESS, sysconfig.get_paths()["purelib"], info.model_uri,
         json.dumps([record])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    model_dir = Path(urlparse(MlflowClient().get_logged_model(info.model_id).artifact_location).path)
    assert Path(result["fss_core"]) == model_dir / "code" / "fss_core" / "__init__.py"
    in_process = mlflow.pyfunc.load_model(info.model_uri).predict([record])
    assert result["rows"] == in_process.to_dict("records")
    assert png_array(result["rows"][0]["mask"]).shape == query.shape[:2]


def test_the_logged_model_is_code_not_a_pickle_and_carries_an_example_request_it_answers(logged):
    """MLflow loads the model by running its definition file (a pickled model would be refused by
    MLflow's pickle switch), and the example shown with the model is a request it answers."""
    _, info = logged
    model_dir = Path(urlparse(MlflowClient().get_logged_model(info.model_id).artifact_location).path)
    files = {p.name for p in model_dir.iterdir()}
    assert "pyfunc_entry.py" in files and "python_model.pkl" not in files
    example = mlflow.models.Model.load(info.model_uri).load_input_example(str(model_dir))
    assert [set(record) for record in example] == [{"query", "support_images", "support_masks"}]
    row = mlflow.pyfunc.load_model(info.model_uri).predict(example).to_dict("records")[0]
    assert png_array(row["mask"]).shape == (row["height"], row["width"]) == (64, 64)


def test_bad_input_is_rejected_with_a_message_naming_row_and_field(logged):
    _, info = logged
    model = mlflow.pyfunc.load_model(info.model_uri)
    rgb, mask = scene(30, 40, seed=1)
    good = {"query": b64_png(rgb), "support_images": [b64_png(rgb)], "support_masks": [b64_png(mask)]}
    wrong_size = {**good, "support_masks": [b64_png(mask[:20, :25])]}
    with pytest.raises(PredictInputError, match=r"row 1: support 1: mask .* is 25x20 but its image .* is 40x30") as err:
        model.predict([good, wrong_size])
    assert err.value.get_http_status_code() == 400  # what `mlflow models serve` answers, with this message
    with pytest.raises(PredictInputError, match=r"row 0: support_masks\[0\]: not valid base64"):
        model.predict([{**good, "support_masks": ["not base64!"]}])
    jpeg = io.BytesIO()
    Image.fromarray(mask * 255).save(jpeg, format="JPEG")
    with pytest.raises(PredictInputError, match=r"row 0: support_masks\[0\]: .*cannot be a JPEG.*PNG"):
        model.predict([{**good, "support_masks": [base64.b64encode(jpeg.getvalue()).decode()]}])
    with pytest.raises(PredictInputError, match=r"row 0: query: not a readable"):
        model.predict([{**good, "query": base64.b64encode(b"no image here").decode()}])
    with pytest.raises(PredictInputError, match=r"row 0: 1 support_images but 2 support_masks"):
        model.predict(pd.DataFrame([{**good, "support_masks": good["support_masks"] * 2}]))


def test_champion_moves_only_to_a_better_model(workspace, tmp_path):
    cfg = load_config(None, [f"runtime.workspace={workspace}", "runtime.experiment=fss-registry-test"])
    name = registered_model_name(cfg)
    assert champion_score(cfg) is None and champion_bundle(cfg, tmp_path / "none") is None
    bundles = [tiny_bundle(tmp_path / f"b{i}", seed=10 + i) for i in range(3)]
    with pipeline_run(cfg, run_name="registry-test") as parent:
        first = register_model(cfg, bundles[0], {"miou_1shot": 0.3, "loss": 1.0}, parent.info.run_id)
        second = register_model(cfg, bundles[1], {"miou_1shot": 0.2}, parent.info.run_id)
        client = MlflowClient()
        assert (first.is_champion, second.is_champion) == (True, False)
        assert int(client.get_model_version_by_alias(name, "champion").version) == first.version == 1
        assert int(client.get_model_version_by_alias(name, "candidate").version) == second.version == 2
        assert champion_score(cfg) == pytest.approx(0.3)
        third = register_model(cfg, bundles[2], {"miou_1shot": 0.5}, parent.info.run_id)
    assert third.is_champion and third.version == 3
    assert int(client.get_model_version_by_alias(name, "champion").version) == 3
    assert int(client.get_model_version_by_alias(name, "candidate").version) == 3
    assert champion_score(cfg) == pytest.approx(0.5)

    register_runs = client.search_runs([parent.info.experiment_id], "tags.`fss.stage` = 'register'")
    assert len(register_runs) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in register_runs} == {parent.info.run_id}

    # The champion's bundle is the third model's, loadable for fine-tuning; it replaces an older download.
    (tmp_path / "champion").mkdir()
    (tmp_path / "champion" / "stale.txt").write_text("an older champion")
    dest = champion_bundle(cfg, tmp_path / "champion")
    assert dest == tmp_path / "champion" and not (dest / "stale.txt").exists()
    downloaded, spec = load_bundle(dest)
    expected, _ = load_bundle(bundles[2])
    assert spec.image_size == IMAGE_SIZE
    for key, value in expected.state_dict().items():
        assert torch.equal(downloaded.state_dict()[key], value), key
    rgb, mask = scene(30, 40, seed=1)
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
        [{"query": b64_png(rgb), "support_images": [b64_png(rgb)], "support_masks": [b64_png(mask)]}])
    np.testing.assert_array_equal(png_array(served["mask"][0]),
                                  predict(expected, [(rgb, mask)], [rgb], image_size=IMAGE_SIZE)[0])

    with pytest.raises(KeyError, match="miou_1shot"):
        register_model(cfg, bundles[0], {"loss": 0.1})


def test_the_score_that_ranks_a_model_is_the_one_its_run_measured():
    """The fewest evaluated shots rank models (not a 1-shot figure that was never measured);
    without labelled val images, the validation score that chose the weights, named as such;
    with neither, no score at all rather than a made-up 0."""
    from tasks.evaluate import EvalRow, EvaluationSummary
    from tasks.register import model_score
    from tasks.train import TrainOutcome

    def summary(shots: tuple[int, ...]) -> EvaluationSummary:
        rows = [EvalRow(m, f, s, v + f / 100, 0.0, 0.5, 0.0) for s in shots for f in (0, 1)
                for m, v in (("unsupervised", 0.4 + s / 10), ("baseline", 0.3))]
        return EvaluationSummary("k", rows, "", False)

    trained = TrainOutcome("t", "unsupervised", "b", 3, 0.27, 0.5, cached=True)
    metrics, key = model_score(trained, summary((1, 5)))
    assert key == "miou_1shot" and metrics[key] == pytest.approx(0.505)
    assert metrics["miou_5shot"] == pytest.approx(0.905) and metrics["baseline_miou_1shot"] == pytest.approx(0.305)
    metrics, key = model_score(trained, summary((5,)))
    assert key == "miou_5shot" and "miou_1shot" not in metrics
    assert model_score(trained, None) == ({"val_score": 0.27}, "val_score")
    assert model_score(trained, EvaluationSummary("k", [], "", False)) == ({"val_score": 0.27}, "val_score")
    unvalidated = TrainOutcome("t", "unsupervised", "b", None, None, 0.5, cached=False)
    assert model_score(unvalidated, None) == ({}, None)


def test_scores_under_different_keys_never_rank_each_other(workspace, tmp_path):
    cfg = load_config(None, [f"runtime.workspace={workspace}", "runtime.experiment=fss-registry-keys"])
    name = registered_model_name(cfg)
    bundles = [tiny_bundle(tmp_path / f"b{i}", seed=20 + i) for i in range(4)]
    client = MlflowClient()
    with pipeline_run(cfg, run_name="registry-keys") as parent:
        unscored = register_model(cfg, bundles[0], {}, parent.info.run_id, score_key=None)
        assert unscored.is_champion and unscored.score is None  # nothing better to serve
        first = register_model(cfg, bundles[1], {"miou_5shot": 0.3}, parent.info.run_id, score_key="miou_5shot")
        assert first.is_champion  # a scored version replaces an unscored champion
        pseudo = register_model(cfg, bundles[2], {"val_score": 0.9}, parent.info.run_id, score_key="val_score")
        one_shot = register_model(cfg, bundles[3], {"miou_1shot": 0.8}, parent.info.run_id)
    assert not pseudo.is_champion and not one_shot.is_champion  # higher numbers, other measures
    assert int(client.get_model_version_by_alias(name, "champion").version) == first.version
    assert int(client.get_model_version_by_alias(name, "candidate").version) == one_shot.version
    assert client.get_model_version(name, str(pseudo.version)).tags["fss.score_key"] == "val_score"


def test_a_bundle_registered_by_a_killed_run_is_not_registered_twice(workspace, tmp_path):
    """A run killed after MLflow registered the bundle but before the bundle noted its version:
    the re-run finds the version by the bundle's key instead of adding a second one."""
    cfg = load_config(None, [f"runtime.workspace={workspace}", "runtime.experiment=fss-registry-rerun"])
    name = registered_model_name(cfg)
    bundle = tiny_bundle(tmp_path / "b", seed=30)
    with pipeline_run(cfg, run_name="registry-rerun") as parent:
        first = register_model(cfg, bundle, {"miou_1shot": 0.4}, parent.info.run_id, bundle_key="k1")
        again = register_model(cfg, bundle, {"miou_1shot": 0.4}, parent.info.run_id, bundle_key="k1")
        other = register_model(cfg, tiny_bundle(tmp_path / "c", seed=31), {"miou_1shot": 0.3}, parent.info.run_id,
                               bundle_key="k2")
    client = MlflowClient()
    assert again.version == first.version == 1 and again.is_champion and other.version == 2
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1


def test_a_bundle_is_registered_once_per_tracking_store_and_names_may_hold_quotes(tmp_path):
    """The bundle's registered.json says which store it was registered in: a run against another
    store registers it there too. A workspace named bob's finds its versions like any other."""
    from tasks.register import run_register
    from tasks.train import TrainOutcome

    bundle = tiny_bundle(tmp_path / "bundle", seed=40)
    trained = TrainOutcome("key-q", "unsupervised", str(bundle), 0, 0.3, 0.5, cached=True)
    versions = []
    for store in ("a", "b", "a"):
        cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", "runtime.experiment=bob's",
                                 f"runtime.mlflow_tracking_uri=sqlite:///{tmp_path / store}.db"])
        ensure_experiment(cfg)
        versions.append(run_register(cfg, trained, None).version)
        name = registered_model_name(cfg)
        stored = MlflowClient(f"sqlite:///{tmp_path / store}.db").search_model_versions(f"name = \"{name}\"")
        assert len(stored) == 1, store  # registered once in each store, found again by its key
    assert versions == [1, 1, 1]
