"""Episode augmentations: foreground-keeping crop, borders and padding, normalisation, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from fss_core.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    rand_blur,
    rand_crop,
    rand_rotate,
    rand_scale,
)


def arrays(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32)
    return image, np.zeros((h, w), dtype=np.uint8), np.zeros((h, w), dtype=bool)


def test_crop_keeps_85_percent_of_the_foreground_when_a_random_crop_often_would_not():
    image, label, padding = arrays(80, 80)
    label[10:20, 30:40] = 1  # a 48-px crop keeps it only when its top offset is <= 11 (12 of 33 offsets)
    for seed in range(40):
        _, cropped, _ = rand_crop(image, label, padding, np.random.default_rng(seed), 48)
        assert cropped.shape == (48, 48)
        assert (cropped == 1).sum() >= 0.85 * 100


def test_crop_pads_small_images_centred_with_ignore_label_and_padding():
    image, label, padding = arrays(30, 40)
    out_image, out_label, out_padding = rand_crop(image, label, padding, np.random.default_rng(0), 48)
    inside = np.zeros((48, 48), dtype=bool)
    inside[9:39, 4:44] = True  # (48-30)/2 rows and (48-40)/2 cols on each side
    assert np.array_equal(out_padding, ~inside)
    assert np.all(out_label[~inside] == 255) and np.all(out_label[inside] == 0)
    np.testing.assert_array_equal(out_image[9:39, 4:44], image)
    np.testing.assert_allclose(out_image[0, 0], 255 * np.asarray(IMAGENET_MEAN), rtol=1e-6)


def test_rotation_fills_borders_with_ignore_label_padding_and_mean_colour():
    rotated = 0
    for seed in range(20):
        image, label, padding = arrays(60, 60, seed)
        out_image, out_label, out_padding = rand_rotate(image, label, padding, np.random.default_rng(seed), 10.0)
        if not out_padding.any():
            assert np.array_equal(out_label, label)  # the 50 % of draws that do not rotate
            continue
        rotated += 1
        assert np.all(out_label[out_padding] == 255)
        assert np.all(out_label[~out_padding] == 0)
        deep = binary_erosion(out_padding, np.ones((3, 3)))  # bilinear mixes only at the edge
        np.testing.assert_allclose(out_image[deep], np.broadcast_to(255 * np.asarray(IMAGENET_MEAN), (deep.sum(), 3)),
                                   rtol=1e-5)
    assert 3 <= rotated <= 17


def test_scale_resizes_both_axes_by_one_factor_and_keeps_labels_discrete():
    image, label, padding = arrays(40, 60)
    label[10:30, 10:50] = 1
    label[0:5] = 255
    out_image, out_label, out_padding = rand_scale(image, label, padding, np.random.default_rng(0), (2.0, 2.0))
    assert out_image.shape == (80, 120, 3) and out_label.shape == (80, 120) and not out_padding.any()
    assert set(np.unique(out_label).tolist()) == {0, 1, 255}
    assert (out_label == 1).sum() == 4 * (label == 1).sum()


def test_blur_is_a_5x5_gaussian_with_sigma_1_1():
    image = np.zeros((15, 15, 3), dtype=np.float32)
    image[7, 7] = 1.0
    for seed in range(10):  # blurs with probability 0.5; the first seed that blurs decides
        out = rand_blur(image, np.random.default_rng(seed))
        if not np.array_equal(out, image):
            break
    g = np.exp(-np.arange(-2, 3) ** 2 / (2 * 1.1**2))
    expected = np.outer(g, g) / g.sum() ** 2
    np.testing.assert_allclose(out[5:10, 5:10, 0], expected, rtol=1e-5)
    assert out[:, :, 0].sum() == pytest.approx(1.0)


def test_train_transform_output_is_normalised_and_padding_marks_non_image_pixels():
    transform = TrainTransform(48, scale_range=(1.0, 1.0), rotate_degrees=0.0)
    image = np.full((30, 40, 3), 255, dtype=np.uint8)
    label = np.zeros((30, 40), dtype=np.uint8)
    img, mask, padding = transform(image, label, np.random.default_rng(0))
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert mask.shape == (48, 48) and mask.dtype == torch.int64 and padding.dtype == torch.bool
    assert int((~padding).sum()) == 30 * 40
    assert torch.all(mask[padding] == 255) and torch.all(mask[~padding] == 0)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(img[:, ~padding].mean(dim=1), white, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img[:, padding], torch.zeros_like(img[:, padding]), rtol=0, atol=1e-5)


def test_train_transform_is_reproducible_from_its_generator():
    transform = TrainTransform(40, scale_range=(0.8, 1.25), rotate_degrees=10.0)
    image = np.random.default_rng(0).integers(0, 256, size=(50, 60, 3), dtype=np.uint8)
    label = np.zeros((50, 60), dtype=np.uint8)
    label[10:40, 20:50] = 1
    first = transform(image, label, np.random.default_rng(11))
    same = transform(image, label, np.random.default_rng(11))
    others = [transform(image, label, np.random.default_rng(s)) for s in range(12, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert any(not torch.equal(first[0], other[0]) for other in others)


def test_eval_transform_resizes_the_longer_side_and_pads_top_left():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    label = np.ones((40, 80), dtype=np.uint8)
    img, mask, padding = EvalTransform(64)(image, label)
    assert img.shape == (3, 64, 64)
    assert torch.all(mask[:32] == 1) and torch.all(mask[32:] == 255)  # 40x80 -> 32x64 on a 64 canvas
    assert torch.all(~padding[:32]) and torch.all(padding[32:])
    # black outside the image, as the protocol pads before normalising (the extraction canvas too)
    black = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(img[:, 32:, :], black[:, None, None].expand(3, 32, 64))
