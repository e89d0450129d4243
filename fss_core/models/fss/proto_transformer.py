"""Prototype transformer: query self-attention + cross-attention to support prototypes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fss_core.models.fss.deform_attn import MSDeformAttn
from fss_core.models.fss.hamming import support_prototypes
from fss_core.models.fss.position import reference_points, sine_position_encoding

MASK_PENALTY = 1e4


class FeedForward(nn.Module):
    """Residual FFN without biases: ``x + Drop(W2 Drop(ReLU(W1 x)))`` on ``[..., C]``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim, bias=False),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.layers(x))


class ProtoCrossAttention(nn.Module):
    """Multi-head attention from query tokens to prototypes (keys = values), no positional encoding."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.attention_dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, prototypes: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
        """Args: query ``[B, N, C]``, prototypes ``[B, K, C]``, invalid ``[B, K]`` bool.

        Returns: ``[B, N, C]``.
        """
        batch, n_query, dim = query.shape
        n_proto = prototypes.shape[1]
        q = self.q_proj(query).view(batch, n_query, self.heads, -1).transpose(1, 2)
        k = self.k_proj(prototypes).view(batch, n_proto, self.heads, -1).transpose(1, 2)
        v = self.v_proj(prototypes).view(batch, n_proto, self.heads, -1).transpose(1, 2)
        # An additive -1e4 (not -inf) keeps an all-invalid row finite, as in the reference.
        logits = q @ k.transpose(-2, -1) * self.scale - MASK_PENALTY * invalid[:, None, None, :].to(q.dtype)
        attention = self.attention_dropout(logits.softmax(-1))
        out = (attention @ v).transpose(1, 2).reshape(batch, n_query, dim)
        return self.output_dropout(self.out_proj(out))


class DeformableEncoderLayer(nn.Module):
    """``x = LN(x + Drop(MSDA(x + pos, x)))``, then ``x = LN(FFN(x))`` on one feature level."""

    def __init__(self, dim: int, heads: int, points: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = MSDeformAttn(dim, n_levels=1, n_heads=heads, n_points=points, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm_attention = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference: torch.Tensor,
        shape: tuple[int, int],
        padding: torch.Tensor,
    ) -> torch.Tensor:
        """Args: x, pos ``[B, h*w, C]``; reference ``[1, h*w, 1, 2]``; padding ``[B, h*w]`` bool."""
        x = self.norm_attention(x + self.dropout(self.self_attention(x + pos, reference, x, [shape], padding)))
        return self.norm_ffn(self.ffn(x))


class ProtoTransformerLayer(nn.Module):
    """Deformable self-attention block, then ``x = LN(x + CrossAttn(x, P))`` and ``x = LN(FFN(x))``."""

    def __init__(self, dim: int, heads: int, points: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_block = DeformableEncoderLayer(dim, heads, points, ffn, dropout)
        self.cross_attention = ProtoCrossAttention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference: torch.Tensor,
        shape: tuple[int, int],
        padding: torch.Tensor,
        prototypes: torch.Tensor,
        invalid: torch.Tensor,
    ) -> torch.Tensor:
        x = self.self_block(x, pos, reference, shape, padding)
        x = self.norm_cross(x + self.cross_attention(x, prototypes, invalid))
        return self.norm_ffn(self.ffn(x))


class ProtoTransformer(nn.Module):
    """Refines query features by attending to fg/bg prototypes of the support features.

    Args:
        dim: token width C (divisible by ``heads`` and by 4 for the sine encoding).
        heads: attention heads (deformable and cross attention).
        layers: number of query layers (and of support layers when enabled).
        points: deformable sampling points per head.
        ffn: FFN hidden width.
        dropout: dropout rate throughout.
        fg_prototypes, bg_prototypes: prototype slots.
        hash_bits: SimHash code length.
        kmeans_iterations: Hamming k-means iterations.
        support_self_attention: when True, support tokens go through ``layers`` deformable
            self-attention blocks before the prototypes are built from them.
        mask_empty_prototypes: when True, empty Hamming clusters are masked out of the
            cross-attention; when False they are attended as zero prototypes (the reference).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        layers: int,
        points: int,
        ffn: int,
        dropout: float,
        fg_prototypes: int,
        bg_prototypes: int,
        hash_bits: int,
        kmeans_iterations: int,
        support_self_attention: bool,
        mask_empty_prototypes: bool = True,
    ) -> None:
        super().__init__()
        self.fg_prototypes = fg_prototypes
        self.bg_prototypes = bg_prototypes
        self.hash_bits = hash_bits
        self.kmeans_iterations = kmeans_iterations
        self.mask_empty_prototypes = mask_empty_prototypes
        self.query_layers = nn.ModuleList(
            ProtoTransformerLayer(dim, heads, points, ffn, dropout) for _ in range(layers)
        )
        self.support_layers = (
            nn.ModuleList(DeformableEncoderLayer(dim, heads, points, ffn, dropout) for _ in range(layers))
            if support_self_attention
            else None
        )

    def forward(
        self,
        query: torch.Tensor,
        query_padding: torch.Tensor,
        support: torch.Tensor,
        support_foreground: torch.Tensor,
        support_padding: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Args:
            query: ``[B, C, h, w]``.
            query_padding: ``[B, h, w]`` bool, True at padded cells.
            support: ``[B, S, C, h, w]``.
            support_foreground: ``[B, S, h, w]`` bool.
            support_padding: ``[B, S, h, w]`` bool.
            generator: source of the prototype clustering's random draws.

        Returns:
            ``[B, C, h, w]``.
        """
        batch, channels, h, w = query.shape
        shots = support.shape[1]
        reference = reference_points(h, w, device=query.device)
        if self.support_layers is not None:
            tokens = support.flatten(0, 1).flatten(2).transpose(1, 2)  # [B*S, h*w, C]
            padding = support_padding.flatten(0, 1)
            pos = self._position(padding, channels, tokens.dtype)
            for layer in self.support_layers:
                tokens = layer(tokens, pos, reference, (h, w), padding.flatten(1))
            support = tokens.transpose(1, 2).reshape(batch, shots, channels, h, w)
        prototypes, invalid = support_prototypes(
            support,
            support_foreground,
            support_padding,
            self.fg_prototypes,
            self.bg_prototypes,
            self.hash_bits,
            self.kmeans_iterations,
            generator,
            self.mask_empty_prototypes,
        )
        x = query.flatten(2).transpose(1, 2)  # [B, h*w, C]
        pos = self._position(query_padding, channels, x.dtype)
        for layer in self.query_layers:
            x = layer(x, pos, reference, (h, w), query_padding.flatten(1), prototypes, invalid)
        return x.transpose(1, 2).reshape(batch, channels, h, w)

    @staticmethod
    def _position(padding: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """Sine encoding flattened to ``[N, h*w, C]``."""
        return sine_position_encoding(padding, channels // 2).flatten(2).transpose(1, 2).to(dtype)
