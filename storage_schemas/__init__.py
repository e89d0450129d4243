"""Pydantic models of every durable artifact and the helpers that open and validate them.

Imports only pydantic, zarr and numpy, so any layer (library, tasks, CLI) can check a
store without pulling in the science or the orchestration.
"""

from storage_schemas.base import (
    ArraySpec,
    JsonMeta,
    StoreAttrs,
    StoreSchema,
    StoreKeyError,
    StoreValidationError,
    StoreVersionError,
    create_store,
    open_store,
    remove_stale_builds,
    replace_folder,
    store_build,
    read_attrs,
    read_json_meta,
    write_attrs,
    write_json_meta,
    write_unit,
)
from storage_schemas.manifest import MANIFEST_SCHEMA_VERSION, ManifestError, ManifestHeader, ManifestRow
from storage_schemas.stores import (
    CLUSTERS,
    EMBEDDINGS,
    TASKS,
    ClustersAttrs,
    EmbeddingsAttrs,
    FelzenszwalbParams,
    Normalisation,
    PseudoMasksMeta,
    TasksAttrs,
)

__all__ = [
    "ArraySpec", "JsonMeta", "StoreAttrs", "StoreSchema", "StoreValidationError",
    "StoreKeyError", "StoreVersionError", "store_build", "replace_folder", "remove_stale_builds",
    "create_store", "open_store", "read_attrs", "read_json_meta", "write_attrs", "write_json_meta", "write_unit",
    "MANIFEST_SCHEMA_VERSION", "ManifestError", "ManifestHeader", "ManifestRow",
    "CLUSTERS", "EMBEDDINGS", "TASKS", "ClustersAttrs", "EmbeddingsAttrs", "FelzenszwalbParams",
    "Normalisation", "PseudoMasksMeta", "TasksAttrs",
]
