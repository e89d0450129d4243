"""Pseudo-mask quality: confusion counts, Hungarian-matched mIoU, the random baseline, the table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fss_core.data.images import load_label, save_label
from fss_core.pseudo.quality import confusion, evaluate_pseudo_masks, format_table, hungarian_miou


@dataclass
class Record:
    image_id: str
    label_path: Path | None


def test_confusion_counts_pairs_and_ignores_255():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(7, 9))
    gt = rng.integers(0, 3, size=(7, 9))
    gt[rng.random((7, 9)) < 0.2] = 255
    expected = np.zeros((4, 3), dtype=np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != 255:
            expected[p, g] += 1
    np.testing.assert_array_equal(confusion(pred, gt, 4, 3), expected)
    with pytest.raises(ValueError, match="class ids"):
        confusion(pred, np.full((7, 9), 3), 4, 3)


def test_hungarian_matching_on_hand_made_confusion():
    # clusters x classes; class 2 never occurs in the ground truth
    conf = np.array([[8, 2, 0],
                     [1, 5, 0],
                     [1, 3, 0]])
    # IoU(0,0) = 8/(10+10-8), IoU(1,1) = 5/(6+10-5): the best one-to-one matching
    miou, per_class, matching = hungarian_miou(conf)
    assert per_class == pytest.approx({0: 8 / 12, 1: 5 / 11})
    assert miou == pytest.approx((8 / 12 + 5 / 11) / 2)
    assert matching == {0: 0, 1: 1, 2: None}


def test_matching_is_optimal_not_greedy():
    conf = np.array([[6, 4],
                     [3, 0]])
    # greedy would take IoU(0,0) = 6/13 first and leave IoU(1,1) = 0; crossing gives 4/10 + 3/9
    miou, per_class, matching = hungarian_miou(conf)
    assert matching == {0: 1, 1: 0}
    assert miou == pytest.approx((4 / 10 + 3 / 9) / 2)


def test_class_without_a_cluster_scores_zero():
    miou, per_class, _ = hungarian_miou(np.array([[5, 5]]))
    assert sorted(per_class.values()) == pytest.approx([0.0, 0.5])
    assert miou == pytest.approx(0.25)


def _blocky_labels(rng, h=48, w=64, classes=4) -> np.ndarray:
    """Piecewise-constant ground truth with an ignore band between blocks."""
    label = np.kron(rng.integers(0, classes, size=(h // 8, w // 8)), np.ones((8, 8), dtype=np.int64))
    label[::8] = 255
    return label.astype(np.uint8)


def _dataset(tmp_path, masks_of, images=6, classes=4):
    rng = np.random.default_rng(3)
    records = []
    for i in range(images):
        gt = _blocky_labels(rng, classes=classes)
        save_label(tmp_path / "gt" / f"{i}.png", gt)
        save_label(tmp_path / "masks" / "sub" / f"{i}.png", masks_of(gt, rng))
        records.append(Record(f"sub/{i}", tmp_path / "gt" / f"{i}.png"))
    records.append(Record("unlabelled", None))
    return records


def test_perfect_masks_with_permuted_cluster_ids_score_one(tmp_path):
    perm = np.array([5, 2, 0, 3])  # class c is cluster perm[c]; clusters 1 and 4 are never used

    def masks_of(gt, rng):
        return np.where(gt == 255, rng.integers(0, 6, size=gt.shape), perm[np.minimum(gt, 3)]).astype(np.uint8)

    report = evaluate_pseudo_masks(tmp_path / "masks", _dataset(tmp_path, masks_of), 6, 4, seed=0)
    assert report.miou == pytest.approx(1.0)
    assert report.pixel_accuracy == pytest.approx(1.0)
    assert report.matching == {5: 0, 2: 1, 0: 2, 3: 3, 1: None, 4: None}
    assert report.num_images == 6
    table = format_table(report, {0: "background"})
    assert "0 background" in table and "mIoU 1.000" in table


def test_random_baseline_is_far_below_a_good_assignment(tmp_path):
    def masks_of(gt, rng):
        noisy = np.where(rng.random(gt.shape) < 0.1, rng.integers(0, 8, size=gt.shape), np.minimum(gt, 3) + 4)
        return noisy.astype(np.uint8)

    report = evaluate_pseudo_masks(tmp_path / "masks", _dataset(tmp_path, masks_of), 8, 4, seed=0)
    assert report.miou > 0.8
    assert report.random_baseline_miou < 0.3
    again = evaluate_pseudo_masks(tmp_path / "masks", _dataset(tmp_path, masks_of), 8, 4, seed=0)
    assert again.random_baseline_miou == report.random_baseline_miou  # seeded


def test_missing_mask_is_named(tmp_path):
    save_label(tmp_path / "gt.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="x.png"):
        evaluate_pseudo_masks(tmp_path / "masks", [Record("x", tmp_path / "gt.png")], 3, 2)


def test_random_baseline_is_the_masks_with_each_images_cluster_ids_shuffled(tmp_path):
    """The baseline keeps every mask's regions and drops only the clusters' meaning across
    images: the Hungarian mIoU of the masks relabelled by one seeded permutation per image."""

    def masks_of(gt, rng):
        return (np.minimum(gt, 3) + 4).astype(np.uint8)  # a perfect clustering, ids 4..7

    records = _dataset(tmp_path, masks_of)
    report = evaluate_pseudo_masks(tmp_path / "masks", records, 8, 4, seed=5)
    rng = np.random.default_rng(5)
    expected = np.zeros((8, 4), dtype=np.int64)
    for record in (r for r in records if r.label_path is not None):
        mask, gt = load_label(tmp_path / "masks" / f"{record.image_id}.png"), load_label(record.label_path)
        expected += confusion(rng.permutation(8)[mask], gt, 8, 4)
    assert report.miou == 1.0
    assert report.random_baseline_miou == hungarian_miou(expected)[0] < 1.0
