"""Training variants that were measured on the demo data and not adopted (docs/results.md,
"Second round"). Reproduces their figures without carrying them in the pipeline's code.

Each ``--variant`` patches one part of the pipeline inside this process only (``set_attr`` lets
tests undo it):

- ``border``: a pseudo-class occurrence is dropped when more than ``BORDER_MAX_SHARE`` of its
  pixels lie in the image's border band (``1/BORDER_BAND`` of the shorter side wide). Background
  regions reach the image border far more often than objects do; on the demo data this halves the
  share of pseudo tasks that are mostly ground-truth background (0.66 to 0.33).
- ``residual``: the network's fg−bg logit gets ``s · (similarity − t)`` added (half to each
  channel, with opposite signs), where ``similarity`` is the training-free baseline's min-max
  normalised cosine to the class prototype (layer3+4), and ``s``, ``t`` are learnt (start 10 and
  0.6). The head's last convolution starts at zero, so the untrained model is the baseline at
  threshold 0.6 (up to how the support mask is pooled: bilinearly here, by area in the baseline),
  and training learns a correction.
- ``softmax_dice``: the dice loss on the softmax of the two channels (whose argmax is the
  prediction) instead of the reference's independent sigmoids.
- ``relation``: the network's output is replaced by a three-layer CNN over maps of how each query
  cell relates to the support (:func:`relation_maps`), plus the ``residual`` term; the transformer
  is not run. Such a learner sees no query feature itself, so it cannot learn what a training
  class looks like, only how similarity maps turn into masks. Its last layer starts at zero, so
  it too starts as the baseline.

The stages are keyed by the config, which does not know these patches, so every run gets a fresh
workspace: ``--workspace`` must not exist; the upstream stores (data, backbone, embeddings,
clusters, pseudo masks and, unless ``border`` rebuilds it, the task index) are copied from
``--source``, a workspace on which ``learning_figures.py`` has run. Arguments after ``--`` go to
``learning_figures.py``; the variant names are added to its JSON.

    python benchmarks/learning_variants.py --source /tmp/learn-a --workspace /tmp/learn-v1 \\
        --variant border --variant residual --variant softmax_dice -- --threads 1 \\
        --set train.image_size=129 --set train.batch_size=8 --set train.epochs=10 \\
        --set "train.adapter_layers=[layer3,layer4]" --set evaluate.episodes=100 \\
        --set "evaluate.seeds=[0]" --set "evaluate.shots=[1]" --out /tmp/learn-v1/figures.json
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import learning_figures
from fss_core.data.images import IGNORE_LABEL
from fss_core.models.fss import network
from fss_core.pseudo import task_index
from fss_core.training import trainer

BORDER_BAND = 16
BORDER_MAX_SHARE = 0.1
RESIDUAL_START = (10.0, 0.6)  # scale s, threshold t
UPSTREAM = ("backbone", "clusters.zarr", "data", "embeddings.zarr", "manifest.jsonl", "pseudo_masks")
VARIANTS = ("border", "residual", "softmax_dice", "relation")
RELATION_HIDDEN = 32


def patch_border(set_attr=setattr) -> None:
    """Drop valid pseudo-classes with more than BORDER_MAX_SHARE of their pixels in the border band."""
    plain = task_index.valid_pseudo_classes

    @functools.wraps(plain)
    def valid_pseudo_classes(mask, min_area, background_span=0.99):
        mask = np.asarray(mask)
        h, w = mask.shape
        b = max(1, min(h, w) // BORDER_BAND)
        band = np.zeros((h, w), dtype=bool)
        band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
        in_band = np.bincount(mask[band].ravel(), minlength=256)
        return [(c, area) for c, area in plain(mask, min_area, background_span)
                if in_band[c] <= BORDER_MAX_SHARE * area]

    set_attr(task_index, "valid_pseudo_classes", valid_pseudo_classes)


def _frozen_relations(backbone, query_img, support_imgs, support_masks, query_padding=None):
    """What the variants read from the frozen backbone: the query and support features, the
    support's fg and bg masks pooled bilinearly to the layer3 grid (``[B, S, 1, h, w]``), the
    query's unpadded cells (``[B, 1, h, w]``), and the baseline's min-max cosine to the prototype
    over layer3+4 there (``[B, 1, h, w]``)."""
    batch, shots = support_imgs.shape[:2]
    if query_padding is None:
        query_padding = torch.zeros(batch, *query_img.shape[-2:], dtype=torch.bool, device=query_img.device)
    with torch.no_grad():
        q = backbone(query_img)
        s = backbone(support_imgs.flatten(0, 1))
    size = tuple(q["layer3"].shape[-2:])

    def pooled(mask):
        return F.interpolate(mask.flatten(0, 1)[:, None].float(), size=size, mode="bilinear",
                             align_corners=True).view(batch, shots, 1, *size)

    fg, bg = pooled(support_masks == 1), pooled(support_masks == 0)
    valid = ~network._downsample_bool(query_padding, size)[:, None]
    layers = ("layer3", "layer4")
    similarity = network.prototype_prior(network._unit_features(q, layers),
                                         network._unit_features(s, layers).view(batch, shots, -1, *size), fg, valid)
    return q, s, fg, bg, valid, similarity


def _add_residual(model) -> None:
    """The learnt scale and threshold of the residual term, at their start values."""
    model.residual_scale = nn.Parameter(torch.tensor(RESIDUAL_START[0]))
    model.residual_threshold = nn.Parameter(torch.tensor(RESIDUAL_START[1]))


def _residual_logits(model, similarity: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``s · (similarity − t)`` as (bg, fg) logits, half to each channel; resized to ``size`` if given."""
    half = model.residual_scale * (similarity - model.residual_threshold) / 2
    if size is not None:
        half = F.interpolate(half, size=size, mode="bilinear", align_corners=True)
    return torch.cat([-half, half], dim=1)


