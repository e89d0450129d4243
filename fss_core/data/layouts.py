"""Readers for the dataset layouts the pipeline accepts.

- ``folder``: any folder of unlabeled images, searched recursively, leaving out pipeline
  workspaces (folders holding a ``WORKSPACE_MARKER`` file) found inside it.
- ``voc``: PASCAL VOC layout, ``JPEGImages/*.jpg`` + ``SegmentationClassAug/*.png``, with split
  lists ``lists/{split}.txt`` (the standard PASCAL-5i lists are shipped as a fallback, used for
  each split the dataset has no list of).
- ``coco``: COCO 2014 layout, ``{train,val}2014/*.jpg`` + ``annotations/{train,val}2014/*.png``
  (semantic masks made by ``fss_core.data.prepare.prepare_coco``).

Split lists use the PFENet format: one ``IMAGE_RELPATH LABEL_RELPATH`` pair per line, paths
relative to the dataset root. Every reader returns records sorted by ``image_id``. Files in an
image format Pillow reads but the readers do not take (``OTHER_IMAGE_SUFFIXES``: .tif, .gif, ...)
are skipped with one warning per folder giving their count and first names.
"""

from __future__ import annotations

import dataclasses

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fss_core.data.images import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES

log = logging.getLogger(__name__)

LAYOUTS = ("voc", "coco", "folder")
VOC_IMAGE_DIR = "JPEGImages"
VOC_LABEL_DIR = "SegmentationClassAug"
COCO_SPLITS = ("train", "val")
WORKSPACE_MARKER = ".fss-workspace"  # a file that marks a folder as a pipeline workspace, not images


class DatasetLayoutError(ValueError):
    """A dataset tree or split list does not match its layout; the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset; ``label_path`` is None for unlabeled images."""

    image_id: str  # unique within a dataset and stable across runs
    image_path: Path
    label_path: Path | None
    split: str | None


def read_folder(root: str | os.PathLike) -> list[ImageRecord]:
    """Every image under ``root`` (recursive; hidden files and folders skipped).

    A pipeline workspace inside ``root`` (a folder holding a ``WORKSPACE_MARKER`` file) is
    skipped whole, with one log line: its masks and overlays are outputs, not images.
    ``image_id`` is the path relative to ``root`` without its suffix, with ``/`` separators.
    """
    root = _existing_dir(root)
    by_id: dict[str, Path] = {}
    other_format: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_report_unlistable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _is_workspace(Path(dirpath, d))]
        for name in sorted(filenames):  # a stable order: the same duplicate is reported every time
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in OTHER_IMAGE_SUFFIXES:
                other_format.append(Path(dirpath, name).relative_to(root).as_posix())
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not _recordable(Path(dirpath, name), root):
                continue
            path = Path(dirpath, name)
            image_id = path.relative_to(root).with_suffix("").as_posix()
            if image_id in by_id:
                raise DatasetLayoutError(
                    f"{root}: {by_id[image_id].name} and {name} in {Path(dirpath)} share the image id "
                    f"{image_id!r}; rename one of them"
                )
            by_id[image_id] = path
    _report_other_formats(root, other_format)
    if not by_id:
        log.warning("no images with suffixes %s found under %s", IMAGE_SUFFIXES, root)
    return [ImageRecord(i, by_id[i], None, None) for i in sorted(by_id)]


