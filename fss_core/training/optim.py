"""The two optimisers of the FSS model and the SGD learning-rate schedule (see docs/training.md).

- SGD (momentum, weight decay) on every trainable parameter outside the transformer; its
  learning rate follows :func:`poly_warmup_lr`, which multiplies the schedule by an explicit
  ``sgd_lr_scale`` (the reference's hidden ×15).
- AdamW on the transformer at a constant learning rate; weight decay on weights, none on biases.
"""

from __future__ import annotations

import torch
from torch import nn

from fss_core.models.fss import parameter_groups

WARMUP_START = 0.001  # the warm-up starts at 0.1 % of the base learning rate


def build_optimizers(
    model: nn.Module,
    base_lr: float,
    sgd_lr_scale: float = 15.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    transformer_lr: float = 1e-4,
    transformer_weight_decay: float = 1e-2,
) -> tuple[torch.optim.SGD, torch.optim.AdamW]:
    """The SGD and AdamW optimisers of ``model`` (split by :func:`parameter_groups`).

    The SGD learning rate set here (``base_lr * sgd_lr_scale``) is overwritten every iteration by
    the trainer with :func:`poly_warmup_lr`; the AdamW learning rate stays constant.

    Raises:
        ValueError: if either optimiser would get no parameter.
    """
    sgd_params, decay, no_decay = parameter_groups(model)
    if not sgd_params:
        raise ValueError("build_optimizers: the model has no trainable parameter outside the transformer")
    if not decay and not no_decay:
        raise ValueError("build_optimizers: the model has no trainable transformer parameter")
    sgd = torch.optim.SGD(sgd_params, lr=base_lr * sgd_lr_scale, momentum=momentum, weight_decay=weight_decay)
    groups = [{"params": decay, "weight_decay": transformer_weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=transformer_lr)
    return sgd, adamw


def poly_warmup_lr(
    base_lr: float, it: int, max_it: int, warmup_it: int, power: float = 0.9, scale: float = 15.0
) -> float:
    """SGD learning rate at iteration ``it`` (1-based, as the reference counts) of ``max_it``.

    ``scale * base_lr * (0.001 + 0.999 * it / warmup_it)`` while ``it < warmup_it``, then
    ``scale * base_lr * (1 - it / max_it) ** power``; 0 at ``it == max_it``.
    """
    if not 0 <= it <= max_it:
        raise ValueError(f"poly_warmup_lr: it must be in [0, max_it={max_it}], got {it}")
    if it < warmup_it:
        lr = base_lr * (WARMUP_START + (1 - WARMUP_START) * it / warmup_it)
    else:
        lr = base_lr * (1 - it / max_it) ** power
    return lr * scale
