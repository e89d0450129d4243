"""Self-supervised pretraining of ``SmallCNN`` on the unlabeled images themselves.

Objective: dense contrastive learning across two augmented views with known pixel
correspondence (in the spirit of DenseCL / PixPro's pixel contrast). Each image is cropped
twice at random (scale, aspect ratio, flip) and colour-jittered independently. A feature
cell of view 1 has a known position in the source image and hence in view 2; the
projected feature there is its positive, and the cells of the *other* images in the batch
are its negatives (InfoNCE, temperature 0.1, both directions). Colour jitter makes the
features invariant to colour shifts; crops at different scales make them agree across
scale and context, so cells of the same surface in both views match while cells of other
images are pushed apart. Negatives never come from the same image, so cells of one object
are not forced apart from each other.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fss_core.data.images import load_rgb
from fss_core.models.backbones import SmallCNN, imagenet_normalize

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "small_cnn.pth"
TEMPERATURE = 0.1
PROJECTION_DIM = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
CROP_SCALE = (0.25, 1.0)  # share of the image area a view covers
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
HUE_SHIFT = 0.03  # hue rotation in [-HUE_SHIFT, HUE_SHIFT] of a full turn
MAX_QUERIES = 1024
SOURCE_SCALE = 1.5  # images are kept in memory with their longer side at 1.5 x image_size


@dataclass
class PretrainReport:
    """What a pretraining run did: mean loss per epoch, wall time, steps, where the weights went."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    checkpoint: Path | None = None


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view came from: its crop box in source pixels (x0, y0, x1, y1) and whether it was mirrored."""

    box: tuple[int, int, int, int]
    flipped: bool


def _load_source(path: Path, max_side: int) -> torch.Tensor:
    """RGB file → float ``[3, h, w]`` in 0..1, longer side at most ``max_side``."""
    image = torch.from_numpy(load_rgb(path)).permute(2, 0, 1).float().div_(255)
    h, w = image.shape[1:]
    scale = max_side / max(h, w)
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return image


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def random_view(image: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, ViewGeometry]:
    """A random resized crop (+ mirror) of ``[3, h, w]`` → ``[3, size, size]`` and its geometry."""
    h, w = image.shape[1:]
    for _ in range(10):
        area = h * w * _uniform(gen, *CROP_SCALE)
        ratio = math.exp(_uniform(gen, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    x0 = int(torch.randint(0, w - cw + 1, (), generator=gen))
    y0 = int(torch.randint(0, h - ch + 1, (), generator=gen))
    crop = image[None, :, y0 : y0 + ch, x0 : x0 + cw]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    flipped = bool(torch.rand((), generator=gen) < 0.5)
    if flipped:
        crop = crop.flip(-1)
    return crop, ViewGeometry((x0, y0, x0 + cw, y0 + ch), flipped)


def colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation, hue (p=0.8) and grayscale (p=0.2) on ``[3, H, W]`` in 0..1."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    if torch.rand((), generator=gen) < 0.8:
        x = x * _uniform(gen, 1 - JITTER, 1 + JITTER)
        mean = (x * weights).sum(0).mean()
        x = (x - mean) * _uniform(gen, 1 - JITTER, 1 + JITTER) + mean
        gray = (x * weights).sum(0, keepdim=True)
        x = gray + (x - gray) * _uniform(gen, 1 - JITTER, 1 + JITTER)
        x = _rotate_hue(x, _uniform(gen, -HUE_SHIFT, HUE_SHIFT) * 2 * math.pi)
    if torch.rand((), generator=gen) < 0.2:
        x = (x * weights).sum(0, keepdim=True).expand(3, -1, -1)
    return x.clamp(0, 1)


def _rotate_hue(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the chroma of ``[3, H, W]`` RGB by ``angle`` radians in YIQ space (luma kept)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix, x)


def corresponding_cells(a: ViewGeometry, b: ViewGeometry, size: int, grid: int) -> torch.Tensor:
    """Where each feature cell of view ``a`` lies on the feature grid of view ``b``: ``[grid*grid, 2]``.

    Rows follow ``a``'s cells in row-major order; values are (x, y) ``grid_sample`` coordinates
    of ``b``'s ``[grid, grid]`` map with ``align_corners=True``, so a cell of ``a`` is visible in
    ``b`` iff both lie in [-1, 1]. With stride ``s = size / grid`` and "same" padding, cell j's
    receptive field is centred on pixel ``s·j`` (continuous coordinate ``s·j + 0.5``).
    """
    stride = size / grid
    centres = torch.arange(grid, dtype=torch.float32) * stride + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    if a.flipped:
        xs = size - xs
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    # view a → source pixels → view b
    xs = (ax0 + xs / size * (ax1 - ax0) - bx0) / (bx1 - bx0) * size
    ys = (ay0 + ys / size * (ay1 - ay0) - by0) / (by1 - by0) * size
    if b.flipped:
        xs = size - xs
    cells = (torch.stack([xs, ys], dim=1) - 0.5) / stride
    return cells / (grid - 1) * 2 - 1


def _projection_head(channels: int) -> nn.Module:
    """1x1-conv MLP mapping backbone features to the contrastive space (discarded after training)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, PROJECTION_DIM, 1),
    )


