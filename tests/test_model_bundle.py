"""A saved model bundle rebuilds the same network: same outputs for the same episode."""

import torch

from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import ModelSpec, load_bundle, save_bundle
from fss_core.models.fss.network import FSSModelConfig, FSSNetwork


def test_bundle_round_trip_gives_identical_logits(tmp_path):
    spec = ModelSpec("small_cnn", 41, FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6))
    torch.manual_seed(0)
    model = FSSNetwork(build_backbone("small_cnn"), spec.config).eval()
    save_bundle(tmp_path / "m", model, spec)
    loaded, loaded_spec = load_bundle(tmp_path / "m")
    assert loaded_spec == spec
    q, s = torch.randn(1, 3, 41, 41), torch.randn(1, 1, 3, 41, 41)
    m = torch.zeros(1, 1, 41, 41)
    m[..., 10:30, 10:30] = 1
    out = [net(q, s, m, generator=torch.Generator().manual_seed(3)) for net in (model, loaded)]
    assert torch.equal(out[0], out[1])


def test_bundle_keeps_the_adapter_layers(tmp_path):
    """A model reading layer3+layer4 is rebuilt with the same adapters (not the layer2+3 default)."""
    config = FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6,
                            adapter_layers=("layer3", "layer4"), adapter_dropout=0.2)
    spec = ModelSpec("small_cnn", 41, config)
    model = FSSNetwork(build_backbone("small_cnn"), config)
    assert model.query_adapter[0].in_channels == 128 + 256
    save_bundle(tmp_path / "m", model, spec)
    loaded, loaded_spec = load_bundle(tmp_path / "m")
    assert loaded_spec.config.adapter_layers == ("layer3", "layer4")
    assert loaded_spec.config.adapter_dropout == 0.2
    assert loaded.query_adapter[0].in_channels == 128 + 256
