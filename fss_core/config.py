"""One configuration tree for the whole pipeline.

Resolution order: defaults (the models below) ← a YAML file (``--config``) ←
``--set section.key=value`` overrides. Unknown keys are an error naming the key, so a
typo never silently falls back to a default. The resolved tree is saved with every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fss_core.data.folds import NUM_FOLDS


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


Fold = Annotated[int, Field(ge=0, lt=NUM_FOLDS)]  # every fold scheme has folds 0..3


def _distinct(value: list) -> list:
    if len(set(value)) != len(value):
        raise ValueError(f"{value} lists a value twice")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """The synthetic VOC-layout dataset used when no source is configured."""

    seed: int = 0
    classes: int = Field(20, ge=1, le=254)
    images: int = Field(480, ge=2)
    size: int = Field(128, ge=32)

    @model_validator(mode="after")
    def _every_class_in_both_splits(self) -> SyntheticConfig:
        if self.images < 2 * self.classes:
            raise ValueError(f"images must be >= 2 * classes = {2 * self.classes} so every class is in train and val")
        return self


class DataConfig(_Section):
    """Where the images come from and how classes are split into folds."""

    source: Path | None = Field(None, description="dataset root; None = synthetic data in the workspace")
    layout: Literal["auto", "folder", "voc", "coco"] = "auto"
    fold_scheme: Literal["pascal", "coco", "coco_consecutive", "generic"] = "generic"
    num_classes: int | None = Field(None, description="classes of a 'generic' VOC-layout dataset")
    synthetic: SyntheticConfig = SyntheticConfig()


class SSLConfig(_Section):
    """Self-supervised pretraining of the download-free backbone (used when no checkpoint)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=2)
    image_size: int = Field(96, ge=32)
    seed: int = 0


class ExtractConfig(_Section):
    """Stage A: pixel embeddings of every image into embeddings.zarr."""

    backbone: Literal["small_cnn", "resnet50", "moco_v2", "resnet50_v2", "dino_vits16", "dino_vitb8"] = "small_cnn"
    checkpoint: Path | None = None
    long_side: int = Field(473, ge=32, description="longer image side on the padded square canvas")
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(64, ge=1, description="images per mapped task and per zarr shard")
    pca_dim: int | None = Field(None, ge=2, description="randomized-PCA projection of the embeddings")
    ssl: SSLConfig = SSLConfig()


class ClusterConfig(_Section):
    """Stage B: k-means of the valid pixel embeddings into pseudo-classes."""

    num_clusters: int = Field(30, ge=2, le=254)
    seed: int = 123
    max_iter: int = Field(50, ge=1)
    tol: float = Field(1e-4, ge=0)
    sample_images: int | None = Field(20000, ge=1, description="cap on images clustered (reference: 20000)")
    init_sample: int = Field(200_000, ge=1000, description="vectors used for the k-means++ initialisation")


class PseudoConfig(_Section):
    """Stage B/C: pseudo masks and the pseudo task index."""

    felzenszwalb_scale: float = 100.0
    felzenszwalb_sigma: float = 0.8
    felzenszwalb_min_size: int = 200
    min_area: int = Field(2048, ge=1, description="minimum pseudo-class area in pixels of the original image "
                          "(of its shrunk copy above max_side)")
    area_reference: int | None = Field(473, ge=1, description="images whose longer side is shorter have min_area and "
                                       "felzenszwalb_min_size scaled by (longer side / area_reference)^2; null = "
                                       "never scaled, as the reference")
    max_side: int | None = Field(640, ge=64, description="an image with a longer side gets its pseudo mask made on "
                                 "its copy shrunk to this size (min_area and felzenszwalb_min_size then count "
                                 "in that copy's pixels), enlarged to the image; the reference's datasets are not "
                                 "larger; null = always at the original size")
    background_span: float = Field(0.99, gt=0, le=1)
    prior_max: int = Field(5000, ge=1, description="cap on the similarity prior's support candidates")


