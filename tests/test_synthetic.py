"""The synthetic VOC-layout dataset: layout, label semantics, determinism, and that it needs
more than colour to segment."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fss_core.data.images import load_label, load_rgb
from fss_core.data.synthetic import append_train_images, class_model, render_image, synthesize

CLASSES, IMAGES, SIZE, SEED = 8, 40, 64, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth") / "data", seed=SEED, classes=CLASSES,
                      images=IMAGES, size=SIZE)


def _pairs(root, split):
    lines = (root / "lists" / f"{split}.txt").read_text().splitlines()
    return [line.split() for line in lines]


def _load_split(root, split):
    return [(load_rgb(root / img), load_label(root / lab)) for img, lab in _pairs(root, split)]


def test_writes_voc_layout_with_pfenet_lists(dataset):
    root = dataset.root
    line = re.compile(r"^JPEGImages/(synth_\d{6})\.jpg SegmentationClassAug/(synth_\d{6})\.png$")
    listed = {}
    for split in ("train", "val"):
        for raw in (root / "lists" / f"{split}.txt").read_text().splitlines():
            m = line.match(raw)
            assert m and m.group(1) == m.group(2), raw
            assert m.group(1) not in listed, f"{m.group(1)} listed twice"
            listed[m.group(1)] = split
    on_disk = {p.stem for p in (root / "JPEGImages").glob("*.jpg")}
    assert set(listed) == on_disk == {p.stem for p in (root / "SegmentationClassAug").glob("*.png")}
    assert len(on_disk) == IMAGES
    assert set(dataset.train_ids) == {k for k, v in listed.items() if v == "train"}
    assert set(dataset.val_ids) == {k for k, v in listed.items() if v == "val"}
    assert 0.15 <= len(dataset.val_ids) / IMAGES <= 0.35  # val_fraction 0.25 up to per-class rounding

    some = sorted(on_disk)[0]
    with Image.open(root / "JPEGImages" / f"{some}.jpg") as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")
    with Image.open(root / "SegmentationClassAug" / f"{some}.png") as im:
        assert (im.format, im.mode) == ("PNG", "P")

    classes = json.loads((root / "classes.json").read_text())
    assert set(classes) == {str(k) for k in range(1, CLASSES + 1)}
    assert {int(k): v["name"] for k, v in classes.items()} == dataset.class_names
    for entry in classes.values():
        assert {"shape", "colour", "texture"} <= set(entry)


def test_images_and_labels_agree_in_size_and_some_are_not_square(dataset):
    shapes = []
    for split in ("train", "val"):
        for rgb, label in _load_split(dataset.root, split):
            assert rgb.shape[:2] == label.shape
            assert max(label.shape) == SIZE and min(label.shape) >= 0.75 * SIZE - 1
            shapes.append(label.shape)
    assert any(h != w for h, w in shapes), "non-square images are part of the test data"
    assert any(h == w for h, w in shapes)


def test_labels_hold_only_background_classes_and_ignore(dataset):
    allowed = set(range(CLASSES + 1)) | {255}
    for split in ("train", "val"):
        for _, label in _load_split(dataset.root, split):
            assert set(np.unique(label).tolist()) <= allowed


def test_ignore_is_a_thin_band_along_object_outlines(dataset):
    for split in ("train", "val"):
        for _, label in _load_split(dataset.root, split):
            ignore = label == 255
            assert ignore.any()
            # Two different real labels never touch: the band separates object from background
            # and from other classes everywhere.
            for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
                touching = (a != b) & (a != 255) & (b != 255)
                assert not touching.any()
            # Thin (2 px, wider only where outlines run close together): no 6x6 patch is all ignore.
            assert not ndimage.binary_erosion(ignore, structure=np.ones((6, 6))).any()
            # Along objects: every piece of the band touches an object pixel.
            obj = (label > 0) & (label < 255)
            pieces, n = ndimage.label(ignore, structure=np.ones((3, 3)))
            near_obj = ndimage.binary_dilation(obj, structure=np.ones((3, 3)))
            assert set(np.unique(pieces[near_obj & ignore])) - {0} == set(range(1, n + 1))


def test_every_image_has_an_object_of_at_least_five_percent(dataset):
    for split in ("train", "val"):
        for _, label in _load_split(dataset.root, split):
            per_class = np.bincount(label.ravel(), minlength=256)[1:CLASSES + 1]
            assert per_class.max() >= 0.05 * label.size


def test_every_class_appears_in_train_and_in_val(dataset):
    for split in ("train", "val"):
        seen = set()
        for _, label in _load_split(dataset.root, split):
            seen |= set(np.unique(label).tolist())
        assert seen - {0, 255} == set(range(1, CLASSES + 1)), split


def test_same_seed_gives_identical_files_and_other_seed_other_images(dataset, tmp_path):
    again = synthesize(tmp_path / "again", seed=SEED, classes=CLASSES, images=IMAGES, size=SIZE)
    files = sorted(p.relative_to(dataset.root) for p in dataset.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel

    other = synthesize(tmp_path / "other", seed=SEED + 1, classes=CLASSES, images=IMAGES, size=SIZE)
    same = sum((dataset.root / "JPEGImages" / f"{x}.jpg").read_bytes()
               == (other.root / "JPEGImages" / f"{x}.jpg").read_bytes() for x in dataset.train_ids)
    assert same == 0


def test_an_image_can_be_drawn_on_its_own(dataset):
    index = 17
    rgb, label = render_image(index, SEED, class_model(CLASSES), SIZE)
    img_rel, lab_rel = next(p for p in _pairs(dataset.root, "train") + _pairs(dataset.root, "val")
                            if p[0].endswith(f"synth_{index:06d}.jpg"))
    assert np.array_equal(label, load_label(dataset.root / lab_rel))
    # JPEG is lossy: the stored image matches up to compression error.
    assert np.abs(rgb.astype(int) - load_rgb(dataset.root / img_rel)).mean() < 6


def test_appended_images_are_listed_as_train_after_the_existing_ones(tmp_path):
    root = synthesize(tmp_path / "data", seed=SEED, classes=CLASSES, images=2 * CLASSES, size=SIZE).root
    before, val_before = _pairs(root, "train"), _pairs(root, "val")
    ids = append_train_images(root, 3, CLASSES, SIZE)
    after = _pairs(root, "train")
    assert ids == ["new_0000", "new_0001", "new_0002"]
    assert after[:len(before)] == before
    assert after[len(before):] == [[f"JPEGImages/{x}.jpg", f"SegmentationClassAug/{x}.png"] for x in ids]
    _, label = render_image(10_001, 99, class_model(CLASSES), SIZE, (1, 2))
    assert np.array_equal(load_label(root / after[-2][1]), label)
    assert _pairs(root, "val") == val_before


def test_class_k_is_the_same_whatever_the_class_count():
    assert class_model(5) == class_model(20)[:5]


def test_colour_alone_does_not_segment_the_classes(dataset):
    """A per-pixel nearest class-mean RGB classifier, fit on train object pixels, labels fewer
    than 60 % of val object pixels correctly: classes must be told apart by shape/texture."""
    def object_pixels(split):
        pairs = _load_split(dataset.root, split)
        keep = [(lab > 0) & (lab < 255) for _, lab in pairs]
        return (np.concatenate([rgb[k] for (rgb, _), k in zip(pairs, keep)]).astype(float),
                np.concatenate([lab[k] for (_, lab), k in zip(pairs, keep)]))

    x_train, y_train = object_pixels("train")
    x_val, y_val = object_pixels("val")
    ids = np.arange(1, CLASSES + 1)
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in ids])
    predicted = ids[np.argmin(((x_val[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(predicted == y_val) < 0.6


@pytest.mark.parametrize("kwargs, field", [
    ({"classes": 0}, "classes"),
    ({"classes": 255}, "classes"),
    ({"classes": 20, "images": 39}, "images"),
    ({"size": 16}, "size"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"objects": (2, 1)}, "objects"),
    ({"objects": (0, 3)}, "objects"),
    ({"seed": -1}, "seed"),
    ({"size": 64.0}, "size"),
])
def test_rejects_bad_arguments_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        synthesize(tmp_path, **{"classes": 4, "images": 8, **kwargs})
    assert not any(tmp_path.iterdir()), "nothing is written for bad arguments"
