"""Compare: the label-efficient models of the evaluation table (``compare.*``).

Per evaluated fold: a model fine-tuned from the run's unsupervised model on x % of the labelled
train images, for each configured fraction x, and a model trained on all labels. Each is a train
stage of its own (build key, cache, nested MLflow run); ``evaluate`` scores them on their fold.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from fss_core.config import LABEL_FRACTIONS, PipelineConfig
from fss_core.data.prepare import prepare_fraction_lists
from tasks.extract import BackboneRef
from tasks.keys import build_key
from tasks.train import TrainOutcome, records, run_train
from tasks.workspace import source_root

log = logging.getLogger(__name__)

SUPERVISED = "supervised"


class CompareError(ValueError):
    """The comparison cannot run on this dataset; the message says why and what to change."""


@dataclass(frozen=True)
class CompareSpec:
    """One model to train: ``method`` (``finetune_{x}`` or ``supervised``) on ``fold``."""

    method: str
    fold: int
    fraction: int | None


@dataclass(frozen=True)
class CompareData:
    """What the comparison trains on: the models, and per method the key of its labelled data."""

    specs: list[CompareSpec]
    data_keys: dict[str, str]


@dataclass(frozen=True)
class ComparedModel:
    """A trained comparison model, evaluated on ``fold`` only."""

    method: str
    fold: int
    trained: TrainOutcome


def finetune_method(fraction: int) -> str:
    return f"finetune_{fraction}"


def method_label(method: str) -> str:
    """The table's name of a method: ``finetune_20`` → ``finetune 20 %``."""
    if method.startswith("finetune_") and method.removeprefix("finetune_").isdigit():
        return f"finetune {method.removeprefix('finetune_')} %"
    return method


def method_order(method: str) -> tuple[int, int]:
    """Table order: unsupervised, finetune 5/10/20 %, supervised, baseline."""
    if method.startswith("finetune_") and method.removeprefix("finetune_").isdigit():
        return 1, int(method.removeprefix("finetune_"))
    return {"unsupervised": (0, 0), SUPERVISED: (2, 0), "baseline": (4, 0)}.get(method, (3, 0))


def compare_specs(cfg: PipelineConfig) -> list[CompareSpec]:
    """The models ``compare.*`` asks for, fold by fold, in table order."""
    c = cfg.compare
    specs = []
    for fold in cfg.evaluate.folds:
        specs += [CompareSpec(finetune_method(x), fold, x) for x in c.finetune_fractions]
        if c.supervised:
            specs.append(CompareSpec(SUPERVISED, fold, None))
    return specs


def fraction_list(cfg: PipelineConfig, fraction: int) -> Path:
    """Where training reads the ``fraction`` % label list (see ``tasks.train.label_fraction_ids``)."""
    return source_root(cfg) / "lists" / f"train_{fraction}.txt"


def ensure_fraction_lists(cfg: PipelineConfig, fractions: list[int]) -> dict[int, Path]:
    """The dataset's ``lists/train_{x}.txt``; missing ones are written, seeded by
    ``compare.fraction_seed``, as ``fss prepare lists`` would (nested prefixes of one permutation)."""
    unknown = [x for x in fractions if x not in LABEL_FRACTIONS]
    if unknown:
        raise CompareError(f"unknown label fraction(s) {unknown}: choose from {list(LABEL_FRACTIONS)}")
    paths = {x: fraction_list(cfg, x) for x in fractions}
    missing = [x for x, p in paths.items() if not p.is_file()]
    if missing:
        root = source_root(cfg)
        log.info("compare: writing label-fraction lists %s under %s (seed %d)",
                 [p.name for x, p in paths.items() if x in missing], root / "lists", cfg.compare.fraction_seed)
        try:
            prepare_fraction_lists(root, cfg.data.layout, root / "lists", cfg.data.fold_scheme,
                                   cfg.compare.fraction_seed, fractions=tuple(x / 100 for x in missing))
        except (ValueError, OSError) as exc:
            raise CompareError(f"cannot write the label-fraction lists {[paths[x].name for x in missing]} "
                               f"under {root / 'lists'} ({exc}); write them with `fss prepare lists`") from exc
    ids = {x: set(_list_ids(p)) for x, p in paths.items()}
    ordered = sorted(ids)
    for small, large in zip(ordered, ordered[1:]):
        if not ids[small] <= ids[large]:
            log.warning("compare: %s is not contained in %s; the fractions are not nested",
                        paths[small].name, paths[large].name)
    for x in ordered:
        if not ids[x]:
            raise CompareError(f"{paths[x]} lists no image: {x} % of the labelled train images is none")
    return paths


