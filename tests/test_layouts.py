"""Dataset readers: plain folders, PFENet split lists, VOC and COCO layouts, and the shipped PASCAL lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from fss_core.data.layouts import (
    DatasetLayoutError,
    ImageRecord,
    detect_layout,
    read_coco,
    read_dataset,
    read_folder,
    read_list,
    read_voc,
    shipped_list,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_voc(root: Path, stems: list[str], labeled: list[str]) -> None:
    for stem in stems:
        touch(root / "JPEGImages" / f"{stem}.jpg")
    for stem in labeled:
        touch(root / "SegmentationClassAug" / f"{stem}.png")


def test_folder_is_recursive_filters_suffixes_and_skips_hidden(tmp_path):
    for rel in ["b.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.WebP", "e.bmp",
                "notes.txt", "f.gif", ".hidden.jpg", ".cache/g.jpg", "sub/.x/h.png"]:  # fmt: skip
        touch(tmp_path / rel)
    records = read_folder(tmp_path)
    assert [r.image_id for r in records] == ["a", "b", "e", "sub/c", "sub/deeper/d"]
    assert all(r.label_path is None and r.split is None for r in records)
    assert {r.image_path for r in records} == {
        tmp_path / p for p in ["a.png", "b.JPG", "e.bmp", "sub/c.jpeg", "sub/deeper/d.WebP"]
    }
    assert read_folder(tmp_path) == records  # stable across calls


def test_folder_rejects_two_images_with_the_same_id(tmp_path):
    touch(tmp_path / "x" / "cat.jpg")
    touch(tmp_path / "x" / "cat.png")
    with pytest.raises(DatasetLayoutError, match="cat"):
        read_folder(tmp_path)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_folder(tmp_path / "nope")


def test_voc_reads_its_own_split_lists(tmp_path):
    make_voc(tmp_path, ["2007_01", "2007_02", "2008_03"], ["2007_01", "2007_02", "2008_03"])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "val.txt").write_text(
        "JPEGImages/2008_03.jpg SegmentationClassAug/2008_03.png\n\n"
        "JPEGImages/2007_01.jpg SegmentationClassAug/2007_01.png\n   \n"
    )
    records = read_voc(tmp_path, "val")
    assert records == [
        ImageRecord("2007_01", tmp_path / "JPEGImages/2007_01.jpg", tmp_path / "SegmentationClassAug/2007_01.png", "val"),
        ImageRecord("2008_03", tmp_path / "JPEGImages/2008_03.jpg", tmp_path / "SegmentationClassAug/2008_03.png", "val"),
    ]


def test_voc_without_split_pairs_every_image_with_its_label(tmp_path):
    make_voc(tmp_path, ["a", "b", "c"], ["a", "c"])
    records = read_voc(tmp_path, None)
    assert [(r.image_id, r.label_path) for r in records] == [
        ("a", tmp_path / "SegmentationClassAug/a.png"),
        ("b", None),
        ("c", tmp_path / "SegmentationClassAug/c.png"),
    ]


def test_voc_falls_back_to_the_shipped_pascal_lists(tmp_path):
    lines = shipped_list("pascal", "val").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()]
    for image_rel, label_rel in pairs:
        touch(tmp_path / image_rel)
        touch(tmp_path / label_rel)
    records = read_voc(tmp_path, "val")
    assert [r.image_id for r in records] == sorted(Path(image).stem for image, _ in pairs)
    assert all(r.split == "val" for r in records)


def test_malformed_list_line_names_file_and_line(tmp_path):
    make_voc(tmp_path, ["a"], ["a"])
    bad = tmp_path / "bad.txt"
    bad.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n\nJPEGImages/a.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"bad\.txt:3"):
        read_list(tmp_path, bad)


def test_missing_file_in_list_names_list_line_and_path(tmp_path):
    make_voc(tmp_path, ["a", "b"], ["a"])
    lst = tmp_path / "lists" / "train.txt"
    touch(lst).write_text(
        "JPEGImages/a.jpg SegmentationClassAug/a.png\nJPEGImages/b.jpg SegmentationClassAug/b.png\n"
    )
    with pytest.raises(DatasetLayoutError) as info:
        read_voc(tmp_path, "train")
    message = str(info.value)
    assert "train.txt:2" in message and "SegmentationClassAug/b.png" in message


def test_duplicate_image_in_list_is_rejected(tmp_path):
    make_voc(tmp_path, ["a"], ["a"])
    lst = touch(tmp_path / "dup.txt")
    lst.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n" * 2)
    with pytest.raises(DatasetLayoutError, match=r"dup\.txt:2"):
        read_list(tmp_path, lst)


def test_coco_pairs_images_with_labels_by_stem(tmp_path):
    for split in ("train", "val"):
        for i in (1, 2):
            touch(tmp_path / f"{split}2014" / f"COCO_{split}2014_{i:012d}.jpg")
    touch(tmp_path / "annotations" / "train2014" / f"COCO_train2014_{1:012d}.png")
    train = read_coco(tmp_path, "train")
    assert [(r.image_id, r.label_path is not None, r.split) for r in train] == [
        ("COCO_train2014_000000000001", True, "train"),
        ("COCO_train2014_000000000002", False, "train"),
    ]
    assert len(read_coco(tmp_path, "val")) == 2
    assert [r.split for r in read_coco(tmp_path, None)] == ["train", "train", "val", "val"]
    with pytest.raises(ValueError, match="train"):
        read_coco(tmp_path, "test")


def test_coco_prefers_its_lists(tmp_path):
    for i in (1, 2):
        touch(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        touch(tmp_path / "annotations" / "val2014" / f"COCO_val2014_{i:012d}.png")
    touch(tmp_path / "lists" / "val.txt").write_text(
        "val2014/COCO_val2014_000000000002.jpg annotations/val2014/COCO_val2014_000000000002.png\n"
    )
    assert [r.image_id for r in read_coco(tmp_path, "val")] == ["COCO_val2014_000000000002"]


def test_detect_layout_and_read_dataset(tmp_path):
    voc, coco, folder = tmp_path / "voc", tmp_path / "coco", tmp_path / "plain"
    make_voc(voc, ["a"], ["a"])
    touch(coco / "val2014" / "COCO_val2014_000000000001.jpg")
    touch(folder / "x.jpg")
    assert [detect_layout(p) for p in (voc, coco, folder)] == ["voc", "coco", "folder"]
    assert [r.image_id for r in read_dataset(voc)] == ["a"]
    assert [r.split for r in read_dataset(coco, split="val")] == ["val"]
    assert [r.image_id for r in read_dataset(folder)] == ["x"]
    with pytest.raises(ValueError, match="no splits"):
        read_dataset(folder, split="train")
    with pytest.raises(ValueError, match="layout"):
        read_dataset(folder, layout="ade20k")


def read_pairs(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()]


def test_shipped_pascal_lists_have_the_standard_sizes_and_do_not_overlap():
    train = read_pairs(shipped_list("pascal", "train"))
    val = read_pairs(shipped_list("pascal", "val"))
    assert (len(train), len(val)) == (5953, 1449)
    for image, label in train + val:
        assert image.startswith("JPEGImages/") and image.endswith(".jpg")
        assert label == f"SegmentationClassAug/{Path(image).stem}.png"
    train_ids, val_ids = {Path(i).stem for i, _ in train}, {Path(i).stem for i, _ in val}
    assert len(train_ids) == 5953 and len(val_ids) == 1449
    assert not train_ids & val_ids


def test_voc_without_split_takes_each_images_split_from_the_lists(tmp_path):
    from fss_core.data.images import save_label, save_rgb
    from fss_core.data.layouts import read_voc

    import numpy as np

    for i in range(3):
        save_rgb(tmp_path / "JPEGImages" / f"im{i}.jpg", np.zeros((8, 8, 3), np.uint8))
        save_label(tmp_path / "SegmentationClassAug" / f"im{i}.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("JPEGImages/im0.jpg SegmentationClassAug/im0.png\n")
    (tmp_path / "lists" / "val.txt").write_text("JPEGImages/im1.jpg SegmentationClassAug/im1.png\n")
    splits = {r.image_id: r.split for r in read_voc(tmp_path, None)}
    assert splits == {"im0": "train", "im1": "val", "im2": None}


def shipped_stems(split: str, n: int) -> list[str]:
    return [Path(image).stem for image, _ in read_pairs(shipped_list("pascal", split))[:n]]


def test_voc_without_lists_takes_each_images_split_from_the_shipped_lists(tmp_path, caplog):
    """The same lists ``read_voc(root, "val")`` falls back to: a shipped val image is never unsplit."""
    train, val = shipped_stems("train", 2), shipped_stems("val", 1)
    make_voc(tmp_path, [*train, *val, "my_own_photo"], [*train, *val])
    with caplog.at_level("INFO", logger="fss_core.data.layouts"):
        splits = {r.image_id: r.split for r in read_voc(tmp_path, None)}
    assert splits == {train[0]: "train", train[1]: "train", val[0]: "val", "my_own_photo": None}
    assert any("1 image" in m and "neither" in m for m in caplog.messages)


def test_voc_with_only_its_own_train_list_takes_val_from_the_shipped_list(tmp_path):
    """Each split is looked up on its own, as ``read_voc(root, split)`` does."""
    (val,) = shipped_stems("val", 1)
    make_voc(tmp_path, ["mine", val], ["mine", val])
    touch(tmp_path / "lists" / "train.txt").write_text("JPEGImages/mine.jpg SegmentationClassAug/mine.png\n")
    assert {r.image_id: r.split for r in read_voc(tmp_path, None)} == {"mine": "train", val: "val"}


def test_image_files_the_readers_do_not_take_are_reported(tmp_path, caplog):
    for rel in ["a.jpg", "b.tif", "sub/c.gif", "d.jpe", "notes.txt"]:
        touch(tmp_path / "plain" / rel)
    make_voc(tmp_path / "voc", ["x"], ["x"])
    touch(tmp_path / "voc" / "JPEGImages" / "y.tiff")
    with caplog.at_level("WARNING", logger="fss_core.data.layouts"):
        assert [r.image_id for r in read_folder(tmp_path / "plain")] == ["a"]
        assert [r.image_id for r in read_voc(tmp_path / "voc", None)] == ["x"]
    (plain,) = [m for m in caplog.messages if "plain" in m]
    assert "3 files" in plain and all(name in plain for name in ("b.tif", "c.gif", "d.jpe"))
    assert "notes.txt" not in plain
    (voc,) = [m for m in caplog.messages if "JPEGImages" in m]
    assert "1 file" in voc and "y.tiff" in voc
