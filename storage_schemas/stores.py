"""The pipeline's stores: embeddings, clusters, pseudo task index, and the pseudo-mask metadata.

Dims used across stores: ``image`` (rows of the manifest's ok images, in ``image_ids``
order), ``channel`` (feature width C), ``row``/``col`` (feature grid G×G of the padded
square input), ``cluster`` (K), ``occurrence`` (one valid (image, cluster) pair),
``prior_entry`` (one entry of the flattened similarity lists).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from storage_schemas.base import HEX_PATTERN, ArraySpec, JsonMeta, StoreAttrs, StoreSchema

IMAGES_PER_BLOCK = 64  # one shard of features, one chunk of the small arrays: one writer at a time

SHA256_PATTERN = r"^[0-9a-f]{64}$"


# --- embeddings.zarr ----------------------------------------------------------------------

class Normalisation(BaseModel):
    """Per-channel input normalisation on the 0..255 scale: ``(x - mean) / std``."""

    model_config = ConfigDict(extra="forbid")

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class EmbeddingsAttrs(StoreAttrs):
    """How the features were made; ``image_ids[i]`` is row ``i`` of every array.

    ``image_sha256[i]`` is the sha256 of the image file row ``i`` is (to be) computed from: a row
    whose image has another sha256 in the manifest is out of date. None in stores written before
    rows recorded it (and by callers that do not track image content); such stores stay valid.
    """

    schema_version: int = 1
    extractor: str
    checkpoint_sha256: str | None = Field(pattern=SHA256_PATTERN)
    input_long_side: int = Field(gt=0)
    stride: int = Field(gt=0)
    normalisation: Normalisation
    channels: int = Field(gt=0)
    pca: int | None = Field(default=None, gt=0)
    image_ids: list[str]
    image_sha256: list[Annotated[str, Field(pattern=SHA256_PATTERN)]] | None = None


EMBEDDINGS = StoreSchema(
    name="embeddings",
    schema_version=1,
    attrs_model=EmbeddingsAttrs,
    arrays=(
        ArraySpec(name="features", dtype="float16", dims=("image", "channel", "row", "col"),
                  chunks={"image": 1}, compressor="blosc-lz4",
                  description="L2-normalised pixel embeddings [N, C, G, G] of the padded square input"),
        ArraySpec(name="valid_hw", dtype="int32", dims=("image", "hw"),
                  description="feature rows/cols [N, 2] that cover image content, not padding"),
        ArraySpec(name="image_hw", dtype="int32", dims=("image", "hw"),
                  description="original image height/width [N, 2] after EXIF orientation"),
        ArraySpec(name="done", dtype="bool", dims=("image",), fill_value=False,
                  description="per-image done mask [N]: rows written completely, for exact resume"),
    ),
    fixed_dims={"hw": 2},
    write_units={"image": IMAGES_PER_BLOCK},
    attr_dims={"image_ids": "image", "image_sha256": "image", "channels": "channel"},
)


# --- clusters.zarr ------------------------------------------------------------------------

class ClustersAttrs(StoreAttrs):
    """How the centroids were fitted; ``image_ids[i]`` is row ``i`` of ``assignments``."""

    schema_version: int = 1
    num_clusters: int = Field(gt=0)
    seed: int
    iterations: int = Field(ge=0)
    inertia: float = Field(ge=0)
    points_used: int = Field(ge=0)
    images_sampled: int = Field(ge=0)
    warm_start_parent: str | None = Field(default=None, pattern=HEX_PATTERN)
    converged: bool
    image_ids: list[str]


CLUSTERS = StoreSchema(
    name="clusters",
    schema_version=1,
    attrs_model=ClustersAttrs,
    arrays=(
        ArraySpec(name="centroids", dtype="float32", dims=("cluster", "channel"),
                  description="k-means centroids [K, C]"),
        ArraySpec(name="assignments", dtype="int16", dims=("image", "row", "col"), fill_value=-1,
                  description="nearest centroid per feature cell [N, G, G]; -1 = padding cell"),
    ),
    write_units={"image": IMAGES_PER_BLOCK},
    attr_dims={"num_clusters": "cluster", "image_ids": "image"},
)


# --- tasks.zarr (pseudo task index) ---------------------------------------------------------

class TasksAttrs(StoreAttrs):
    """Filters and similarity-prior rule used to build the index.

    A cluster with ``n`` occurrences lists, for each, its ``k`` most similar occurrences:
    ``k = n`` if ``n < prior_min_members`` else ``min(floor(prior_fraction * n), prior_max_k)``,
    searched among at most ``prior_max_candidates`` members.
    """

    schema_version: int = 1
    image_ids: list[str]
    num_clusters: int = Field(gt=0)
    channels: int = Field(gt=0)
    min_area: int = Field(ge=0)
    background_span: float = Field(gt=0, le=1)
    prior_min_members: int = Field(ge=0)
    prior_fraction: float = Field(gt=0, le=1)
    prior_max_k: int = Field(gt=0)
    prior_max_candidates: int = Field(gt=0)


TASKS = StoreSchema(
    name="tasks",
    schema_version=1,
    attrs_model=TasksAttrs,
    arrays=(
        ArraySpec(name="occ_image", dtype="int32", dims=("occurrence",),
                  description="row into image_ids [M] of each valid (image, cluster) occurrence"),
        ArraySpec(name="occ_cluster", dtype="int16", dims=("occurrence",),
                  description="cluster id [M] of each occurrence"),
        ArraySpec(name="occ_area", dtype="int64", dims=("occurrence",),
                  description="pixel area [M] of the occurrence at original resolution"),
        ArraySpec(name="occ_prototype", dtype="float32", dims=("occurrence", "channel"),
                  chunks={"occurrence": 512},
                  description="mean feature [M, C] inside the occurrence's region"),
        ArraySpec(name="prior_offsets", dtype="int64", dims=("occurrence_edge",),
                  description="CSR offsets [M + 1]: prior_rows[off[i]:off[i+1]] are occurrence i's candidates"),
        ArraySpec(name="prior_rows", dtype="int32", dims=("prior_entry",), chunks={"prior_entry": 1 << 18},
                  description="support candidates [P] as occurrence rows, most similar first"),
    ),
    derived_dims={"occurrence_edge": ("occurrence", 1)},
    write_units={"occurrence": 8192, "prior_entry": 1 << 22},
    attr_dims={"channels": "channel"},
)


# --- pseudo masks (a folder of PNGs + meta.json) -----------------------------------------------

class FelzenszwalbParams(BaseModel):
    """scikit-image ``felzenszwalb`` parameters of the superpixel majority vote."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(gt=0)
    sigma: float = Field(ge=0)
    min_size: int = Field(ge=0)


class PseudoMasksMeta(JsonMeta):
    """``meta.json`` of the pseudo-mask folder: one palette PNG per image, pixel = cluster id."""

    kind: ClassVar[str] = "pseudo-masks metadata"
    schema_version: int = 1
    build_key: str = Field(pattern=HEX_PATTERN, min_length=8)
    num_clusters: int = Field(gt=0)
    felzenszwalb: FelzenszwalbParams
    image_count: int = Field(ge=0)
