"""The config tree: defaults ← YAML ← overrides; unknown keys fail with the key's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fss_core.config import ConfigError, PipelineConfig, load_config


def test_defaults_follow_the_reference():
    cfg = load_config()
    assert cfg.cluster.num_clusters == 30
    assert cfg.train.sgd_lr_scale == 15.0  # the reference's hidden factor, now explicit
    assert cfg.train.base_lr == 0.002 and cfg.train.transformer_lr == 1e-4
    assert cfg.pseudo.min_area == 2048


def test_train_section_reaches_the_model_spec():
    from tasks.train import model_spec

    cfg = load_config(None, ["train.adapter_layers=[layer3,layer4]", "train.adapter_dropout=0.2", "train.hidden=64"])
    spec = model_spec(cfg, "small_cnn")
    assert spec.config.adapter_layers == ("layer3", "layer4")
    assert spec.config.adapter_dropout == 0.2 and spec.config.hidden == 64
    assert model_spec(load_config(), "small_cnn").config.adapter_layers == ("layer2", "layer3")  # reference
    with pytest.raises(ConfigError, match="adapter_layers"):
        load_config(None, ["train.adapter_layers=[layer5]"])


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "shots": 5}, "cluster": {"num_clusters": 12}}))
    cfg = load_config(path, ["train.epochs=3", "evaluate.shots=[1]", "extract.checkpoint=/w/m.pth"])
    assert cfg.train.epochs == 3  # override beats file
    assert cfg.train.shots == 5  # file beats default
    assert cfg.cluster.num_clusters == 12
    assert cfg.evaluate.shots == [1]
    assert str(cfg.extract.checkpoint) == "/w/m.pth"
    assert cfg.train.batch_size == PipelineConfig().train.batch_size  # untouched default


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.epochz=3", "unknown config key 'train.epochz'"), ("trian.epochs=3", "unknown config key 'trian'"),
     ("cluster.seed.x=1", "config key 'cluster.seed'")],
)
def test_unknown_override_key_is_named(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert named in str(err.value)


def test_unknown_key_in_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cluster:\n  num_clusterz: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'cluster.num_clusterz'.*bad.yaml"):
        load_config(path)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.epochs.*'many'"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize(
    ("override", "named"),
    [("evaluate.folds=[4]", r"evaluate\.folds\.0.*less than 4"), ("train.fold=4", r"train\.fold.*less than 4"),
     ("evaluate.folds=[]", r"evaluate\.folds.*at least 1"), ("evaluate.shots=[0]", r"evaluate\.shots\.0"),
     ("evaluate.shots=[1,1]", r"evaluate\.shots.*twice"), ("evaluate.seeds=[]", r"evaluate\.seeds.*at least 1")],
)
def test_evaluation_settings_that_cannot_run_fail_when_read_not_after_training(override, named):
    """A fold outside 0..3, no fold, shot count or seed, or one listed twice, is refused with the
    config, before any stage runs."""
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


def test_finetune_needs_a_label_fraction():
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(None, ["train.mode=finetune"])
    assert load_config(None, ["train.mode=finetune", "train.label_fraction=10"]).train.label_fraction == 10


def test_section_key_changes_only_with_its_section():
    a = load_config()
    b = load_config(None, ["train.epochs=1"])
    assert a.section_key("cluster") == b.section_key("cluster")
    assert a.section_key("train") != b.section_key("train")


def test_cli_reports_unknown_key_and_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "fss_cli.main", "config", "show", "--set", "train.epochz=3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.epochz" in proc.stderr


def test_saved_run_holds_resolved_config_and_commit(tmp_path):
    from tasks.workspace import Workspace, save_resolved_config

    cfg = load_config(None, ["train.epochs=9"])
    folder = save_resolved_config(cfg, Workspace(tmp_path).ensure(), run_name="r1")
    saved = load_config(folder / "config.yaml")
    assert saved == cfg
    assert (folder / "git_commit.txt").read_text().strip()


def test_cli_creates_a_missing_prefect_home(tmp_path):
    home = tmp_path / "not" / "there"
    env = {**__import__("os").environ, "PREFECT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "fss_cli.main", "config", "show"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert home.is_dir()


def test_cli_logging_hides_library_chatter_unless_debugging(monkeypatch):
    import logging
    import os

    from fss_cli import main

    monkeypatch.delenv("FSS_DEBUG", raising=False)
    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    for name in main.NOISY_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    main._setup_logging()
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING  # no line per HTTP request
    assert logging.getLogger("fss_core").level == logging.NOTSET  # our own messages follow the root (INFO)
    assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "warning"  # read by distributed when it is imported
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    monkeypatch.setenv("FSS_DEBUG", "1")
    main._setup_logging()
    assert logging.getLogger("httpx").level == logging.NOTSET


def test_evaluation_episodes_do_not_move_with_pseudo_task_settings():
    """The protocol's 2·32·32 px rule picks the test episodes; changing which pseudo-classes train
    the model (pseudo.min_area) must leave the test set, and so the baseline's score, alone."""
    from tasks.keys import build_key

    default = load_config()
    assert (default.evaluate.min_area, default.evaluate.area_reference) == (2048, 473)
    larger_pseudo = load_config(None, ["pseudo.min_area=12000"])
    assert larger_pseudo.evaluate == default.evaluate
    assert build_key("evaluate", larger_pseudo, "m") == build_key("evaluate", default, "m")
    stricter = load_config(None, ["evaluate.min_area=4096"])
    assert build_key("evaluate", stricter, "m") != build_key("evaluate", default, "m")
    unscaled = load_config(None, ["evaluate.area_reference=null"])
    assert build_key("evaluate_result", unscaled, "m") != build_key("evaluate_result", default, "m")


