"""The evaluation protocol: episode materialisation, scoring at the original size, multi-seed runs, baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fss_core.data.folds import FoldSplit
from fss_core.data.images import save_label, save_rgb
from fss_core.data.layouts import ImageRecord
from fss_core.evaluation.baseline import PrototypeBaseline
from fss_core.evaluation.protocol import (
    EpisodeInput,
    default_episodes,
    evaluate_episodes,
    materialise_episodes,
    read_episodes,
    run_protocol,
    write_episodes,
)
from fss_core.models.backbones import build_backbone

NOVEL = (1, 2)
MIN_AREA = 30
IMAGE_SIZE = 64
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (40, 60, 220), 4: (230, 220, 40)}
SIZES = ((40, 56), (56, 40), (48, 48), (36, 60))
FOLD = FoldSplit("generic", 0, NOVEL, (3, 4))


pytestmark = pytest.mark.usefixtures("single_thread")


def _draw(rgb: np.ndarray, label: np.ndarray, class_id: int, top: int, left: int, h: int, w: int) -> None:
    """A flat-coloured rectangle; its outermost pixel ring is labelled 255, like VOC's boundary band."""
    rgb[top:top + h, left:left + w] = COLOURS[class_id]
    label[top:top + h, left:left + w] = 255
    label[top + 1:top + h - 1, left + 1:left + w - 1] = class_id


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[ImageRecord]:
    """16 labelled images of several sizes: a large object of class i % 4 + 1 each; every third image
    also holds a small (< MIN_AREA px) object of the next class."""
    root = tmp_path_factory.mktemp("voc")
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        h, w = SIZES[i % len(SIZES)]
        rgb = rng.integers(110, 140, size=(h, w, 3), dtype=np.uint8)
        label = np.zeros((h, w), dtype=np.uint8)
        _draw(rgb, label, i % 4 + 1, int(rng.integers(2, 8)), int(rng.integers(2, 8)), h // 2, w // 2)
        if i % 3 == 0:
            _draw(rgb, label, (i + 1) % 4 + 1, h - 7, w - 7, 5, 5)  # 3x3 = 9 px inside its band
        image_id = f"img{i:02d}"
        save_rgb(root / f"{image_id}.png", rgb)
        save_label(root / f"{image_id}_label.png", label)
        records.append(ImageRecord(image_id, root / f"{image_id}.png", root / f"{image_id}_label.png", "val"))
    return records


def _label(record: ImageRecord) -> np.ndarray:
    return np.asarray(Image.open(record.label_path))


def _area(record: ImageRecord, class_id: int) -> int:
    return int((_label(record) == class_id).sum())


class ColourPredictor:
    """Foreground where a query pixel's colour is nearer the supports' mean foreground colour than
    their mean background colour, plus optional noise drawn from the episode's generator."""

    def __init__(self, noise: float = 0.0):
        self.noise = noise

    def __call__(self, episode: EpisodeInput) -> torch.Tensor:
        images = episode.support_imgs.flatten(0, 1).permute(0, 2, 3, 1)  # [N, L, L, 3]
        masks = episode.support_masks.flatten(0, 1)
        fg_colour = images[masks == 1].mean(0)
        bg_colour = images[masks == 0].mean(0)
        query = episode.query_img.permute(0, 2, 3, 1)
        logits = torch.stack([-(query - bg_colour).norm(dim=-1), -(query - fg_colour).norm(dim=-1)], dim=1)
        return logits + self.noise * torch.randn(logits.shape, generator=episode.generator)


class ValidRegionPredictor:
    """Foreground exactly on the canvas's non-padding region."""

    def __call__(self, episode: EpisodeInput) -> torch.Tensor:
        fg = (~episode.query_padding).float()[:, None]
        return torch.cat([1 - fg, fg], dim=1)


class TinyCNN(nn.Module):
    """A random stride-4 CNN with the backbone output convention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer2 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())

    def forward(self, x):
        layer2 = self.layer2(x)
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def _recompute(seed_dir: Path, predictions: Path, records: dict[str, ImageRecord], novel=NOVEL) -> dict:
    """mIoU and FB-IoU from episodes.jsonl, the saved prediction PNGs and the labels, by definition."""
    fg_i, fg_u = {c: 0 for c in novel}, {c: 0 for c in novel}
    inter, union = np.zeros(2), np.zeros(2)
    for line in (seed_dir / "episodes.jsonl").read_text().splitlines():
        row = json.loads(line)
        label = _label(records[row["query_id"]])
        pred = np.asarray(Image.open(predictions / f"{row['episode']:05d}.png"))
        assert pred.shape == label.shape
        valid = label != 255
        for k, (p, t) in enumerate([(pred == 0, label != row["class_id"]), (pred == 1, label == row["class_id"])]):
            inter[k] += (p & t & valid).sum()
            union[k] += ((p | t) & valid).sum()
        fg_i[row["class_id"]] += ((pred == 1) & (label == row["class_id"]) & valid).sum()
        fg_u[row["class_id"]] += (((pred == 1) | (label == row["class_id"])) & valid).sum()
    return {"miou": np.mean([fg_i[c] / fg_u[c] for c in novel]), "fbiou": np.mean(inter / union)}


def test_exactly_n_valid_episodes(dataset):
    by_id = {r.image_id: r for r in dataset}
    for shots, n in ((1, 1), (1, 7), (3, 40)):
        specs = materialise_episodes(dataset, NOVEL, shots, n, seed=0, min_area=MIN_AREA)
        assert [s.index for s in specs] == list(range(n))
        for spec in specs:
            assert spec.class_id in NOVEL
            assert _area(by_id[spec.query_id], spec.class_id) > 0
            assert len(spec.support_ids) == shots == len(set(spec.support_ids))
            assert spec.query_id not in spec.support_ids
            assert all(_area(by_id[s], spec.class_id) >= MIN_AREA for s in spec.support_ids)


def test_queries_are_the_qualifying_images_cycled_evenly(dataset):
    qualifying = {r.image_id for r in dataset if any(_area(r, c) >= MIN_AREA for c in NOVEL)}
    specs = materialise_episodes(dataset, NOVEL, 1, 3 * len(qualifying), seed=5, min_area=MIN_AREA)
    counts = {q: sum(s.query_id == q for s in specs) for q in qualifying}
    assert set(s.query_id for s in specs) == qualifying
    assert set(counts.values()) == {3}


def test_query_class_may_be_a_small_novel_object(dataset):
    """A novel class under min_area still counts in a qualifying query (the reference's rule)."""
    small = [r for r in dataset if 0 < _area(r, 2) < MIN_AREA and _area(r, 1) >= MIN_AREA]
    assert small, "the fixture should hold an image with a large class 1 and a small class 2"
    specs = materialise_episodes(dataset, NOVEL, 1, 200, seed=0, min_area=MIN_AREA)
    assert any(s.query_id == small[0].image_id and s.class_id == 2 for s in specs)


def test_same_seed_same_episodes_other_seed_other_episodes(dataset):
    first = materialise_episodes(dataset, NOVEL, 2, 20, seed=1, min_area=MIN_AREA)
    again = materialise_episodes(list(reversed(dataset)), NOVEL, 2, 20, seed=1, min_area=MIN_AREA)
    other = materialise_episodes(dataset, NOVEL, 2, 20, seed=2, min_area=MIN_AREA)
    assert first == again
    assert first != other


def test_impossible_episodes_and_unlabelled_images_are_refused(dataset):
    with pytest.raises(ValueError, match="support images"):
        materialise_episodes(dataset, NOVEL, 10, 5, seed=0, min_area=MIN_AREA)
    unlabelled = [ImageRecord("x", Path("x.png"), None, "val")]
    with pytest.raises(ValueError, match="has no label"):
        materialise_episodes(unlabelled, NOVEL, 1, 5, seed=0, min_area=MIN_AREA)


def test_episodes_file_round_trip_and_bad_line(dataset, tmp_path):
    specs = materialise_episodes(dataset, NOVEL, 2, 9, seed=0, min_area=MIN_AREA)
    write_episodes(tmp_path / "episodes.jsonl", specs)
    assert read_episodes(tmp_path / "episodes.jsonl") == specs
    (tmp_path / "bad.jsonl").write_text('{"episode": 0, "class_id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_episodes(tmp_path / "bad.jsonl")


def test_predictions_are_scored_at_the_original_size_without_padding(dataset, tmp_path):
    by_id = {r.image_id: r for r in dataset}
    specs = materialise_episodes(dataset, NOVEL, 1, 8, seed=0, min_area=MIN_AREA)
    evaluate_episodes(ValidRegionPredictor(), specs, by_id, IMAGE_SIZE, NOVEL, seed=0,
                      save_predictions_dir=tmp_path)
    for spec in specs:
        pred = np.asarray(Image.open(tmp_path / f"{spec.index:05d}.png"))
        assert pred.shape == _label(by_id[spec.query_id]).shape
        assert (pred == 1).all()  # no padding stretched into the picture


def test_a_pixel_exact_predictor_scores_near_perfect_after_the_round_trip(dataset):
    by_id = {r.image_id: r for r in dataset}
    specs = materialise_episodes(dataset, NOVEL, 1, 12, seed=0, min_area=MIN_AREA)
    result = evaluate_episodes(ColourPredictor(), specs, by_id, IMAGE_SIZE, NOVEL, seed=0)
    assert result["miou"] > 0.95
    assert result["episodes"] == 12 and result["shots"] == 1


def test_metrics_json_is_reproduced_from_episodes_and_saved_predictions(dataset, tmp_path):
    by_id = {r.image_id: r for r in dataset}
    summary = run_protocol(ColourPredictor(noise=0.8), dataset, FOLD, shots=2, n_episodes=10, seeds=[0, 1, 2],
                           image_size=IMAGE_SIZE, min_area=MIN_AREA, out_dir=tmp_path / "out",
                           predictions_dir=tmp_path / "predictions", n_overlays=2)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == summary
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["seed0", "seed1", "seed2"]
    assert len(list((tmp_path / "predictions" / "seed1").glob("*.png"))) == 10
    recomputed = [_recompute(tmp_path / "out" / f"seed{s}", tmp_path / "predictions" / f"seed{s}", by_id)
                  for s in (0, 1, 2)]
    for per_seed, expected in zip(written["seeds"], recomputed):
        assert per_seed["miou"] == pytest.approx(expected["miou"])
        assert per_seed["fbiou"] == pytest.approx(expected["fbiou"])
        assert per_seed["episodes"] == 10
    mious = [r["miou"] for r in recomputed]
    assert written["miou"] == pytest.approx(np.mean(mious))
    assert written["miou_std"] == pytest.approx(np.std(mious))
    assert written["fbiou"] == pytest.approx(np.mean([r["fbiou"] for r in recomputed]))
    assert written["fbiou_std"] == pytest.approx(np.std([r["fbiou"] for r in recomputed]))
    for c in NOVEL:
        assert written["per_class"][str(c)] == pytest.approx(np.mean([r["per_class"][str(c)] for r in written["seeds"]]))
    assert (written["shots"], written["fold"], written["episodes"]) == (2, 0, 10)
    assert 0.0 < written["miou"] < 1.0
    overlays = sorted((tmp_path / "out" / "seed0" / "overlays").iterdir())
    assert len(overlays) == 2 and Image.open(overlays[0]).width > Image.open(overlays[0]).height


def test_same_seed_gives_identical_numbers_another_seed_different(dataset, tmp_path):
    def run(seeds, out):
        return run_protocol(ColourPredictor(noise=0.8), dataset, FOLD, shots=1, n_episodes=6, seeds=seeds,
                            image_size=IMAGE_SIZE, min_area=MIN_AREA, out_dir=tmp_path / out)["seeds"]

    first, again = run([3, 4], "a"), run([3], "b")
    assert first[0] == again[0]
    assert first[0]["miou"] != first[1]["miou"]


def test_default_episode_counts():
    assert default_episodes("pascal") == 1000
    assert default_episodes("coco") == default_episodes("coco_consecutive") == 5000


def test_prototype_baseline_finds_the_shared_object(dataset):
    by_id = {r.image_id: r for r in dataset}
    specs = materialise_episodes(dataset, NOVEL, 1, 10, seed=0, min_area=MIN_AREA)
    baseline = evaluate_episodes(PrototypeBaseline(TinyCNN()), specs, by_id, IMAGE_SIZE, NOVEL, seed=0)
    everything = evaluate_episodes(ValidRegionPredictor(), specs, by_id, IMAGE_SIZE, NOVEL, seed=0)
    assert baseline["miou"] > 0.35
    assert baseline["miou"] > everything["miou"] + 0.15  # better than marking the whole image


def test_cli_save_predictions_dir_reproduces_every_metrics_json(tmp_path):
    """`fss evaluate --baseline --save-predictions DIR` over 2 folds x 2 shot counts x 2 seeds: one PNG per
    episode under DIR/fold{f}/{s}shot/seed{n}/, which with episodes.jsonl gives back metrics.json."""
    from typer.testing import CliRunner

    from fss_cli.main import app
    from fss_core.data.folds import fold_split
    from fss_core.data.layouts import read_dataset
    from fss_core.data.synthetic import synthesize

    root = tmp_path / "data"
    synthesize(root, seed=0, classes=4, images=40, size=64)
    out, predictions = tmp_path / "out", tmp_path / "predictions"
    weights = tmp_path / "small_cnn.pth"
    torch.save(build_backbone("small_cnn").state_dict(), weights)
    sets = [f"data.source={root}", "data.layout=voc", "data.num_classes=4", "train.image_size=65",
            f"extract.checkpoint={weights}", f"runtime.workspace={tmp_path / 'ws'}",
            "evaluate.folds=[0, 1]", "evaluate.shots=[1, 2]", "evaluate.seeds=[0, 1]", "evaluate.episodes=4",
            "runtime.progress=false"]
    args = ["evaluate", "--baseline", "--out", str(out), "--save-predictions", str(predictions)]
    result = CliRunner().invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    by_id = {r.image_id: r for r in read_dataset(root, "voc", split="val")}
    for fold in (0, 1):
        novel = fold_split("generic", fold, 4).novel
        for shots in (1, 2):
            run_dir, pred_dir = out / f"fold{fold}" / f"{shots}shot", predictions / f"fold{fold}" / f"{shots}shot"
            written = json.loads((run_dir / "metrics.json").read_text())
            assert sorted(p.name for p in pred_dir.iterdir()) == ["seed0", "seed1"]
            for per_seed in written["seeds"]:
                seed = per_seed["seed"]
                assert sorted(p.name for p in (pred_dir / f"seed{seed}").iterdir()) == [f"{i:05d}.png" for i in range(4)]
                expected = _recompute(run_dir / f"seed{seed}", pred_dir / f"seed{seed}", by_id, novel)
                assert per_seed["miou"] == pytest.approx(expected["miou"])
                assert per_seed["fbiou"] == pytest.approx(expected["fbiou"])
            assert written["miou"] == pytest.approx(np.mean([r["miou"] for r in written["seeds"]]))


def test_standalone_baseline_uses_the_pipelines_backbone_and_refuses_random_weights(tmp_path, monkeypatch):
    """`fss evaluate --baseline` scores the baseline the pipeline's table shows: the workspace's
    pretrained small CNN (or the configured checkpoint), and with no trained weights anywhere
    it stops with a message naming what to do, rather than score random features."""
    from typer.testing import CliRunner

    import fss_cli.standalone as standalone
    from fss_cli.main import app
    from fss_core.config import load_config
    from fss_core.data.synthetic import synthesize
    from tasks.extract import small_cnn_checkpoint

    root = tmp_path / "data"
    synthesize(root, seed=0, classes=4, images=24, size=64)
    sets = [f"data.source={root}", "data.layout=voc", "data.num_classes=4", "train.image_size=65",
            "evaluate.folds=[0]", "evaluate.shots=[1]", "evaluate.seeds=[0]", "evaluate.episodes=2",
            "runtime.progress=false", f"runtime.workspace={tmp_path / 'ws'}"]
    args = ["evaluate", "--baseline", "--out", str(tmp_path / "out"), *[x for s in sets for x in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "fss extract" in result.output and "extract.checkpoint" in result.output
    assert not (tmp_path / "out" / "summary.json").exists()

    pretrained = small_cnn_checkpoint(load_config(None, sets))
    pretrained.parent.mkdir(parents=True)
    torch.save(build_backbone("small_cnn").state_dict(), pretrained)
    built = []
    real = standalone.build_backbone
    monkeypatch.setattr(standalone, "build_backbone", lambda name, checkpoint: built.append((name, checkpoint))
                        or real(name, checkpoint=checkpoint))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert built == [("small_cnn", str(pretrained))]

    result = CliRunner().invoke(app, [*args, "--set", "train.backbone=resnet50_v2"])
    assert result.exit_code != 0 and "train.backbone_checkpoint" in result.output


def test_cli_save_predictions_needs_a_bundle_or_the_baseline(tmp_path):
    from typer.testing import CliRunner

    from fss_cli.main import app

    result = CliRunner().invoke(app, ["evaluate", "--save-predictions", str(tmp_path / "p"),
                                      "--set", f"runtime.workspace={tmp_path / 'ws'}"])
    assert result.exit_code == 2
    assert "--save-predictions" in result.output


def test_a_class_counts_from_the_protocols_area_in_full_size_images_and_a_scaled_one_in_small_ones():
    """2·32·32 px of the original label on PASCAL-size images (longer side >= 473), the same
    share of the canvas on smaller ones; never a function of the model's input size."""
    from fss_core.evaluation.protocol import class_min_area

    assert class_min_area(2048, 473, 375, 500) == 2048  # a PASCAL image: the protocol as published
    assert class_min_area(2048, 473, 480, 640) == 2048  # COCO
    assert class_min_area(2048, 473, 96, 128) == round(2048 * (128 / 473) ** 2) == 150
    assert class_min_area(2048, None, 96, 128) == 2048
    assert class_min_area(1, 473, 8, 8) == 1


def test_episodes_on_small_images_use_the_scaled_area(tmp_path):
    """On 64 px images the rule is 2048·(64/473)² = 37 px: a class of 40 px counts, one of 30 does not."""
    records = []
    for i, area in enumerate((40, 30, 40, 30, 40)):
        label = np.zeros((48, 64), np.uint8)
        label.ravel()[:area] = 1
        label[-1, -1] = 2  # every image also holds class 2, too small to count anywhere
        save_label(tmp_path / f"l{i}.png", label)
        save_rgb(tmp_path / f"i{i}.png", np.zeros((48, 64, 3), np.uint8))
        records.append(ImageRecord(f"im{i}", tmp_path / f"i{i}.png", tmp_path / f"l{i}.png", "val"))
    specs = materialise_episodes(records, (1, 2), 1, 30, seed=0, min_area=2048, area_reference=473)
    assert {s.query_id for s in specs} == {"im0", "im2", "im4"}
    assert all(s.class_id == 1 and set(s.support_ids) <= {"im0", "im2", "im4"} for s in specs)
    with pytest.raises(ValueError, match="no val image"):
        materialise_episodes(records, (1, 2), 1, 5, seed=0, min_area=2048)  # unscaled: nothing counts
