"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Sampling uses ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``), which
matches the CUDA kernel's ``loc * W - 0.5`` pixel convention, so no compiled op is needed
and autograd provides the backward pass. Includes the CyCTR changes: value tokens at padded
cells are zeroed, a random fraction of value tokens is zeroed in training, and dropout is
applied to the softmaxed attention weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = list[tuple[int, int]]


def deformable_sample(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Attention-weighted bilinear sampling of per-head value maps.

    Args:
        value: ``[B, Lv, heads, d]``, the levels flattened row-major and concatenated.
        spatial_shapes: ``[(h_l, w_l)]`` per level; ``sum(h_l * w_l) == Lv``.
        sampling_locations: ``[B, Lq, heads, levels, points, 2]`` as (x, y) in [0, 1].
        attention_weights: ``[B, Lq, heads, levels, points]``.

    Returns:
        ``[B, Lq, heads * d]``.
    """
    batch, _, heads, d_head = value.shape
    _, n_query, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample works in [-1, 1]; with align_corners=False this is the kernel's loc*W - 0.5.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [B, h*w, heads, d] -> [B*heads, d, h, w]
        value_map = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, d_head, h, w)
        # [B, Lq, heads, points, 2] -> [B*heads, Lq, points, 2]
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*heads, d, Lq, points]
    # [B, Lq, heads, levels, points] -> [B*heads, 1, Lq, levels*points]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, n_query, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*heads, d, Lq]
    return output.view(batch, heads * d_head, n_query).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with CyCTR's value masking.

    Args:
        d_model: token width C; must be divisible by ``n_heads``.
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        dropout: dropout on the softmaxed attention weights.
        value_token_drop: fraction of value tokens zeroed at random in training.
    """

    def __init__(
        self,
        d_model: int,
        n_levels: int = 1,
        n_heads: int = 8,
        n_points: int = 9,
        dropout: float = 0.1,
        value_token_drop: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.value_token_drop = value_token_drop
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model, bias=False)
        self.output_proj = nn.Linear(d_model, d_model, bias=False)
        self.attention_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation.

        Offsets start at zero weight with a bias that points head h in direction
        ``2*pi*h/heads`` (scaled so the larger component is 1 cell) at 1..points cells;
        attention logits start at zero (uniform weights); projections are xavier.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * radii
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.xavier_uniform_(self.output_proj.weight)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to learned offsets around its reference point.

        Args:
            query: ``[B, Lq, C]`` (already including any positional encoding).
            reference_points: ``[B or 1, Lq, levels, 2]`` as (x, y) in [0, 1].
            value_input: ``[B, Lv, C]``, levels flattened and concatenated.
            spatial_shapes: ``[(h_l, w_l)]`` per level.
            padding_mask: ``[B, Lv]`` bool, True at padded cells (their values are zeroed).

        Returns:
            ``[B, Lq, C]``.
        """
        batch, n_query, _ = query.shape
        n_value = value_input.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn: got {len(spatial_shapes)} spatial shapes for {self.n_levels} levels")
        if sum(h * w for h, w in spatial_shapes) != n_value:
            raise ValueError(f"MSDeformAttn: spatial_shapes {spatial_shapes} do not cover {n_value} value tokens")

        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        if self.training and self.value_token_drop > 0:
            dropped = torch.rand(batch, n_value, 1, device=value.device) < self.value_token_drop
            value = value.masked_fill(dropped, 0.0)
        value = value.view(batch, n_value, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(batch, n_query, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, n_query, self.n_heads, self.n_levels * self.n_points)
        weights = self.attention_dropout(weights.softmax(-1))
        weights = weights.view(batch, n_query, self.n_heads, self.n_levels, self.n_points)

        # Offsets are in cells of each level: divide by (w, h) to get normalised coordinates.
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(deformable_sample(value, spatial_shapes, locations, weights))
