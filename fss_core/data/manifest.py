"""Ingest: turn a source dataset into a manifest, one row per image, and keep it up to date.

Every candidate image is hashed (sha256, streamed), decoded once to prove it is readable
and to record its size after EXIF orientation, and its label (if any) is checked to be
readable and of the same size, and, when the number of classes is known, to hold only class
ids ``0..num_classes`` and 255 (ignore). A file that fails any check becomes a ``skipped`` row
with the reason, never a crash and never a silent drop.

Re-ingesting the same source is cheap: a file whose size and mtime match its row is
trusted without re-reading it, and a file whose content hash matches keeps its row. A
file that disappeared keeps its row, marked ``skipped`` with reason ``"missing from
source"``, so image ids once seen stay known; if it comes back it is ingested as new.
Labels are checked when their image is new or changed, or the label path changes; a label
edited in place under an unchanged image is not re-checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from PIL import Image
from pydantic import BaseModel

from fss_core.data.images import IGNORE_LABEL, ImageReadError, exif_orientation, image_size, load_label
from fss_core.data.layouts import ImageRecord, detect_layout, read_dataset
from storage_schemas.manifest import (
    MANIFEST_SCHEMA_VERSION,
    REASON_MISSING,
    ManifestError,
    ManifestHeader,
    ManifestRow,
)

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ManifestUpdate:
    """The new manifest rows (sorted by image_id) and what changed, as image ids.

    ``added``, ``changed``, ``unchanged`` and ``removed`` partition ``rows``: new ids (or ids
    back after being missing), files whose content, label or split differ from their row,
    rows kept as they were (including rows still missing), and files present before but
    gone now. ``skipped`` lists the present files that are unusable (corrupt, empty, bad label).
    """

    rows: list[ManifestRow]
    added: list[str]
    changed: list[str]
    unchanged: list[str]
    skipped: list[str]
    removed: list[str]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def scan_source(root: str | os.PathLike, layout: str = "auto", split: str | None = None) -> list[ImageRecord]:
    """Candidate images of a source dataset, sorted by image_id.

    ``layout`` is ``"auto"``, ``"folder"``, ``"voc"`` or ``"coco"``. Only files with an image
    suffix are candidates; whether they decode is checked by :func:`build_manifest`.
    """
    resolved = detect_layout(root) if layout == "auto" else layout
    records = read_dataset(root, resolved, split)
    log.info("%s: %d candidate images (layout %s, split %s)", root, len(records), resolved, split)
    return records


def build_manifest(root: str | os.PathLike, layout: str = "auto", existing: list[ManifestRow] | None = None,
                   *, split: str | None = None, workers: int | None = None,
                   num_classes: int | None = None) -> ManifestUpdate:
    """Ingest ``root`` and return the updated manifest relative to ``existing`` (None = first ingest).

    ``workers`` threads hash and decode files in parallel (default: up to 8, one per core).
    ``num_classes``: foreground classes of the labels; a label holding another value than
    ``0..num_classes`` or 255 makes its image a skipped row (None = values not checked).
    """
    root = Path(root)
    records = scan_source(root, layout, split)
    previous = {row.image_id: row for row in existing or ()}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda rec: _ingest_one(root, rec, previous.get(rec.image_id), num_classes),
                                records))

    rows: dict[str, ManifestRow] = {}
    update: dict[str, list[str]] = {k: [] for k in ("added", "changed", "unchanged", "skipped", "removed")}
    for row, outcome in results:
        rows[row.image_id] = row
        update[outcome].append(row.image_id)
        if row.status == "skipped":
            update["skipped"].append(row.image_id)
            log.warning("%s: skipped %s (%s)", root, row.path, row.reason)
    for image_id, row in previous.items():
        if image_id in rows:
            continue
        if row.reason == REASON_MISSING:
            update["unchanged"].append(image_id)
            rows[image_id] = row
        else:
            update["removed"].append(image_id)
            rows[image_id] = row.model_copy(update={"status": "skipped", "reason": REASON_MISSING})
    counts = ", ".join(f"{len(ids)} {name}" for name, ids in update.items())
    log.info("%s: manifest of %d rows: %s", root, len(rows), counts)
    return ManifestUpdate(rows=[rows[i] for i in sorted(rows)], **{k: sorted(v) for k, v in update.items()})


def _ingest_one(root: Path, record: ImageRecord, previous: ManifestRow | None,
                num_classes: int | None = None) -> tuple[ManifestRow, str]:
    """(row, outcome) for one candidate; outcome is "added", "changed" or "unchanged"."""
    path = _relative(root, record.image_path)
    label_path = _relative(root, record.label_path) if record.label_path is not None else None
    known = previous if previous is not None and previous.reason != REASON_MISSING else None
    base = {"image_id": record.image_id, "path": path, "split": record.split, "label_path": label_path}
    if known is not None:
        base["added_at"] = known.added_at
    try:
        stat = record.image_path.stat()
        same_stat = known is not None and known.sha256 is not None and (
            (known.size_bytes, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns))
        sha256 = known.sha256 if same_stat else file_sha256(record.image_path)
    except OSError as exc:
        return ManifestRow(**base, size_bytes=0, mtime_ns=0, status="skipped",
                           reason=f"cannot read file ({exc.strerror or exc})"), "changed" if known else "added"
    base.update(sha256=sha256, size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    if known is not None and sha256 == known.sha256 and (path, label_path, record.split) == (
            known.path, known.label_path, known.split):
        return known.model_copy(update={"mtime_ns": stat.st_mtime_ns}), "unchanged"
    outcome = "changed" if known is not None else "added"
    if stat.st_size == 0:
        return ManifestRow(**base, status="skipped", reason="empty file (0 bytes)"), outcome
    try:
        height, width = image_size(record.image_path)
    except (ImageReadError, Image.DecompressionBombError) as exc:
        return ManifestRow(**base, status="skipped", reason=f"unreadable image ({_cause(exc)})"), outcome
    base.update(width=width, height=height)
    if record.label_path is not None:
        orientation = exif_orientation(record.image_path)
        if orientation != 1:
            # The image is read rotated or mirrored for display, its label as stored: whether the
            # label was drawn on the stored or the displayed pixels cannot be told, so neither is guessed.
            return ManifestRow(**base, status="skipped",
                               reason=f"EXIF orientation {orientation} turns the image for display but not its "
                                      f"label {label_path}: save the image as displayed without the tag, or "
                                      f"remove the tag if the label follows the stored pixels"), outcome
        try:
            label = load_label(record.label_path)
        except (ImageReadError, Image.DecompressionBombError) as exc:
            return ManifestRow(**base, status="skipped",
                               reason=f"unreadable label {label_path} ({_cause(exc)})"), outcome
        if label.shape != (height, width):
            return ManifestRow(**base, status="skipped",
                               reason=f"label {label_path} is {label.shape[1]}x{label.shape[0]}, "
                                      f"image is {width}x{height}"), outcome
        if num_classes is not None:
            present = np.unique(label)
            foreign = present[(present > num_classes) & (present != IGNORE_LABEL)]
            if len(foreign):
                return ManifestRow(**base, status="skipped",
                                   reason=f"label {label_path} holds values {foreign[:5].tolist()} outside the "
                                          f"classes 0..{num_classes} and {IGNORE_LABEL} (ignore)"), outcome
    return ManifestRow(**base, status="ok"), outcome


def _relative(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as POSIX; an error if it lies outside."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError as exc:
        raise ValueError(f"{path} lies outside the source root {root}") from exc


def _cause(exc: BaseException) -> str:
    """The underlying decoder message, without the file path the caller already records."""
    return str(exc.__cause__ or exc)


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow]) -> None:
    """Write ``rows`` as JSON Lines after a header line, sorted by image_id, atomically."""
    ordered = sorted(rows, key=lambda r: r.image_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.image_id == b.image_id:
            raise ValueError(f"manifest {path}: image id {a.image_id!r} appears twice")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(ManifestHeader(row_count=len(ordered)).model_dump_json() + "\n")
        for row in ordered:
            f.write(row.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())  # the rename must never expose a partly written file
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate a manifest; ManifestError names the file, line and field on any problem."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path}: cannot read ({exc})") from exc
    if not lines:
        raise ManifestError(f"manifest {path}: empty file, expected a header line")
    header = _parse_line(path, 1, lines[0], ManifestHeader, check_version=True)
    rows: list[ManifestRow] = []
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        row = _parse_line(path, lineno, line, ManifestRow)
        if row.image_id in line_of:
            raise ManifestError(f"manifest {path}, line {lineno}: image id {row.image_id!r} already on "
                                f"line {line_of[row.image_id]}")
        line_of[row.image_id] = lineno
        rows.append(row)
    if len(rows) != header.row_count:
        raise ManifestError(f"manifest {path}: header says {header.row_count} rows, found {len(rows)} "
                            f"(truncated or edited file)")
    return rows


def _parse_line(path: str | os.PathLike, lineno: int, line: str, model: type[BaseModel],
                check_version: bool = False) -> Any:
    """One JSON line validated as ``model``; the header line also has its version checked first."""
    where = f"manifest {path}, line {lineno}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(raw).__name__}")
    if check_version and raw.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"{where}: was written with schema_version {raw.get('schema_version')}, "
                            f"this code reads {MANIFEST_SCHEMA_VERSION}")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"field {'.'.join(map(str, e['loc'])) or '(row)'!r}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{where}: {problems}") from exc