def patch_residual(set_attr=setattr) -> None:
    """Add the learnt, baseline-started similarity term to the network's logits."""
    init, forward = network.FSSNetwork.__init__, network.FSSNetwork.forward

    def __init__(self, backbone, config=None):
        init(self, backbone, config)
        _add_residual(self)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward_with_residual(self, query_img, support_imgs, support_masks, query_padding=None,
                              support_padding=None, generator=None):
        logits = forward(self, query_img, support_imgs, support_masks, query_padding, support_padding, generator)
        similarity = _frozen_relations(self.backbone, query_img, support_imgs, support_masks, query_padding)[-1]
        return logits + _residual_logits(self, similarity, tuple(logits.shape[-2:]))

    set_attr(network.FSSNetwork, "__init__", __init__)
    set_attr(network.FSSNetwork, "forward", forward_with_residual)


def relation_maps(backbone, query_img, support_imgs, support_masks, query_padding=None):
    """Maps of how each query cell relates to the support, at the layer3 grid ``[B, 5, h, w]``, in
    this order: the baseline's min-max cosine to the prototype (layer3+4), the same to the
    support's background prototype, the raw cosine to the prototype in layer3 and in layer4, and
    the PFENet prior (layer4). None of them carries the query's own features, so a network that
    reads only these cannot learn what a training class looks like."""
    q, s, fg, bg, valid, similarity = _frozen_relations(backbone, query_img, support_imgs, support_masks,
                                                        query_padding)
    batch, shots = support_imgs.shape[:2]
    size = tuple(similarity.shape[-2:])
    layers = ("layer3", "layer4")
    maps = [similarity, network.prototype_prior(network._unit_features(q, layers),
                                                network._unit_features(s, layers).view(batch, shots, -1, *size),
                                                bg, valid)]
    for layer in layers:
        qu = network._unit_features(q, (layer,))
        su = network._unit_features(s, (layer,)).view(batch, shots, -1, *size)
        prototype = F.normalize(((su * fg).sum((3, 4)) / fg.sum((3, 4)).clamp_min(1e-4)).mean(1), dim=1)
        maps.append(torch.einsum("bchw,bc->bhw", qu, prototype)[:, None] * valid)
    q4 = F.interpolate(q["layer4"], size=size, mode="bilinear", align_corners=True)
    s4 = F.interpolate(s["layer4"], size=size, mode="bilinear", align_corners=True).view(batch, shots, -1, *size)
    maps.append(network.prior_mask(q4, s4, fg) * valid)
    return torch.cat(maps, dim=1)


