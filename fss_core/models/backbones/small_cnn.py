"""A small convolutional backbone for when no pretrained checkpoint exists.

It is pretrained self-supervised on the unlabeled images themselves
(``fss_core.embeddings.ssl_pretrain``). Nine conv-BN-ReLU layers, 0.71 M parameters:
three strided 3x3 convs bring it to stride 8; after that nothing strides (layer4's 3x3 conv
is dilated by 2 instead), so a small image still gives a useful grid (a 96x96 input → 12x12
cells at every level). The receptive field is 103 px: wide enough for object shape, yet
local enough that a cell does not see a whole small image, which in pretraining made cells
encode their image rather than their surface. A final 1x1 conv widens layer4 to 256 channels
cheaply.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fss_core.models.backbones.base import Backbone
from fss_core.models.backbones.checkpoints import load_strict, read_checkpoint


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(Backbone):
    """A stride-8 CNN: ``x [B, 3, H, W]`` → ``layer2 [B, 64, h, w]``, ``layer3 [B, 128, h, w]``,
    ``layer4 [B, 256, h, w]`` with ``h, w = ⌈H/8⌉, ⌈W/8⌉``."""

    embedding_layer = "layer4"

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 32, stride=2)
        self.layer1 = nn.Sequential(_conv(32, 64, stride=2), _conv(64, 64))
        self.layer2 = nn.Sequential(_conv(64, 64, stride=2), _conv(64, 64))
        self.layer3 = nn.Sequential(_conv(64, 128), _conv(128, 128))
        self.layer4 = nn.Sequential(_conv(128, 256, dilation=2), _conv(256, 256, kernel=1))
        self.channels = {"layer2": 64, "layer3": 128, "layer4": 256}
        self.strides = {"layer2": 8, "layer3": 8, "layer4": 8}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` ImageNet-normalised → ``{"layer2", "layer3", "layer4"}`` at stride 8."""
        layer2 = self.layer2(self.layer1(self.stem(x)))
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def small_cnn() -> SmallCNN:
    """A randomly initialised ``SmallCNN``."""
    return SmallCNN()


def load_small_cnn(model: SmallCNN, path: str | os.PathLike) -> None:
    """Load a plain ``SmallCNN`` state dict, as written by ``pretrain_small_cnn``."""
    load_strict(model, read_checkpoint(path), path)
