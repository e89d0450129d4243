"""The prototype cross-attention FSS model: attention, prototypes, loss and the whole network."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from fss_core.models.fss import FSSModelConfig, FSSNetwork, dice_loss, parameter_groups
from fss_core.models.fss.deform_attn import MSDeformAttn
from fss_core.models.fss.hamming import cluster_prototypes, hamming_kmeans, simhash, support_prototypes
from fss_core.models.fss.position import sine_position_encoding

TINY = FSSModelConfig(hidden=32, heads=4, layers=2, ffn=96, points=3, fg_prototypes=4, bg_prototypes=6)


pytestmark = pytest.mark.usefixtures("single_thread")


class TinyBackbone(nn.Module):
    """Stride-8 stand-in honouring the backbone interface (with a BatchNorm to watch its mode)."""

    channels = {"layer2": 8, "layer3": 12, "layer4": 16}
    strides = {"layer2": 8, "layer3": 8, "layer4": 8}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.layer3 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        layer2 = self.stem(x)
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def make_model(**overrides) -> FSSNetwork:
    torch.manual_seed(0)
    return FSSNetwork(TinyBackbone(), dataclasses.replace(TINY, **overrides))


def toy_episode(shots: int, size: int = 33, batch: int = 2, seed: int = 0):
    """Images with a bright square on noise; masks mark the square."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, shots + 1, 3, size, size, generator=g) * 0.3
    masks = torch.zeros(batch, shots + 1, size, size, dtype=torch.long)
    for b in range(batch):
        for i in range(shots + 1):
            top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
            side = size // 2
            images[b, i, :, top : top + side, left : left + side] += 2.0
            masks[b, i, top : top + side, left : left + side] = 1
    return images[:, 0], images[:, 1:], masks[:, 1:], masks[:, 0]


# ---------------------------------------------------------------- deformable attention


def naive_deformable_attention(module, query, reference, value_input, shapes, padding):
    """Per-head, per-point bilinear sampling with explicit loops (zero outside the map)."""
    batch, n_query, dim = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    d_head = dim // heads
    value = module.value_proj(value_input).masked_fill(padding[..., None], 0.0)
    offsets = module.sampling_offsets(query).view(batch, n_query, heads, levels, points, 2)
    weights = module.attention_weights(query).view(batch, n_query, heads, levels * points).softmax(-1)
    weights = weights.view(batch, n_query, heads, levels, points)
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(levels)]
    out = torch.zeros(batch, n_query, dim, dtype=query.dtype)
    for b in range(batch):
        for q in range(n_query):
            for h in range(heads):
                channels = slice(h * d_head, (h + 1) * d_head)
                for level, (height, width) in enumerate(shapes):
                    for p in range(points):
                        # Normalised location -> pixel coordinates with centres at integer + 0.5.
                        x = (reference[b, q, level, 0] + offsets[b, q, h, level, p, 0] / width) * width - 0.5
                        y = (reference[b, q, level, 1] + offsets[b, q, h, level, p, 1] / height) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d_head, dtype=query.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < height and 0 <= xx < width:
                                corner = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                sample = sample + corner * value[b, starts[level] + yy * width + xx, channels]
                        out[b, q, channels] += weights[b, q, h, level, p] * sample
    return module.output_proj(out)


def test_deformable_attention_matches_naive_loop():
    torch.manual_seed(0)
    module = MSDeformAttn(8, n_levels=2, n_heads=2, n_points=3).eval()
    with torch.no_grad():  # non-trivial offsets (some leave the map) and attention weights
        module.sampling_offsets.weight.normal_(0, 1.0)
        module.sampling_offsets.bias.normal_(0, 2.0)
        module.attention_weights.weight.normal_(0, 1.0)
    shapes = [(3, 4), (2, 3)]
    n_value = sum(h * w for h, w in shapes)
    query = torch.randn(2, 5, 8)
    value_input = torch.randn(2, n_value, 8)
    reference = torch.rand(2, 5, 2, 2)
    padding = torch.rand(2, n_value) < 0.2
    with torch.no_grad():
        fast = module(query, reference, value_input, shapes, padding)
        slow = naive_deformable_attention(module, query, reference, value_input, shapes, padding)
    assert fast.shape == (2, 5, 8)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_deformable_attention_initial_offsets_fan_out_by_head():
    module = MSDeformAttn(16, n_levels=1, n_heads=4, n_points=3)
    bias = module.sampling_offsets.bias.view(4, 1, 3, 2)
    # head h looks towards angle 2*pi*h/4: right, down, left, up; point p sits p+1 cells away
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        torch.testing.assert_close(bias[:, 0, p], directions * (p + 1), atol=1e-6, rtol=0)
    assert torch.all(module.sampling_offsets.weight == 0)
    assert torch.all(module.attention_weights.weight == 0)


