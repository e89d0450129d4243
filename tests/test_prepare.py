"""Fold definitions and data preparation: SBD/VOC merge, COCO json → masks, split/fold/fraction lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fss_core.data.folds import (
    COCO_CLASS_NAMES,
    NUM_FOLDS,
    PASCAL_CLASS_NAMES,
    class_names,
    fold_split,
    scheme_for,
)
from fss_core.data.prepare import PrepareError, prepare_coco, prepare_fraction_lists, prepare_lists, prepare_sbd

# --------------------------------------------------------------------------- fold definitions


def test_pascal_fold_2_tests_classes_11_to_15():
    split = fold_split("pascal", 2)
    assert split.novel == (11, 12, 13, 14, 15)
    assert split.base == tuple(c for c in range(1, 21) if not 11 <= c <= 15)


def test_coco_interleaved_and_consecutive_folds():
    assert fold_split("coco", 0).novel == tuple(range(1, 80, 4))
    assert fold_split("coco", 3).novel == tuple(range(4, 81, 4))
    assert fold_split("coco_consecutive", 1).novel == tuple(range(21, 41))


@pytest.mark.parametrize(("scheme", "n"), [("pascal", 20), ("coco", 80), ("coco_consecutive", 80), ("generic", 12)])
def test_folds_partition_the_classes(scheme, n):
    splits = [fold_split(scheme, f, num_classes=n) for f in range(NUM_FOLDS)]
    novel = [set(s.novel) for s in splits]
    assert all(len(s) == n // NUM_FOLDS for s in novel)
    assert set().union(*novel) == set(range(1, n + 1))  # covering; equal sizes summing to n ⇒ disjoint
    for s in splits:
        assert set(s.base) == set(range(1, n + 1)) - set(s.novel)


def test_invalid_folds_and_class_counts_are_rejected():
    with pytest.raises(ValueError, match="0..3"):
        fold_split("pascal", 4)
    with pytest.raises(ValueError, match="num_classes"):
        fold_split("generic", 0, num_classes=10)
    with pytest.raises(ValueError, match="scheme"):
        fold_split("ade", 0)


def test_class_name_tables():
    assert len(set(PASCAL_CLASS_NAMES)) == 20 and len(set(COCO_CLASS_NAMES)) == 80
    assert class_names("pascal")[15] == "person" and class_names("pascal")[20] == "tvmonitor"
    assert class_names("coco")[1] == "person" and class_names("coco")[80] == "toothbrush"
    assert class_names("generic", 4) == {1: "class_1", 2: "class_2", 3: "class_3", 4: "class_4"}
    assert [scheme_for(n) for n in ("PASCAL", "pascal-5i", "coco", "COCO2014", "coco_consecutive", "shapes")] == [
        "pascal", "pascal", "coco", "coco", "coco_consecutive", "generic"
    ]  # fmt: skip


# --------------------------------------------------------------------------- SBD + VOC


def save_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """An SBD class file as the benchmark ships it: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(seg[seg > 0]).astype(np.uint8)
    gtcls = {"Segmentation": seg.astype(np.uint8), "Boundaries": np.empty((20, 1), dtype=object), "CategoriesPresent": present}
    gtcls["Boundaries"][:] = [[np.zeros((1, 1))] for _ in range(20)]
    scipy.io.savemat(path, {"GTcls": gtcls})


