"""DETR sine positional encoding and deformable-attention reference points."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    padding: torch.Tensor,
    num_feats: int,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DETR sine encoding (normalize=True) over the non-padded cells.

    Coordinates are cumulative counts of non-padded cells along each axis, normalised by the
    last count and scaled to [0, scale]; padded cells repeat their neighbours' coordinates.

    Args:
        padding: ``[B, h, w]`` bool, True at padded cells.
        num_feats: features per axis (even); the output has ``2 * num_feats`` channels.

    Returns:
        ``[B, 2 * num_feats, h, w]``: the y features, then the x features, each interleaving
        sin (even indices) and cos (odd indices).
    """
    if num_feats % 2 != 0:
        raise ValueError(f"sine_position_encoding: num_feats={num_feats} must be even")
    not_padded = (~padding).to(torch.float32)
    y_embed = not_padded.cumsum(1)
    x_embed = not_padded.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    index = torch.arange(num_feats, dtype=torch.float32, device=padding.device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=4).flatten(3)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([pos_y, pos_x], dim=3).permute(0, 3, 1, 2)


def reference_points(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Cell centres of an ``h x w`` grid as normalised (x, y).

    Returns:
        ``[1, h*w, 1, 2]`` (batch 1, one level), row-major order, values ``((x+0.5)/w, (y+0.5)/h)``.
    """
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)[None, :, None, :]