class TrainConfig(_Section):
    """Stages D-E: the FSS model and its training."""

    mode: Literal["unsupervised", "finetune", "supervised"] = "unsupervised"
    fold: Fold = 0
    label_fraction: Literal[5, 10, 20] | None = None
    shots: int = Field(1, ge=1)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    image_size: int = Field(473, ge=33)
    base_lr: float = Field(0.002, gt=0)
    sgd_lr_scale: float = Field(15.0, gt=0, description="the reference's hidden x15 factor on the SGD lr")
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    transformer_lr: float = 1e-4
    transformer_weight_decay: float = 1e-2
    scale_range: tuple[float, float] = (0.9, 1.1)
    rotate_degrees: float = 10.0
    max_side: int | None = Field(640, ge=64, description="episode images (and their masks) with a longer side are "
                                 "shrunk to it on loading, before the augmentations; the reference's datasets are "
                                 "not larger; null = never shrunk")
    hidden: int = 256
    ffn: int = 768
    heads: int = 8
    layers: int = 2
    fg_prototypes: int = 20
    bg_prototypes: int = 50
    support_self_attention: bool = False
    dice_ignores_void: bool = Field(
        True, description="leave label-255 and padding pixels out of the dice loss; false = count them with "
                          "a target of 0 in both channels, as the reference")
    mask_empty_prototypes: bool = Field(
        True, description="mask empty Hamming clusters out of the cross-attention; false = attend them as "
                          "zero prototypes, as the reference")
    distinct_supports: bool = Field(
        True, description="pseudo episodes with shots > 1 get distinct support images; false = drawn with "
                          "replacement from the similarity prior, as the reference (never the query)")
    adapter_layers: list[Literal["layer2", "layer3", "layer4"]] = Field(
        ["layer2", "layer3"], min_length=1,
        description="backbone maps the adapters read; the reference's layer2+3 suit ImageNet ResNets")
    adapter_dropout: float = Field(0.5, ge=0, lt=1)
    prototype_prior: bool = Field(
        False, description="a second prior channel: cosine to the masked-average class prototype (not in the reference)")
    prototype_prior_layers: list[Literal["layer2", "layer3", "layer4"]] = Field(["layer3", "layer4"], min_length=1)
    backbone: Literal["small_cnn", "resnet50", "moco_v2", "resnet50_v2", "dino_vits16", "dino_vitb8"] | None = Field(
        None, description="frozen FSS backbone; None = the extraction backbone (and its weights)")
    backbone_checkpoint: Path | None = None
    seed: int = 123
    init_checkpoint: Path | None = Field(None, description="model bundle to start from (finetune mode)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=1, description="images held out for model selection")
    num_workers: int = Field(
        0, ge=0, description="episode-loader processes, kept for the whole run; 0 = load in the training process "
                             "(on CPU, 1 is faster only with a core free for it: docs/benchmarks.md, training)")
    decode_cache_mb: int = Field(
        256, ge=0, description="decoded images and labels kept across epochs, in MiB per episode dataset "
                               "(training, validation) and loading process; 0 = decode on every use")


class EvaluateConfig(_Section):
    """Stage F: the few-shot evaluation protocol."""

    folds: list[Fold] = Field([0, 1, 2, 3], min_length=1)
    shots: list[Annotated[int, Field(ge=1)]] = Field([1, 5], min_length=1)
    episodes: int | None = Field(None, ge=1, description="None = 1000 (PASCAL-like) or 5000 (COCO)")
    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    baseline_threshold: float = Field(0.6, gt=0, lt=1, description="min-max normalised similarity threshold")
    overlays: int = Field(8, ge=0)
    min_area: int = Field(2048, ge=1, description="a novel class counts in a val image (to pick queries and "
                          "supports) from this many px of the original label: the protocol's 2*32*32, independent "
                          "of pseudo.min_area so pseudo-task settings never change the test set")
    area_reference: int | None = Field(473, ge=1, description="images whose longer side is shorter have min_area "
                                       "scaled by (longer side / area_reference)^2; null = never scaled")

    _distinct_entries = field_validator("folds", "shots", "seeds")(_distinct)


LABEL_FRACTIONS = (5, 10, 20)  # % of the labelled train images in the lists train_{5,10,20}.txt


class CompareConfig(_Section):
    """Label-efficient rows of the evaluation table, trained per evaluated fold (needs labels).

    For each fold in ``evaluate.folds``: each fraction x fine-tunes the run's unsupervised model on
    base-class episodes of x % of the labelled train images (``lists/train_{x}.txt``, written
    seeded and nested when missing); ``supervised`` trains a model from fresh weights on base-class
    episodes of every labelled train image. Other training settings come from ``train.*``.
    Off by default.
    """

    finetune_fractions: list[int] = Field([], description="label fractions in % (from 5, 10, 20) to fine-tune with")
    finetune_epochs: int = Field(5, ge=1)
    finetune_base_lr: float | None = Field(None, gt=0, description="None = train.base_lr")
    supervised: bool = Field(False, description="also a model trained on all labels of the base classes")
    supervised_epochs: int | None = Field(None, ge=1, description="None = train.epochs")
    fraction_seed: int = Field(0, description="seed of the label-fraction lists written when missing")

    @field_validator("finetune_fractions")
    @classmethod
    def _known_fractions(cls, value: list[int]) -> list[int]:
        unknown = [x for x in value if x not in LABEL_FRACTIONS]
        if unknown:
            raise ValueError(f"unknown label fraction(s) {unknown}: choose from {list(LABEL_FRACTIONS)} (% of labels)")
        if len(set(value)) != len(value):
            raise ValueError(f"a label fraction is listed twice in {value}")
        return sorted(value)

    @property
    def enabled(self) -> bool:
        return bool(self.finetune_fractions) or self.supervised


class RetrainConfig(_Section):
    """Retraining when new unlabeled images arrive (the scheduled ``retrain`` flow)."""

    min_new_images: int = Field(1, ge=1)
    min_new_fraction: float = Field(0.05, ge=0, le=1, description="new images / images already known")
    epochs: int = Field(5, ge=1, description="meta-training epochs from the champion model")


class RuntimeConfig(_Section):
    """Where the run happens: workspace, Dask cluster, MLflow tracking."""

    workspace: Path = Path("workspace")
    dask_address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    gpu_resource: str | None = Field(None, description="Dask worker resource name for GPU tasks, e.g. GPU")
    mlflow_tracking_uri: str | None = Field(None, description="None = sqlite in the workspace")
    experiment: str | None = Field(None, description="None = one experiment per workspace")
    progress: bool = True


class PipelineConfig(_Section):
    """The whole pipeline's configuration."""

    data: DataConfig = DataConfig()
    extract: ExtractConfig = ExtractConfig()
    cluster: ClusterConfig = ClusterConfig()
    pseudo: PseudoConfig = PseudoConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()
    retrain: RetrainConfig = RetrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.train.mode == "finetune" and self.train.label_fraction is None:
            raise ValueError("train.label_fraction must be 5, 10 or 20 when train.mode is 'finetune'")
        if self.compare.enabled and self.train.mode != "unsupervised":
            raise ValueError("compare.* sets label-efficient models beside the run's unsupervised model: "
                             "it needs train.mode=unsupervised")
        return self

    def section_key(self, *sections: str) -> str:
        """A stable hash of the named sections, the basis of each stage's build key."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` → ``("train.epochs", 3)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key, value


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> PipelineConfig:
    """Resolve defaults ← YAML file (or ``base`` dict) ← ``section.key=value`` overrides."""
    if path is not None and base is not None:
        raise ConfigError("give a config file or a config mapping, not both")
    tree: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        where = f" (from {path})" if path else ""
        raise ConfigError(_explain(exc) + where) from None