def test_the_references_unscaled_areas_can_be_chosen():
    """``pseudo.area_reference: null`` applies the area thresholds in original pixels, as the
    reference does, at every image size; the default scales them for images smaller than 473 px."""
    from fss_core.pseudo.masks import REFERENCE_FELZENSZWALB, min_size_for
    from fss_core.pseudo.task_index import scaled_min_area

    reference = load_config(None, ["pseudo.area_reference=null"]).pseudo
    default = load_config().pseudo
    assert reference.area_reference is None and default.area_reference == 473
    for h, w in ((375, 500), (128, 128)):
        assert scaled_min_area(reference.min_area, reference.area_reference, h, w) == 2048
        assert min_size_for(REFERENCE_FELZENSZWALB, reference.area_reference, h, w) == 200
    assert scaled_min_area(default.min_area, default.area_reference, 375, 500) == 2048
    assert scaled_min_area(default.min_area, default.area_reference, 128, 128) == round(2048 * (128 / 473) ** 2)
    with pytest.raises(ConfigError, match="area_reference"):
        load_config(None, ["pseudo.area_reference=0"])


def test_a_new_class_split_is_evaluated_again_but_keeps_the_pseudo_trained_model():
    """COCO's interleaved and consecutive splits give a fold other novel classes: switching
    must not read back the other split's stored scores or real-label models. The unsupervised
    model never sees a class id, so it stays reusable."""
    from tasks.keys import build_key

    interleaved = load_config(None, ["data.fold_scheme=coco"])
    consecutive = load_config(None, ["data.fold_scheme=coco_consecutive"])
    generic_80 = load_config(None, ["data.num_classes=80"])
    generic_40 = load_config(None, ["data.num_classes=40"])
    for a, b in ((interleaved, consecutive), (generic_80, generic_40), (interleaved, generic_80)):
        assert build_key("evaluate", a, "m") != build_key("evaluate", b, "m")
        assert build_key("compare_data", a, "d") != build_key("compare_data", b, "d")
        assert build_key("train", a, "t") == build_key("train", b, "t")  # unsupervised
    supervised = ["train.mode=supervised"]
    assert (build_key("train", load_config(None, ["data.fold_scheme=coco", *supervised]), "t")
            != build_key("train", load_config(None, ["data.fold_scheme=coco_consecutive", *supervised]), "t"))


def test_task_index_settings_keep_the_pseudo_masks():
    """Which pseudo-classes become tasks (area, span, prior size) is decided by the task index:
    changing it rebuilds the index, not every mask; a Felzenszwalb setting rebuilds both."""
    from tasks.keys import build_key

    default = load_config()
    for override in ("pseudo.min_area=4096", "pseudo.background_span=0.9", "pseudo.prior_max=5"):
        changed = load_config(None, [override])
        assert build_key("pseudo", changed, "c") == build_key("pseudo", default, "c"), override
        assert build_key("task_index", changed, "p") != build_key("task_index", default, "p"), override
    for override in ("pseudo.felzenszwalb_scale=300", "pseudo.area_reference=null"):
        assert build_key("pseudo", load_config(None, [override]), "c") != build_key("pseudo", default, "c"), override


