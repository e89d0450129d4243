"""Backbones by name, each with a strict loader for its published checkpoint format.

| name | network | checkpoint format |
|---|---|---|
| ``resnet50`` | torchvision ResNet-50 v1.5, stride 32 | torchvision state dict (``fc.*`` required, unused) |
| ``moco_v2`` | same | MoCo ``{"state_dict": {"module.encoder_q.<key>": ...}}`` |
| ``resnet50_v2`` | PFENet deep-stem ResNet-50, stride 8 | plain state dict (``fc.*`` required, unused) |
| ``dino_vits16`` / ``dino_vitb8`` | DINO ViT-S/16 / ViT-B/8 | DINO state dict, optionally wrapped |
| ``small_cnn`` | ~1.3 M-parameter CNN, stride 8 | state dict from ``pretrain_small_cnn`` |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from fss_core.models.backbones.base import (
    FEATURE_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    imagenet_normalize,
)
from fss_core.models.backbones.checkpoints import CheckpointMismatchError, checkpoint_sha256
from fss_core.models.backbones.resnet import (
    load_moco,
    load_pfenet,
    load_torchvision,
    resnet50,
    resnet50_deep_stem,
)
from fss_core.models.backbones.small_cnn import SmallCNN, load_small_cnn, small_cnn
from fss_core.models.backbones.vit import dino_vitb8, dino_vits16, load_dino

__all__ = [
    "BACKBONES",
    "FEATURE_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "CheckpointMismatchError",
    "SmallCNN",
    "build_backbone",
    "checkpoint_sha256",
    "imagenet_normalize",
]

log = logging.getLogger(__name__)

# name → (constructor, loader of that name's checkpoint format)
BACKBONES: dict[str, tuple[Callable[..., Backbone], Callable[[Backbone, str | os.PathLike], None]]] = {
    "resnet50": (resnet50, load_torchvision),
    "moco_v2": (resnet50, load_moco),
    "resnet50_v2": (resnet50_deep_stem, load_pfenet),
    "dino_vits16": (dino_vits16, load_dino),
    "dino_vitb8": (dino_vitb8, load_dino),
    "small_cnn": (small_cnn, load_small_cnn),
}


def build_backbone(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> Backbone:
    """Build backbone ``name`` and, if ``checkpoint`` is given, load it strictly.

    ``kwargs`` go to the constructor (the ViTs take ``depth``). Without a checkpoint the
    weights are random. Raises ``KeyError`` for an unknown name and
    ``CheckpointMismatchError`` when the file's keys or shapes do not fit.
    """
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone '{name}'; choose one of {sorted(BACKBONES)}")
    build, load = BACKBONES[name]
    model = build(**kwargs)
    if checkpoint is not None:
        load(model, checkpoint)
        log.info("backbone %s loaded from %s", name, checkpoint)
    return model