def test_sine_encoding_depends_only_on_the_valid_region():
    padding = torch.zeros(1, 4, 6, dtype=torch.bool)
    padding[:, :, 4:] = True  # two padded columns on the right
    padded = sine_position_encoding(padding, 8)
    unpadded = sine_position_encoding(torch.zeros(1, 4, 4, dtype=torch.bool), 8)
    assert padded.shape == (1, 16, 4, 6)
    torch.testing.assert_close(padded[..., :4], unpadded)


# ---------------------------------------------------------------- hashing and prototypes


def test_simhash_bits_on_a_hand_computed_example():
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    planes = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [1.0, 1.0, 3.0]])
    expected = torch.tensor([[True, True, False], [False, True, False], [True, True, True]])
    assert torch.equal(simhash(tokens, planes), expected)


@pytest.mark.parametrize("seed", range(10))
def test_hamming_kmeans_separates_two_obvious_groups(seed):
    g = torch.Generator().manual_seed(100 + seed)
    base = torch.rand(32, generator=g) < 0.5
    groups = []
    for centre in (base, ~base):
        codes = centre.repeat(7, 1)
        for row in range(7):  # up to 2 flipped bits per code
            flips = torch.randint(0, 32, (2,), generator=g)
            codes[row, flips] = ~codes[row, flips]
        groups.append(codes)
    labels = hamming_kmeans(torch.cat(groups), 2, 10, torch.Generator().manual_seed(seed))
    assert len(set(labels[:7].tolist())) == 1
    assert len(set(labels[7:].tolist())) == 1
    assert labels[0] != labels[7]


def test_hamming_kmeans_never_splits_identical_codes():
    codes = torch.tensor([[True, False] * 4] * 5 + [[False, True] * 4] * 5)
    labels = hamming_kmeans(codes, 4, 10, torch.Generator().manual_seed(0))
    assert len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1


def test_cluster_prototypes_are_group_means_and_empty_clusters_are_invalid():
    group_a, group_b = torch.tensor([5.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -5.0])
    tokens = torch.stack([group_a] * 4 + [group_b] * 6)
    prototypes, valid = cluster_prototypes(tokens, 5, 32, 10, torch.Generator().manual_seed(0))
    assert valid.sum() == 2  # only two distinct tokens, so three of the five clusters are empty
    found = sorted(prototypes[valid].tolist())
    expected = sorted([(group_a * 4 / (4 + 1e-3)).tolist(), (group_b * 6 / (6 + 1e-3)).tolist()])
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected))
    assert torch.all(prototypes[~valid] == 0)


def test_cluster_prototypes_keep_few_tokens_as_they_are():
    tokens = torch.randn(3, 4)
    prototypes, valid = cluster_prototypes(tokens, 5, 32, 10, torch.Generator().manual_seed(0))
    assert torch.equal(prototypes[:3], tokens) and torch.equal(valid, torch.tensor([True] * 3 + [False] * 2))


def grid_features(h: int, w: int) -> torch.Tensor:
    """[1, 1, h*w, h, w]: cell (y, x) carries the one-hot vector of its index."""
    return torch.eye(h * w).view(h * w, h, w)[None, None]


