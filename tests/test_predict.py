"""Inference on custom images: input checks, output sizes, batching, saving, the FSS model adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fss_core.data.images import ImageReadError, load_label, load_mask, save_rgb
from fss_core.evaluation.protocol import EpisodeInput
from fss_core.inference.predict import PredictInputError, predict, save_masks
from fss_core.models.fss import FSSModelConfig, FSSNetwork

RED = (220, 40, 40)
IMAGE_SIZE = 48


pytestmark = pytest.mark.usefixtures("single_thread")


def scene(h: int, w: int, box: tuple[int, int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey noisy image with a red box (top, left, height, width), and the box's 0/1 mask."""
    rgb = np.random.default_rng(seed).integers(100, 150, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    top, left, bh, bw = box
    rgb[top:top + bh, left:left + bw] = RED
    mask[top:top + bh, left:left + bw] = 1
    return rgb, mask


class ColourPredictor:
    """Foreground where a query pixel is nearer the supports' mean foreground colour than their
    mean background colour; records the input shapes it was called with."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, episode: EpisodeInput) -> torch.Tensor:
        self.calls.append(tuple(episode.support_imgs.shape))
        images = episode.support_imgs.flatten(0, 1).permute(0, 2, 3, 1)
        masks = episode.support_masks.flatten(0, 1)
        fg, bg = images[masks == 1].mean(0), images[masks == 0].mean(0)
        query = episode.query_img.permute(0, 2, 3, 1)
        return torch.stack([-(query - bg).norm(dim=-1), -(query - fg).norm(dim=-1)], dim=1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_masks_have_each_querys_size_and_find_the_object():
    supports = [scene(30, 40, (5, 5, 12, 20)), scene(36, 24, (10, 4, 15, 15), seed=1)]
    queries = [scene(20, 50, (4, 30, 10, 12), seed=2), scene(64, 32, (30, 2, 20, 20), seed=3),
               scene(25, 25, (0, 0, 12, 12), seed=4)]
    masks = predict(ColourPredictor(), supports, [rgb for rgb, _ in queries], image_size=IMAGE_SIZE)
    assert len(masks) == 3
    for mask, (rgb, truth) in zip(masks, queries):
        assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert iou(mask == 1, truth == 1) > 0.8


def test_all_shots_in_one_pass_and_queries_batched():
    supports = [scene(30, 40, (5, 5, 12, 20), seed=s) for s in range(3)]
    queries = [scene(30, 30, (3, 3, 10, 10), seed=10 + i)[0] for i in range(5)]
    predictor = ColourPredictor()
    batched = predict(predictor, supports, queries, image_size=IMAGE_SIZE, batch_size=2)
    assert predictor.calls == [(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)] * 2 + [(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE)]
    one_by_one = predict(ColourPredictor(), supports, queries, image_size=IMAGE_SIZE, batch_size=1)
    assert all((a == b).all() for a, b in zip(batched, one_by_one))


def test_mask_encodings_and_files_are_equivalent(tmp_path):
    rgb, mask = scene(30, 40, (5, 5, 12, 20))
    query = scene(30, 30, (3, 3, 10, 10), seed=5)[0]
    save_rgb(tmp_path / "support.png", rgb)
    Image.fromarray(mask * 255).save(tmp_path / "mask255.png")
    expected = predict(ColourPredictor(), [(rgb, mask)], [query], image_size=IMAGE_SIZE)[0]
    for support in [(rgb, mask * 255), (rgb, mask.astype(bool)), (tmp_path / "support.png", tmp_path / "mask255.png")]:
        assert (predict(ColourPredictor(), [support], [query], image_size=IMAGE_SIZE)[0] == expected).all()


def test_mask_files_read_as_nonzero_in_every_lossless_encoding(tmp_path):
    """Whatever tool drew the mask, its nonzero pixels, and only those, are the foreground; fully
    transparent pixels are background even where their colour is not black."""
    rgb, mask = scene(30, 40, (5, 5, 12, 20))
    query = scene(30, 30, (3, 3, 10, 10), seed=5)[0]
    expected = predict(ColourPredictor(), [(rgb, mask)], [query], image_size=IMAGE_SIZE)[0]
    fg = mask.astype(bool)
    palette = Image.fromarray(mask * 3, mode="P")  # index 3 for the object, index 0 drawn white
    palette.putpalette([255, 255, 255] + [0, 0, 0] * 255)
    transparent_index = Image.fromarray(np.where(fg, 1, 2).astype(np.uint8), mode="P")
    transparent_index.putpalette([0, 0, 0, 255, 0, 0, 255, 255, 255] + [0, 0, 0] * 253)
    transparent_index.info["transparency"] = 2  # the background: white, but transparent
    white_on_clear = np.zeros((30, 40, 4), dtype=np.uint8)
    white_on_clear[..., :3] = 255  # colour everywhere, the object opaque, the rest clear
    white_on_clear[..., 3] = fg * 255
    dark_blue = np.zeros((30, 40, 3), dtype=np.uint8)
    dark_blue[fg] = (0, 0, 1)  # grey conversion would round this to 0
    files = {
        "bits.png": Image.fromarray(fg).convert("1"),
        "grey255.png": Image.fromarray(mask * 255),
        "grey16.png": Image.fromarray(mask.astype(np.uint16) * 65535),
        "palette.png": palette,
        "transparent_index.png": transparent_index,
        "white_on_clear.png": Image.fromarray(white_on_clear, mode="RGBA"),
        "dark_blue.bmp": Image.fromarray(dark_blue),
        "grey.tiff": Image.fromarray(mask * 7),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        np.testing.assert_array_equal(load_mask(tmp_path / name), mask, err_msg=name)
        got = predict(ColourPredictor(), [(rgb, tmp_path / name)], [query], image_size=IMAGE_SIZE)[0]
        assert (got == expected).all(), name


def test_a_jpeg_mask_is_refused_naming_the_file(tmp_path):
    """JPEG compression leaves faint nonzero values across the background: read as nonzero, the
    mask would grow stray foreground, so it is refused with the way out."""
    rgb, mask = scene(30, 40, (5, 5, 12, 20))
    Image.fromarray(mask * 255).save(tmp_path / "drawn.jpg", quality=75)
    noisy = np.asarray(Image.open(tmp_path / "drawn.jpg"))
    assert ((noisy != 0) & (mask == 0)).any()  # what reading it would have done
    with pytest.raises(PredictInputError, match=r"support 1 mask: .*drawn.jpg.*JPEG.*save the mask as PNG"):
        predict(ColourPredictor(), [(rgb, tmp_path / "drawn.jpg")], [rgb])
    with pytest.raises(ImageReadError, match=r"drawn.jpg.*a label cannot be a JPEG"):
        load_label(tmp_path / "drawn.jpg")


def test_missing_mask_file_is_named(tmp_path):
    rgb, _ = scene(30, 40, (5, 5, 12, 20))
    with pytest.raises(PredictInputError, match="support 1 mask: mask file not found: .*nope.png"):
        predict(ColourPredictor(), [(rgb, tmp_path / "nope.png")], [rgb])


def test_mask_of_the_wrong_size_reports_both_sizes_and_the_file(tmp_path):
    rgb, _ = scene(30, 40, (5, 5, 12, 20))
    good = scene(30, 40, (5, 5, 12, 20))
    Image.fromarray(np.full((20, 40), 255, dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(PredictInputError) as err:
        predict(ColourPredictor(), [good, (rgb, tmp_path / "small.png")], [rgb])
    message = str(err.value)
    assert "support 2" in message and "small.png" in message
    assert "40x20" in message and "40x30" in message


def test_empty_mask_is_refused():
    rgb, _ = scene(30, 40, (5, 5, 12, 20))
    with pytest.raises(PredictInputError, match="no foreground pixel"):
        predict(ColourPredictor(), [(rgb, np.zeros((30, 40), dtype=np.uint8))], [rgb])


def test_no_support_and_unreadable_images_are_refused(tmp_path):
    rgb, mask = scene(30, 40, (5, 5, 12, 20))
    with pytest.raises(PredictInputError, match="no support"):
        predict(ColourPredictor(), [], [rgb])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(PredictInputError, match="query 2: .*broken.jpg"):
        predict(ColourPredictor(), [(rgb, mask)], [rgb, tmp_path / "broken.jpg"])
    with pytest.raises(PredictInputError, match="support 1 image: file not found"):
        predict(ColourPredictor(), [(tmp_path / "absent.jpg", mask)], [rgb])


def test_save_masks_round_trip(tmp_path):
    masks = [scene(20, 30, (2, 2, 5, 5))[1], scene(16, 16, (0, 0, 8, 8))[1]]
    paths = save_masks(masks, ["a", "b"], tmp_path / "out")
    assert [p.name for p in paths] == ["a.png", "b.png"]
    for path, mask in zip(paths, masks):
        assert (load_label(path) == mask).all()
    with pytest.raises(PredictInputError, match="plain"):
        save_masks(masks[:1], ["../escape"], tmp_path)
    with pytest.raises(PredictInputError, match="2 masks but 1 names"):
        save_masks(masks, ["a"], tmp_path)


class TinyBackbone(nn.Module):
    """A random stride-8 backbone with the interface the FSS network expects."""

    channels = {"layer2": 8, "layer3": 8, "layer4": 8}
    strides = {"layer2": 8, "layer3": 8, "layer4": 8}

    def __init__(self):
        super().__init__()
        self.layer2 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def freeze(self):
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    def forward(self, x):
        layer2 = self.layer2(x)
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def test_fss_network_runs_through_predict_deterministically():
    torch.manual_seed(0)
    config = FSSModelConfig(hidden=16, heads=2, layers=1, ffn=32, points=2, fg_prototypes=2, bg_prototypes=3)
    model = FSSNetwork(TinyBackbone(), config)
    supports = [scene(30, 40, (5, 5, 12, 20), seed=s) for s in range(2)]
    queries = [scene(20, 50, (4, 30, 10, 12), seed=2)[0], scene(40, 24, (3, 3, 10, 10), seed=3)[0]]
    first = predict(model, supports, queries, image_size=IMAGE_SIZE, seed=7)
    again = predict(model, supports, queries, image_size=IMAGE_SIZE, seed=7)
    assert [m.shape for m in first] == [q.shape[:2] for q in queries]
    assert all((a == b).all() for a, b in zip(first, again))


def test_cli_refuses_queries_whose_masks_would_share_a_file_before_predicting(tmp_path, monkeypatch):
    """`fss predict` names each mask after its query's file name without the extension:
    a/x.jpg and b/x.png would overwrite each other, so the run stops at once, naming both."""
    from typer.testing import CliRunner

    import fss_core.inference.predict as library
    from fss_cli.main import app

    rgb, mask = scene(24, 24, (4, 4, 12, 12))
    save_rgb(tmp_path / "s.png", rgb)
    Image.fromarray(mask * 255).save(tmp_path / "m.png")
    for q in (tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png"):
        save_rgb(q, rgb)
    called = []
    monkeypatch.setattr(library, "predict", lambda *a, **k: called.append(1))
    result = CliRunner().invoke(app, ["predict", "--bundle", str(tmp_path / "no-bundle"),
                                      "--support", f"{tmp_path / 's.png'}:{tmp_path / 'm.png'}",
                                      "--query", str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.png"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and not called and not (tmp_path / "out").exists()
    assert str(tmp_path / "a" / "x.jpg") in result.output and str(tmp_path / "b" / "x.png") in result.output


def test_a_querys_mask_does_not_depend_on_the_other_queries_or_the_batch_size():
    """The prototype clustering draws random numbers: each query starts from the same draws,
    so segmenting q alone, with other queries, or in batches of any size gives the same mask."""
    torch.manual_seed(0)
    config = FSSModelConfig(hidden=16, heads=2, layers=1, ffn=32, points=2, fg_prototypes=2, bg_prototypes=3)
    model = FSSNetwork(TinyBackbone(), config)
    supports = [scene(30, 40, (5, 5, 12, 20), seed=s) for s in range(2)]
    queries = [scene(20 + 6 * s, 50 - 5 * s, (4, 8, 10, 12), seed=s)[0] for s in range(2, 6)]
    alone = [predict(model, supports, [q], image_size=IMAGE_SIZE)[0] for q in queries]
    for batch_size in (1, 2, 4):
        together = predict(model, supports, queries, image_size=IMAGE_SIZE, batch_size=batch_size)
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a, b)


def test_cli_takes_a_folder_of_queries_and_refuses_an_output_path_that_is_a_file(tmp_path):
    """`--query DIR` segments the images directly in DIR (not its hidden files, other files or
    sub-folders); an `--out` that is an existing file is refused before anything is read, and kept."""
    from typer.testing import CliRunner

    from fss_cli.main import app
    from fss_core.models.backbones import build_backbone
    from fss_core.models.fss.bundle import ModelSpec, save_bundle

    spec = ModelSpec("small_cnn", 41, FSSModelConfig(hidden=16, heads=2, layers=1, ffn=32, points=2,
                                                     fg_prototypes=2, bg_prototypes=3))
    save_bundle(tmp_path / "bundle", FSSNetwork(build_backbone("small_cnn"), spec.config), spec)
    rgb, mask = scene(24, 24, (4, 4, 12, 12))
    save_rgb(tmp_path / "s.png", rgb)
    Image.fromarray(mask * 255).save(tmp_path / "m.png")
    folder = tmp_path / "queries"
    for name, (h, w) in {"b.png": (20, 30), "a.jpg": (32, 16), ".hidden.png": (8, 8), "sub/c.png": (8, 8)}.items():
        save_rgb(folder / name, scene(h, w, (2, 2, 6, 6))[0])
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    def fss_predict(*queries, out):
        return CliRunner().invoke(app, ["predict", "--bundle", str(tmp_path / "bundle"), "--support",
                                        f"{tmp_path / 's.png'}:{tmp_path / 'm.png'}", "--query", *map(str, queries),
                                        "--out", str(out)])

    done = fss_predict(folder, out=tmp_path / "out")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert load_label(tmp_path / "out" / "a.png").shape == (32, 16)
    assert f"{folder / 'a.jpg'} -> " in done.output

    refused = fss_predict(tmp_path / "empty", out=tmp_path / "out2")
    assert refused.exit_code == 2 and "no image in it" in refused.output and not (tmp_path / "out2").exists()
    (tmp_path / "taken.png").write_bytes(b"keep me")
    refused = fss_predict(folder, out=tmp_path / "taken.png")
    assert refused.exit_code == 2 and "is a file" in refused.output
    assert (tmp_path / "taken.png").read_bytes() == b"keep me"
