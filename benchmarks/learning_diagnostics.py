"""Why does a trained FSS model score what it scores? Diagnostics for docs/results.md.

For one trained model bundle on a workspace built with the demo config (or ``--set``
overrides), writes a JSON with:

- ``pseudo_val``: foreground mIoU on the held-out pseudo episodes (the task the unsupervised
  model is trained for) of the model and of the training-free prototype baseline;
- ``pseudo_tasks``: what the pseudo tasks are made of, judged by the ground truth (used here
  only to diagnose): the share of (image, pseudo-class) occurrences whose pixels are mostly
  ground-truth background;
- ``novel``: novel-class 1-shot mIoU per fold of the model, the baseline (layer3+4 and layer4
  alone, and layer3+4 at thresholds 0.5 and 0.7), the PFENet prior alone (the model's prior
  input, thresholded) and two rules that use the support's background ("fg where the cosine
  to the fg prototype beats the cosine to the background": one mean background prototype, or
  5 k-means ones), plus each predictor's precision, recall and predicted/true foreground area;
- ``pseudo_val_baseline``: the baseline's held-out pseudo score at thresholds 0.4–0.8 (which
  threshold the pseudo tasks ask for);
- ``grid_oracle``: the ground truth itself averaged to the feature grid and upsampled like a
  prediction, scored on the val images' novel classes (what the grid's resolution allows).

The baseline and the priors use the bundle's own frozen backbone, so every row sees the same
features.

    python benchmarks/learning_diagnostics.py --workspace /tmp/fss-demo-bench \\
        --bundle /tmp/fss-demo-bench/models/unsupervised-<key> --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fss_core.config import load_config
from fss_core.data.episodes import collate_episodes
from fss_core.data.folds import fold_split
from fss_core.data.images import IGNORE_LABEL, load_label
from fss_core.evaluation import protocol
from fss_core.evaluation.baseline import PrototypeBaseline
from fss_core.models.fss.bundle import load_bundle
from fss_core.models.fss.network import prior_mask
from tasks.pseudo import dataset_num_classes
from tasks.train import _datasets, records

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("learning_diagnostics")


class PriorPredictor:
    """The PFENet prior of ``layer`` (max cosine to any support fg cell), thresholded."""

    def __init__(self, backbone: torch.nn.Module, threshold: float, layer: str = "layer4"):
        self.backbone, self.threshold, self.layer = backbone, threshold, layer

    def __call__(self, episode: protocol.EpisodeInput) -> torch.Tensor:
        batch, shots = episode.support_imgs.shape[:2]
        with torch.inference_mode():
            query = self.backbone(episode.query_img)[self.layer]
            support = self.backbone(episode.support_imgs.flatten(0, 1))[self.layer]
        size = query.shape[-2:]
        mask = F.interpolate((episode.support_masks.flatten(0, 1) == 1)[:, None].float(), size=size,
                             mode="bilinear", align_corners=True)
        prior = prior_mask(query, support.view(batch, shots, -1, *size), mask.view(batch, shots, 1, *size))
        prior = F.interpolate(prior, size=episode.query_img.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([torch.zeros_like(prior), prior - self.threshold], dim=1)


class BackgroundRule(PrototypeBaseline):
    """Foreground where the cosine to the fg prototype beats the best cosine to the support's
    background prototypes: their mean (``k`` = 1) or ``k`` seeded k-means centres (cosine)."""

    def __init__(self, backbone: torch.nn.Module, k: int = 1, iterations: int = 10):
        super().__init__(backbone)
        self.k, self.iterations = k, iterations

    def _background_prototypes(self, cells: torch.Tensor) -> torch.Tensor:
        if self.k == 1 or len(cells) <= self.k:
            return F.normalize(cells.mean(0, keepdim=True), dim=1)
        order = torch.randperm(len(cells), generator=torch.Generator().manual_seed(0))
        centres = cells[order[:self.k]].clone()
        for _ in range(self.iterations):
            nearest = (cells @ centres.T).argmax(1)
            for j in range(self.k):
                if (nearest == j).any():
                    centres[j] = F.normalize(cells[nearest == j].mean(0), dim=0)
        return centres

    def __call__(self, episode: protocol.EpisodeInput) -> torch.Tensor:
        batch, shots = episode.support_imgs.shape[:2]
        with torch.inference_mode():
            query = self._features(episode.query_img)
            support = self._features(episode.support_imgs.flatten(0, 1))
        size = query.shape[-2:]
        fg = F.interpolate((episode.support_masks.flatten(0, 1) == 1)[:, None].float(), size=size, mode="area")
        padding = F.interpolate(episode.support_padding.flatten(0, 1)[:, None].float(), size=size, mode="area")
        bg = (1 - fg) * (padding < 0.5)
        prototype = F.normalize(((support * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1e-6))
                                .view(batch, shots, -1).mean(1), dim=1)
        scores = []
        for b in range(batch):
            cells = support.view(batch, shots, *support.shape[1:])[b].permute(0, 2, 3, 1).reshape(-1, support.shape[1])
            background = self._background_prototypes(cells[bg.view(batch, -1)[b] > 0.5])
            scores.append(torch.einsum("chw,c->hw", query[b], prototype[b])
                          - torch.einsum("chw,kc->khw", query[b], background).max(0).values)
        score = F.interpolate(torch.stack(scores)[:, None], size=episode.query_img.shape[-2:], mode="bilinear",
                              align_corners=False)
        return torch.cat([torch.zeros_like(score), score], dim=1)


def pseudo_val(cfg, model, baseline, thresholds=(0.4, 0.5, 0.6, 0.7, 0.8)) -> tuple[dict, dict]:
    """Foreground mIoU over clusters on the held-out pseudo episodes (epoch 0 draws), in one pass:
    ``({"model", "baseline"}, the baseline's at each of ``thresholds``)``."""
    _, held_out = _datasets(cfg)
    loader = DataLoader(held_out, batch_size=8, shuffle=False, collate_fn=collate_episodes)
    sums: dict = {name: ({}, {}) for name in ("model", "baseline", *thresholds)}
    generator = torch.Generator().manual_seed(0)
    for batch in loader:
        episode = protocol.EpisodeInput(batch.query_img, batch.support_imgs, batch.support_masks,
                                        batch.query_padding, batch.support_padding, generator)
        with torch.inference_mode():
            logits = model(batch.query_img, batch.support_imgs, batch.support_masks,
                           batch.query_padding, batch.support_padding, generator)
            # the baseline's own score map: fg where it exceeds the threshold
            similarity = F.interpolate(baseline.similarity(episode)[:, None], size=batch.query_img.shape[-2:],
                                       mode="bilinear", align_corners=False)[:, 0]
        valid = (batch.query_mask != IGNORE_LABEL) & ~batch.query_padding
        target = (batch.query_mask == 1) & valid
        predictions = {"model": logits.argmax(1) == 1, "baseline": similarity > baseline.threshold,
                       **{t: similarity > t for t in thresholds}}
        for name, pred in predictions.items():
            pred = pred & valid
            inter, union = sums[name]
            for c, i, u in zip(batch.class_id.tolist(), (pred & target).sum((1, 2)).tolist(),
                               (pred | target).sum((1, 2)).tolist()):
                inter[c] = inter.get(c, 0) + i
                union[c] = union.get(c, 0) + u
    scores = {name: float(np.mean([inter[c] / union[c] for c in union if union[c]]))
              for name, (inter, union) in sums.items()}
    return ({"model": scores["model"], "baseline": scores["baseline"]},
            {str(t): scores[t] for t in thresholds})


def grid_oracle(cfg, folds: list[int], grids=(17, 25)) -> dict[str, float]:
    """mIoU over the novel classes of ``folds`` of the ground truth averaged to a ``g × g`` grid
    (on the padded square canvas) and upsampled bilinearly, per class summed over val images."""
    n_classes = dataset_num_classes(cfg)
    novel = {c for fold in folds for c in fold_split(cfg.data.fold_scheme, fold, n_classes).novel}
    results = {}
    for grid in grids:
        sums: dict[int, list[int]] = {}
        for record in records(cfg, "val"):
            label = load_label(record.label_path)
            side = max(label.shape)
            canvas = np.full((side, side), IGNORE_LABEL, dtype=np.uint8)
            canvas[:label.shape[0], :label.shape[1]] = label
            valid = canvas != IGNORE_LABEL
            for c in sorted(set(np.unique(label).tolist()) & novel):
                truth = canvas == c
                small = F.interpolate(torch.from_numpy(truth.astype(np.float32))[None, None], size=(grid, grid),
                                      mode="area")
                pred = F.interpolate(small, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
                entry = sums.setdefault(c, [0, 0])
                entry[0] += int((pred & truth & valid).sum())
                entry[1] += int(((pred | truth) & valid).sum())
        results[str(grid)] = float(np.mean([i / u for i, u in sums.values() if u]))
    return results


def pseudo_task_composition(cfg) -> dict[str, float]:
    """Share of task-index occurrences whose labelled pixels are > 50 % / > 80 % / > 95 % background."""
    from PIL import Image

    from fss_core.pseudo.task_index import PseudoTaskIndex
    from tasks.workspace import workspace_of

    ws = workspace_of(cfg)
    index = PseudoTaskIndex.load(ws.tasks)
    labels = {r.image_id: r.label_path for r in records(cfg, "train")}
    fractions = []
    for image, cluster in zip(index.occ_image.tolist(), index.occ_cluster.tolist()):
        image_id = index.image_ids[image]
        if image_id not in labels:
            continue
        pseudo = np.array(Image.open(ws.pseudo_masks / f"{image_id}.png"))
        truth = np.array(Image.open(labels[image_id]))
        pixels = (pseudo == cluster) & (truth != IGNORE_LABEL)
        if pixels.any():
            fractions.append(float((truth[pixels] == 0).mean()))
    share = np.array(fractions)
    return {"occurrences": len(fractions), **{f"mostly_background_{int(t * 100)}": float((share > t).mean())
                                               for t in (0.5, 0.8, 0.95)}}


class CountingMetric(protocol.FewShotSegMetric):
    """The protocol's metric, also summing predicted, true and overlapping foreground pixels."""

    counts: list[tuple[int, int, int]] = []

    def process(self, pred, target, class_id):
        valid = target != IGNORE_LABEL
        p, t = (pred == 1) & valid, (target == 1) & valid
        CountingMetric.counts.append((int(p.sum()), int(t.sum()), int((p & t).sum())))
        return super().process(pred, target, class_id)


def novel_classes(cfg, predictors: dict, folds: list[int], episodes: int, image_size: int, out: Path) -> dict:
    val = records(cfg, "val")
    n_classes = dataset_num_classes(cfg)
    results = {}
    protocol.FewShotSegMetric = CountingMetric  # the protocol builds its metric by this name
    for name, predictor in predictors.items():
        CountingMetric.counts = []
        per_fold = {}
        for fold in folds:
            split = fold_split(cfg.data.fold_scheme, fold, n_classes)
            m = protocol.run_protocol(predictor, val, split, 1, episodes, [0], image_size, cfg.evaluate.min_area,
                                      out / name / f"fold{fold}", area_reference=cfg.evaluate.area_reference)
            per_fold[fold] = m["miou"]
        counts = np.array(CountingMetric.counts, dtype=float)
        results[name] = {"miou": per_fold, "mean": float(np.mean(list(per_fold.values()))),
                         "precision": float(counts[:, 2].sum() / max(counts[:, 0].sum(), 1)),
                         "recall": float(counts[:, 2].sum() / max(counts[:, 1].sum(), 1)),
                         "area_ratio": float(counts[:, 0].sum() / max(counts[:, 1].sum(), 1))}
        log.info("%s: %s", name, results[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    model, spec = load_bundle(args.bundle)
    cfg = load_config(args.config, [*args.overrides, f"runtime.workspace={args.workspace}",
                                    f"train.image_size={spec.image_size}"])
    backbone = copy.deepcopy(model.backbone)
    baseline = PrototypeBaseline(backbone, threshold=cfg.evaluate.baseline_threshold)
    figures = {"bundle": str(args.bundle)}
    figures["pseudo_val"], figures["pseudo_val_baseline"] = pseudo_val(cfg, model, baseline)
    log.info("pseudo-val mIoU: %s", figures["pseudo_val"])
    log.info("pseudo-val mIoU of the baseline by threshold: %s", figures["pseudo_val_baseline"])
    figures["pseudo_tasks"] = pseudo_task_composition(cfg)
    log.info("pseudo tasks: %s", figures["pseudo_tasks"])
    predictors = {"model": protocol.ModelPredictor(model), "baseline": baseline,
                  "baseline_layer4": PrototypeBaseline(backbone, layers=("layer4",),
                                                       threshold=cfg.evaluate.baseline_threshold)}
    predictors.update({f"baseline@{t}": PrototypeBaseline(backbone, threshold=t) for t in (0.5, 0.7)})
    predictors.update({f"pfenet_prior@{t}": PriorPredictor(backbone, t) for t in (0.5, 0.6, 0.7, 0.8)})
    predictors.update({"background_mean": BackgroundRule(backbone, k=1), "background_kmeans5": BackgroundRule(backbone, k=5)})
    folds = [int(f) for f in args.folds.split(",")]
    figures["grid_oracle"] = grid_oracle(cfg, folds)
    log.info("grid oracle mIoU: %s", figures["grid_oracle"])
    figures["novel_1shot"] = novel_classes(cfg, predictors, folds, args.episodes, spec.image_size,
                                           args.out.parent / "diagnostics")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    log.info("written to %s", args.out)


if __name__ == "__main__":
    main()
