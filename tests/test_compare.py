"""The comparison table: compare.* config, label-fraction lists, the table and CSV, and the
label-efficient models trained, cached and evaluated by the pipeline flow."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from fss_core.config import ConfigError, load_config
from tasks.compare import (
    CompareError,
    CompareSpec,
    compare_config,
    compare_specs,
    ensure_fraction_lists,
    method_label,
    prepare_compare,
)
from tasks.evaluate import EvalRow, comparison_csv, comparison_table
from tasks.ingest import labels_digest
from tasks.keys import build_key
from tests.tiny_config import TINY

# --------------------------------------------------------------------------------------- config


def test_compare_is_off_by_default_and_fractions_are_sorted():
    cfg = load_config(None, [])
    assert not cfg.compare.enabled and compare_specs(cfg) == []
    cfg = load_config(None, ["compare.finetune_fractions=[20, 5]", "compare.supervised=true",
                             "evaluate.folds=[1, 3]"])
    assert cfg.compare.finetune_fractions == [5, 20]
    assert compare_specs(cfg) == [CompareSpec("finetune_5", 1, 5), CompareSpec("finetune_20", 1, 20),
                                  CompareSpec("supervised", 1, None), CompareSpec("finetune_5", 3, 5),
                                  CompareSpec("finetune_20", 3, 20), CompareSpec("supervised", 3, None)]


@pytest.mark.parametrize("override, named", [
    ("compare.finetune_fractions=[15]", "unknown label fraction(s) [15]"),
    ("compare.finetune_fractions=[10, 10]", "listed twice"),
    ("compare.finetune_epochs=0", "compare.finetune_epochs"),
    ("compare.supervised_epochs=0", "compare.supervised_epochs"),
    ("compare.finetuned=[5]", "unknown config key 'compare.finetuned'"),
])
def test_bad_compare_settings_are_named(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert named in str(err.value)


def test_compare_needs_the_unsupervised_main_model():
    with pytest.raises(ConfigError, match="train.mode=unsupervised"):
        load_config(None, ["compare.supervised=true", "train.mode=supervised"])


def test_derived_training_configs():
    cfg = load_config(None, ["compare.finetune_fractions=[10]", "compare.supervised=true", "compare.finetune_epochs=3",
                             "compare.finetune_base_lr=0.0005", "train.epochs=7", "train.hidden=32"])
    ft = compare_config(cfg, CompareSpec("finetune_10", 2, 10), "/ws/models/unsupervised-abc")
    t = ft.train
    assert (t.mode, t.fold, t.label_fraction, t.epochs, t.base_lr) == ("finetune", 2, 10, 3, 0.0005)
    assert str(t.init_checkpoint) == "/ws/models/unsupervised-abc" and t.hidden == 32
    sup = compare_config(cfg, CompareSpec("supervised", 2, None), "/ws/models/unsupervised-abc")
    t = sup.train
    assert (t.mode, t.fold, t.label_fraction, t.epochs, t.init_checkpoint) == ("supervised", 2, None, 7, None)
    assert t.base_lr == cfg.train.base_lr and not sup.compare.enabled


# --------------------------------------------------------------------------------------- lists


@pytest.fixture
def labelled_source(tmp_path):
    from fss_core.data.synthetic import synthesize

    root = tmp_path / "data"
    synthesize(root, seed=0, classes=4, images=40, size=32)
    return root


def test_missing_fraction_lists_are_written_nested_like_fss_prepare_lists(labelled_source, tmp_path):
    from fss_core.data.prepare import prepare_lists

    cfg = load_config(None, [f"data.source={labelled_source}", "data.layout=voc", "data.num_classes=4",
                             f"runtime.workspace={tmp_path / 'ws'}", "compare.finetune_fractions=[10, 20]"])
    paths = ensure_fraction_lists(cfg, [10, 20])
    assert paths == {x: labelled_source / "lists" / f"train_{x}.txt" for x in (10, 20)}
    prepare_lists(labelled_source, "voc", tmp_path / "reference", "generic", seed=0, min_area=1, num_classes=4)
    for x in (10, 20):
        assert paths[x].read_bytes() == (tmp_path / "reference" / f"train_{x}.txt").read_bytes()
    small, large = (set(paths[x].read_text().splitlines()) for x in (10, 20))
    assert small and small < large
    stamp = paths[20].stat().st_mtime_ns
    ensure_fraction_lists(cfg, [20])
    assert paths[20].stat().st_mtime_ns == stamp  # an existing list is used as it is
    with pytest.raises(CompareError, match="unknown label fraction"):
        ensure_fraction_lists(cfg, [15])


def test_a_dataset_without_labels_is_a_clear_error(tmp_path, monkeypatch):
    import tasks.compare

    monkeypatch.setattr(tasks.compare, "records", lambda cfg, split: [])
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", f"data.source={tmp_path}", "data.layout=folder",
                             "compare.finetune_fractions=[5]"])
    with pytest.raises(CompareError, match="no labelled image in its train split"):
        prepare_compare(cfg, "ingest-key")


# --------------------------------------------------------------------------------------- table


def _row(method, fold, shots, seeds):
    return EvalRow(method, fold, shots, float(np.mean(seeds)), float(np.std(seeds)), 0.5, 0.0, list(seeds), "")


def test_one_row_per_method_with_shots_per_fold_and_the_mean():
    rows = [_row(m, f, s, [base + 0.01 * f + 0.1 * s, base + 0.02 + 0.01 * f + 0.1 * s])
            for f in (0, 1) for s in (1, 5)
            for m, base in (("baseline", 0.3), ("supervised", 0.5), ("unsupervised", 0.2), ("finetune_20", 0.4),
                            ("finetune_5", 0.35))]
    lines = comparison_table(rows).splitlines()
    assert lines[0].split(" | ") == ["method", "fold0 1-shot", "fold0 5-shot", "fold1 1-shot", "fold1 5-shot",
                                     "mean 1-shot", "mean 5-shot"]
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "unsupervised", "finetune 5 %", "finetune 20 %", "supervised", "baseline"]
    unsup = lines[2].split(" | ")
    assert unsup[1] == "31.0 ± 1.0" and unsup[4] == "72.0 ± 1.0"
    assert unsup[5] == "31.5 ± 1.0"  # mean over folds; std over seeds of the per-seed fold means
    table = list(csv.DictReader(io.StringIO(comparison_csv(rows))))
    mean = next(r for r in table if r["method"] == "unsupervised" and r["fold"] == "mean" and r["shots"] == "1")
    assert float(mean["miou"]) == pytest.approx(0.315) and float(mean["miou_std"]) == pytest.approx(0.01)
    assert len(table) == 5 * (4 + 2)
    assert method_label("finetune_10") == "finetune 10 %"


def test_a_model_result_on_disk_is_read_back_not_computed_again(tmp_path):
    from tasks.evaluate import _evaluated, _Method

    def never():
        raise AssertionError("the predictor must not be built")

    folder = tmp_path / "unsupervised" / "fold0" / "1shot"
    folder.mkdir(parents=True)
    saved = {"miou": 0.4, "miou_std": 0.0, "fbiou": 0.6, "fbiou_std": 0.0, "seeds": [{"seed": 0, "miou": 0.4}]}
    (folder / "metrics.json").write_text(json.dumps(saved))
    method = _Method("unsupervised", [0], "key", never, True)
    assert _evaluated(load_config(None, []), method, folder, [], None, 1, 10) == saved


# ------------------------------------------------------------------------------- the flow, end to end

# 60 images: the 20 % list of the 45 train images gives several base-class episodes per fold.
SETTINGS = ["data.synthetic.images=60", "train.batch_size=2", "evaluate.folds=[0, 1]", "evaluate.seeds=[0, 1]"]
COMPARE = ["compare.finetune_fractions=[20]", "compare.supervised=true", "compare.finetune_epochs=1",
           "compare.supervised_epochs=1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("compare") / "ws"


def _run(workspace, *extra):
    from flows.pipeline import pipeline

    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY, *SETTINGS, *extra])
    return pipeline(config=cfg.model_dump(mode="json"), until="evaluate")


def _cells(table: str) -> dict[str, list[str]]:
    lines = table.splitlines()
    return {"head": lines[0].split(" | "), **{line.split(" | ")[0]: line.split(" | ") for line in lines[2:]}}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness", "single_thread")
def test_compare_rows_for_every_method_and_fold_equal_their_metrics_and_are_cached(workspace):
    r = _run(workspace, *COMPARE)
    assert {(m.method, m.fold) for m in r["compare"]} == {(m, f) for m in ("finetune_20", "supervised") for f in (0, 1)}
    assert not any(m.trained.cached for m in r["compare"])
    assert {m.trained.mode for m in r["compare"]} == {"finetune", "supervised"}
    assert (workspace / "data" / "synthetic" / "lists" / "train_20.txt").is_file()

    summary = r["evaluate"]
    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY, *SETTINGS])
    for row in summary.rows:  # each model's results sit under its own key, whatever the table holds
        model_key = next((m.trained.build_key for m in r["compare"] if (m.method, m.fold) == (row.method, row.fold)),
                         r["train"].build_key)
        assert Path(row.folder).parts[-4] == build_key("evaluate_result", cfg, model_key, labels_digest(cfg, "val"))
    methods = ("unsupervised", "finetune_20", "supervised", "baseline")
    assert {(row.method, row.fold) for row in summary.rows} == {(m, f) for m in methods for f in (0, 1)}
    cells = _cells(summary.table)
    assert cells["head"] == ["method", "fold0 1-shot", "fold1 1-shot", "mean 1-shot"]
    assert list(cells)[1:] == ["unsupervised", "finetune 20 %", "supervised", "baseline"]
    for row in summary.rows:
        metrics = json.loads((Path(row.folder) / "metrics.json").read_text())
        assert (metrics["fold"], metrics["shots"]) == (row.fold, row.shots)
        assert (row.miou, row.miou_std, row.fbiou) == (metrics["miou"], metrics["miou_std"], metrics["fbiou"])
        assert [s["seed"] for s in metrics["seeds"]] == [0, 1]
        shown = cells[method_label(row.method)][1 + row.fold]
        assert shown == f"{100 * metrics['miou']:.1f} ± {100 * metrics['miou_std']:.1f}"
    for method in methods:
        mious = [json.loads((Path(row.folder) / "metrics.json").read_text())["miou"]
                 for row in summary.rows if row.method == method]
        assert cells[method_label(method)][3].split(" ± ")[0] == f"{100 * np.mean(mious):.1f}"
    _assert_compare_tracked(workspace, summary.build_key)

    again = _run(workspace, *COMPARE)
    assert again["train"].cached and again["train"].build_key == r["train"].build_key
    retrained = [(m.method, m.fold, m.trained.build_key) for m in again["compare"] if not m.trained.cached]
    assert not retrained, (retrained, [(m.method, m.fold, m.trained.build_key) for m in r["compare"]])
    assert again["evaluate"].cached and again["evaluate"].table == summary.table
    assert {m.trained.bundle for m in again["compare"]} == {m.trained.bundle for m in r["compare"]}


def _assert_compare_tracked(workspace, evaluate_key):
    """A nested MLflow run per comparison model, and the table as markdown, CSV and metrics."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import experiment_name, tracking_uri

    cfg = load_config(None, [f"runtime.workspace={workspace}", *TINY])
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(experiment_name(cfg)).experiment_id])
    stages = [r.data.tags.get("fss.stage") for r in runs]
    for name in ("train_finetune_20_fold0", "train_finetune_20_fold1", "train_supervised_fold0",
                 "train_supervised_fold1"):
        assert stages.count(name) == 1, name
        run = next(r for r in runs if r.data.tags.get("fss.stage") == name)
        assert "mlflow.parentRunId" in run.data.tags and "train_loss" in run.data.metrics
    evaluation = next(r for r in runs if r.data.tags.get("fss.build_key") == evaluate_key)
    for metric in ("finetune_20_fold1_1shot_miou", "supervised_mean_1shot_miou", "unsupervised_mean_1shot_miou",
                   "baseline_fold0_1shot_miou"):
        assert metric in evaluation.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/comparison.md", "evaluation/comparison.csv"}