def save_voc_png(path: Path, label: np.ndarray) -> None:
    """A VOC SegmentationClass PNG: palette image of class indices (any palette will do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)])
    im.save(path)


def read_png_indices(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im)


def test_sbd_and_voc_merge_with_voc_precedence(tmp_path):
    rng = np.random.default_rng(0)
    sbd_root = tmp_path / "benchmark_RELEASE" / "dataset"  # the archive's nesting
    voc_root = tmp_path / "VOC2012"
    sbd = {s: rng.integers(0, 21, size=(7, 9)) for s in ("2008_a", "2008_b", "2009_c")}
    voc = {s: rng.integers(0, 21, size=(7, 9)) for s in ("2008_b", "2007_d")}
    for v in voc.values():
        v[0, :] = 255  # the VOC boundary band
    for stem, seg in sbd.items():
        save_sbd_mat(sbd_root / "cls" / f"{stem}.mat", seg)
    for stem, label in voc.items():
        save_voc_png(voc_root / "SegmentationClass" / f"{stem}.png", label)

    report = prepare_sbd(tmp_path, voc_root)

    out = voc_root / "SegmentationClassAug"
    assert report.output == out
    assert report.counts == {"written": 4, "from_sbd": 2, "from_voc": 1, "both": 1}
    assert sorted(p.name for p in out.iterdir()) == ["2007_d.png", "2008_a.png", "2008_b.png", "2009_c.png"]
    expected = {**sbd, **voc}  # VOC wins where both exist
    for stem, label in expected.items():
        np.testing.assert_array_equal(read_png_indices(out / f"{stem}.png"), label)


def test_bad_sbd_file_is_named(tmp_path):
    voc_root = tmp_path / "VOC2012"
    save_voc_png(voc_root / "SegmentationClass" / "x.png", np.zeros((4, 4)))
    (tmp_path / "sbd" / "cls").mkdir(parents=True)
    scipy.io.savemat(tmp_path / "sbd" / "cls" / "wrong.mat", {"something": np.zeros((3, 3))})
    with pytest.raises(PrepareError, match="wrong.mat"):
        prepare_sbd(tmp_path / "sbd", voc_root, tmp_path / "out")
    (tmp_path / "sbd" / "cls" / "wrong.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(PrepareError, match="wrong.mat"):
        prepare_sbd(tmp_path / "sbd", voc_root, tmp_path / "out")


def v73_mat_bytes() -> bytes:
    """The 128-byte header of a MATLAB v7.3 (HDF5) file, which scipy cannot read, then filler."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM" + b"\x89HDF\r\n\x1a\n" + b"\0" * 384


@pytest.mark.parametrize("content", [b"", b"garbage", v73_mat_bytes()], ids=["empty", "truncated", "v7.3"])
def test_unreadable_sbd_mat_is_named(tmp_path, content):
    voc_root = tmp_path / "VOC2012"
    save_voc_png(voc_root / "SegmentationClass" / "x.png", np.zeros((4, 4)))
    save_sbd_mat(tmp_path / "sbd" / "cls" / "good.mat", np.ones((4, 4)))
    (tmp_path / "sbd" / "cls" / "2008_000123.mat").write_bytes(content)
    with pytest.raises(PrepareError, match="2008_000123.mat"):
        prepare_sbd(tmp_path / "sbd", voc_root, tmp_path / "out")


def test_rgb_voc_label_is_rejected(tmp_path):
    save_sbd_mat(tmp_path / "sbd" / "cls" / "a.mat", np.ones((4, 4)))
    rgb = tmp_path / "VOC2012" / "SegmentationClass" / "b.png"
    rgb.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), (128, 0, 0), dtype=np.uint8)).save(rgb)
    with pytest.raises(PrepareError, match="b.png"):
        prepare_sbd(tmp_path / "sbd", tmp_path / "VOC2012", tmp_path / "out")


