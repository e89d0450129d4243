"""Data preparation: the label files and split lists the benchmarks expect, built from the raw downloads.

- ``prepare_sbd``: SBD ``cls/*.mat`` + VOC2012 ``SegmentationClass/*.png`` → ``SegmentationClassAug/``.
- ``prepare_coco``: COCO 2014 instance json → one semantic PNG per image (0 = bg, 1..80).
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
    """Class map ``uint8 [H, W]`` (0 = bg, 1..20) of an SBD ``cls/*.mat`` file (struct ``GTcls.Segmentation``)."""
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"])  # skip the large boundary cell arrays
        seg = np.asarray(mat["GTcls"]["Segmentation"][0, 0])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
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
    Crowd instances are skipped; later instances overwrite earlier ones (json order); images
    without annotations get an all-0 mask. Existing PNGs are kept unless ``overwrite``.
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
    counts = {"written": 0, "skipped_existing": 0, "empty": 0, "crowd_skipped": 0}
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        out = out_dir / f"{Path(info['file_name']).stem}.png"
        if out.exists() and not overwrite:
            counts["skipped_existing"] += 1
            continue
        label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                counts["crowd_skipped"] += 1
                continue
            if ann["category_id"] not in class_of:
                raise PrepareError(f"{ann_file}: annotation {ann['id']} has unknown category {ann['category_id']}")
            mask = _instance_mask(coco, ann)
            if mask is not None:
                label[mask > 0] = class_of[ann["category_id"]]
        counts["empty"] += int(not label.any())
        save_label(out, label)
        counts["written"] += 1
        if counts["written"] % 5000 == 0:
            log.info("%d / %d masks written", counts["written"], len(coco.imgs))
    return PrepareReport(out_dir, counts)


def _instance_mask(coco, ann: dict) -> np.ndarray | None:
    """Binary mask ``uint8 [H, W]`` of one instance, or None for a polygon with no area."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        # pycocotools reads a 4-number polygon as a box and rejects shorter ones; both have no area
        seg = [poly for poly in seg if len(poly) >= 6]
        if not seg:
            return None
        ann = {**ann, "segmentation": seg}
    return coco.annToMask(ann)


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

    The same inputs and seed give byte-identical files.
    """
    root, out = Path(root), Path(out_dir)
    n_classes = num_classes_of(scheme, num_classes)
    _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    train, val = _train_val(root, layout, scheme, rng)
    _check_labelled((*train, *val))

    labeled = [*train, *val]
    log.info("reading %d labels for per-class areas", len(labeled))
    present = dict(zip([r.image_id for r in labeled], _classes_present(labeled, n_classes, min_area)))

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
        return read_coco(root, "train"), read_coco(root, "val")
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


def _classes_present(records: list[ImageRecord], num_classes: int, min_area: int) -> list[frozenset[int]]:
    """Per record, the class ids 1..num_classes covering at least ``min_area`` pixels of its label."""

    def present(record: ImageRecord) -> frozenset[int]:
        areas = np.bincount(load_label(record.label_path).ravel(), minlength=256)[1 : num_classes + 1]
        return frozenset((np.flatnonzero(areas >= min_area) + 1).tolist())

    # label decoding releases the GIL, so threads overlap file reads and PNG inflation
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(present, records))


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
