"""The measured-and-not-adopted training variants (benchmarks/learning_variants.py) do what
docs/results.md says they do, so its figures stay reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fss_core.models.fss import network
from fss_core.pseudo import task_index
from fss_core.training import trainer
from tests.test_fss_model import make_model, toy_episode

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def variants(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learning_variants

    return learning_variants, monkeypatch.setattr


def test_border_variant_drops_regions_that_hug_the_border(variants):
    module, set_attr = variants
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:51, :10] = 1  # a strip along the left edge: 40 % of it inside the 4 px border band
    mask[20:40, 20:40] = 2  # an object in the middle
    mask[2:30, 50:62] = 3  # touches the top and right bands with a minority of its pixels
    # cluster 0, the rest, spans every row and column: background-like by the reference's rule
    assert [c for c, _ in task_index.valid_pseudo_classes(mask, 10)] == [1, 2, 3]
    module.patch_border(set_attr)
    kept = [c for c, _ in task_index.valid_pseudo_classes(mask, 10)]
    assert 1 not in kept and 2 in kept
    share = np.count_nonzero((mask == 3) & ~_interior(64, 4)) / np.count_nonzero(mask == 3)
    assert (3 in kept) == (share <= module.BORDER_MAX_SHARE)


def _interior(size: int, band: int) -> np.ndarray:
    inside = np.zeros((size, size), dtype=bool)
    inside[band:-band, band:-band] = True
    return inside


def _thresholded_similarity(model, query, supports, support_masks):
    """The baseline's min-max cosine to the prototype (layer3+4) as a logit, 10 · (sim − 0.6), at
    the image size, and the similarity itself at the layer3 grid."""
    with torch.no_grad():
        q, s = model.backbone(query), model.backbone(supports.flatten(0, 1))
    size = tuple(q["layer3"].shape[-2:])
    batch, shots = supports.shape[:2]
    fg = F.interpolate((support_masks == 1).flatten(0, 1)[:, None].float(), size=size, mode="bilinear",
                       align_corners=True)
    layers = ("layer3", "layer4")
    similarity = network.prototype_prior(network._unit_features(q, layers),
                                         network._unit_features(s, layers).view(batch, shots, -1, *size),
                                         fg.view(batch, shots, 1, *size),
                                         torch.ones(batch, 1, *size, dtype=torch.bool))
    logit = F.interpolate(10.0 * (similarity - 0.6), size=query.shape[-2:], mode="bilinear", align_corners=True)
    return logit[:, 0], similarity


def test_residual_variant_starts_as_the_thresholded_similarity(variants):
    module, set_attr = variants
    module.patch_residual(set_attr)
    model = make_model(adapter_layers=("layer3", "layer4")).eval()
    query, supports, support_masks, _ = toy_episode(1)
    with torch.no_grad():
        logits = model(query, supports, support_masks)
    expected, _ = _thresholded_similarity(model, query, supports, support_masks)
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert {"residual_scale", "residual_threshold"} <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_relation_variant_starts_as_the_baseline_and_reads_only_relations(variants):
    module, set_attr = variants
    module.patch_relation(set_attr)
    model = make_model(adapter_layers=("layer3", "layer4")).eval()
    query, supports, support_masks, _ = toy_episode(1)
    padding = torch.zeros(query.shape[0], *query.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        logits = model(query, supports, support_masks)
        maps = module.relation_maps(model.backbone, query, supports, support_masks, padding)
    expected, similarity = _thresholded_similarity(model, query, supports, support_masks)
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert maps.shape == (2, 5, *similarity.shape[-2:])
    torch.testing.assert_close(maps[:, :1], similarity)
    # the fg and bg prototype maps are min-max normalised, the raw cosines lie in [-1, 1]
    assert float(maps[:, :2].amin()) == 0.0 and float(maps[:, :2].amax()) == pytest.approx(1.0)
    assert float(maps[:, 2:4].abs().amax()) <= 1.0 + 1e-6
    # what it learns is a function of the relation maps: the transformer's weights play no part
    with torch.no_grad():
        model.relation_head[-1].weight.normal_()
        trained = model(query, supports, support_masks)
        for name, parameter in model.named_parameters():
            if "transformer" in name:
                parameter.mul_(3.0).add_(1.0)
        assert torch.equal(model(query, supports, support_masks), trained)
    assert not torch.allclose(trained, logits)


def test_softmax_dice_variant_scores_the_softmax_and_ignores_255(variants):
    module, set_attr = variants
    module.patch_softmax_dice(set_attr)
    target = torch.tensor([[[0, 1], [1, 255]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[-20.0, 20.0], [20.0, -20.0]])  # right on the 3 labelled pixels
    assert float(trainer.dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere: dice 2*0.5*n / (0.25*3 + n) per channel
    expected = (1 - 1.0 / (0.75 + 1)) + (1 - 2.0 / (0.75 + 2))
    assert float(trainer.dice_loss(flat, target)) == pytest.approx(expected, rel=1e-6)