def test_support_prototypes_mask_empty_fg_clusters():
    features = torch.randn(1, 1, 4, 3, 3)
    foreground = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    foreground[0, 0, 0] = True  # three fg cells, identical features
    features[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    no_padding = torch.zeros_like(foreground)
    prototypes, invalid = support_prototypes(features, foreground, no_padding, 2, 6, 32, 10, torch.Generator())
    assert prototypes.shape == (1, 8, 4) and invalid.shape == (1, 8)
    assert invalid[0, :2].tolist().count(True) == 1  # 3 identical tokens > 2 slots: one cluster empty
    torch.testing.assert_close(prototypes[0, :2][~invalid[0, :2]][0], torch.tensor([1.0, 2.0, 3.0, 4.0]) / 30**0.5)
    assert not invalid[0, 2:].any()  # 6 bg tokens fill the 6 bg slots
    torch.testing.assert_close(prototypes.norm(dim=-1)[~invalid], torch.ones(7))


def test_support_prototypes_safeguards_and_padding():
    features = grid_features(4, 4)  # cell index = position of the 1
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    prototypes, invalid = support_prototypes(features, empty, empty, 16, 16, 32, 10, torch.Generator())
    fg_cells = prototypes[0, :16][~invalid[0, :16]].argmax(-1).tolist()
    assert sorted(fg_cells) == [5, 6, 9, 10]  # central 2x2 cells

    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    prototypes, invalid = support_prototypes(features, full, empty, 16, 16, 32, 10, torch.Generator())
    bg_cells = prototypes[0, 16:][~invalid[0, 16:]].argmax(-1).tolist()
    assert sorted(bg_cells) == [0, 3, 12, 15]  # the four corners

    padding = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    padding[..., 3] = True  # last column padded
    half = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    half[..., :2, :] = True
    prototypes, invalid = support_prototypes(features, half, padding, 16, 16, 32, 10, torch.Generator())
    kept = sorted(prototypes[0][~invalid[0]].argmax(-1).tolist())
    assert kept == [y * 4 + x for y in range(4) for x in range(3)]


def test_support_prototypes_are_differentiable_and_seeded():
    features = torch.randn(2, 3, 8, 5, 5, requires_grad=True)
    foreground = torch.rand(2, 3, 5, 5) < 0.4
    padding = torch.zeros_like(foreground)
    first, invalid = support_prototypes(features, foreground, padding, 4, 6, 32, 10, torch.Generator().manual_seed(3))
    again, _ = support_prototypes(features, foreground, padding, 4, 6, 32, 10, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    first[~invalid].sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


# ---------------------------------------------------------------- loss


def test_dice_loss_hand_computed():
    logits = torch.zeros(1, 2, 1, 3)  # sigmoid = 0.5 everywhere
    target = torch.tensor([[[0, 1, 255]]])
    # valid pixels 0 and 1; per channel: 1 - 2*0.5 / (0.25 + 0.25 + 1) = 1/3
    assert dice_loss(logits, target).item() == pytest.approx(2 / 3, abs=1e-6)
    padding = torch.tensor([[[False, True, False]]])
    # only pixel 0 (bg): bg 1 - 1/(0.25 + 1) = 0.2, fg 1 - 0/0.25 = 1
    assert dice_loss(logits, target, padding).item() == pytest.approx(1.2, abs=1e-6)


def test_dice_loss_ignores_255_and_padding_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, generator=g)
    target = torch.randint(0, 2, (2, 6, 6), generator=g)
    target[:, 0] = 255
    padding = torch.zeros(2, 6, 6, dtype=torch.bool)
    padding[:, :, -2:] = True
    changed = logits.clone()
    changed[:, :, 0] = 50.0
    changed[:, :, :, -2:] = -50.0
    assert dice_loss(changed, target, padding).item() == pytest.approx(dice_loss(logits, target, padding).item())
    assert dice_loss(changed, target).item() != pytest.approx(dice_loss(logits, target).item())


def test_dice_loss_of_a_perfect_prediction_is_zero():
    target = torch.randint(0, 2, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    target[:, :, 0] = 255
    logits = torch.stack([target == 0, target == 1], dim=1).float() * 40 - 20
    logits[:, :, :, 0] = 20.0  # anything at ignored pixels
    assert dice_loss(logits, target).item() < 1e-6


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("shots", [1, 5])
def test_network_output_shape(shots):
    model = make_model()
    query, support, masks, _ = toy_episode(shots)
    assert model(query, support, masks).shape == (2, 2, 33, 33)
    model.eval()
    with torch.no_grad():
        assert model(query, support, masks).shape == (2, 2, 33, 33)


def test_network_accepts_other_sizes_and_padding():
    model = make_model().eval()
    query, support, masks, _ = toy_episode(2, size=40)
    query_padding = torch.zeros(2, 40, 40, dtype=torch.bool)
    query_padding[:, 30:] = True
    support_padding = torch.zeros(2, 2, 40, 40, dtype=torch.bool)
    support_padding[:, :, :, 35:] = True
    with torch.no_grad():
        logits = model(query, support, masks, query_padding, support_padding, torch.Generator().manual_seed(0))
    assert logits.shape == (2, 2, 40, 40) and torch.isfinite(logits).all()


def test_backward_reaches_adapters_and_transformer_but_not_backbone():
    model = make_model()
    query, support, masks, target = toy_episode(2)
    dice_loss(model(query, support, masks), target).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for module in (model.query_adapter, model.support_adapter, model.query_merge, model.transformer, model.head):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_support_self_attention_is_live_only_when_enabled():
    model = make_model(support_self_attention=True)
    query, support, masks, target = toy_episode(2)
    dice_loss(model(query, support, masks), target).backward()
    branch = list(model.transformer.support_layers.named_parameters())
    assert branch
    for name, parameter in branch:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    plain = make_model(support_self_attention=False)
    assert not any("support_layers" in name for name, _ in plain.named_parameters())


def test_seeded_evaluation_is_deterministic():
    model = make_model().eval()
    query, support, masks, _ = toy_episode(2)
    with torch.no_grad():
        first = model(query, support, masks, generator=torch.Generator().manual_seed(7))
        again = model(query, support, masks, generator=torch.Generator().manual_seed(7))
        other = model(query, support, masks, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # the generator really drives the prototype clustering


def test_training_mode_keeps_the_backbone_in_eval_mode():
    model = make_model()
    model.train()
    running_mean = model.backbone.stem[1].running_mean.clone()
    query, support, masks, _ = toy_episode(1)
    model(query, support, masks)
    assert model.training and not model.backbone.training
    assert torch.equal(model.backbone.stem[1].running_mean, running_mean)


def test_parameter_groups_split_for_the_two_optimisers():
    model = make_model(support_self_attention=True)
    sgd, decay, no_decay = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in sgd} == {
        n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("transformer.")
    }
    assert all(names[id(p)].startswith("transformer.") and "bias" not in names[id(p)] for p in decay)
    assert all(names[id(p)].startswith("transformer.") and names[id(p)].endswith("bias") for p in no_decay)
    assert no_decay  # the deformable attention's offset/weight biases
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(sgd) + len(decay) + len(no_decay) == len(trainable)


def test_linear_layers_are_xavier_with_zero_bias():
    model = make_model()
    cross = model.transformer.query_layers[0].cross_attention.q_proj.weight
    bound = math.sqrt(6.0 / (cross.shape[0] + cross.shape[1]))
    assert cross.abs().max() <= bound
    attention = model.transformer.query_layers[0].self_block.self_attention
    assert torch.all(attention.attention_weights.weight == 0)  # re-initialised after xavier
    assert torch.all(model.transformer.query_layers[0].norm_cross.bias == 0)


def test_bad_inputs_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="hidden"):
        FSSModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="adapter_layers"):
        FSSModelConfig(adapter_layers=("layer5",))
    with pytest.raises(ValueError, match="adapter_layers"):
        FSSModelConfig(adapter_layers=())
    with pytest.raises(ValueError, match="adapter_dropout"):
        FSSModelConfig(adapter_dropout=1.0)
    model = make_model()
    query, support, masks, _ = toy_episode(2)
    with pytest.raises(ValueError, match="support_masks"):
        model(query, support, masks[:, :1])