def read_list(
    root: str | os.PathLike, list_file: str | os.PathLike, split: str | None = None
) -> list[ImageRecord]:
    """Records of a PFENet-format list (``IMAGE_RELPATH LABEL_RELPATH`` per line, relative to ``root``).

    ``image_id`` is the stem of the image path. Blank lines are ignored; a malformed line, a
    duplicate image id or a missing file raises ``DatasetLayoutError`` naming the list and line.
    """
    root, list_file = Path(root), Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetLayoutError(f"{list_file}: cannot read split list ({exc})") from exc
    records: dict[str, ImageRecord] = {}
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetLayoutError(
                f"{list_file}:{lineno}: expected 'IMAGE_RELPATH LABEL_RELPATH', got {line.strip()!r}"
            )
        image_path, label_path = root / fields[0], root / fields[1]
        for path in (image_path, label_path):
            if not path.is_file():
                raise DatasetLayoutError(f"{list_file}:{lineno}: missing file {path}")
        image_id = Path(fields[0]).stem
        if image_id in records:
            raise DatasetLayoutError(
                f"{list_file}:{lineno}: image id {image_id!r} already listed on line {line_of[image_id]}"
            )
        records[image_id] = ImageRecord(image_id, image_path, label_path, split)
        line_of[image_id] = lineno
    return [records[i] for i in sorted(records)]


def shipped_list(dataset: str, split: str) -> Path:
    """Path of a split list shipped with the package, e.g. ``shipped_list("pascal", "train")``."""
    path = Path(__file__).parent / "lists" / dataset / f"{split}.txt"
    if not path.is_file():
        raise DatasetLayoutError(f"no shipped list for dataset {dataset!r}, split {split!r} (looked for {path})")
    return path


def read_voc(root: str | os.PathLike, split: str | None) -> list[ImageRecord]:
    """A VOC-layout dataset's ``split``, from ``root/lists/{split}.txt`` or the shipped PASCAL lists.

    With ``split=None``: every image in ``JPEGImages/``, paired with its label when it exists,
    and with the split of the train or val list that names it, the lists being chosen as for
    ``split="train"`` and ``split="val"`` (see ``voc_list_file``). So an image that evaluation
    reads as val is never given another split. An image named by neither list gets split None
    (a log line counts them); one named by both gets "val".
    """
    root = _existing_dir(root)
    if split is None:
        split_of: dict[str, str] = {}
        for name in ("train", "val"):  # val second: it wins over train
            list_file = voc_list_file(root, name)
            if list_file == shipped_list("pascal", name):  # all of PASCAL: the root may hold any part of it
                split_of.update((image_id, name) for image_id in _listed_ids(list_file))
            else:
                split_of.update((r.image_id, name) for r in read_list(root, list_file, name))
        records = [
            dataclasses.replace(r, split=split_of.get(r.image_id))
            for r in _pair_folder(root / VOC_IMAGE_DIR, root / VOC_LABEL_DIR, None)
        ]
        unsplit = sum(r.split is None for r in records)
        if unsplit:
            log.info("%s: %d image%s in neither the train nor the val list: no split (used for training)",
                     root, unsplit, "" if unsplit == 1 else "s")
        return records
    return read_list(root, voc_list_file(root, split), split)


def voc_list_file(root: str | os.PathLike, split: str) -> Path:
    """The list of a VOC-layout dataset's ``split``: ``root/lists/{split}.txt``, else the shipped PASCAL-5i list.

    Decided per split: a dataset with only its own ``lists/train.txt`` gets the shipped val list.
    """
    list_file = Path(root) / "lists" / f"{split}.txt"
    if list_file.is_file():
        return list_file
    shipped = shipped_list("pascal", split)
    log.info("%s has no lists/%s.txt; using the shipped PASCAL-5i list %s", root, split, shipped)
    return shipped


def _listed_ids(list_file: Path) -> list[str]:
    """Image ids (stems of the image paths) of a PFENet-format list, without checking the files exist."""
    lines = list_file.read_text(encoding="utf-8").splitlines()
    return [Path(line.split()[0]).stem for line in lines if line.strip()]


def read_coco(root: str | os.PathLike, split: str | None) -> list[ImageRecord]:
    """A COCO-2014-layout dataset's ``split`` ("train" or "val"; None = both).

    From ``root/lists/{split}.txt`` if present, else every ``{split}2014/*.jpg`` paired with
    ``annotations/{split}2014/<stem>.png`` (``label_path`` None where that PNG is missing).
    """
    root = _existing_dir(root)
    if split is None:
        return sorted(
            (r for s in COCO_SPLITS for r in read_coco(root, s)), key=lambda r: r.image_id
        )
    if split not in COCO_SPLITS:
        raise ValueError(f"COCO split must be one of {COCO_SPLITS}, got {split!r}")
    list_file = root / "lists" / f"{split}.txt"
    if list_file.is_file():
        return read_list(root, list_file, split)
    return _pair_folder(root / f"{split}2014", root / "annotations" / f"{split}2014", split)


