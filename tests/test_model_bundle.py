"""A saved model bundle rebuilds the same network: same outputs for the same episode."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fss_cli.main import app
from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import SPEC_FILE, ModelSpec, load_bundle, save_bundle
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


def test_a_folder_holding_bundles_is_refused_naming_them_newest_first(tmp_path):
    """``--bundle WORKSPACE`` is a common slip: the error lists the bundles found below it."""
    import os

    spec = ModelSpec("small_cnn", 41, FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6))
    model = FSSNetwork(build_backbone("small_cnn"), spec.config)
    old, new = tmp_path / "models" / "unsupervised-old", tmp_path / "models" / "unsupervised-new"
    for age, folder in ((100, old), (0, new)):
        save_bundle(folder, model, spec)
        stamp = (folder / "weights.pt").stat().st_mtime - age
        os.utime(folder / "weights.pt", (stamp, stamp))
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / SPEC_FILE).write_text("{}")  # no weights: not a bundle
    with pytest.raises(FileNotFoundError, match=rf"not a model bundle .*the bundles in it: {re.escape(str(new))}, "
                                                rf"{re.escape(str(old))}$"):
        load_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a model bundle \(needs model.json and weights.pt\)$"):
        load_bundle(tmp_path / "absent")


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


@pytest.mark.parametrize("text, says", [
    ("{}", "missing field 'backbone'"),
    ('{"backbone": "small_cnn", "image_size": 41}', "missing field 'config'"),
    ('{"backbone": "small_cnn", "image_size": 41, "config": {"hiden": 32}}', "hiden"),
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_model_json_is_named_with_what_is_wrong(tmp_path, text, says):
    """The library and `fss predict` both name the file and the fault (was: `unexpected KeyError: 'backbone'`)."""
    spec = ModelSpec("small_cnn", 41, FSSModelConfig(hidden=32, ffn=64, heads=4, fg_prototypes=4, bg_prototypes=6))
    save_bundle(tmp_path / "m", FSSNetwork(build_backbone("small_cnn"), spec.config), spec)
    (tmp_path / "m" / SPEC_FILE).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'm' / SPEC_FILE}: ")) as err:
        load_bundle(tmp_path / "m")
    assert says in str(err.value)

    image, mask = tmp_path / "s.png", tmp_path / "m.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(mask)
    result = CliRunner().invoke(app, ["predict", "--bundle", str(tmp_path / "m"), "--support", f"{image}:{mask}",
                                      "--query", str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {tmp_path / 'm' / SPEC_FILE}: "), lines
    assert says in lines[-1]
