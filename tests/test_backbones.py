"""Backbones: architecture, feature shapes, and strict loading of each real checkpoint format.

Checkpoint files are written here from random weights in each published layout (torchvision,
MoCo v2 ``.pth.tar``, PFENet ``resnet50_v2.pth``, DINO), then loaded back: the loaded
backbone must reproduce the source network's outputs exactly.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from fss_core.models.backbones import (
    FEATURE_KEYS,
    CheckpointMismatchError,
    build_backbone,
    checkpoint_sha256,
)

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("single_thread")


def torchvision_resnet50_keys() -> list[str]:
    """The state-dict keys of torchvision's ``resnet50()``, spelled out from its architecture."""
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in BN_KEYS]
    for layer, blocks in enumerate((3, 4, 6, 3), 1):
        for b in range(blocks):
            prefix = f"layer{layer}.{b}"
            for c in (1, 2, 3):
                keys += [f"{prefix}.conv{c}.weight"] + [f"{prefix}.bn{c}.{k}" for k in BN_KEYS]
            if b == 0:
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{k}" for k in BN_KEYS]
    return keys + ["fc.weight", "fc.bias"]


def dino_vit_keys(depth: int) -> list[str]:
    """The state-dict keys of a DINO ViT backbone checkpoint."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return keys + ["norm.weight", "norm.bias"]


def randomised_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor redrawn (variances kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5, generator=gen)
        elif value.is_floating_point():
            value.normal_(0, 0.05, generator=gen)
        state[key] = value
    return state


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_outputs(a: nn.Module, b: nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    out_a, out_b = outputs(a, x), outputs(b, x)
    assert set(out_a) == set(out_b) == set(FEATURE_KEYS)
    for key in FEATURE_KEYS:
        assert out_a[key].std() > 1e-3  # a live signal, so equality is not vacuous
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision-format ResNet-50 file with random weights, and the source network."""
    source = build_backbone("resnet50")
    state = randomised_state(source, seed=1)
    source.load_state_dict(state)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50-torchvision.pth"
    torch.save(state, path)
    return path, source, state


def test_resnet50_state_dict_keys_are_torchvision_keys(torchvision_file):
    _, source, state = torchvision_file
    expected = torchvision_resnet50_keys()
    assert len(expected) == 320
    assert set(source.state_dict()) | {"fc.weight", "fc.bias"} == set(expected)
    assert state["layer1.0.downsample.1.weight"].shape == (256,)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert state["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    # v1.5: the stride sits on the 3x3 conv, not the first 1x1
    assert source.layer2[0].conv2.stride == (2, 2) and source.layer2[0].conv1.stride == (1, 1)


def test_resnet50_loads_torchvision_checkpoint_exactly(torchvision_file):
    path, source, _ = torchvision_file
    loaded = build_backbone("resnet50", checkpoint=path)
    assert_same_outputs(source, loaded, (32, 32))


def test_resnet50_feature_shapes_follow_strides():
    model = build_backbone("resnet50")
    out = outputs(model, torch.randn(1, 3, 64, 64))
    assert model.strides == {"layer2": 8, "layer3": 16, "layer4": 32}
    for key in FEATURE_KEYS:
        side = 64 // model.strides[key]
        assert out[key].shape == (1, model.channels[key], side, side)
    assert model.channels["layer4"] == 2048 and model.embedding_layer == "layer4"


def test_moco_checkpoint_uses_query_encoder_and_drops_heads(torchvision_file, tmp_path):
    _, source, state = torchvision_file
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    mlp_head = {"fc.0.weight": torch.randn(2048, 2048), "fc.0.bias": torch.randn(2048),
                "fc.2.weight": torch.randn(128, 2048), "fc.2.bias": torch.randn(128)}
    moco = {f"module.encoder_q.{k}": v for k, v in {**backbone, **mlp_head}.items()}
    # key-encoder weights differ from the query's, so loading them by mistake would change the outputs
    for key in ("conv1.weight", "layer4.2.bn3.running_var"):
        moco[f"module.encoder_k.{key}"] = torch.zeros_like(state[key])
    moco["module.encoder_k.fc.2.weight"] = torch.zeros(128, 2048)
    moco["module.queue"] = torch.randn(128, 64)
    moco["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": moco,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}, path)
    loaded = build_backbone("moco_v2", checkpoint=path)
    assert_same_outputs(source, loaded, (32, 32))


