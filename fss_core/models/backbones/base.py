"""The interface every backbone implements.

A backbone maps an ImageNet-normalised image batch to a dict of named feature maps
(``layer2``, ``layer3``, ``layer4``), and declares the channels and stride of each map
and which one Stage A uses as the pixel embedding.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_KEYS = ("layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on the 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB on the 0..1 scale → ImageNet-normalised ``[B, 3, H, W]``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Backbone(nn.Module):
    """Base class: ``forward(x [B, 3, H, W]) -> {"layer2", "layer3", "layer4": [B, C_k, H/s_k, W/s_k]}``.

    Subclasses set ``channels`` and ``strides`` (per key) and ``embedding_layer``.
    After ``freeze()`` no parameter takes gradients and BatchNorm layers keep using
    their running statistics, even if ``train()`` is called later.
    """

    channels: dict[str, int]
    strides: dict[str, int]
    embedding_layer: str

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def freeze(self) -> Backbone:
        """Stop gradients and put every BatchNorm in eval mode, for good; returns ``self``."""
        for param in self.parameters():
            param.requires_grad_(False)
        self.frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
