"""The training-free prototype baseline: how far frozen features go with no few-shot training.

For each episode: L2-normalised backbone features (one layer, or several resized to the finest
grid and concatenated, each normalised first, so the cosine is the mean of the per-layer
cosines); one masked-average foreground prototype per support, averaged over the shots; the
cosine similarity of every query cell to that prototype, min-max normalised over the query's
non-padding cells; foreground where the normalised similarity exceeds ``threshold``.

The min-max form is used because raw cosines of ReLU features sit in a narrow band whose
position depends on the backbone (5–95th percentile 0.55–0.88 for a random-weight small CNN,
0.80–0.98 for a random-weight ResNet-50, layers 3+4), so a fixed raw threshold flips from "all
foreground" to "nothing" between backbones: on synthetic PASCAL-like episodes raw thresholds
0.2–0.9 gave 0–31 % mIoU, min-max thresholds 0.3–0.7 gave 27–35 % for both backbones, best
around 0.6 with layers 3+4 (the defaults). Its cost: some foreground is always predicted, even
where the class is absent — which the protocol never asks, as every query contains its class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fss_core.evaluation.protocol import EpisodeInput

DEFAULT_LAYERS = ("layer3", "layer4")
DEFAULT_THRESHOLD = 0.6
EPS = 1e-6


class PrototypeBaseline:
    """A ``Predictor``: masked-average prototype + cosine similarity, no learnt parameter.

    Args:
        backbone: module mapping ``[N, 3, H, W]`` to a dict of feature maps (e.g. a backbone from
            ``build_backbone``); used frozen, in eval mode.
        layers: which maps to use; several are concatenated on the finest grid.
        threshold: foreground where the min-max normalised similarity exceeds it, in (0, 1).
        device: where the backbone runs.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        layers: Sequence[str] = DEFAULT_LAYERS,
        threshold: float = DEFAULT_THRESHOLD,
        device: str | torch.device = "cpu",
    ):
        if not layers:
            raise ValueError("PrototypeBaseline needs at least one feature layer")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"PrototypeBaseline threshold must be in (0, 1), got {threshold}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.layers = tuple(layers)
        self.threshold = float(threshold)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → unit-norm features ``[N, C, h, w]`` on the finest grid among ``layers``."""
        out = self.backbone(images.to(self.device))
        missing = [name for name in self.layers if name not in out]
        if missing:
            raise KeyError(f"backbone output lacks layers {missing}; it has {sorted(out)}")
        maps = [F.normalize(out[name].float(), dim=1) for name in self.layers]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return F.normalize(torch.cat(maps, dim=1), dim=1)

    def similarity(self, episode: EpisodeInput) -> torch.Tensor:
        """Min-max normalised cosine similarity of the query to the prototype, ``[B, h, w]`` in [0, 1]
        on the feature grid (padding cells 0)."""
        batch, shots = episode.support_imgs.shape[:2]
        with torch.inference_mode():
            query = self._features(episode.query_img)  # [B, C, h, w]
            support = self._features(episode.support_imgs.flatten(0, 1))  # [B*S, C, h, w]
        size = tuple(query.shape[-2:])
        # Area pooling: a cell's weight is the fraction of its pixels that are foreground.
        weight = F.interpolate((episode.support_masks.flatten(0, 1) == 1)[:, None].float().to(self.device),
                               size=size, mode="area")
        shot_prototypes = (support * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(EPS)  # [B*S, C]
        prototype = F.normalize(shot_prototypes.view(batch, shots, -1).mean(1), dim=1)  # [B, C]
        cosine = torch.einsum("bchw,bc->bhw", query, prototype)
        valid = F.interpolate((~episode.query_padding)[:, None].float().to(self.device), size=size,
                              mode="area")[:, 0] > 0.5
        low = torch.where(valid, cosine, torch.inf).flatten(1).min(1).values.view(batch, 1, 1)
        high = torch.where(valid, cosine, -torch.inf).flatten(1).max(1).values.view(batch, 1, 1)
        return torch.where(valid, (cosine - low) / (high - low).clamp_min(EPS), 0.0)

    def __call__(self, episode: EpisodeInput) -> torch.Tensor:
        """``EpisodeInput`` → logits ``[B, 2, L, L]`` on CPU: bg 0, fg = similarity − threshold."""
        height, width = episode.query_img.shape[-2:]
        score = F.interpolate(self.similarity(episode)[:, None], size=(height, width), mode="bilinear",
                              align_corners=False)
        return torch.cat([torch.zeros_like(score), score - self.threshold], dim=1).cpu()