def test_loading_settings_leave_the_trained_model_reusable():
    """How episodes are loaded (loader processes, decoded-image memory) changes no weight, so
    changing it must reuse the stored model; a setting that shapes the model must not."""
    from tasks.keys import build_key

    default = load_config()
    for override in ("train.num_workers=2", "train.decode_cache_mb=0"):
        assert build_key("train", load_config(None, [override]), "t") == build_key("train", default, "t"), override
    assert build_key("train", load_config(None, ["train.epochs=3"]), "t") != build_key("train", default, "t")


def test_the_wheel_ships_the_demo_config(tmp_path):
    """`fss demo` reads its config from the installed package, so a non-editable install (the
    container images) has it: the wheel holds configs/demo.yaml's content as fss_cli/demo.yaml."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in ("fss_core", "storage_schemas", "tasks", "flows", "fss_cli", "configs"):
        shutil.copytree(root / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("fss_cli/demo.yaml")
    assert shipped == (root / "configs" / "demo.yaml").read_bytes()

    from fss_cli.main import DEMO_CONFIG

    assert load_config(DEMO_CONFIG) == load_config(root / "configs" / "demo.yaml")


def test_a_model_trained_on_labels_is_keyed_by_them_and_by_its_area_rule(tmp_path):
    """A supervised model reads the train labels, selects on the val labels and picks episode
    images by pseudo.min_area: a corrected label or another area gives another model."""
    from fss_core.data.images import load_label, save_label
    from tasks.ingest import run_ingest
    from tasks.train import _label_inputs

    base = [f"runtime.workspace={tmp_path / 'ws'}", "data.synthetic.images=16", "data.synthetic.classes=4",
            "data.synthetic.size=48", "train.mode=supervised"]
    cfg = load_config(None, base)
    run_ingest(cfg)
    before = _label_inputs(cfg)
    assert _label_inputs(load_config(None, [*base, "pseudo.min_area=4096"])) != before
    assert _label_inputs(load_config(None, [*base[:-1], "train.mode=unsupervised"])) == []
    data = tmp_path / "ws" / "data" / "synthetic"
    label_path = data / (data / "lists" / "train.txt").read_text().split()[1]
    label = load_label(label_path)
    label[:4] = 0
    save_label(label_path, label)
    assert _label_inputs(cfg) != before


def test_reference_behaviour_switches_default_to_the_fixes_and_reach_the_model_and_episodes(monkeypatch):
    from types import SimpleNamespace

    import tasks.train as train_stage
    from tasks.keys import build_key

    default = load_config()
    switches = ("dice_ignores_void", "mask_empty_prototypes", "distinct_supports")
    assert all(getattr(default.train, name) is True for name in switches)
    reference = load_config(None, [f"train.{name}=false" for name in switches])
    assert train_stage.model_spec(default, "small_cnn").config.mask_empty_prototypes is True
    assert train_stage.model_spec(reference, "small_cnn").config.mask_empty_prototypes is False
    for name in switches:  # each shapes the trained model, so each is part of the train key
        changed = load_config(None, [f"train.{name}=false"])
        assert build_key("train", changed, "t") != build_key("train", default, "t"), name

    index = SimpleNamespace(split_holdout=lambda fraction, seed: ("train index", "held index"))
    monkeypatch.setattr(train_stage.PseudoTaskIndex, "load", lambda path: index)
    monkeypatch.setattr(train_stage, "workspace_of", lambda cfg: SimpleNamespace(tasks="t", pseudo_masks="m"))
    monkeypatch.setattr(train_stage, "source_root", lambda cfg: Path("/data"))
    monkeypatch.setattr(train_stage, "training_rows", lambda cfg: [])
    monkeypatch.setattr(train_stage, "PseudoEpisodeDataset", lambda index, paths, masks, **kwargs: kwargs)
    for cfg, expected in ((default, True), (reference, False)):
        train_set, held_set = train_stage._datasets(cfg)
        assert train_set["distinct_supports"] is expected and held_set["distinct_supports"] is expected