def test_moco_checkpoint_without_state_dict_is_rejected(torchvision_file, tmp_path):
    path = tmp_path / "not_moco.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointMismatchError, match="state_dict"):
        build_backbone("moco_v2", checkpoint=path)


def test_missing_key_is_named_with_the_file(torchvision_file, tmp_path):
    _, _, state = torchvision_file
    broken = dict(state)
    del broken["layer4.2.bn3.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_backbone("resnet50", checkpoint=path)
    message = str(info.value)
    assert "layer4.2.bn3.running_var" in message and str(path) in message and "missing keys (1)" in message


def test_unexpected_key_and_bad_shape_are_named(torchvision_file, tmp_path):
    _, _, state = torchvision_file
    broken = dict(state)
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    broken["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "extra.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_backbone("resnet50", checkpoint=path)
    message = str(info.value)
    assert "layer5.0.conv1.weight" in message and "unexpected keys (1)" in message
    assert "conv1.weight file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message


def test_torchvision_checkpoint_without_classifier_is_rejected(torchvision_file, tmp_path):
    _, _, state = torchvision_file
    path = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        build_backbone("resnet50", checkpoint=path)


def test_resnet50_v2_loads_pfenet_checkpoint_with_or_without_step_counters(tmp_path):
    source = build_backbone("resnet50_v2")
    state = randomised_state(source, seed=2)
    source.load_state_dict(state)
    assert {"conv2.weight", "bn2.running_mean", "conv3.weight", "bn3.bias"} <= set(state)
    assert state["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)  # layer1 takes the 128-channel stem
    plain = dict(state, **{"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    # files saved from nn.BatchNorm2d carry step counters; they hold no weights
    counters = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                for k in state if k.endswith("running_mean")}
    for name, content in (("plain", plain), ("counters", plain | counters)):
        path = tmp_path / f"resnet50_v2_{name}.pth"
        torch.save(content, path)
        assert_same_outputs(source, build_backbone("resnet50_v2", checkpoint=path), (33, 33))


def test_resnet50_v2_is_dilated_to_stride_8_with_frozen_norms():
    model = build_backbone("resnet50_v2")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(model.layer3[b].conv2.dilation == (2, 2) for b in range(6))
    assert all(model.layer4[b].conv2.dilation == (4, 4) for b in range(3))
    assert model.layer3[0].downsample[0].stride == (1, 1) and model.layer4[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 65, 65)
    out = outputs(model, x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "layer2": (1, 512, 9, 9), "layer3": (1, 1024, 9, 9), "layer4": (1, 2048, 9, 9)}
    assert set(model.strides.values()) == {8}
    model.train()  # frozen norms ignore the batch statistics
    with torch.no_grad():
        torch.testing.assert_close(model(x)["layer4"], out["layer4"])


def test_resnet50_v2_checkpoint_needs_classifier_keys(tmp_path):
    source = build_backbone("resnet50_v2")
    path = tmp_path / "resnet50_v2.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="fc.bias"):
        build_backbone("resnet50_v2", checkpoint=path)


def test_dino_vits16_has_the_dino_key_set():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        state = build_backbone("dino_vits16").state_dict()
    assert list(state) == dino_vit_keys(12)
    assert state["pos_embed"].shape == (1, 14 * 14 + 1, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    assert state["blocks.11.mlp.fc1.weight"].shape == (4 * 384, 384)


def test_dino_vitb8_dimensions():
    with torch.device("meta"):
        model = build_backbone("dino_vitb8")
        out = outputs(model, torch.empty(1, 3, 32, 32))
    assert model.state_dict()["pos_embed"].shape == (1, 28 * 28 + 1, 768)
    assert model.state_dict()["blocks.11.attn.qkv.weight"].shape == (3 * 768, 768)
    assert all(out[k].shape == (1, 768, 4, 4) for k in FEATURE_KEYS)


@pytest.fixture(scope="module")
def dino_source():
    """A 3-block DINO ViT-S/16 with random weights, and its state dict."""
    source = build_backbone("dino_vits16", depth=3)
    state = randomised_state(source, seed=4)
    source.load_state_dict(state)
    return source, state


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"teacher": {f"module.backbone.{k}": v for k, v in s.items()}
                   | {"module.head.last_layer.weight_g": torch.ones(1, 1)},
                   "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in s.items()}},
        lambda s: {"student": {f"backbone.{k}": v for k, v in s.items()} | {"head.mlp.0.weight": torch.ones(1)}},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "teacher-module-backbone", "student-backbone", "state_dict-module"],
)
def test_dino_checkpoints_load(tmp_path, wrap, dino_source):
    source, state = dino_source
    path = tmp_path / "dino.pth"
    torch.save(wrap(state), path)
    loaded = build_backbone("dino_vits16", checkpoint=path, depth=3)
    assert_same_outputs(source, loaded, (64, 64))
    assert all(v.shape == (1, 384, 4, 4) for v in outputs(loaded, torch.randn(1, 3, 64, 64)).values())


def test_dino_missing_block_is_named(tmp_path):
    source = build_backbone("dino_vits16", depth=3)
    state = {k: v for k, v in source.state_dict().items() if k != "blocks.2.mlp.fc2.bias"}
    path = tmp_path / "dino.pth"
    torch.save({"teacher": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.mlp\.fc2\.bias"):
        build_backbone("dino_vits16", checkpoint=path, depth=3)


def test_vit_maps_are_patch_tokens_of_a_non_square_input_with_final_norm():
    model = build_backbone("dino_vits16", depth=3)
    out = outputs(model, torch.randn(2, 3, 64, 96))
    assert all(out[k].shape == (2, 384, 4, 6) for k in FEATURE_KEYS)
    assert model.strides == dict.fromkeys(FEATURE_KEYS, 16)
    tokens = out["layer4"]  # LayerNorm with unit weight and zero bias: each token has mean 0, variance 1
    torch.testing.assert_close(tokens.mean(1), torch.zeros(2, 4, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(1, unbiased=False), torch.ones(2, 4, 6), atol=1e-3, rtol=0)
    assert not torch.allclose(out["layer3"], out["layer4"])


def test_small_cnn_shapes_size_and_round_trip(tmp_path):
    model = build_backbone("small_cnn")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.strides == dict.fromkeys(FEATURE_KEYS, 8) and model.embedding_layer == "layer4"
    out = outputs(model, torch.randn(1, 3, 96, 96))
    assert {k: v.shape[1:] for k, v in out.items()} == {k: (model.channels[k], 12, 12) for k in FEATURE_KEYS}
    source = build_backbone("small_cnn")
    source.load_state_dict(randomised_state(source, seed=5))
    path = tmp_path / "small_cnn.pth"
    torch.save(source.state_dict(), path)
    assert_same_outputs(source, build_backbone("small_cnn", checkpoint=path), (48, 40))


def test_freeze_stops_gradients_and_batch_statistics():
    model = build_backbone("small_cnn")
    model.load_state_dict(randomised_state(model, seed=6))
    model.freeze()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    single = model(x[:1])["layer4"]
    batch = model(x)["layer4"]
    assert all(not p.requires_grad for p in model.parameters())
    torch.testing.assert_close(single, batch[:1])  # eval-mode norms: a sample's output ignores its batch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_name_and_unreadable_file(tmp_path):
    with pytest.raises(KeyError, match="resnet50_v2"):
        build_backbone("resnet51")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="junk.pth"):
        build_backbone("small_cnn", checkpoint=junk)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_backbone("small_cnn", checkpoint=tmp_path / "absent.pth")


def test_checkpoint_sha256_is_the_file_digest(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.arange(10.0)}, path)
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
