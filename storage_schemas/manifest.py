"""The manifest: one row per source image, written as JSON Lines after a header line.

File layout::

    {"kind": "fss-manifest", "schema_version": 1, "row_count": 3}
    {"image_id": "...", "path": "...", ...}        # one ManifestRow per line, sorted by image_id
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage_schemas.base import StoreValidationError

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_KIND = "fss-manifest"
REASON_MISSING = "missing from source"


class ManifestError(StoreValidationError):
    """A manifest file is unreadable or invalid; the message names the file and line."""


class ManifestHeader(BaseModel):
    """First line of a manifest file; ``row_count`` catches a truncated file."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fss-manifest"] = MANIFEST_KIND
    schema_version: int = MANIFEST_SCHEMA_VERSION
    row_count: int = Field(ge=0)


class ManifestRow(BaseModel):
    """One source image.

    ``path`` and ``label_path`` are relative to the source root, POSIX style. ``width`` and
    ``height`` are after EXIF orientation; they are ``None`` only for a skipped row whose
    image could not be decoded. ``reason`` is set exactly when ``status == "skipped"``.
    ``size_bytes``/``mtime_ns``/``sha256`` fingerprint the image file: an ingest that finds
    the same size and mtime trusts the recorded hash instead of reading the file again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_id: str = Field(min_length=1)
    path: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    mtime_ns: int
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    split: str | None = None
    label_path: str | None = None
    status: Literal["ok", "skipped"]
    reason: str | None = None
    added_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("path", "label_path")
    @classmethod
    def _relative_posix(cls, value: str | None) -> str | None:
        if value is None:
            return value
        p = PurePosixPath(value)
        if not value or "\\" in value or p.is_absolute() or ".." in p.parts or str(p) != value:
            raise ValueError(f"must be a normalised relative POSIX path inside the source root, got {value!r}")
        return value

    @model_validator(mode="after")
    def _status_consistent(self) -> ManifestRow:
        if self.status == "skipped" and not self.reason:
            raise ValueError("a skipped row needs a reason")
        if self.status == "ok" and self.reason is not None:
            raise ValueError("an ok row must not have a reason")
        if self.status == "ok" and None in (self.width, self.height, self.sha256):
            raise ValueError("an ok row needs sha256, width and height")
        return self
