"""Bad input: every kind of broken, odd or hostile file the tests can make is either ingested
correctly or recorded as a skipped manifest row with its reason; a run that cannot go on stops
with one line, a non-zero exit code and no traceback; no good image is dropped."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import tasks.ingest  # noqa: F401  (Prefect binds its console handler at import: to pytest's stream, not a runner's)
from fss_cli.main import app
from fss_core.data.images import load_rgb, save_label
from fss_core.data.manifest import read_manifest
from fss_core.embeddings.extract import preprocess

RNG = np.random.default_rng(0)
SPACED = "with space é 日本"  # a file name with spaces and non-ASCII letters


def pixels(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width × height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def exif_rotated() -> tuple[bytes, np.ndarray]:
    """A 40 x 20 (w x h) JPEG tagged "rotate 90° clockwise to display", and how it must look."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(stored), "JPEG", quality=100, exif=exif), np.rot90(stored, k=-1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of every case, and what each must become: ("ok", check) or ("skipped", reason part)."""
    root = tmp_path_factory.mktemp("bad-input") / "images"
    root.mkdir()
    good = pixels(24, 32)
    cases = {}

    def add(name: str, content: bytes, expect: str, detail=None):
        (root / name).write_bytes(content)
        cases[Path(name).stem] = (expect, detail)

    add("good.jpg", encoded(Image.fromarray(good), "JPEG"), "ok", (24, 32))
    add("good_png.png", encoded(Image.fromarray(good), "PNG"), "ok", lambda rgb: np.array_equal(rgb, good))
    jpeg = encoded(Image.fromarray(pixels(30, 40)), "JPEG")
    add("corrupt.jpg", jpeg[:4] + RNG.integers(0, 256, 400, dtype=np.uint8).tobytes(), "skipped", "unreadable image")
    add("truncated_jpeg.jpg", jpeg[: len(jpeg) // 2], "skipped", "truncated")
    png = encoded(Image.fromarray(pixels(30, 40)), "PNG")
    add("truncated.png", png[: len(png) * 6 // 10], "skipped", "truncated")
    add("empty.png", b"", "skipped", "empty file (0 bytes)")
    add("not_an_image.jpg", b"name,size\nimage,3\n" * 20, "skipped", "cannot identify image file")
    gray = RNG.integers(0, 256, (16, 20), dtype=np.uint8)
    add("gray.png", encoded(Image.fromarray(gray, mode="L"), "PNG"), "ok",
        lambda rgb: all(np.array_equal(rgb[..., c], gray) for c in range(3)))
    rgba = np.dstack([pixels(16, 20), np.r_[np.zeros((8, 20)), np.full((8, 20), 255)].astype(np.uint8)])
    add("rgba.png", encoded(Image.fromarray(rgba, mode="RGBA"), "PNG"), "ok",
        lambda rgb: np.array_equal(rgb, rgba[..., :3]))
    palette = Image.fromarray(RNG.integers(0, 4, (16, 20), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 756)
    expected_palette = np.asarray(palette.convert("RGB"))
    add("palette.png", encoded(palette, "PNG", transparency=0), "ok",
        lambda rgb: np.array_equal(rgb, expected_palette))
    add("cmyk.jpg", encoded(Image.new("CMYK", (20, 16), (0, 255, 255, 0)), "JPEG", quality=100), "ok",
        lambda rgb: rgb[..., 0].min() > 200 and rgb[..., 1:].max() < 60)  # pure red ink reads red
    deep = (np.arange(16 * 20).reshape(16, 20) * 200).astype(np.uint16)
    add("gray16.png", encoded(Image.fromarray(deep), "PNG"), "ok",
        lambda rgb: np.abs(rgb[..., 0].astype(int) - np.rint(deep / 257)).max() <= 1)  # scaled, not clipped
    rotated, displayed = exif_rotated()
    add("exif_rotated.jpg", rotated, "ok", lambda rgb: rgb.shape == (40, 20, 3)
        and np.abs(rgb.astype(int) - displayed).mean() < 8)
    add("one_pixel.png", encoded(Image.fromarray(pixels(1, 1)), "PNG"), "ok", (1, 1))
    add("thin.png", encoded(Image.fromarray(pixels(1, 300)), "PNG"), "ok", (1, 300))
    add("bomb.png", png_header_only(30_000, 30_000), "skipped", "decompression")
    add("large.png", png_header_only(10_000, 10_000), "skipped", "decompression-bomb limit")
    add(f"{SPACED}.png", encoded(Image.fromarray(good), "PNG"), "ok", (24, 32))
    if os.geteuid() != 0:
        add("unreadable.png", encoded(Image.fromarray(good), "PNG"), "skipped", "Permission denied")
        (root / "unreadable.png").chmod(0)
    return root, cases


def ingest(*args: str):
    result = CliRunner().invoke(app, ["ingest", *args])
    assert "Traceback" not in result.output
    return result


def error_lines(result) -> list[str]:
    """The error lines of a command's stderr (other lines are log records), checking it ends with one."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors and lines[-1] == errors[-1], result.stderr
    return errors


def test_every_case_is_ingested_or_skipped_with_its_reason(corpus, tmp_path):
    root, cases = corpus
    result = ingest(str(root), "--layout", "folder", "-w", str(tmp_path / "ws"))
    assert result.exit_code == 0, result.output
    rows = {r.image_id: r for r in read_manifest(tmp_path / "ws" / "manifest.jsonl")}
    assert sorted(rows) == sorted(cases)  # every file has a row: none dropped, none invented
    ok = sum(expect == "ok" for expect, _ in cases.values())
    assert f"{len(cases)} images, {ok} ok, {len(cases) - ok} skipped" in result.stdout
    for image_id, (expect, detail) in cases.items():
        row = rows[image_id]
        assert row.status == expect, f"{image_id}: {row.status} ({row.reason})"
        if expect == "skipped":
            assert detail in row.reason and "\n" not in row.reason, f"{image_id}: {row.reason}"
            continue
        rgb = load_rgb(root / row.path)
        assert (row.height, row.width) == rgb.shape[:2]
        if isinstance(detail, tuple):
            assert rgb.shape[:2] == detail, image_id
        else:
            assert detail(rgb), image_id
        canvas, geometry = preprocess(rgb, 64)  # every good image also goes through extraction's input path
        assert canvas.shape == (3, 64, 64) and geometry.new_h >= 8 and geometry.new_w >= 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions, so an unreadable file "
                                               "cannot be made; the case is covered for other users")
def test_unreadable_file_is_in_the_corpus(corpus):
    assert "unreadable" in corpus[1]


def test_labels_of_another_size_or_with_foreign_values_are_skipped(tmp_path):
    root = tmp_path / "voc"
    labels = {"ok": [[0, 1], [5, 255]], "small": [[0, 0]], "foreign": [[0, 37], [1, 2]]}
    for name, label in labels.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(2, 2)).save(root / "JPEGImages" / f"{name}.png")
        save_label(root / "SegmentationClassAug" / f"{name}.png", np.array(label, np.uint8))
    result = ingest(str(root), "-w", str(tmp_path / "ws"), "-s", "data.num_classes=5")
    assert result.exit_code == 0, result.output
    rows = {r.image_id: r for r in read_manifest(tmp_path / "ws" / "manifest.jsonl")}
    assert rows["ok"].status == "ok" and rows["ok"].label_path == "SegmentationClassAug/ok.png"
    assert rows["small"].reason == "label SegmentationClassAug/small.png is 2x1, image is 2x2"
    assert rows["foreign"].reason == ("label SegmentationClassAug/foreign.png holds values [37] outside the "
                                      "classes 0..5 and 255 (ignore)")


@pytest.mark.parametrize("case, message", [
    ("missing", "error: dataset root {root} is not a folder"),
    ("duplicates", "error: {root}: cat.jpg and cat.png in {root} share the image id 'cat'; rename one of them"),
    ("nothing_readable", "error: no readable image in the source (2 skipped; the manifest {ws}/manifest.jsonl "
                         "gives each reason)"),
])
def test_a_run_that_cannot_go_on_stops_with_one_line(tmp_path, case, message):
    root = tmp_path / "src"
    if case != "missing":
        root.mkdir()
    if case == "duplicates":
        for suffix in ("jpg", "png"):
            Image.fromarray(pixels(8, 8)).save(root / f"cat.{suffix}")
    if case == "nothing_readable":
        (root / "a.jpg").write_bytes(b"")
        (root / "b.png").write_bytes(b"not a png")
    ws = tmp_path / "ws"
    result = ingest(str(root), "--layout", "folder", "-w", str(ws))
    assert result.exit_code != 0
    assert error_lines(result) == [message.format(root=root, ws=ws)]


def test_duplicate_ids_in_a_split_list_name_the_list_and_line(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(pixels(4, 4)).save(root / "JPEGImages" / f"{name}.jpg")
        save_label(root / "SegmentationClassAug" / f"{name}.png", np.zeros((4, 4), np.uint8))
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n"
                                              "JPEGImages/b.jpg SegmentationClassAug/b.png\n"
                                              "JPEGImages/a.jpg SegmentationClassAug/a.png\n")
    result = ingest(str(root), "-w", str(tmp_path / "ws"))
    assert result.exit_code != 0
    assert error_lines(result) == [f"error: {root / 'lists' / 'train.txt'}:3: image id 'a' already listed on line 1"]


def test_unexpected_errors_are_one_line_too_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    def broken(cfg):
        raise KeyError("image_id")

    monkeypatch.setattr(tasks.ingest, "run_ingest", broken)
    result = ingest(str(tmp_path), "-w", str(tmp_path / "ws"))
    assert result.exit_code == 1
    assert error_lines(result) == ["error: unexpected KeyError: 'image_id' (set FSS_DEBUG=1 to see the traceback)"]
    monkeypatch.setenv("FSS_DEBUG", "1")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path), "-w", str(tmp_path / "ws")])
    assert isinstance(result.exception, KeyError)


def test_terminal_log_lines_lose_their_tracebacks_but_keep_the_message():
    import logging

    from fss_cli.errors import hide_tracebacks_in_terminal_logs

    stream = io.StringIO()
    logger = logging.getLogger("fss-test-terminal")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        hide_tracebacks_in_terminal_logs()
        try:
            raise ValueError("the shard failed")
        except ValueError:
            logger.exception("task run failed: %s", "extract-shard-3")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "task run failed: extract-shard-3\n"


def test_local_dask_workers_print_task_failures_without_tracebacks(monkeypatch):
    """The CLI has the workers of its local cluster preload a hook that strips tracebacks from
    Prefect's terminal log lines (task failures are logged there, in the worker processes)."""
    import json
    import subprocess
    import sys

    from fss_cli.errors import quiet_local_workers

    monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__PRELOAD", raising=False)
    quiet_local_workers()
    assert json.loads(os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"]) == ["fss_cli.errors"]
    worker = ("import importlib, logging, dask\n"
              "hook = importlib.import_module(dask.config.get('distributed.worker.preload')[0])\n"
              "hook.dask_setup(None)\n"
              "try:\n    raise ValueError('need at least 2 readable training images')\n"
              "except ValueError:\n    logging.getLogger('tasks.extract').exception('Task run failed')\n")
    run = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Task run failed" in run.stderr and "Traceback" not in run.stderr


def test_a_label_above_the_decompression_limit_is_an_image_read_error(tmp_path):
    """A label whose header claims more pixels than the decoding limit is refused as unreadable,
    naming the file, as an image is (the served model's callers then get a clean message)."""
    from fss_core.data.images import ImageReadError, load_label

    for width, height in ((10_000, 10_000), (30_000, 30_000)):
        path = tmp_path / f"label{width}.png"
        path.write_bytes(png_header_only(width, height))
        with pytest.raises(ImageReadError, match=f"label{width}.png.*decompression"):
            load_label(path)


def test_a_large_jpeg_may_be_decoded_at_a_reduced_scale_and_is_told_from_a_wrong_size(tmp_path):
    """``at_least`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale keeping the longer side at least
    that long (EXIF orientation still applied); other formats and small JPEGs decode whole."""
    from fss_core.data.images import is_reduced_decode

    smooth = np.asarray(Image.fromarray(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((403, 301)))
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")
    reduced = load_rgb(tmp_path / "big.jpg", at_least=90)
    assert reduced.shape == (76, 101, 3)  # 1/4: ceil(301/4) x ceil(403/4); 1/8 would make 51 < 90
    assert is_reduced_decode(reduced.shape[:2], (301, 403)) and not is_reduced_decode((75, 101), (301, 403))
    whole = load_rgb(tmp_path / "big.jpg")
    shrunk = np.asarray(Image.fromarray(whole).resize((101, 76), Image.BILINEAR), dtype=np.float64)
    assert np.abs(reduced - shrunk).mean() < 4  # the same picture, decoded smaller
    assert load_rgb(tmp_path / "big.png", at_least=90).shape == (301, 403, 3)
    assert load_rgb(tmp_path / "big.jpg", at_least=250).shape == (301, 403, 3)  # 1/2 would go below 250
    (tmp_path / "turned.jpg").write_bytes(exif_rotated()[0])
    assert load_rgb(tmp_path / "turned.jpg", at_least=10).shape == (10, 5, 3)  # stored 40x20 at 1/4, turned