def _list_ids(path: Path) -> list[str]:
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def prepare_compare(cfg: PipelineConfig, labels_key: str) -> CompareData:
    """Check that the dataset has labels, write missing fraction lists, and key each method's data.

    ``labels_key`` names the dataset's content (the ingest build key); a finetune method's key
    also covers its list's content.
    """
    specs = compare_specs(cfg)
    if not specs:
        return CompareData([], {})
    source = cfg.data.source or "the synthetic data"
    for split in ("train", "val"):
        if not records(cfg, split):
            raise CompareError(
                f"compare.finetune_fractions / compare.supervised need labelled images, but {source} has no "
                f"labelled image in its {split} split (data.layout={cfg.data.layout}); use a labelled "
                f"VOC- or COCO-layout dataset, or turn the comparison off")
    keys = {}
    for fraction, path in ensure_fraction_lists(cfg, cfg.compare.finetune_fractions).items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        keys[finetune_method(fraction)] = build_key("compare_data", cfg, labels_key, digest)
    if cfg.compare.supervised:
        keys[SUPERVISED] = build_key("compare_data", cfg, labels_key)
    return CompareData(specs, keys)


def compare_config(cfg: PipelineConfig, spec: CompareSpec, unsupervised_bundle: str) -> PipelineConfig:
    """The run's config with ``train.*`` set for one comparison model."""
    c = cfg.compare
    tree = cfg.model_dump(mode="json")
    t = tree["train"]
    t["fold"] = spec.fold
    if spec.fraction is not None:
        t.update(mode="finetune", label_fraction=spec.fraction, epochs=c.finetune_epochs,
                 init_checkpoint=unsupervised_bundle)
        if c.finetune_base_lr is not None:
            t["base_lr"] = c.finetune_base_lr
    else:
        t.update(mode="supervised", label_fraction=None, epochs=c.supervised_epochs or t["epochs"],
                 init_checkpoint=None)
    tree["compare"] = {}  # the derived run trains one model; it does not compare
    return PipelineConfig.model_validate(tree)


def run_compare_train(cfg: PipelineConfig, spec: CompareSpec, data_key: str, extraction: BackboneRef,
                      unsupervised_bundle: str, parent_run_id: str | None = None) -> ComparedModel:
    """Train (or reuse, by build key) one comparison model; its MLflow run is ``train_{method}_fold{f}``."""
    derived = compare_config(cfg, spec, unsupervised_bundle)
    try:
        trained = run_train(derived, data_key, extraction, parent_run_id, stage=f"train_{spec.method}_fold{spec.fold}")
    except ValueError as exc:  # e.g. too few labelled episodes for one batch
        data = f"lists/train_{spec.fraction}.txt" if spec.fraction else "every labelled train image"
        raise CompareError(f"{method_label(spec.method)} on fold {spec.fold} (base-class episodes of {data}, "
                           f"train.batch_size={derived.train.batch_size}): {exc}") from exc
    return ComparedModel(spec.method, spec.fold, trained)


@task(name="compare-prepare")
def compare_prepare_task(config: dict, labels_key: str) -> CompareData:
    return prepare_compare(PipelineConfig.model_validate(config), labels_key)


@task(name="compare-train", task_run_name="train-{method}-fold{fold}")
def compare_train_task(config: dict, method: str, fold: int, fraction: int | None, data_key: str,
                       extraction: BackboneRef, unsupervised_bundle: str,
                       parent_run_id: str | None = None) -> ComparedModel:
    return run_compare_train(PipelineConfig.model_validate(config), CompareSpec(method, fold, fraction), data_key,
                             extraction, unsupervised_bundle, parent_run_id)
