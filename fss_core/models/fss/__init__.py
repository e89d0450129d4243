"""Prototype cross-attention few-shot segmentation model, in plain PyTorch (no compiled ops)."""

from fss_core.models.fss.loss import dice_loss
from fss_core.models.fss.network import FSSModelConfig, FSSNetwork, parameter_groups

__all__ = ["FSSModelConfig", "FSSNetwork", "dice_loss", "parameter_groups"]