def test_a_few_steps_overfit_one_episode():
    model = make_model(dropout=0.0)
    query, support, masks, target = toy_episode(1, batch=1, seed=3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return dice_loss(model(query, support, masks, generator=torch.Generator().manual_seed(0)), target).item()

    before = eval_loss()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(40):
        optimiser.zero_grad()
        dice_loss(model(query, support, masks), target).backward()
        optimiser.step()
    after = eval_loss()
    assert after < 0.5 * before


def test_prototype_prior_is_the_normalised_cosine_to_the_class_prototype():
    from fss_core.models.fss.network import prototype_prior

    # 1 x 3 query grid; support: one shot whose fg cells hold e0 and e1, so the prototype is
    # their normalised mean (e0 + e1)/sqrt(2).
    e = torch.eye(3)
    query = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), e[2]], dim=1).view(1, 3, 1, 3)
    support = torch.stack([e[0], e[1], e[2]], dim=1).view(1, 1, 3, 1, 3)
    mask = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 1, 3)
    valid = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    prior = prototype_prior(query, support, mask, valid).flatten()
    # cosines: 1/sqrt(2), 1, 0 → min-max: 1/sqrt(2), 1, 0
    assert torch.allclose(prior, torch.tensor([1 / math.sqrt(2), 1.0, 0.0]), atol=1e-5)
    # a padding cell is 0 and does not set the minimum
    valid[..., 2] = False
    prior = prototype_prior(query, support, mask, valid).flatten()
    assert torch.allclose(prior, torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_prototype_prior_adds_one_merge_input_and_runs():
    model = make_model(prototype_prior=True)
    assert model.query_merge[0].in_channels == 2 * TINY.hidden + 2
    query, support, masks, _ = toy_episode(2)
    logits = model(query, support, masks, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, 2, 33, 33) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="prototype_prior_layers"):
        FSSModelConfig(prototype_prior_layers=("layer9",))


