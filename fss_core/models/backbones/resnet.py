"""ResNet-50 in plain PyTorch, in the two layouts the method uses.

- ``resnet50`` / ``moco_v2``: the torchvision v1.5 network (7x7 stem, stride on the 3x3
  conv of each bottleneck), output stride 32, BatchNorm. Its state-dict keys are exactly
  torchvision's, so torchvision and MoCo v2 checkpoints load without renaming.
- ``resnet50_v2``: the PSPNet/PFENet deep-stem network (three 3x3 stem convs 64-64-128),
  layer3/layer4 dilated by 2/4 with stride 1 (output stride 8), FrozenBatchNorm2d.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fss_core.models.backbones.base import Backbone
from fss_core.models.backbones.checkpoints import (
    CheckpointMismatchError,
    load_strict,
    read_checkpoint,
    take_prefix,
)

_BLOCKS = (3, 4, 6, 3)
_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
_MOCO_PREFIX = "module.encoder_q."


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed affine parameters and statistics (buffers, never trained).

    Keys: ``weight, bias, running_mean, running_var``, as in ``nn.BatchNorm2d`` minus the step counter.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → ``[B, C, H, W]``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride, dilation) → 1x1 with a residual; expansion 4 (ResNet v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, norm: type[nn.Module]) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), norm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(Backbone):
    """ResNet-50 returning ``layer2 [B, 512, ...]``, ``layer3 [B, 1024, ...]``, ``layer4 [B, 2048, ...]``.

    ``deep_stem=False``: torchvision layout, strides 8/16/32, ``nn.BatchNorm2d``.
    ``deep_stem=True``: PFENet layout, strides 8/8/8 (input (H-1) % 8 == 0 gives (H-1)/8+1 cells),
    ``FrozenBatchNorm2d`` with eps 1e-5.
    """

    embedding_layer = "layer4"

    def __init__(self, deep_stem: bool) -> None:
        super().__init__()
        norm = FrozenBatchNorm2d if deep_stem else nn.BatchNorm2d
        if deep_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
            self.bn1 = norm(64)
            self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
            self.bn2 = norm(64)
            self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
            self.bn3 = norm(128)
            stem_out = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm(64)
            stem_out = 64
        self.deep_stem = deep_stem
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # (stride, dilation) per stage; the deep-stem net trades the last two strides for dilation
        stages = ((1, 1), (2, 1), (1, 2), (1, 4)) if deep_stem else ((1, 1), (2, 1), (2, 1), (2, 1))
        inplanes = stem_out
        for index, (planes, blocks, (stride, dilation)) in enumerate(zip((64, 128, 256, 512), _BLOCKS, stages), 1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, dilation, norm))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.channels = {"layer2": 512, "layer3": 1024, "layer4": 2048}
        self.strides = {"layer2": 8, "layer3": 8 if deep_stem else 16, "layer4": 8 if deep_stem else 32}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` ImageNet-normalised → ``{"layer2", "layer3", "layer4"}`` feature maps."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        x = self.layer1(self.maxpool(x))
        layer2 = self.layer2(x)
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def resnet50() -> ResNet50:
    """The torchvision ResNet-50 v1.5 backbone (random init), for torchvision or MoCo v2 weights."""
    return ResNet50(deep_stem=False)


def resnet50_deep_stem() -> ResNet50:
    """The PFENet ``resnet50_v2`` backbone (random init): deep stem, dilated, output stride 8."""
    return ResNet50(deep_stem=True)


def load_torchvision(model: ResNet50, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet-50 state dict; its ``fc.weight``/``fc.bias`` must be present and are unused."""
    load_strict(model, read_checkpoint(path), path, required_unused=_CLASSIFIER_KEYS)


def load_moco(model: ResNet50, path: str | os.PathLike) -> None:
    """Load a MoCo checkpoint: ``state_dict`` keys ``module.encoder_q.<torchvision key>``.

    The query encoder is kept with its prefix stripped; its ``fc*`` head (MoCo v2: an MLP
    ``fc.0``/``fc.2``) is dropped; the key encoder and the queue are ignored.
    """
    content = read_checkpoint(path)
    if "state_dict" not in content:
        found = sorted(content)[:20]
        raise CheckpointMismatchError(f"{path}: a MoCo checkpoint holds 'state_dict'; found keys {found}")
    query = take_prefix(content["state_dict"], _MOCO_PREFIX)
    if not query:
        raise CheckpointMismatchError(f"{path}: no '{_MOCO_PREFIX}*' keys in 'state_dict'")
    load_strict(model, {k: v for k, v in query.items() if not k.startswith("fc.")}, path)


def load_pfenet(model: ResNet50, path: str | os.PathLike) -> None:
    """Load PFENet's ``resnet50_v2.pth`` (plain state dict); ``fc.weight``/``fc.bias`` must be present, unused."""
    load_strict(model, read_checkpoint(path), path, required_unused=_CLASSIFIER_KEYS)
