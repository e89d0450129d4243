"""Self-supervised pretraining of the small CNN: view geometry, learning, determinism, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fss_core.embeddings.ssl_pretrain import corresponding_cells, pretrain_small_cnn, random_view
from fss_core.models.backbones import build_backbone


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def texture_images(tmp_path_factory):
    """16 small images: a random stripe or checker texture in random colours on a random background."""
    root = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    paths = []
    for i in range(16):
        period = rng.integers(4, 10)
        pattern = ((xx // period + yy // period) % 2) if i % 2 else ((xx + yy) // period % 2)
        colours = rng.integers(0, 256, size=(2, 3))
        image = colours[pattern]
        image[: rng.integers(8, 24)] = rng.integers(0, 256, size=3)  # a flat band of another surface
        path = root / f"texture_{i:02d}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_corresponding_cells_map_each_cell_onto_the_same_source_point():
    # an image whose two channels are its own source x and y pixel coordinates
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    source = torch.stack([xs, ys, torch.zeros_like(xs)])
    gen = torch.Generator().manual_seed(0)
    size, grid = 64, 8
    checked = 0
    for _ in range(20):
        (view_a, geo_a), (view_b, geo_b) = random_view(source, size, gen), random_view(source, size, gen)
        # a cell's value is the view's pixel at its receptive-field centre, pixel (8i, 8j)
        cells_a, cells_b = view_a[:2, ::8, ::8], view_b[:2, ::8, ::8]
        coords = corresponding_cells(geo_a, geo_b, size, grid)
        inside = (coords.abs() <= 1).all(1)
        found = F.grid_sample(cells_b[None], coords[None, None], align_corners=True)[0, :, 0].t()
        expected = cells_a.flatten(1).t()
        error = (found - expected)[inside].abs().max(dim=1).values
        assert error.numel() == 0 or error.max() < 1.5  # source pixels; crops are resampled bilinearly
        checked += int(inside.sum())
    assert checked > 100


def test_a_few_steps_lower_the_loss(texture_images):
    _, report = pretrain_small_cnn(texture_images, image_size=32, epochs=8, batch_size=8, seed=0, progress=False)
    assert len(report.losses) == 8 and report.steps == 16
    assert np.mean(report.losses[-2:]) < np.mean(report.losses[:2]) - 0.1


def test_pretraining_is_deterministic_per_seed_and_saves_a_loadable_checkpoint(texture_images, tmp_path):
    kwargs = dict(image_size=32, epochs=1, batch_size=8, progress=False)
    model, report = pretrain_small_cnn(texture_images, seed=3, checkpoint_dir=tmp_path, **kwargs)
    again, report_again = pretrain_small_cnn(texture_images, seed=3, **kwargs)
    _, other = pretrain_small_cnn(texture_images, seed=4, **kwargs)
    assert report.losses == report_again.losses and report.losses != other.losses
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key

    loaded = build_backbone("small_cnn", checkpoint=report.checkpoint).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["layer4"], model(x)["layer4"], rtol=0, atol=0)


def test_bad_arguments_are_named(texture_images):
    with pytest.raises(ValueError, match="at least 2 images"):
        pretrain_small_cnn(texture_images[:1], 32, 1, 8, 0, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        pretrain_small_cnn(texture_images, 36, 1, 8, 0, progress=False)
