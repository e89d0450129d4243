"""The few-shot metric against hand-computed examples."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fss_core.evaluation.metric import FewShotSegMetric

X = 255  # ignored target pixel


def test_single_episode_matches_hand_computation_and_ignores_255():
    pred = np.array([[1, 1, 0],
                     [1, 0, 0],
                     [1, 1, 1]])
    target = np.array([[1, 1, 1],
                       [0, 0, 0],
                       [X, X, 1]])
    # Valid pixels: the top two rows and (2, 2). Foreground: pred {00,01,10,22}, target {00,01,02,22}
    # → I_fg = 3 (00, 01, 22), U_fg = 5 (00, 01, 02, 10, 22).
    # Background: pred {02,11,12}, target {10,11,12} → I_bg = 2 (11, 12), U_bg = 4 (02, 10, 11, 12).
    metric = FewShotSegMetric([7])
    metric.process(pred, target, 7)
    result = metric.evaluate()
    assert result["per_class"] == {7: pytest.approx(3 / 5)}
    assert result["miou"] == pytest.approx(3 / 5)
    assert result["fbiou"] == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert result["episodes"] == 1


def test_empty_prediction_scores_zero_foreground():
    target = np.array([[0, 1, 1],
                       [0, 1, X],
                       [0, 0, 0]])
    metric = FewShotSegMetric([3])
    metric.process(np.zeros((3, 3), dtype=np.uint8), target, 3)
    result = metric.evaluate()
    # fg: I = 0, U = 3. bg: pred bg = 8 valid pixels, target bg = 5 → I = 5, U = 8.
    assert result["per_class"][3] == 0.0
    assert result["fbiou"] == pytest.approx((5 / 8 + 0) / 2)


def test_episodes_of_a_class_pool_sums_instead_of_averaging_ious():
    metric = FewShotSegMetric([1])
    # Episode A: a 1-pixel object, predicted as 2 pixels → I = 1, U = 2 (IoU 0.5).
    target_a = np.zeros((4, 4), dtype=np.uint8)
    target_a[0, 0] = 1
    pred_a = np.zeros((4, 4), dtype=np.uint8)
    pred_a[0, :2] = 1
    # Episode B: an 8-pixel object predicted exactly → I = 8, U = 8 (IoU 1).
    target_b = np.zeros((4, 4), dtype=np.uint8)
    target_b[:2] = 1
    pred_b = target_b.copy()
    metric.process(pred_a, target_a, 1)
    metric.process(pred_b, target_b, 1)
    iou = metric.evaluate()["per_class"][1]
    assert iou == pytest.approx(9 / 10)  # pooled: (1 + 8) / (2 + 8)
    assert iou != pytest.approx((0.5 + 1.0) / 2)  # not the mean of the episodes' IoUs


def test_miou_is_the_mean_over_classes_and_fbiou_pools_all_episodes():
    metric = FewShotSegMetric([1, 2])
    target = np.array([[1, 1], [0, 0]])
    metric.process(np.array([[1, 0], [0, 0]]), target, 1)  # fg I 1 U 2; bg I 2 U 3
    metric.process(np.array([[1, 1], [1, 1]]), target, 2)  # fg I 2 U 4; bg I 0 U 2
    result = metric.evaluate()
    assert result["per_class"] == {1: pytest.approx(0.5), 2: pytest.approx(0.5)}
    assert result["miou"] == pytest.approx(0.5)
    assert result["fbiou"] == pytest.approx(((2 + 0) / (3 + 2) + (1 + 2) / (2 + 4)) / 2)
    assert result["episodes"] == 2


def test_class_without_episode_is_reported_and_left_out_of_the_mean(caplog):
    metric = FewShotSegMetric([1, 2, 3])
    target = np.array([[1, 0]])
    metric.process(np.array([[1, 0]]), target, 1)
    metric.process(np.array([[0, 0]]), target, 3)
    with caplog.at_level(logging.WARNING):
        result = metric.evaluate()
    assert math.isnan(result["per_class"][2])
    assert result["missing"] == [2]
    assert result["miou"] == pytest.approx((1.0 + 0.0) / 2)
    assert "[2]" in caplog.text


def test_reset_forgets_episodes():
    metric = FewShotSegMetric([1])
    metric.process(np.array([[1]]), np.array([[1]]), 1)
    metric.reset()
    metric.process(np.array([[0]]), np.array([[1]]), 1)
    assert metric.evaluate()["per_class"][1] == 0.0
    assert metric.evaluate()["episodes"] == 1


def test_bad_input_is_rejected():
    metric = FewShotSegMetric([1])
    with pytest.raises(ValueError, match="class 5"):
        metric.process(np.zeros((2, 2)), np.zeros((2, 2)), 5)
    with pytest.raises(ValueError, match="same 2-D shape"):
        metric.process(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="pred must hold only 0 and 1"):
        metric.process(np.full((2, 2), 2), np.zeros((2, 2)), 1)


def test_table_lists_every_class_with_its_iou_and_the_means():
    metric = FewShotSegMetric([1, 2], class_names={1: "aeroplane", 2: "bicycle"})
    metric.process(np.array([[1, 0, 0, 0]]), np.array([[1, 1, 0, 0]]), 1)  # IoU 1/2
    metric.process(np.array([[1, 1, 1, 1]]), np.array([[1, 0, 0, 0]]), 2)  # IoU 1/4
    table = metric.table()
    rows = {line.split()[1]: line.split() for line in table.splitlines() if line[:1].isdigit()}
    assert float(rows["aeroplane"][-1]) == pytest.approx(50.0)
    assert float(rows["bicycle"][-1]) == pytest.approx(25.0)
    miou_row = next(line for line in table.splitlines() if line.startswith("mIoU"))
    assert float(miou_row.split()[-1]) == pytest.approx(37.5)