# ---------------------------------------------------------------- switches back to the reference's behaviour


def test_dice_loss_counts_void_pixels_like_the_reference_when_switched_off():
    logits = torch.zeros(1, 2, 1, 3)  # sigmoid = 0.5 everywhere
    target = torch.tensor([[[0, 1, 255]]])
    padding = torch.tensor([[[False, False, True]]])
    # every pixel counts, the 255 pixel with target 0 in both channels:
    # per channel 1 - 2*0.5 / (3*0.25 + 1) = 3/7; padding is not used
    assert dice_loss(logits, target, ignore_void=False).item() == pytest.approx(6 / 7, abs=1e-6)
    assert dice_loss(logits, target, padding, ignore_void=False).item() == pytest.approx(6 / 7, abs=1e-6)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, generator=g)
    target = torch.randint(0, 2, (2, 6, 6), generator=g)
    no_void = dice_loss(logits, target, ignore_void=False)
    assert torch.equal(no_void, dice_loss(logits, target))  # without void pixels both settings agree exactly
    target[:, 0] = 255
    padding = torch.zeros(2, 6, 6, dtype=torch.bool)
    padding[:, :, -2:] = True
    target[padding] = 255  # the episode datasets label padding 255
    changed = logits.clone()
    changed[:, :, 0] = 50.0
    changed[:, :, :, -2:] = -50.0
    on = [dice_loss(x, target, padding).item() for x in (logits, changed)]
    off = [dice_loss(x, target, padding, ignore_void=False).item() for x in (logits, changed)]
    assert on[0] == pytest.approx(on[1])  # void predictions are left out ...
    assert off[0] != pytest.approx(off[1])  # ... or counted, as in the reference
    one_hot = torch.stack([target == 0, target == 1], dim=1).float()
    probs = torch.sigmoid(logits)
    expected = (1 - 2 * (probs * one_hot).sum((2, 3)) / ((probs**2).sum((2, 3)) + one_hot.sum((2, 3)))).sum(1).mean()
    assert off[0] == pytest.approx(expected.item(), rel=1e-6)


def test_empty_clusters_stay_valid_zero_prototypes_when_masking_is_off():
    group_a, group_b = torch.tensor([5.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -5.0])
    tokens = torch.stack([group_a] * 4 + [group_b] * 6)
    masked, valid = cluster_prototypes(tokens, 5, 32, 10, torch.Generator().manual_seed(0))
    kept, all_valid = cluster_prototypes(tokens, 5, 32, 10, torch.Generator().manual_seed(0), mask_empty=False)
    assert valid.sum() == 2 and all_valid.all()  # three empty clusters: masked only when on
    assert torch.equal(masked, kept) and torch.all(kept[~valid] == 0)
    few, few_valid = cluster_prototypes(tokens[:3], 5, 32, 10, mask_empty=False)
    assert few_valid.tolist() == [True] * 3 + [False] * 2  # unused slots stay masked either way

    features = torch.randn(1, 1, 4, 3, 3)
    foreground = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    foreground[0, 0, 0] = True
    features[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # 3 identical fg tokens, 2 fg slots
    padding = torch.zeros_like(foreground)
    on = support_prototypes(features, foreground, padding, 2, 6, 32, 10, torch.Generator().manual_seed(1))
    off = support_prototypes(features, foreground, padding, 2, 6, 32, 10, torch.Generator().manual_seed(1),
                             mask_empty=False)
    assert on[1].sum() == 1 and not off[1].any()
    assert torch.equal(on[0], off[0])


def test_the_network_attends_empty_clusters_only_when_masking_is_off():
    query, support, masks, _ = toy_episode(1, batch=1)
    flat = torch.zeros_like(support)  # identical support tokens: most bg clusters stay empty
    logits = {}
    for flag in (True, False):
        model = make_model(mask_empty_prototypes=flag).eval()  # the same weights: the switch adds none
        assert model.transformer.mask_empty_prototypes is flag
        with torch.no_grad():
            logits[flag] = model(query, flat, masks, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(logits[True], logits[False])


def test_a_model_spec_saved_before_the_empty_cluster_switch_loads_with_masking_on():
    import json

    from fss_core.models.fss.bundle import ModelSpec

    raw = json.loads(ModelSpec("small_cnn", 41, TINY).to_json())
    del raw["config"]["mask_empty_prototypes"]
    spec = ModelSpec.from_json(json.dumps(raw))
    assert spec.config.mask_empty_prototypes is True and spec == ModelSpec("small_cnn", 41, TINY)
