"""Data preparation: the label files and split lists the benchmarks expect, built from the raw downloads.

- ``prepare_sbd``: SBD ``cls/*.mat`` + VOC2012 ``SegmentationClass/*.png`` → ``SegmentationClassAug/``.
- ``prepare_coco``: COCO 2014 instance json → one semantic PNG per annotated image (0 = bg, 1..80).
- ``prepare_lists``: train/val lists, per-fold lists and class → image indexes, and nested,
  seeded label-fraction subsets ``train_{5,10,20}.txt``.
- ``prepare_fraction_lists``: only those label-fraction subsets (no label is read).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from fss_core.data.folds import NUM_FOLDS, fold_split, num_classes_of
from fss_core.data.images import IGNORE_LABEL, load_label, save_label
from fss_core.data.layouts import ImageRecord, detect_layout, read_coco, read_voc

log = logging.getLogger(__name__)

PASCAL_NUM_CLASSES = 20
VAL_FRACTION = 0.2  # share of labeled images held out when a dataset ships no train/val split


class PrepareError(ValueError):
    """Input to a preparation step is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class PrepareReport:
    """What a preparation step produced: its output location and named counts."""

    output: Path
    counts: dict[str, int]

    def summary(self) -> str:
        """One line, e.g. ``"<output>: written=12031, from_sbd=9118, ..."``."""
        return f"{self.output}: " + ", ".join(f"{k}={v}" for k, v in self.counts.items())


# ---------------------------------------------------------------------------------------------
# SBD + VOC → SegmentationClassAug


