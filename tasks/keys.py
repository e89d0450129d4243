"""Build keys: a stage's output is keyed by its config section(s) and its inputs' keys.

Same key ⇒ the stored output is reused; a changed setting changes this stage's key and,
through the chain, every later stage's — never an earlier one's.
"""

from __future__ import annotations

import hashlib
import json

from fss_core.config import PipelineConfig

# Which config sections shape each stage's output.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "extract": ("extract",),
    "cluster": ("cluster",),
    "pseudo": ("pseudo",),
    "task_index": ("pseudo",),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "evaluate_result": ("evaluate",),  # one method on one fold and shot count
}


# Settings (of a stage's sections) that never change what the stage makes: left out of its key,
# so that changing them reuses the stored output.
UNKEYED: dict[str, frozenset[str]] = {
    "train": frozenset({"num_workers", "decode_cache_mb"}),
    # the masks depend on the Felzenszwalb settings alone; these shape the task index only
    "pseudo": frozenset({"min_area", "background_span", "prior_max"}),
    # a result's folder names its fold and shot count: adding one leaves the others' results valid
    "evaluate_result": frozenset({"folds", "shots"}),
}


def class_split(stage: str, cfg: PipelineConfig) -> dict | None:
    """How classes are split into folds, for the stages whose output depends on it: evaluation
    (its novel classes), the comparison models' data and training on real labels (their base
    classes). None for the others: pseudo-task training never reads a class id."""
    labelled = stage in ("evaluate", "evaluate_result", "compare_data") or (stage == "train" and cfg.train.mode != "unsupervised")
    return {"fold_scheme": cfg.data.fold_scheme, "num_classes": cfg.data.num_classes} if labelled else None


def build_key(stage: str, cfg: PipelineConfig, *input_keys: str | None) -> str:
    """16 hex digits naming (stage, its config sections, its inputs' keys)."""
    sections = {s: getattr(cfg, s).model_dump(mode="json", exclude=set(UNKEYED.get(stage, ())))
                for s in STAGE_SECTIONS.get(stage, ())}
    content = {"stage": stage, "sections": sections, "inputs": list(input_keys)}
    if (split := class_split(stage, cfg)) is not None:
        content["class_split"] = split
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
