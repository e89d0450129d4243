"""Ingest: the manifest records every candidate image truthfully and updates incrementally."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import fss_core.data.manifest as manifest_mod
from fss_core.data.manifest import build_manifest, read_manifest, scan_source, write_manifest
from storage_schemas import ManifestError, ManifestRow


def save_image(path, width: int, height: int, seed: int, **save_kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save_kwargs)


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    sizes = {"a.png": (30, 20), "b.jpg": (16, 24), "sub/c.jpeg": (40, 10), "sub/d.png": (12, 12)}
    for seed, (name, (w, h)) in enumerate(sizes.items()):
        save_image(root / name, w, h, seed)
    (root / "notes.txt").write_text("not a candidate")
    return root, sizes


@pytest.fixture
def hash_calls(monkeypatch):
    """Paths hashed by the ingest, in call order."""
    calls = []
    real = manifest_mod.file_sha256

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(manifest_mod, "file_sha256", counting)
    return calls


def test_folder_ingest_records_every_image(photo_folder, tmp_path):
    root, sizes = photo_folder
    update = build_manifest(root, "folder", workers=2)
    assert [r.path for r in update.rows] == sorted(sizes)
    assert update.added == ["a", "b", "sub/c", "sub/d"] and not update.skipped
    for row in update.rows:
        with Image.open(root / row.path) as im:
            assert (row.width, row.height) == im.size
        assert row.sha256 == sha256_of(root / row.path)
        assert row.size_bytes == (root / row.path).stat().st_size
        assert (row.status, row.reason, row.label_path) == ("ok", None, None)
    write_manifest(tmp_path / "manifest.jsonl", update.rows)
    assert read_manifest(tmp_path / "manifest.jsonl") == update.rows


def test_second_ingest_adds_new_images_and_rehashes_nothing(photo_folder, hash_calls):
    root, sizes = photo_folder
    first = build_manifest(root, "folder", workers=2)
    hash_calls.clear()
    for i in range(3):
        save_image(root / f"new/n{i}.png", 8 + i, 9, seed=100 + i)
    second = build_manifest(root, "folder", existing=first.rows, workers=2)
    assert second.added == ["new/n0", "new/n1", "new/n2"]
    assert second.unchanged == [r.image_id for r in first.rows]
    assert not (second.changed or second.removed or second.skipped)
    assert sorted(hash_calls) == ["n0.png", "n1.png", "n2.png"]  # old files trusted by size + mtime
    assert len(second.rows) == len(first.rows) + 3
    old = {r.image_id: r for r in first.rows}
    assert all(r == old[r.image_id] for r in second.rows if r.image_id in old)


def test_corrupt_and_empty_files_are_skipped_with_reasons(photo_folder):
    root, _ = photo_folder
    (root / "broken.jpg").write_bytes(np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "empty.png").write_bytes(b"")
    update = build_manifest(root, "folder", workers=2)
    rows = {r.image_id: r for r in update.rows}
    assert update.skipped == ["broken", "empty"]
    assert rows["broken"].status == rows["empty"].status == "skipped"
    assert "unreadable image" in rows["broken"].reason
    assert "empty" in rows["empty"].reason
    assert rows["broken"].reason != rows["empty"].reason
    assert rows["empty"].sha256 == hashlib.sha256(b"").hexdigest()
    assert rows["broken"].width is None
    assert "notes" not in rows  # other suffixes are not candidates


def test_content_change_with_same_size_is_detected(tmp_path, hash_calls):
    root = tmp_path / "src"
    save_image(root / "x.bmp", 10, 6, seed=1)  # BMP: same dimensions give the same byte size
    save_image(root / "y.bmp", 10, 6, seed=2)
    first = build_manifest(root, "folder", workers=1)
    size_before, stat_before = (root / "x.bmp").stat().st_size, (root / "x.bmp").stat()
    save_image(root / "x.bmp", 10, 6, seed=3)
    os.utime(root / "x.bmp", ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 10**9))
    os.utime(root / "y.bmp", ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 10**9))  # touched only
    assert (root / "x.bmp").stat().st_size == size_before
    hash_calls.clear()
    second = build_manifest(root, "folder", existing=first.rows, workers=1)
    assert second.changed == ["x"] and second.unchanged == ["y"]
    assert sorted(hash_calls) == ["x.bmp", "y.bmp"]
    new, old = second.rows[0], first.rows[0]
    assert new.sha256 == sha256_of(root / "x.bmp") != old.sha256
    assert new.added_at == old.added_at
    assert second.rows[1].mtime_ns == (root / "y.bmp").stat().st_mtime_ns  # next ingest trusts it again


def test_exif_rotation_is_applied_to_recorded_size(tmp_path):
    root = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to display
    save_image(root / "portrait.jpg", 40, 20, seed=0, exif=exif)
    (row,) = build_manifest(root, "folder").rows
    assert (row.width, row.height) == (20, 40)


def test_vanished_files_are_reported_and_kept(photo_folder):
    root, _ = photo_folder
    first = build_manifest(root, "folder", workers=2)
    moved = (root / "b.jpg").read_bytes()
    (root / "b.jpg").unlink()
    second = build_manifest(root, "folder", existing=first.rows, workers=2)
    assert second.removed == ["b"]
    row = next(r for r in second.rows if r.image_id == "b")
    assert (row.status, row.reason) == ("skipped", "missing from source")
    third = build_manifest(root, "folder", existing=second.rows, workers=2)
    assert not third.removed and "b" in third.unchanged
    (root / "b.jpg").write_bytes(moved)
    fourth = build_manifest(root, "folder", existing=third.rows, workers=2)
    assert fourth.added == ["b"]
    assert next(r for r in fourth.rows if r.image_id == "b").status == "ok"


@pytest.mark.parametrize("orientation, size", [(6, (20, 20)), (6, (30, 20)), (3, (30, 20))])
def test_a_labelled_image_turned_by_its_exif_tag_is_skipped_with_the_reason(tmp_path, orientation, size):
    """An unlabelled image is read as displayed; a labelled one could have been annotated on its
    stored or its displayed pixels, so it is skipped, naming the tag, rather than misaligned
    (a square image or a 180° turn keeps the label's size, so sizes alone would not show it)."""
    root = tmp_path / "voc"
    exif = Image.Exif()
    exif[0x0112] = orientation
    w, h = size
    save_image(root / "JPEGImages" / "turned.jpg", w, h, seed=0, exif=exif)
    save_image(root / "JPEGImages" / "plain.jpg", w, h, seed=1)
    (root / "SegmentationClassAug").mkdir()
    for name in ("turned", "plain"):
        Image.fromarray(np.zeros((h, w), np.uint8), mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
    rows = {r.image_id: r for r in build_manifest(root, "voc").rows}
    assert rows["plain"].status == "ok"
    assert rows["turned"].status == "skipped" and f"EXIF orientation {orientation}" in rows["turned"].reason


def test_labels_must_be_readable_and_match_the_image(tmp_path):
    root = tmp_path / "voc"
    for name, (w, h) in {"good": (20, 10), "small": (20, 10), "bad": (20, 10)}.items():
        save_image(root / "JPEGImages" / f"{name}.jpg", w, h, seed=0)
    labels = root / "SegmentationClassAug"
    labels.mkdir()
    Image.fromarray(np.zeros((10, 20), np.uint8), mode="L").save(labels / "good.png")
    Image.fromarray(np.zeros((5, 20), np.uint8), mode="L").save(labels / "small.png")
    (labels / "bad.png").write_bytes(b"garbage")
    update = build_manifest(root, "auto")
    rows = {r.image_id: r for r in update.rows}
    assert rows["good"].status == "ok" and rows["good"].label_path == "SegmentationClassAug/good.png"
    assert rows["small"].reason == "label SegmentationClassAug/small.png is 20x5, image is 20x10"
    assert rows["bad"].reason.startswith("unreadable label SegmentationClassAug/bad.png")


def test_scan_source_lists_candidates_only(photo_folder):
    root, _ = photo_folder
    records = scan_source(root)
    assert [r.image_id for r in records] == ["a", "b", "sub/c", "sub/d"]


def sample_rows() -> list[ManifestRow]:
    return [
        ManifestRow(image_id="b", path="b.png", sha256="1" * 64, size_bytes=5, mtime_ns=7, width=3, height=2,
                    status="ok"),
        ManifestRow(image_id="a", path="a.jpg", sha256="2" * 64, size_bytes=0, mtime_ns=8, split="train",
                    status="skipped", reason="empty file (0 bytes)"),
    ]


def test_manifest_round_trip_sorted_with_header(tmp_path):
    path = tmp_path / "ws" / "manifest.jsonl"
    rows = sample_rows()
    write_manifest(path, rows)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"kind": "fss-manifest", "schema_version": 1, "row_count": 2}
    assert read_manifest(path) == [rows[1], rows[0]]  # sorted by image_id
    assert os.listdir(path.parent) == ["manifest.jsonl"]


def test_malformed_line_names_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, sample_rows())
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=rf"manifest {path}, line 3: not valid JSON"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines.__setitem__(2, lines[2].replace('"ok"', '"fine"')), r"line 3: field 'status'"),
        (lambda lines: lines.pop(), r"header says 2 rows, found 1"),
        (lambda lines: lines.__setitem__(2, lines[1]), r"line 3: image id 'a' already on line 2"),
        (lambda lines: lines.__setitem__(0, lines[0].replace('"schema_version":1', '"schema_version":0')),
         r"line 1: was written with schema_version 0, this code reads 1"),
    ],
)
def test_invalid_manifest_is_one_clear_error(tmp_path, edit, message):
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, sample_rows())
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_one_bit_label_is_read_as_classes_0_and_1(tmp_path):
    """A 1-bit PNG ("1" mode) holds class 1, not 255 (ignore), where its pixels are set."""
    from fss_core.data.images import load_label

    root = tmp_path / "voc"
    save_image(root / "JPEGImages" / "a.jpg", 8, 6, seed=0)
    mask = np.zeros((6, 8), bool)
    mask[2:5, 1:4] = True
    (root / "SegmentationClassAug").mkdir()
    Image.fromarray(mask).save(root / "SegmentationClassAug" / "a.png")
    with Image.open(root / "SegmentationClassAug" / "a.png") as im:
        assert im.mode == "1"
    label = load_label(root / "SegmentationClassAug" / "a.png")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, mask.astype(np.uint8))
    (row,) = build_manifest(root, "voc", num_classes=1).rows
    assert row.status == "ok"