def detect_layout(root: str | os.PathLike) -> str:
    """``"voc"`` if ``root/JPEGImages`` exists, ``"coco"`` if ``root/{train,val}2014`` does, else ``"folder"``."""
    root = _existing_dir(root)
    if (root / VOC_IMAGE_DIR).is_dir():
        return "voc"
    if any((root / f"{s}2014").is_dir() for s in COCO_SPLITS):
        return "coco"
    return "folder"


def read_dataset(root: str | os.PathLike, layout: str = "auto", split: str | None = None) -> list[ImageRecord]:
    """Records of a dataset in any supported layout (``"auto"`` = ``detect_layout``)."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "voc":
        return read_voc(root, split)
    if layout == "coco":
        return read_coco(root, split)
    if layout == "folder":
        if split is not None:
            raise ValueError(f"{root}: a plain image folder has no splits, got split={split!r}")
        return read_folder(root)
    raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")


def _pair_folder(image_dir: Path, label_dir: Path, split: str | None) -> list[ImageRecord]:
    """Images directly inside ``image_dir``, each paired with ``label_dir/<stem>.png`` if present."""
    if not image_dir.is_dir():
        raise DatasetLayoutError(f"image folder {image_dir} does not exist")
    by_id: dict[str, Path] = {}
    try:
        entries = list(image_dir.iterdir())
    except OSError as exc:
        raise DatasetLayoutError(f"image folder {image_dir} cannot be listed ({exc.strerror or exc})") from exc
    entries = sorted(p for p in entries if not p.name.startswith("."))
    _report_other_formats(image_dir, [p.name for p in entries if p.suffix.lower() in OTHER_IMAGE_SUFFIXES])
    for path in entries:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not _recordable(path, image_dir):
            continue
        if path.stem in by_id:
            raise DatasetLayoutError(
                f"{image_dir}: {by_id[path.stem].name} and {path.name} share the image id {path.stem!r}"
            )
        by_id[path.stem] = path
    records = []
    for image_id in sorted(by_id):
        label = label_dir / f"{image_id}.png"
        records.append(ImageRecord(image_id, by_id[image_id], label if label.is_file() else None, split))
    return records


def _is_workspace(folder: Path) -> bool:
    """Whether ``folder`` is a pipeline workspace; a log line says that it is skipped."""
    if not (folder / WORKSPACE_MARKER).is_file():
        return False
    log.info("%s is a pipeline workspace: skipped, its files are not ingested", folder)
    return True


def _report_other_formats(folder: Path, names: list[str]) -> None:
    """One warning for the files under ``folder`` in an image format the readers do not take."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    log.warning("%s: %d file%s in an image format the readers do not take skipped (%s); convert to one of %s "
                "to ingest them", folder, len(names), "" if len(names) == 1 else "s", shown, ", ".join(IMAGE_SUFFIXES))


def _report_unlistable(error: OSError) -> None:
    """A sub-folder that cannot be listed (permissions): its images cannot be seen, so say so."""
    log.warning("cannot list %s (%s): images in it are not ingested", error.filename, error.strerror or error)


def _recordable(path: Path, root: Path) -> bool:
    """Whether the manifest can record ``path`` (UTF-8, no backslash); a warning names it if not."""
    relative = os.fsdecode(path.relative_to(root))
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("%s: file name is not valid UTF-8 and cannot be recorded; rename it to ingest it",
                    os.fsencode(path))
        return False
    if "\\" in relative:
        log.warning("%s: file name contains a backslash and cannot be recorded; rename it to ingest it", path)
        return False
    return True


def _existing_dir(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    return root