def read_sbd_mat(path: str | os.PathLike) -> np.ndarray:
    """Class map ``uint8 [H, W]`` (0 = bg, 1..20) of an SBD ``cls/*.mat`` file (struct ``GTcls.Segmentation``).

    An empty, truncated or otherwise unreadable file, or a MATLAB v7.3 (HDF5) one, which scipy
    cannot read, raises ``PrepareError`` naming the file.
    """
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"])  # skip the large boundary cell arrays
        seg = np.asarray(mat["GTcls"]["Segmentation"][0, 0])
    except NotImplementedError as exc:  # scipy's answer to a v7.3 file
        raise PrepareError(f"{path}: a MATLAB v7.3 (HDF5) file, which cannot be read; the SBD release "
                           f"files are MATLAB v5, so re-download or re-save it with -v7 ({exc})") from exc
    except (OSError, ValueError, KeyError, IndexError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise PrepareError(f"{path}: not an SBD class file with GTcls.Segmentation ({exc!r})") from exc
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise PrepareError(f"{path}: GTcls.Segmentation must be a 2-D integer map, got {seg.dtype} {seg.shape}")
    _check_pascal_ids(seg, path)
    return seg.astype(np.uint8)


def prepare_sbd(
    sbd_root: str | os.PathLike, voc_root: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> PrepareReport:
    """Merge SBD and VOC2012 segmentation labels into palette PNGs (``SegmentationClassAug``).

    ``sbd_root`` holds ``cls/*.mat`` (also found under ``dataset/`` or ``benchmark_RELEASE/dataset/``);
    ``voc_root`` is the VOC2012 folder with ``SegmentationClass/*.png``. Where an image has both,
    the VOC label wins (it carries the 255 boundary band). Output defaults to
    ``voc_root/SegmentationClassAug``; every output file is (re)written.
    """
    cls_dir = _sbd_cls_dir(Path(sbd_root))
    voc_dir = Path(voc_root) / "SegmentationClass"
    if not voc_dir.is_dir():
        raise PrepareError(f"VOC label folder {voc_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else Path(voc_root) / "SegmentationClassAug"
    sbd = {p.stem: p for p in cls_dir.glob("*.mat")}
    voc = {p.stem: p for p in voc_dir.glob("*.png")}
    stems = sorted(sbd.keys() | voc.keys())
    log.info("writing %d labels (%d SBD, %d VOC) to %s", len(stems), len(sbd), len(voc), out)
    for n, stem in enumerate(stems, start=1):
        label = _read_voc_label(voc[stem]) if stem in voc else read_sbd_mat(sbd[stem])
        save_label(out / f"{stem}.png", label)
        if n % 1000 == 0:
            log.info("%d / %d labels written", n, len(stems))
    counts = {
        "written": len(stems),
        "from_sbd": len(sbd.keys() - voc.keys()),
        "from_voc": len(voc.keys() - sbd.keys()),
        "both": len(sbd.keys() & voc.keys()),
    }
    return PrepareReport(out, counts)


def _sbd_cls_dir(sbd_root: Path) -> Path:
    """The folder of SBD ``.mat`` class files, accepting the archive's usual nesting."""
    candidates = [
        sbd_root / "cls",
        sbd_root / "dataset" / "cls",
        sbd_root / "benchmark_RELEASE" / "dataset" / "cls",
    ]
    for cls_dir in candidates:
        if cls_dir.is_dir() and any(cls_dir.glob("*.mat")):
            return cls_dir
    raise PrepareError(f"no SBD cls/*.mat files found; looked in {', '.join(map(str, candidates))}")


def _read_voc_label(path: Path) -> np.ndarray:
    label = load_label(path)
    _check_pascal_ids(label, path)
    return label


def _check_pascal_ids(label: np.ndarray, path: str | os.PathLike) -> None:
    bad = np.setdiff1d(np.unique(label), [*range(PASCAL_NUM_CLASSES + 1), IGNORE_LABEL])
    if bad.size:
        raise PrepareError(
            f"{path}: label values {bad[:5].tolist()} are not PASCAL class ids (0..20, 255); "
            "a VOC label must be a palette-index PNG, not an RGB rendering"
        )


# ---------------------------------------------------------------------------------------------
# COCO instances json → semantic PNGs


def prepare_coco(coco_root: str | os.PathLike, split: str, overwrite: bool = False) -> PrepareReport:
    """Semantic masks ``annotations/{split}2014/<image stem>.png`` from ``annotations/instances_{split}2014.json``.

    Pixel values: 0 = background, 1..80 = index of the category in sorted category-id order.
    Crowd instances are skipped; later instances overwrite earlier ones (json order). Existing
    PNGs are kept unless ``overwrite``.

    An image with no annotation at all gets no mask, so the readers pair it with no label:
    ``prepare_lists`` leaves it out of every list, as the standard COCO-20i lists do (82,081
    train / 40,137 val images), and ingest records it as unlabeled. A mask of such an image left
    by an earlier run is removed. An image with only crowd annotations keeps an all-0 mask, as it
    is in the standard lists. A malformed annotation raises ``PrepareError`` naming the json file,
    the annotation id and the image id.
    """
    from pycocotools.coco import COCO  # deferred: only this step needs pycocotools

    if split not in ("train", "val"):
        raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
    root = Path(coco_root)
    ann_file = root / "annotations" / f"instances_{split}2014.json"
    if not ann_file.is_file():
        raise PrepareError(f"COCO annotation file {ann_file} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress with print
            coco = COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise PrepareError(f"{ann_file}: not a COCO instances file ({exc!r})") from exc
    class_of = {cat_id: i for i, cat_id in enumerate(sorted(coco.getCatIds()), start=1)}
    if len(class_of) >= IGNORE_LABEL:
        raise PrepareError(f"{ann_file}: {len(class_of)} categories do not fit in a uint8 mask")
    out_dir = root / "annotations" / f"{split}2014"
    counts = {"written": 0, "skipped_existing": 0, "no_annotations": 0, "stale_removed": 0, "empty": 0,
              "crowd_skipped": 0}
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        out = out_dir / f"{Path(info['file_name']).stem}.png"
        anns = coco.imgToAnns.get(image_id, [])
        if not anns:
            counts["no_annotations"] += 1
            if out.exists():
                out.unlink()
                counts["stale_removed"] += 1
            continue
        if out.exists() and not overwrite:
            counts["skipped_existing"] += 1
            continue
        label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        for ann in anns:
            if ann.get("iscrowd", 0):
                counts["crowd_skipped"] += 1
                continue
            where = f"{ann_file}: annotation {ann.get('id')} of image {image_id} ({info['file_name']})"
            if ann.get("category_id") not in class_of:
                raise PrepareError(f"{where} has unknown category {ann.get('category_id')}")
            mask = _instance_mask(coco, ann, label.shape, where)
            if mask is not None:
                label[mask > 0] = class_of[ann["category_id"]]
        counts["empty"] += int(not label.any())
        save_label(out, label)
        counts["written"] += 1
        if counts["written"] % 5000 == 0:
            log.info("%d / %d masks written", counts["written"], len(coco.imgs))
    if counts["no_annotations"]:
        log.info("%d images without annotations get no mask (%d masks of earlier runs removed)",
                 counts["no_annotations"], counts["stale_removed"])
    return PrepareReport(out_dir, counts)


def _instance_mask(coco, ann: dict, shape: tuple[int, int], where: str) -> np.ndarray | None:
    """Binary mask ``uint8 [H, W]`` of one instance, or None for a polygon with no area.

    A segmentation that is missing, not a list of polygons or an RLE, or an RLE of another size
    than the image (``shape``) raises ``PrepareError`` starting with ``where``.
    """
    if "segmentation" not in ann:
        raise PrepareError(f"{where} has no 'segmentation'")
    seg = ann["segmentation"]
    try:
        if isinstance(seg, list):
            # pycocotools reads a 4-number polygon as a box and rejects shorter ones; both have no area
            seg = [poly for poly in seg if len(poly) >= 6]
            if not seg:
                return None
            ann = {**ann, "segmentation": seg}
        mask = coco.annToMask(ann)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise PrepareError(f"{where}: malformed segmentation, expected a list of polygons [[x1, y1, x2, y2, ...], "
                           f"...] or an RLE {{'size': [h, w], 'counts': ...}} ({exc!r})") from exc
    if mask.shape != shape:
        raise PrepareError(f"{where}: segmentation is {mask.shape[1]}x{mask.shape[0]}, the image is "
                           f"{shape[1]}x{shape[0]}")
    return mask


# ---------------------------------------------------------------------------------------------
# Split, fold and label-fraction lists


def prepare_lists(
    root: str | os.PathLike,
    layout: str,
    out_dir: str | os.PathLike,
    scheme: str,
    seed: int,
    fractions: tuple[float, ...] = (0.05, 0.10, 0.20),
    min_area: int = 2048,
    num_classes: int | None = None,
) -> PrepareReport:
    """Write the split, fold and label-fraction lists of a labeled VOC- or COCO-layout dataset.

    Files under ``out_dir`` (list lines are ``IMAGE_RELPATH LABEL_RELPATH``, relative to ``root``):

    - ``train.txt``, ``val.txt``: the dataset's own split (``lists/``, the shipped PASCAL lists,
      or the COCO 2014 folders), else a seeded split holding out ``VAL_FRACTION`` of the images;
    - ``fold{i}/train.txt``: train images containing a base class of fold i with ≥ ``min_area`` px;
    - ``fold{i}/val.txt``: val images containing a novel class of fold i with ≥ ``min_area`` px;
    - ``fold{i}/classes_{train,val}.json``: class id → sorted image ids (same area rule);
    - ``train_{pct}.txt`` per fraction: ⌊fraction·N⌋ train images, the prefixes of one seeded
      permutation, so smaller subsets are contained in larger ones.

    A label holding a class id above the scheme's classes (other than 255, ignore) raises
    ``PrepareError`` before any file is written: the scheme does not fit the dataset (see
    ``default_scheme``). The same inputs and seed give byte-identical files.
    """
    root, out = Path(root), Path(out_dir)
    n_classes = num_classes_of(scheme, num_classes)
    _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    train, val = _train_val(root, layout, scheme, rng)
    _check_labelled((*train, *val))

    labeled = [*train, *val]
    log.info("reading %d labels for per-class areas", len(labeled))
    classes = _classes_present(labeled, n_classes, min_area)
    _check_class_ids(labeled, [above for _, above in classes], scheme, n_classes)
    present = dict(zip([r.image_id for r in labeled], [found for found, _ in classes]))

    counts = {"train": len(train), "val": len(val)}
    _write_lines(out / "train.txt", [_list_line(r, root) for r in train])
    _write_lines(out / "val.txt", [_list_line(r, root) for r in val])
    for fold in range(NUM_FOLDS):
        split = fold_split(scheme, fold, num_classes)
        for name, records, classes in (("train", train, split.base), ("val", val, split.novel)):
            index = {c: [r.image_id for r in records if c in present[r.image_id]] for c in classes}
            chosen = [r for r in records if any(c in present[r.image_id] for c in classes)]
            for c, ids in index.items():
                if not ids:
                    log.warning("fold %d %s: class %d has no image with >= %d px", fold, name, c, min_area)
            _write_lines(out / f"fold{fold}" / f"{name}.txt", [_list_line(r, root) for r in chosen])
            index_json = json.dumps({str(c): ids for c, ids in index.items()}, indent=1)
            _write_text(out / f"fold{fold}" / f"classes_{name}.json", index_json + "\n")
            counts[f"fold{fold}_{name}"] = len(chosen)

    counts.update(_write_fraction_lists(root, out, train, rng, fractions))
    return PrepareReport(out, counts)


def prepare_fraction_lists(
    root: str | os.PathLike,
    layout: str,
    out_dir: str | os.PathLike,
    scheme: str,
    seed: int,
    fractions: tuple[float, ...] = (0.05, 0.10, 0.20),
) -> PrepareReport:
    """Only the label-fraction lists ``train_{pct}.txt`` of ``prepare_lists``, without reading labels.

    Same root, layout, scheme and seed ⇒ the same files as ``prepare_lists`` writes, so lists
    made one fraction at a time are nested like lists made together.
    """
    root, out = Path(root), Path(out_dir)
    _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    train, val = _train_val(root, layout, scheme, rng)
    _check_labelled(train)
    return PrepareReport(out, _write_fraction_lists(root, out, train, rng, fractions))


def default_scheme(root: str | os.PathLike, layout: str) -> str:
    """The fold scheme a dataset's layout implies: "coco" (COCO-20i) for the COCO layout, else "pascal"."""
    if layout == "auto":
        layout = detect_layout(root)
    return "coco" if layout == "coco" else "pascal"


def _check_fractions(fractions: tuple[float, ...]) -> None:
    for x in fractions:
        if not 0 < x <= 1:
            raise ValueError(f"label fractions must lie in (0, 1], got {x}")


def _check_labelled(records) -> None:
    for record in records:
        if record.label_path is None:
            raise PrepareError(
                f"{record.image_path} has no label file; for COCO run the COCO preparation first"
            )


def _write_fraction_lists(root: Path, out: Path, train: list[ImageRecord], rng: np.random.Generator,
                          fractions: tuple[float, ...]) -> dict[str, int]:
    """``train_{pct}.txt`` per fraction: the ⌊fraction·N⌋-prefixes of one seeded permutation."""
    counts = {}
    order = rng.permutation(len(train))
    for x in fractions:
        size = math.floor(x * len(train) + 1e-9)  # guard against 0.1 * 30 = 2.9999…
        subset = sorted(order[:size].tolist())  # train is sorted by id, so this keeps id order
        name = f"train_{round(x * 100, 6):g}"
        _write_lines(out / f"{name}.txt", [_list_line(train[i], root) for i in subset])
        counts[name] = size
    return counts


def _train_val(
    root: Path, layout: str, scheme: str, rng: np.random.Generator
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The dataset's own train/val split, or a seeded split of its labeled images when it has none."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "coco":
        return _coco_with_masks(root, "train"), _coco_with_masks(root, "val")
    if layout != "voc":
        raise ValueError(f"{root}: split and fold lists need a labeled 'voc' or 'coco' layout, got {layout!r}")
    has_lists = all((root / "lists" / f"{s}.txt").is_file() for s in ("train", "val"))
    if has_lists or scheme == "pascal":
        return read_voc(root, "train"), read_voc(root, "val")
    labeled = [r for r in read_voc(root, None) if r.label_path is not None]
    if len(labeled) < 2:
        raise PrepareError(f"{root}: need at least 2 labeled images to split, found {len(labeled)}")
    n_val = max(1, round(VAL_FRACTION * len(labeled)))
    held_out = set(rng.permutation(len(labeled))[:n_val].tolist())
    log.info("%s has no lists/; holding out %d of %d labeled images for val (seeded)", root, n_val, len(labeled))
    train = [r for i, r in enumerate(labeled) if i not in held_out]
    val = [r for i, r in enumerate(labeled) if i in held_out]
    return train, val


def _coco_with_masks(root: Path, split: str) -> list[ImageRecord]:
    """The COCO images of ``split`` that have a mask: ``prepare_coco`` makes none for an image without annotations."""
    records = read_coco(root, split)
    with_masks = [r for r in records if r.label_path is not None]
    if not with_masks:
        raise PrepareError(f"{root}: no {split} image has a mask in annotations/{split}2014/; "
                           f"run `fss prepare coco --coco-root {root} --split {split}` first")
    if len(with_masks) < len(records):
        log.info("%s: %d %s images have no mask (no annotations): left out of the lists",
                 root, len(records) - len(with_masks), split)
    return with_masks


def _classes_present(records: list[ImageRecord], num_classes: int,
                     min_area: int) -> list[tuple[frozenset[int], list[int]]]:
    """Per record, the class ids 1..num_classes covering at least ``min_area`` pixels of its label,
    and the ids above ``num_classes`` (other than 255, ignore) found in it."""

    def present(record: ImageRecord) -> tuple[frozenset[int], list[int]]:
        areas = np.bincount(load_label(record.label_path).ravel(), minlength=256)
        found = frozenset((np.flatnonzero(areas[1 : num_classes + 1] >= min_area) + 1).tolist())
        above = (np.flatnonzero(areas[num_classes + 1 : IGNORE_LABEL]) + num_classes + 1).tolist()
        return found, above

    # label decoding releases the GIL, so threads overlap file reads and PNG inflation
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(present, records))


def _check_class_ids(records: list[ImageRecord], above: list[list[int]], scheme: str, num_classes: int) -> None:
    """A ``PrepareError`` naming the first label whose ids exceed the scheme's classes, if any does."""
    bad = [i for i, ids in enumerate(above) if ids]
    if bad:
        first = records[bad[0]]
        raise PrepareError(
            f"{first.label_path}: label ids {above[bad[0]][:5]} exceed scheme {scheme!r}, which has "
            f"{num_classes} classes ({len(bad)} of {len(records)} labels hold ids above {num_classes}); "
            "choose the scheme (--scheme, and --num-classes for 'generic') that fits the dataset"
        )


def _list_line(record: ImageRecord, root: Path) -> str:
    image, label = record.image_path.relative_to(root), record.label_path.relative_to(root)
    return f"{image.as_posix()} {label.as_posix()}"


def _write_lines(path: Path, lines: list[str]) -> None:
    _write_text(path, "".join(f"{line}\n" for line in lines))


def _write_text(path: Path, text: str) -> None:
    """Write UTF-8 text with ``\\n`` newlines atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)