def dense_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    views1: list[ViewGeometry],
    views2: list[ViewGeometry],
    size: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """InfoNCE from view-1 cells to their corresponding points in view 2, other images as negatives.

    ``z1``, ``z2``: L2-normalised projections ``[B, D, g, g]`` of the two views. For every cell of
    view 1 whose source position lies inside view 2, the positive is ``z2`` bilinearly sampled at
    that position; the negatives are all cells of the other B-1 images in ``z2``. At most
    ``MAX_QUERIES`` cells, drawn at random, are used per call, which bounds the cost of the
    query x negative similarity matrix.
    """
    b, d, g, _ = z1.shape
    queries, positives, owners = [], [], []
    for i in range(b):
        coords = corresponding_cells(views1[i], views2[i], size, g).to(z1.device)
        inside = (coords.abs() <= 1).all(dim=1)
        if not inside.any():
            continue
        sampled = F.grid_sample(z2[i : i + 1], coords[inside].view(1, 1, -1, 2), align_corners=True)
        positives.append(F.normalize(sampled[0, :, 0].t(), dim=1))
        queries.append(z1[i].flatten(1).t()[inside])
        owners.append(torch.full((int(inside.sum()),), i, device=z1.device))
    if not queries:
        return z1.sum() * 0  # no overlap anywhere: nothing to learn from this batch
    q, k, owner = torch.cat(queries), torch.cat(positives), torch.cat(owners)
    if len(q) > MAX_QUERIES:
        keep = torch.randperm(len(q), generator=gen)[:MAX_QUERIES].to(q.device)
        q, k, owner = q[keep], k[keep], owner[keep]
    bank = z2.permute(0, 2, 3, 1).reshape(b * g * g, d)
    bank_owner = torch.arange(b, device=z2.device).repeat_interleave(g * g)
    negatives = (q @ bank.t()).masked_fill(owner[:, None] == bank_owner[None], float("-inf"))
    logits = torch.cat([(q * k).sum(1, keepdim=True), negatives], dim=1) / TEMPERATURE
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def pretrain_small_cnn(
    image_paths: list[Path],
    image_size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> tuple[SmallCNN, PretrainReport]:
    """Pretrain a ``SmallCNN`` with the dense contrastive objective on ``image_paths`` (no labels).

    Views are ``image_size`` squares (a multiple of 8). Deterministic per ``seed`` on the CPU
    for a given number of torch threads.
    With ``checkpoint_dir``, the backbone's state dict is written to
    ``checkpoint_dir/small_cnn.pth`` (loadable by ``build_backbone("small_cnn", checkpoint=...)``).
    Returns the trained backbone (on ``device``, in eval mode) and a ``PretrainReport``.
    """
    if len(image_paths) < 2:
        raise ValueError(f"self-supervised pretraining needs at least 2 images, got {len(image_paths)}")
    if image_size % 8 or image_size < 32:
        raise ValueError(f"image_size must be a multiple of 8 and >= 32, got {image_size}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sources = [_load_source(Path(p), round(image_size * SOURCE_SCALE)) for p in image_paths]
    batch_size = min(batch_size, len(sources))
    steps_per_epoch = len(sources) // batch_size
    model = SmallCNN().to(device)
    head = _projection_head(model.channels[model.embedding_layer]).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    report = PretrainReport()
    model.train()
    head.train()
    for epoch in tqdm(range(epochs), desc="ssl pretrain", disable=not progress):
        order = torch.randperm(len(sources), generator=gen)
        epoch_losses = []
        for step in range(steps_per_epoch):
            batch = [sources[i] for i in order[step * batch_size : (step + 1) * batch_size].tolist()]
            pairs = [[random_view(image, image_size, gen) for _ in range(2)] for image in batch]
            x1, x2 = (
                torch.stack([imagenet_normalize(colour_jitter(pair[v][0], gen)[None])[0] for pair in pairs]).to(device)
                for v in (0, 1)
            )
            views1, views2 = [pair[0][1] for pair in pairs], [pair[1][1] for pair in pairs]
            z1 = F.normalize(head(model(x1)[model.embedding_layer]), dim=1)
            z2 = F.normalize(head(model(x2)[model.embedding_layer]), dim=1)
            loss = 0.5 * (
                dense_contrastive_loss(z1, z2, views1, views2, image_size, gen)
                + dense_contrastive_loss(z2, z1, views2, views1, image_size, gen)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss.item())
            report.steps += 1
        report.losses.append(float(np.mean(epoch_losses)))
        log.info("ssl epoch %d/%d: loss %.4f", epoch + 1, epochs, report.losses[-1])
    model.eval()
    if checkpoint_dir is not None:
        report.checkpoint = _save_atomic(model, Path(checkpoint_dir) / CHECKPOINT_NAME)
    report.seconds = time.perf_counter() - started
    return model, report


def _save_atomic(model: nn.Module, path: Path) -> Path:
    """Write the state dict to ``path`` via a temp file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path
