"""Declarative zarr v3 store layouts and the helpers that create, open and validate them.

A :class:`StoreSchema` names a store's arrays (:class:`ArraySpec`: dtype, named dimensions,
chunking, compression) and the pydantic model of its attributes. :func:`create_store` lays
a store out from a schema; :func:`open_store` opens one and checks it against the schema,
so a store written by other code (or an older version of this code) fails at open time
with one :class:`StoreValidationError` that says what differs, never deep inside a stage.

Chunking: along a dimension listed in the schema's ``write_units``, every array of the
store is split into blocks of that many entries (zarr shards, or plain chunks when the
array has no finer ``chunks`` rule). A writer that owns one block of, say, images owns
whole files in every array, so writers of different blocks never touch the same file and a
killed run leaves whole blocks only. Writers that share a block must take turns: a write into
part of a block rewrites its file (see ``fss_core.embeddings.extract``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import pydantic
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from zarr.codecs import BloscCodec, ZstdCodec

# blosc-zstd: zstd 3 over bit-shuffled bytes, for small integer arrays; blosc-lz4: lz4 over the bytes
# as they are, for the float16 embeddings, written once per image and read on every k-means pass
# (on ReLU features, half of them zeros, through zarr: about half the CPU of zstd 1 + byte shuffle
# to write and to read, for a store about a fifth larger; docs/benchmarks.md, "feature codecs")
Compressor = Literal["blosc-zstd", "blosc-lz4", "zstd", "none"]
HEX_PATTERN = r"^[0-9a-f]+$"


class StoreValidationError(ValueError):
    """A durable artifact does not match what the code expects; the message says where and how."""


class StoreVersionError(StoreValidationError):
    """A whole artifact written with another ``schema_version``: refused, never read or rebuilt over.

    Other validation errors mean a missing or half-written artifact, which its stage rebuilds;
    this one means the workspace belongs to other code, so only a person decides to delete it.
    """


class StoreKeyError(StoreValidationError):
    """A store was built from another config or other inputs than the reader expects."""


class StoreAttrs(BaseModel):
    """Attributes every store records: its layout version, the key it was built from, when."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    build_key: str = Field(pattern=HEX_PATTERN, min_length=8)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class ArraySpec(BaseModel):
    """One array of a store.

    ``dims`` names each axis; a name shared by several arrays is one size across the store.
    ``chunks`` gives the inner (read) chunk length along some dims; dims not listed take
    their write unit (see :class:`StoreSchema`) or their whole extent.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    dims: tuple[str, ...]
    chunks: dict[str, int] = Field(default_factory=dict)
    compressor: Compressor = "blosc-zstd"
    fill_value: float | int | bool = 0
    description: str

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return np.dtype(value).name

    @model_validator(mode="after")
    def _chunks_on_own_dims(self) -> ArraySpec:
        unknown = set(self.chunks) - set(self.dims)
        if unknown:
            raise ValueError(f"array {self.name!r}: chunks name unknown dims {sorted(unknown)}")
        if any(n < 1 for n in self.chunks.values()):
            raise ValueError(f"array {self.name!r}: chunk lengths must be >= 1")
        return self


class StoreSchema(BaseModel):
    """The layout of one kind of store.

    - ``fixed_dims``: dims whose size is part of the layout (e.g. ``hw`` = 2).
    - ``derived_dims``: ``dim -> (base_dim, offset)``, size = size(base_dim) + offset
      (e.g. CSR offsets have one entry more than rows).
    - ``write_units``: block length along a dim shared by every array (see module doc).
    - ``attr_dims``: ``attr field -> dim``; the field (an int, or the length of a list)
      must equal that dim's size. A ``None`` field is not checked.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    schema_version: int
    arrays: tuple[ArraySpec, ...]
    attrs_model: type[StoreAttrs]
    fixed_dims: dict[str, int] = Field(default_factory=dict)
    derived_dims: dict[str, tuple[str, int]] = Field(default_factory=dict)
    write_units: dict[str, int] = Field(default_factory=dict)
    attr_dims: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> StoreSchema:
        if self.attrs_model.model_fields["schema_version"].default != self.schema_version:
            raise ValueError(f"{self.name}: {self.attrs_model.__name__}.schema_version must default to "
                             f"{self.schema_version}")
        dims = {d for spec in self.arrays for d in spec.dims}
        for field, dim in self.attr_dims.items():
            if field not in self.attrs_model.model_fields or dim not in dims:
                raise ValueError(f"{self.name}: attr_dims entry {field!r} -> {dim!r} names an unknown field or dim")
        for spec in self.arrays:
            for dim, chunk in spec.chunks.items():
                unit = self.write_units.get(dim)
                if unit is not None and unit % chunk:
                    raise ValueError(f"{self.name}: write unit {unit} along {dim!r} is not a multiple of "
                                     f"array {spec.name!r}'s chunk {chunk}")
        return self

    def resolve_sizes(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Every dim's size from the free ones given (fixed and derived dims are filled in)."""
        needed = {d for spec in self.arrays for d in spec.dims}
        unknown = sorted(set(sizes) - needed)
        if unknown:
            raise ValueError(f"{self.name}: sizes given for unknown dims {unknown}")
        resolved = dict(self.fixed_dims)
        for dim, size in sizes.items():
            if dim in self.fixed_dims and size != self.fixed_dims[dim]:
                raise ValueError(f"{self.name}: dim {dim!r} is fixed at {self.fixed_dims[dim]}, got {size}")
            resolved[dim] = int(size)
        for dim, (base, offset) in self.derived_dims.items():
            if base not in resolved:
                continue
            expected = resolved[base] + offset
            if dim in resolved and resolved[dim] != expected:
                raise ValueError(f"{self.name}: dim {dim!r} must be size({base!r}) + {offset}, got {resolved[dim]}")
            resolved[dim] = expected
        missing = sorted(needed - set(resolved))
        if missing:
            raise ValueError(f"{self.name}: sizes missing for dims {missing}")
        negative = sorted(d for d in needed if resolved[d] < 0)
        if negative:
            raise ValueError(f"{self.name}: negative sizes for dims {negative}")
        return {d: resolved[d] for d in sorted(needed)}


def _codecs(compressor: Compressor) -> tuple:
    if compressor == "blosc-zstd":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
    if compressor == "blosc-lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),)
    if compressor == "zstd":
        return (ZstdCodec(level=3),)
    return ()


def _layout(spec: ArraySpec, sizes: Mapping[str, int],
            write_units: Mapping[str, int]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards or None) for one array; shards are always a multiple of chunks."""
    outer = tuple(write_units.get(d, max(sizes[d], 1)) for d in spec.dims)
    inner = tuple(spec.chunks.get(d, o) for d, o in zip(spec.dims, outer))
    for dim, o, i in zip(spec.dims, outer, inner):
        if o % i:
            raise ValueError(f"array {spec.name!r}: write unit {o} along {dim!r} is not a multiple of chunk {i}")
    return (inner, None) if inner == outer else (inner, outer)


def create_store(path: str | os.PathLike, schema: StoreSchema, sizes: Mapping[str, int],
                 attrs: StoreAttrs, *, write_units: Mapping[str, int] | None = None) -> zarr.Group:
    """Create (replacing anything at ``path``) an empty zarr v3 store laid out by ``schema``.

    ``sizes`` gives every free dim (fixed and derived dims are filled in); ``write_units``
    overrides the schema's block length along some dims (e.g. small blocks in tests, or
    one block per Dask partition). Arrays start at their fill value; ``attrs`` is checked
    against the sizes and written. Returns the group opened read-write.
    """
    if type(attrs) is not schema.attrs_model:
        raise TypeError(f"{schema.name}: attrs must be {schema.attrs_model.__name__}, got {type(attrs).__name__}")
    if attrs.schema_version != schema.schema_version:
        raise ValueError(f"{schema.name}: attrs say schema_version {attrs.schema_version}, "
                         f"schema is {schema.schema_version}")
    resolved = schema.resolve_sizes(sizes)
    units = {**schema.write_units, **(write_units or {})}
    where = _display(path)
    _check_attr_dims(schema, attrs, resolved, where)
    group = zarr.open_group(os.fspath(path), mode="w", zarr_format=3)
    for spec in schema.arrays:
        chunks, shards = _layout(spec, resolved, units)
        group.create_array(
            spec.name,
            shape=tuple(resolved[d] for d in spec.dims),
            dtype=spec.dtype,
            chunks=chunks,
            shards=shards,
            compressors=_codecs(spec.compressor),
            fill_value=spec.fill_value,
            dimension_names=list(spec.dims),
            attributes={"description": spec.description},
        )
    write_attrs(group, attrs)
    return group


def open_store(path: str | os.PathLike, schema: StoreSchema,
               mode: Literal["r", "r+"] = "r", *, build_key: str | None = None) -> zarr.Group:
    """Open the store at ``path`` and check it against ``schema``.

    Checks that the group exists (zarr v3), its ``schema_version`` equals the schema's, its
    attributes parse, every array exists with the expected dtype, dims and consistent
    sizes, and, when ``build_key`` is given, that the store was built with that key. Raises
    :class:`StoreValidationError` on the first mismatch (:class:`StoreVersionError` for
    another schema version, :class:`StoreKeyError` for another build key). ``mode="r+"``
    lets a resumed run write into it.
    """
    where = _display(path)
    try:
        group = zarr.open_group(os.fspath(path), mode=mode)
    except (FileNotFoundError, KeyError) as exc:
        raise StoreValidationError(f"{schema.name} store at {where}: no zarr group there ({exc})") from exc
    except Exception as exc:  # zarr raises several types for "something else is there"
        raise StoreValidationError(f"{schema.name} store at {where}: cannot be opened as a zarr group "
                                   f"({type(exc).__name__}: {exc})") from exc
    if group.metadata.zarr_format != 3:
        raise StoreValidationError(f"{schema.name} store at {where}: is zarr format "
                                   f"{group.metadata.zarr_format}, expected 3")
    attrs = _parse_attrs(dict(group.attrs), schema, where)
    if build_key is not None and attrs.build_key != build_key:
        raise StoreKeyError(f"{schema.name} store at {where}: was built with build key {attrs.build_key}, "
                            f"this run expects {build_key} (built from another config or other inputs); "
                            f"re-run the stage that builds it")
    versions = f"(store schema_version {attrs.schema_version}, code expects {schema.schema_version})"
    found_sizes: dict[str, tuple[int, str]] = {}
    for spec in schema.arrays:
        node = group.get(spec.name)
        if not isinstance(node, zarr.Array):
            what = "is missing" if node is None else "is a group, not an array"
            raise StoreValidationError(f"{schema.name} store at {where}: array {spec.name!r} {what} {versions}")
        dtype = np.dtype(node.dtype)
        if dtype != np.dtype(spec.dtype):
            raise StoreValidationError(f"{schema.name} store at {where}: array {spec.name!r} has dtype "
                                       f"{dtype.name}, expected {spec.dtype} {versions}")
        if node.ndim != len(spec.dims):
            raise StoreValidationError(f"{schema.name} store at {where}: array {spec.name!r} has {node.ndim} dims "
                                       f"{node.shape}, expected {len(spec.dims)} {list(spec.dims)} {versions}")
        names = node.metadata.dimension_names
        if names is not None and tuple(names) != spec.dims:
            raise StoreValidationError(f"{schema.name} store at {where}: array {spec.name!r} has dimension names "
                                       f"{list(names)}, expected {list(spec.dims)} {versions}")
        for dim, size in zip(spec.dims, node.shape):
            if dim in found_sizes and found_sizes[dim][0] != size:
                other_size, other = found_sizes[dim]
                raise StoreValidationError(f"{schema.name} store at {where}: dim {dim!r} has size {size} in array "
                                           f"{spec.name!r} but {other_size} in array {other!r} {versions}")
            found_sizes.setdefault(dim, (size, spec.name))
    sizes = {d: s for d, (s, _) in found_sizes.items()}
    expected = dict(schema.fixed_dims)
    expected.update({d: sizes[b] + off for d, (b, off) in schema.derived_dims.items() if b in sizes})
    for dim, size in expected.items():
        if dim in sizes and sizes[dim] != size:
            raise StoreValidationError(f"{schema.name} store at {where}: dim {dim!r} has size {sizes[dim]}, "
                                       f"expected {size} {versions}")
    _check_attr_dims(schema, attrs, sizes, where)
    return group


@contextlib.contextmanager
def store_build(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh sibling folder to write a whole store into; it replaces ``path`` once the block ends.

    For stores written in one go (no per-row resume): readers only ever see the previous store
    or the finished new one, never a half-written one. A run killed while writing leaves a
    hidden ``.NAME.build-PID-…`` folder, removed by the next build; killed between the two
    renames of the swap, it leaves no store at ``path``, which is then rebuilt.
    """
    path = Path(path)
    remove_stale_builds(path)
    staging = path.with_name(f".{path.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, path)


def replace_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, replacing what is there (two renames, then a delete)."""
    retired = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)


def remove_stale_builds(path: str | os.PathLike) -> list[Path]:
    """Delete the leftovers of killed :func:`store_build` runs next to ``path`` (those of live
    processes are kept); returns what was removed."""
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*-*-*"):
        kind, _, rest = leftover.name[len(path.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("build", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_attrs(group: zarr.Group, attrs: StoreAttrs) -> None:
    """Replace the group's attributes with ``attrs`` (JSON form)."""
    group.attrs.put(attrs.model_dump(mode="json"))


def read_attrs(group: zarr.Group, schema: StoreSchema) -> StoreAttrs:
    """The group's attributes parsed as ``schema.attrs_model`` (StoreValidationError if they don't fit)."""
    return _parse_attrs(dict(group.attrs), schema, _display(group.store_path))


def write_unit(array: zarr.Array) -> tuple[int, ...]:
    """The block a single writer must own: the shard shape, or the chunk shape if unsharded."""
    return array.shards or array.chunks


class JsonMeta(BaseModel):
    """A small JSON metadata file next to a folder artifact; subclasses set ``kind`` and
    default ``schema_version`` to the version the code writes."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "metadata"

    schema_version: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def write_json_meta(path: str | os.PathLike, meta: JsonMeta) -> None:
    """Write ``meta`` as JSON at ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json_meta(path: str | os.PathLike, model: type[JsonMeta]) -> JsonMeta:
    """Read and validate a JSON metadata file; StoreValidationError names the file, field and versions."""
    head = f"{model.kind} at {_display(path)}"
    expected = model.model_fields["schema_version"].default
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StoreValidationError(f"{head}: file is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreValidationError(f"{head}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise StoreValidationError(f"{head}: expected a JSON object, found {type(raw).__name__}")
    return _validate_versioned(raw, model, expected, head)


def _parse_attrs(raw: dict[str, Any], schema: StoreSchema, where: str) -> StoreAttrs:
    return _validate_versioned(raw, schema.attrs_model, schema.schema_version, f"{schema.name} store at {where}")


def _validate_versioned(raw: dict[str, Any], model: type[BaseModel], expected: int, head: str) -> Any:
    """Check ``schema_version`` first (a clear version message), then every field."""
    if "schema_version" not in raw:
        raise StoreValidationError(f"{head}: attribute 'schema_version' is missing "
                                   f"(code expects schema_version {expected})")
    version = raw["schema_version"]
    if version != expected:
        raise StoreVersionError(f"{head}: was written with schema_version {version}, this code reads {expected}; "
                                f"move or delete it to rebuild it with this code")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise StoreValidationError(f"{head}: does not match {model.__name__}: {problems} "
                                   f"(store schema_version {version}, code expects {expected})") from exc


def _describe(err: Mapping[str, Any]) -> str:
    """One pydantic error as "attribute 'x' <problem>, found <value>"."""
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "missing":
        return f"attribute {field!r} is missing"
    found = repr(err.get("input"))
    if len(found) > 80:
        found = found[:77] + "..."
    return f"attribute {field!r} {err['msg'][0].lower()}{err['msg'][1:]}, found {found}"


def _check_attr_dims(schema: StoreSchema, attrs: StoreAttrs, sizes: Mapping[str, int], where: str) -> None:
    for field, dim in schema.attr_dims.items():
        value = getattr(attrs, field)
        if value is None or dim not in sizes:
            continue
        count = value if isinstance(value, int) else len(value)
        if count != sizes[dim]:
            what = "has" if isinstance(value, int) else "lists"
            raise StoreValidationError(f"{schema.name} store at {where}: attribute {field!r} {what} {count}, "
                                       f"but dim {dim!r} has size {sizes[dim]} "
                                       f"(store schema_version {attrs.schema_version}, "
                                       f"code expects {schema.schema_version})")


def _display(path: Any) -> str:
    text = str(path)
    return text.removeprefix("file://")