def patch_relation(set_attr=setattr) -> None:
    """Replace the network's output by a small CNN over :func:`relation_maps` plus the residual
    baseline term: a learner that sees only query-support relations (the transformer is not run)."""
    init = network.FSSNetwork.__init__

    def __init__(self, backbone, config=None):
        init(self, backbone, config)
        _add_residual(self)
        self.relation_head = nn.Sequential(
            nn.Conv2d(5, RELATION_HIDDEN, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(RELATION_HIDDEN, RELATION_HIDDEN, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(RELATION_HIDDEN, 2, 3, padding=1))
        nn.init.zeros_(self.relation_head[-1].weight)
        nn.init.zeros_(self.relation_head[-1].bias)

    def forward_relation(self, query_img, support_imgs, support_masks, query_padding=None,
                         support_padding=None, generator=None):
        maps = relation_maps(self.backbone, query_img, support_imgs, support_masks, query_padding)
        logits = self.relation_head(maps) + _residual_logits(self, maps[:, :1])
        return F.interpolate(logits, size=query_img.shape[-2:], mode="bilinear", align_corners=True)

    set_attr(network.FSSNetwork, "__init__", __init__)
    set_attr(network.FSSNetwork, "forward", forward_relation)


def patch_softmax_dice(set_attr=setattr) -> None:
    """The trainer's loss (training and validation) on softmax probabilities."""

    def softmax_dice(logits, target, padding=None, ignore_label=IGNORE_LABEL):
        valid = target != ignore_label
        if padding is not None:
            valid = valid & ~padding
        valid = valid[:, None].to(logits.dtype)
        one_hot = torch.stack([target == 0, target == 1], dim=1).to(logits.dtype) * valid
        probs = torch.softmax(logits, dim=1) * valid
        numerator = 2 * (probs * one_hot).sum((2, 3))
        denominator = (probs**2).sum((2, 3)) + (one_hot**2).sum((2, 3))
        return (1 - numerator / denominator.clamp_min(1e-8)).sum(1).mean()

    set_attr(trainer, "dice_loss", softmax_dice)


PATCHES = {"border": patch_border, "residual": patch_residual, "softmax_dice": patch_softmax_dice,
           "relation": patch_relation}


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="a workspace learning_figures.py has run on")
    parser.add_argument("--workspace", type=Path, required=True, help="a new folder for this run")
    parser.add_argument("--variant", action="append", choices=VARIANTS, required=True)
    args = parser.parse_args(own)
    if args.workspace.exists():
        parser.error(f"--workspace {args.workspace} exists; each variant run needs a fresh one "
                     "(its stages would be taken for the unpatched ones)")
    missing = [name for name in UPSTREAM if not (args.source / name).exists()]
    if missing:
        parser.error(f"--source {args.source} lacks {missing}: run learning_figures.py on it first")
    args.workspace.mkdir(parents=True)
    for name in UPSTREAM + (() if "border" in args.variant else ("tasks.zarr",)):
        src, dst = args.source / name, args.workspace / name
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.exists():
            shutil.copy2(src, dst)
    for variant in args.variant:
        PATCHES[variant]()
    sys.argv = [sys.argv[0], "--workspace", str(args.workspace), *rest]
    learning_figures.main()
    out = Path(rest[rest.index("--out") + 1])
    figures = json.loads(out.read_text())
    figures["variants"] = sorted(set(args.variant))
    out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