# --------------------------------------------------------------------------- COCO json → masks


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the box covering pixel columns x0..x1-1 and rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs starting with zeros), computed by hand."""
    flat, counts, value, run = mask.T.ravel(), [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def write_coco(root: Path, split: str) -> dict[str, np.ndarray]:
    """A tiny instances json (non-contiguous category ids) and the masks it must produce."""
    h, w = 8, 10
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[5:8, 0:3] = 1
    name = lambda i: f"COCO_{split}2014_{i:012d}.jpg"  # noqa: E731
    data = {
        "images": [{"id": i, "file_name": name(i), "height": h, "width": w} for i in (7, 3, 12)],
        "categories": [{"id": 90, "name": "ninety"}, {"id": 1, "name": "one"}, {"id": 5, "name": "five"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": [rect(1, 1, 6, 5)]},
            {"id": 2, "image_id": 7, "category_id": 90, "iscrowd": 0, "segmentation": [rect(4, 3, 9, 7)]},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1,
             "segmentation": {"counts": column_major_runs(crowd), "size": [h, w]}},
            {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": [rect(8, 0, 10, 2), rect(0, 6, 1, 8), [3, 3, 4, 4]]},
            {"id": 5, "image_id": 12, "category_id": 1, "iscrowd": 1,
             "segmentation": {"counts": column_major_runs(crowd), "size": [h, w]}},
        ],
    }  # fmt: skip
    for ann in data["annotations"]:
        ann.update(area=1.0, bbox=[0, 0, 1, 1])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))

    # sorted category ids 1, 5, 90 → classes 1, 2, 3; later instances overwrite earlier ones
    expected = np.zeros((h, w), dtype=np.uint8)
    expected[1:5, 1:6] = 2
    expected[3:7, 4:9] = 3
    expected[0:2, 8:10] = 1
    expected[6:8, 0:1] = 1
    zeros = np.zeros((h, w), dtype=np.uint8)
    return {"000000000007": expected, "000000000003": zeros, "000000000012": zeros}


def test_coco_json_becomes_semantic_masks(tmp_path):
    """Image 3 has no annotation and gets no mask; image 12 (crowd only) gets an all-0 one."""
    expected = write_coco(tmp_path, "val")
    del expected["000000000003"]
    report = prepare_coco(tmp_path, "val")
    out = tmp_path / "annotations" / "val2014"
    assert report.counts["written"] == 2 and report.counts["empty"] == 1 and report.counts["no_annotations"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"COCO_val2014_{i}.png" for i in expected)
    for i, mask in expected.items():
        np.testing.assert_array_equal(read_png_indices(out / f"COCO_val2014_{i}.png"), mask)


def test_coco_keeps_existing_masks_unless_overwrite(tmp_path):
    expected = write_coco(tmp_path, "train")
    prepare_coco(tmp_path, "train")
    target = tmp_path / "annotations" / "train2014" / "COCO_train2014_000000000007.png"
    save_voc_png(target, np.zeros((8, 10)))
    assert prepare_coco(tmp_path, "train").counts["skipped_existing"] == 2
    assert not read_png_indices(target).any()
    prepare_coco(tmp_path, "train", overwrite=True)
    np.testing.assert_array_equal(read_png_indices(target), expected["000000000007"])


def test_coco_missing_json_is_named(tmp_path):
    with pytest.raises(PrepareError, match="instances_val2014.json"):
        prepare_coco(tmp_path, "val")


def test_coco_mask_of_an_unannotated_image_left_by_an_earlier_run_is_removed(tmp_path):
    write_coco(tmp_path, "val")
    stale = tmp_path / "annotations" / "val2014" / "COCO_val2014_000000000003.png"
    save_voc_png(stale, np.zeros((8, 10)))
    report = prepare_coco(tmp_path, "val")
    assert not stale.exists() and report.counts["stale_removed"] == 1


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ([0, 0, 10, 0, 10, 10], "flat polygon"),
        (None, "no segmentation"),
        ({"size": [5, 5], "counts": [0, 25]}, "RLE of another size"),
        ("not a polygon", "a string"),
    ],
)
def test_malformed_coco_annotation_names_file_annotation_and_image(tmp_path, segmentation, problem):
    ann = {"id": 41, "image_id": 17, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]}
    if segmentation is not None:
        ann["segmentation"] = segmentation
    data = {"images": [{"id": 17, "file_name": "COCO_val2014_000000000017.jpg", "height": 10, "width": 12}],
            "annotations": [ann], "categories": [{"id": 1, "name": "one"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(PrepareError, match=r"instances_val2014\.json.*annotation 41.*image 17"):
        prepare_coco(tmp_path, "val")


def make_coco_dataset(root: Path) -> None:
    """COCO layout: images 7, 3, 12 per split (3 has no annotation, 12 only a crowd one), masks prepared."""
    for split in ("train", "val"):
        write_coco(root, split)
        for i in (7, 3, 12):
            (root / f"{split}2014").mkdir(exist_ok=True)
            (root / f"{split}2014" / f"COCO_{split}2014_{i:012d}.jpg").write_bytes(b"")
        prepare_coco(root, split)


def test_coco_lists_hold_only_annotated_images(tmp_path):
    """Like the standard COCO-20i lists: images with an annotation, crowd-only ones included."""
    root = tmp_path / "coco"
    make_coco_dataset(root)
    prepare_lists(root, "auto", tmp_path / "out", "coco", seed=0, min_area=1, fractions=(0.5, 1.0))
    for split in ("train", "val"):
        assert list_ids(tmp_path / "out" / f"{split}.txt") == [
            f"COCO_{split}2014_000000000007", f"COCO_{split}2014_000000000012"]
    assert len(list_ids(tmp_path / "out" / "train_100.txt")) == 2
    prepare_fraction_lists(root, "auto", tmp_path / "frac", "coco", seed=0, fractions=(1.0,))
    assert len(list_ids(tmp_path / "frac" / "train_100.txt")) == 2


def test_coco_lists_before_the_masks_are_made_are_a_clear_error(tmp_path):
    root = tmp_path / "coco"
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir(parents=True)
        (root / f"{split}2014" / f"COCO_{split}2014_000000000001.jpg").write_bytes(b"")
    with pytest.raises(PrepareError, match="prepare coco"):
        prepare_lists(root, "auto", tmp_path / "out", "coco", seed=0)


# --------------------------------------------------------------------------- split / fold / fraction lists

SIDE = 16  # labels are 16×16 = 256 px; MIN_AREA below makes a class count from 40 px on
MIN_AREA = 40


def make_labeled_voc(root: Path, n: int, num_classes: int, seed: int) -> dict[str, dict[int, int]]:
    """A VOC-layout dataset whose labels paint random classes in horizontal bands of known area."""
    rng = np.random.default_rng(seed)
    areas = {}
    for i in range(n):
        stem = f"img_{i:03d}"
        label = np.zeros((SIDE, SIDE), dtype=np.uint8)
        label[-1, :] = 255
        row, area = 0, {}
        for c in rng.choice(np.arange(1, num_classes + 1), size=rng.integers(1, 4), replace=False):
            rows = int(rng.integers(1, 5))  # 16..64 px: some below MIN_AREA, some above
            label[row : row + rows] = c
            area[int(c)] = rows * SIDE
            row += rows
        areas[stem] = area
        save_voc_png(root / "SegmentationClassAug" / f"{stem}.png", label)
        (root / "JPEGImages").mkdir(exist_ok=True)
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(b"")
    return areas


def list_ids(path: Path) -> list[str]:
    return [Path(line.split(" ")[0]).stem for line in path.read_text().splitlines()]


def test_lists_follow_fold_and_area_rules(tmp_path):
    root, out = tmp_path / "data", tmp_path / "lists_out"
    areas = make_labeled_voc(root, 60, num_classes=8, seed=1)
    report = prepare_lists(root, "auto", out, "generic", seed=3, min_area=MIN_AREA, num_classes=8)

    train, val = list_ids(out / "train.txt"), list_ids(out / "val.txt")
    assert sorted(train + val) == sorted(areas) and not set(train) & set(val)  # seeded split
    assert train == sorted(train) and report.counts["val"] == 12  # 20 % held out
    big = {stem: {c for c, a in area.items() if a >= MIN_AREA} for stem, area in areas.items()}
    for fold in range(NUM_FOLDS):
        novel = {2 * fold + 1, 2 * fold + 2}  # 8 classes in 4 consecutive folds
        base = set(range(1, 9)) - novel
        assert list_ids(out / f"fold{fold}" / "train.txt") == [s for s in train if big[s] & base]
        assert list_ids(out / f"fold{fold}" / "val.txt") == [s for s in val if big[s] & novel]
        classes_val = json.loads((out / f"fold{fold}" / "classes_val.json").read_text())
        assert classes_val == {str(c): [s for s in val if c in big[s]] for c in sorted(novel)}
        classes_train = json.loads((out / f"fold{fold}" / "classes_train.json").read_text())
        assert classes_train == {str(c): [s for s in train if c in big[s]] for c in sorted(base)}
    first = (out / "train.txt").read_text().splitlines()[0].split(" ")
    assert (root / first[0]).is_file() and (root / first[1]).is_file()  # paths relative to the root


def test_fraction_lists_are_nested_and_reproducible_per_seed(tmp_path):
    root = tmp_path / "data"
    make_labeled_voc(root, 50, num_classes=4, seed=2)
    kwargs = dict(layout="voc", scheme="generic", min_area=MIN_AREA, num_classes=4, fractions=(0.1, 0.2, 0.5))
    prepare_lists(root, out_dir=tmp_path / "a", seed=7, **kwargs)
    prepare_lists(root, out_dir=tmp_path / "b", seed=7, **kwargs)
    prepare_lists(root, out_dir=tmp_path / "c", seed=8, **kwargs)

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 3 + 4 * 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    train = set(list_ids(tmp_path / "a" / "train.txt"))
    subsets = [set(list_ids(tmp_path / "a" / f"train_{pct}.txt")) for pct in (10, 20, 50)]
    assert [len(s) for s in subsets] == [len(train) // 10, len(train) // 5, len(train) // 2]
    assert subsets[0] <= subsets[1] <= subsets[2] <= train
    assert list_ids(tmp_path / "a" / "train_50.txt") != list_ids(tmp_path / "c" / "train_50.txt")


def test_fraction_lists_alone_equal_those_of_prepare_lists_one_at_a_time(tmp_path):
    root = tmp_path / "data"
    make_labeled_voc(root, 50, num_classes=4, seed=2)
    prepare_lists(root, "voc", tmp_path / "all", "generic", seed=7, min_area=MIN_AREA, num_classes=4,
                  fractions=(0.05, 0.1, 0.2))
    for fraction in (0.2, 0.05):
        report = prepare_fraction_lists(root, "voc", tmp_path / "one", "generic", seed=7, fractions=(fraction,))
        assert list(report.counts) == [f"train_{round(fraction * 100):d}"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["train_20.txt", "train_5.txt"]
    for name in ("train_5.txt", "train_20.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()
    with pytest.raises(ValueError, match="fractions"):
        prepare_fraction_lists(root, "voc", tmp_path / "x", "generic", seed=7, fractions=(0.0,))


def test_existing_split_lists_are_kept(tmp_path):
    root = tmp_path / "data"
    make_labeled_voc(root, 10, num_classes=4, seed=4)
    (root / "lists").mkdir()
    stems = [f"img_{i:03d}" for i in range(10)]
    for split, chosen in (("train", stems[3:]), ("val", stems[:3])):
        lines = "".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in chosen)
        (root / "lists" / f"{split}.txt").write_text(lines)
    out = tmp_path / "out"
    prepare_lists(root, "voc", out, "generic", seed=0, min_area=MIN_AREA, num_classes=4)
    assert (out / "val.txt").read_text() == (root / "lists" / "val.txt").read_text()
    assert list_ids(out / "train.txt") == stems[3:]


def test_unlabeled_folder_cannot_get_fold_lists(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="labeled"):
        prepare_lists(tmp_path, "auto", tmp_path / "out", "pascal", seed=0)


def test_lists_scheme_defaults_from_the_layout(tmp_path):
    """``fss prepare lists`` on a COCO root uses the COCO-20i folds without ``--scheme``."""
    from typer.testing import CliRunner

    from fss_cli.main import app

    root = tmp_path / "coco"
    make_coco_dataset(root)
    result = CliRunner().invoke(app, ["prepare", "lists", "--root", str(root), "--out", str(tmp_path / "out"),
                                      "--min-area", "1"])
    assert result.exit_code == 0, result.output
    classes = json.loads((tmp_path / "out" / "fold0" / "classes_val.json").read_text())
    assert [int(c) for c in classes] == list(fold_split("coco", 0).novel)


def test_label_ids_above_the_schemes_classes_are_an_error(tmp_path):
    root = tmp_path / "data"
    make_labeled_voc(root, 10, num_classes=6, seed=5)
    with pytest.raises(PrepareError, match=r"img_\d{3}\.png.*exceed.*generic.*4 classes"):
        prepare_lists(root, "voc", tmp_path / "out", "generic", seed=0, num_classes=4)
    assert not (tmp_path / "out").exists()  # nothing written
