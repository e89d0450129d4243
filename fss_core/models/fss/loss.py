"""Dice loss of the FSS network, with ignore and padding pixels excluded (or, as in the
reference, counted: ``ignore_void=False``)."""

from __future__ import annotations

import torch

IGNORE_LABEL = 255
DENOMINATOR_FLOOR = 1e-8


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    padding: torch.Tensor | None = None,
    ignore_label: int = IGNORE_LABEL,
    ignore_void: bool = True,
) -> torch.Tensor:
    """Dice on the sigmoid of both channels against the one-hot target, summed over channels.

    ``L = mean_b sum_{c in (bg, fg)} [1 - 2 sum_p s_cp t_cp / max(sum_p s_cp^2 + sum_p t_cp^2, 1e-8)]``
    with ``s = sigmoid(logits)``, ``t_bg = [y == 0]``, ``t_fg = [y == 1]``, and the sums taken
    only over valid pixels (label != ignore_label and not padding).

    With ``ignore_void=False`` the sums run over every pixel, as in the reference: ignore and
    padding pixels are not masked, so their predictions enter both denominators, and their
    target is 0 in both channels (a 255 label is neither 0 nor 1). Such pixels therefore push
    both channels towards "neither bg nor fg". ``padding`` is then not used; the episode
    datasets label every padding pixel 255, so it is counted like any ignore pixel.

    Args:
        logits: ``[B, 2, H, W]``.
        target: ``[B, H, W]`` integer labels in {0, 1, ignore_label}.
        padding: ``[B, H, W]`` bool, True at padded pixels; None = no padding.
        ignore_label: the label of ignore pixels.
        ignore_void: leave ignore and padding pixels out of the sums (True, the fix) or count
            them as the reference did (False).

    Returns:
        scalar loss in [0, 2].
    """
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"dice_loss: logits must be [B, 2, H, W], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"dice_loss: target must be {(logits.shape[0], *logits.shape[2:])}, got {tuple(target.shape)}")
    if padding is not None and padding.shape != target.shape:
        raise ValueError(f"dice_loss: padding must be {tuple(target.shape)}, got {tuple(padding.shape)}")
    if not ignore_void:
        valid = torch.ones_like(target, dtype=torch.bool)
    elif padding is None:
        valid = target != ignore_label
    else:
        valid = (target != ignore_label) & ~padding
    valid = valid[:, None].to(logits.dtype)
    one_hot = torch.stack([target == 0, target == 1], dim=1).to(logits.dtype) * valid
    probs = torch.sigmoid(logits) * valid
    numerator = 2 * (probs * one_hot).sum((2, 3))
    denominator = (probs**2).sum((2, 3)) + (one_hot**2).sum((2, 3))
    per_sample = (1 - numerator / denominator.clamp_min(DENOMINATOR_FLOOR)).sum(1)
    return per_sample.mean()
