"""The few-shot segmentation network: frozen backbone, adapters, PFENet prior, prototype transformer."""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from fss_core.models.fss.deform_attn import MSDeformAttn
from fss_core.models.fss.proto_transformer import ProtoTransformer

logger = logging.getLogger(__name__)

FEATURE_LAYERS = ("layer2", "layer3", "layer4")
PRIOR_LAYER = "layer4"
GAP_EPS = 5e-4
COSINE_EPS = 1e-7
HEAD_DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class FSSModelConfig:
    """Hyper-parameters of :class:`FSSNetwork`; the defaults are the reference's, except
    ``mask_empty_prototypes`` (True: empty Hamming clusters are masked out of the cross-attention;
    False: they are attended as zero prototypes, as in the reference)."""

    hidden: int = 256
    heads: int = 8
    layers: int = 2
    ffn: int = 768
    dropout: float = 0.1
    points: int = 9
    fg_prototypes: int = 20
    bg_prototypes: int = 50
    hash_bits: int = 32
    kmeans_iterations: int = 10
    support_self_attention: bool = False
    adapter_layers: tuple[str, ...] = ("layer2", "layer3")
    adapter_dropout: float = 0.5
    prototype_prior: bool = False
    prototype_prior_layers: tuple[str, ...] = ("layer3", "layer4")
    mask_empty_prototypes: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_layers", tuple(self.adapter_layers))
        unknown = [name for name in self.adapter_layers if name not in FEATURE_LAYERS]
        if not self.adapter_layers or unknown or len(set(self.adapter_layers)) != len(self.adapter_layers):
            raise ValueError(
                f"FSSModelConfig.adapter_layers must be distinct names among {FEATURE_LAYERS}, "
                f"got {list(self.adapter_layers)}"
            )
        object.__setattr__(self, "prototype_prior_layers", tuple(self.prototype_prior_layers))
        unknown = [name for name in self.prototype_prior_layers if name not in FEATURE_LAYERS]
        if not self.prototype_prior_layers or unknown:
            raise ValueError(
                f"FSSModelConfig.prototype_prior_layers must be names among {FEATURE_LAYERS}, "
                f"got {list(self.prototype_prior_layers)}"
            )
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"FSSModelConfig.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        for name in ("hidden", "heads", "layers", "ffn", "points", "fg_prototypes", "bg_prototypes", "hash_bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"FSSModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kmeans_iterations < 0:
            raise ValueError(f"FSSModelConfig.kmeans_iterations must be >= 0, got {self.kmeans_iterations}")
        if self.hidden % self.heads != 0:
            raise ValueError(f"FSSModelConfig.hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.hidden % 4 != 0:
            raise ValueError(f"FSSModelConfig.hidden={self.hidden} must be divisible by 4 (sine encoding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FSSModelConfig.dropout must be in [0, 1), got {self.dropout}")


def weighted_gap(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling.

    Args:
        features: ``[N, C, h, w]``.
        mask: ``[N, 1, h, w]`` soft mask in [0, 1].

    Returns:
        ``[N, C, 1, 1]`` = sum(features * mask) / (sum(mask) + 5e-4).
    """
    return (features * mask).sum((2, 3), keepdim=True) / (mask.sum((2, 3), keepdim=True) + GAP_EPS)


def prior_mask(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
    """PFENet training-free prior from high-level features.

    For each shot: the max cosine similarity of each query pixel to the masked support pixels,
    min-max normalised over the query pixels of each image; then the mean over shots.

    Args:
        query: ``[B, C, h, w]``.
        support: ``[B, S, C, h, w]``.
        support_mask: ``[B, S, 1, h, w]`` soft fg mask.

    Returns:
        ``[B, 1, h, w]`` in [0, 1].
    """
    batch, _, h, w = query.shape
    q = query.flatten(2)  # [B, C, hw]
    q_norm = q.norm(dim=1, keepdim=True)  # [B, 1, hw]
    priors = []
    for shot in range(support.shape[1]):
        s = (support[:, shot] * support_mask[:, shot]).flatten(2).transpose(1, 2)  # [B, hw, C]
        s_norm = s.norm(dim=2, keepdim=True)  # [B, hw, 1]
        similarity = (s @ q) / (s_norm @ q_norm + COSINE_EPS)  # [B, hw_support, hw_query]
        best = similarity.max(1).values  # [B, hw_query]
        low = best.min(1, keepdim=True).values
        high = best.max(1, keepdim=True).values
        priors.append((best - low) / (high - low + COSINE_EPS))
    return torch.stack(priors).mean(0).view(batch, 1, h, w)


def prototype_prior(
    query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, query_valid: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity of each query cell to the class prototype, min-max normalised.

    The prototype is the masked average of the (unit-normalised) support features of each shot,
    averaged over the shots: one vector for the whole class, so unlike :func:`prior_mask` a
    single noisy support pixel cannot light up the query.

    Args:
        query: ``[B, C, h, w]`` unit-normalised along C.
        support: ``[B, S, C, h, w]`` unit-normalised along C.
        support_mask: ``[B, S, 1, h, w]`` soft fg mask.
        query_valid: ``[B, 1, h, w]`` bool, False at padding cells (excluded from the min-max,
            set to 0).

    Returns:
        ``[B, 1, h, w]`` in [0, 1].
    """
    prototypes = (support * support_mask).sum((3, 4)) / support_mask.sum((3, 4)).clamp_min(GAP_EPS)  # [B, S, C]
    prototype = F.normalize(prototypes.mean(1), dim=1)  # [B, C]
    cosine = torch.einsum("bchw,bc->bhw", query, prototype)[:, None]
    low = torch.where(query_valid, cosine, torch.inf).amin((2, 3), keepdim=True)
    high = torch.where(query_valid, cosine, -torch.inf).amax((2, 3), keepdim=True)
    return torch.where(query_valid, (cosine - low) / (high - low).clamp_min(COSINE_EPS), 0.0)


def _unit_features(features: dict[str, torch.Tensor], layers: tuple[str, ...]) -> torch.Tensor:
    """Each layer L2-normalised along channels, concatenated, normalised again (a cosine on the
    result is the mean of the per-layer cosines)."""
    return F.normalize(torch.cat([F.normalize(features[name], dim=1) for name in layers], dim=1), dim=1)


def _adapter(in_channels: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


def _merge(in_channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False), nn.ReLU(inplace=True))


def _downsample_bool(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a bool mask ``[N, H, W]`` to ``[N, *size]``."""
    return F.interpolate(mask[:, None].to(torch.float32), size=size, mode="nearest")[:, 0] > 0.5


class FSSNetwork(nn.Module):
    """Prototype cross-attention few-shot segmentation network.

    Args:
        backbone: module mapping ``[N, 3, H, W]`` to a dict with ``layer2``, ``layer3`` and
            ``layer4`` maps at one common stride, with attributes ``channels``/``strides``
            (dicts by layer name) and ``freeze()``. It is frozen here and kept in eval mode.
        config: hyper-parameters.
    """

    def __init__(self, backbone: nn.Module, config: FSSModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or FSSModelConfig()
        for attribute in ("channels", "strides"):
            missing = [name for name in FEATURE_LAYERS if name not in getattr(backbone, attribute, {})]
            if missing:
                raise ValueError(f"FSSNetwork: backbone.{attribute} lacks {missing}")
        strides = {backbone.strides[name] for name in FEATURE_LAYERS}
        if len(strides) != 1:
            raise ValueError(
                f"FSSNetwork: backbone layers {FEATURE_LAYERS} must share one stride, got {backbone.strides}"
            )
        hidden = self.config.hidden
        mid_channels = sum(backbone.channels[name] for name in self.config.adapter_layers)
        self.query_adapter = _adapter(mid_channels, hidden, self.config.adapter_dropout)
        self.support_adapter = _adapter(mid_channels, hidden, self.config.adapter_dropout)
        priors = 2 if self.config.prototype_prior else 1
        self.query_merge = _merge(2 * hidden + priors, hidden)
        self.support_merge = _merge(2 * hidden, hidden)
        self.transformer = ProtoTransformer(
            dim=hidden,
            heads=self.config.heads,
            layers=self.config.layers,
            points=self.config.points,
            ffn=self.config.ffn,
            dropout=self.config.dropout,
            fg_prototypes=self.config.fg_prototypes,
            bg_prototypes=self.config.bg_prototypes,
            hash_bits=self.config.hash_bits,
            kmeans_iterations=self.config.kmeans_iterations,
            support_self_attention=self.config.support_self_attention,
            mask_empty_prototypes=self.config.mask_empty_prototypes,
        )
        self.head = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(HEAD_DROPOUT),
            nn.Conv2d(hidden, 2, kernel_size=1),
        )
        self._init_weights()
        backbone.freeze()
        self.backbone = backbone.eval()
        logger.info("FSSNetwork: %s, backbone channels %s", self.config, backbone.channels)

    def _init_weights(self) -> None:
        """Xavier for every Linear (zero bias), then the deformable-attention re-initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()

    def train(self, mode: bool = True) -> FSSNetwork:
        """Set train/eval mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        query_padding: torch.Tensor | None = None,
        support_padding: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Segment the query given S annotated supports.

        Args:
            query_img: ``[B, 3, H, W]`` normalised image.
            support_imgs: ``[B, S, 3, H, W]``.
            support_masks: ``[B, S, H, W]`` with 1 = fg, 0 = bg, 255 = ignore (counted as bg).
            query_padding: ``[B, H, W]`` bool, True where the canvas is padding; None = none.
            support_padding: ``[B, S, H, W]`` bool; None = none.
            generator: source of the prototype clustering's random draws (global RNG when None).

        Returns:
            logits ``[B, 2, H, W]`` (channel 0 = bg, 1 = fg).
        """
        batch, _, height, width = query_img.shape
        if support_imgs.dim() != 5 or support_imgs.shape[0] != batch or support_imgs.shape[2:] != query_img.shape[1:]:
            raise ValueError(
                f"FSSNetwork: support_imgs must be [B, S, 3, H, W] matching query_img {tuple(query_img.shape)}, "
                f"got {tuple(support_imgs.shape)}"
            )
        shots = support_imgs.shape[1]
        if support_masks.shape != (batch, shots, height, width):
            raise ValueError(
                f"FSSNetwork: support_masks must be {(batch, shots, height, width)}, got {tuple(support_masks.shape)}"
            )
        if query_padding is None:
            query_padding = torch.zeros(batch, height, width, dtype=torch.bool, device=query_img.device)
        if support_padding is None:
            support_padding = torch.zeros(batch, shots, height, width, dtype=torch.bool, device=query_img.device)
        if query_padding.shape != (batch, height, width):
            raise ValueError(
                f"FSSNetwork: query_padding must be {(batch, height, width)}, got {tuple(query_padding.shape)}"
            )
        if support_padding.shape != support_masks.shape:
            raise ValueError(
                f"FSSNetwork: support_padding must be {tuple(support_masks.shape)}, got {tuple(support_padding.shape)}"
            )

        with torch.no_grad():
            query_feats = self.backbone(query_img)
            support_feats = self.backbone(support_imgs.flatten(0, 1))
        size = tuple(query_feats["layer2"].shape[-2:])
        for name in FEATURE_LAYERS:
            if tuple(query_feats[name].shape[-2:]) != size:
                got = tuple(query_feats[name].shape[-2:])
                raise ValueError(f"FSSNetwork: backbone {name} has spatial size {got}, expected {size} like layer2")
        hidden = self.config.hidden

        adapter_layers = self.config.adapter_layers
        query = self.query_adapter(torch.cat([query_feats[name] for name in adapter_layers], dim=1))
        support = self.support_adapter(torch.cat([support_feats[name] for name in adapter_layers], dim=1))

        foreground = (support_masks == 1).flatten(0, 1)  # [B*S, H, W]
        soft_mask = F.interpolate(foreground[:, None].to(query.dtype), size=size, mode="bilinear", align_corners=True)
        shot_prototypes = weighted_gap(support, soft_mask)  # [B*S, hidden, 1, 1]
        mean_prototype = shot_prototypes.view(batch, shots, hidden, 1, 1).mean(1)
        prior = prior_mask(
            query_feats[PRIOR_LAYER],
            support_feats[PRIOR_LAYER].view(batch, shots, -1, *size),
            soft_mask.view(batch, shots, 1, *size),
        )
        priors = [prior]
        if self.config.prototype_prior:
            layers = self.config.prototype_prior_layers
            priors.append(prototype_prior(
                _unit_features(query_feats, layers),
                _unit_features(support_feats, layers).view(batch, shots, -1, *size),
                soft_mask.view(batch, shots, 1, *size),
                ~_downsample_bool(query_padding, size)[:, None],
            ))
        query = self.query_merge(
            torch.cat([query, mean_prototype.expand(-1, -1, *size), *(p.to(query.dtype) for p in priors)], dim=1)
        )
        support = self.support_merge(torch.cat([support, shot_prototypes.expand(-1, -1, *size)], dim=1))

        fused = self.transformer(
            query,
            _downsample_bool(query_padding, size),
            support.view(batch, shots, hidden, *size),
            _downsample_bool(foreground, size).view(batch, shots, *size),
            _downsample_bool(support_padding.flatten(0, 1), size).view(batch, shots, *size),
            generator,
        )
        logits = self.head(fused)
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters for the two optimisers.

    Returns:
        (sgd_params, transformer_decay, transformer_no_decay): parameters whose name lacks
        "transformer" (SGD); transformer parameters whose name lacks "bias" (AdamW, weight
        decay 1e-2); transformer biases (AdamW, no decay). Frozen parameters are excluded.
    """
    sgd, decay, no_decay = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "transformer" not in name:
            sgd.append(parameter)
        elif "bias" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return sgd, decay, no_decay
