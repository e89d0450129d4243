"""DINO Vision Transformers (ViT-S/16, ViT-B/8) in plain PyTorch, with DINO's state-dict keys.

Keys: ``cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}.*, norm.*``. The positional embedding (learnt for a 224x224
input) is interpolated bicubically to the input's patch grid. Feature maps are patch
tokens only (no CLS) reshaped to ``[B, D, H/p, W/p]``: ``layer2``/``layer3`` are the
outputs of blocks depth/3 and 2·depth/3, ``layer4`` the last block after the final LayerNorm.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from fss_core.models.backbones.base import Backbone
from fss_core.models.backbones.checkpoints import load_strict, read_checkpoint, strip_prefix, take_prefix, unwrap

_TRAIN_SIZE = 224  # the input side the positional embedding was learnt for
_WRAPPERS = ("teacher", "student", "state_dict")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches → ``dim``-d tokens via one strided conv."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, D, H//p, W//p]``."""
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` → ``[B, N, D]``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1`` (D → 4D), GELU, ``fc2`` (4D → D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, as in DINO)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(Backbone):
    """DINO ViT: ``forward(x [B, 3, H, W]) -> {"layer2", "layer3", "layer4": [B, D, H//p, W//p]}``."""

    embedding_layer = "layer4"

    def __init__(self, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"depth must be >= 3 to provide three feature levels, got {depth}")
        self.patch = patch
        self.patch_embed = PatchEmbed(patch, dim)
        grid = _TRAIN_SIZE // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.taps = {depth // 3 - 1: "layer2", 2 * depth // 3 - 1: "layer3"}
        self.channels = dict.fromkeys(("layer2", "layer3", "layer4"), dim)
        self.strides = dict.fromkeys(("layer2", "layer3", "layer4"), patch)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """``[1, 1 + gh·gw, D]``: the CLS position plus the patch grid resized bicubically to gh x gw."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(patch_pos.shape[1])
        if (gh, gw) != (side, side):
            grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` ImageNet-normalised → patch-token maps ``[B, D, H//p, W//p]`` per key."""
        tokens = self.patch_embed(x)
        b, d, gh, gw = tokens.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.position_embedding(gh, gw)

        def as_map(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(b, d, gh, gw)

        out = {}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in self.taps:
                out[self.taps[index]] = as_map(tokens)
        out["layer4"] = as_map(self.norm(tokens))
        return out


def dino_vits16(depth: int = 12) -> VisionTransformer:
    """DINO ViT-S/16: dim 384, 6 heads (``depth`` 12; smaller only for tests)."""
    return VisionTransformer(patch=16, dim=384, depth=depth, heads=6)


def dino_vitb8(depth: int = 12) -> VisionTransformer:
    """DINO ViT-B/8: dim 768, 12 heads (``depth`` 12; smaller only for tests)."""
    return VisionTransformer(patch=8, dim=768, depth=depth, heads=12)


def load_dino(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Load a DINO checkpoint: a plain state dict, or one under ``teacher``/``student``/``state_dict``.

    The first wrapper present wins (the teacher is DINO's evaluated network). A ``module.``
    prefix is stripped; if keys sit under ``backbone.``, only those are kept (the DINO
    projection ``head.*`` beside them is dropped).
    """
    state = strip_prefix(unwrap(read_checkpoint(path), path, _WRAPPERS), "module.")
    if any(k.startswith("backbone.") for k in state):
        state = take_prefix(state, "backbone.")
    load_strict(model, state, path)