def test_run_summary_prints_the_models_and_the_table(tmp_path, capsys):
    from fss_cli.report import print_summary
    from tasks.compare import ComparedModel
    from tasks.evaluate import EvaluationSummary
    from tasks.train import TrainOutcome

    rows = [_row(m, f, s, [0.4, 0.5]) for m in ("unsupervised", "finetune_20", "supervised", "baseline")
            for f in range(4) for s in (1, 5)]
    models = [ComparedModel(m, 0, TrainOutcome("k", mode, f"/ws/models/{mode}-k", 1, 0.3, 0.2, cached=True))
              for m, mode in (("finetune_20", "finetune"), ("supervised", "supervised"))]
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}"])
    print_summary(cfg, {"compare": models, "evaluate": EvaluationSummary("k", rows, comparison_table(rows), False)})
    printed = capsys.readouterr().out
    assert "finetune_20" in printed and "/ws/models/supervised-k" in printed
    assert comparison_table(rows) in printed  # not wrapped, however wide


def test_run_summary_says_what_its_counts_count_and_why_quality_is_missing(tmp_path, capsys):
    """On unlabeled images the pseudo-mask quality cannot be measured: the summary says so
    instead of a table of None, and counts read as sentences, not as a table of one "value"."""
    from fss_cli.report import print_summary
    from tasks.pseudo import QualitySummary

    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}"])
    print_summary(cfg, {"extracted": 50, "pseudo_quality": QualitySummary(None, None, None, 0),
                        "evaluated_results": 0})
    printed = capsys.readouterr().out
    assert "extracted: 50 images embedded in this run" in printed
    assert "pseudo_quality: not measured (no labelled training image" in printed and "None" not in printed
    assert "evaluated_results: 0 results (method x fold x shots) scored in this run" in printed
    print_summary(cfg, {"pseudo_quality": QualitySummary(0.127, 0.012, 0.3, 360)})
    assert "0.127" in capsys.readouterr().out
