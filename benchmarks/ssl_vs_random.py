"""Pixel-embedding quality of the small CNN: self-supervised pretraining vs random weights.

On the synthetic VOC-layout data, each backbone's layer4 embeddings (L2-normalised) of the
train images are clustered with k-means; every pixel of the train images (clustered) and of
the val images (held out) takes its nearest centroid (scores bilinearly upsampled to the
image). The clusters are scored against the ground truth (0 bg, 1..C, 255 ignored) by

- Hungarian mIoU: one cluster per class, matched to maximise overlap (``linear_sum_assignment``);
  unmatched clusters count as wrong. Mean over background + C classes.
- many-to-one mIoU: every cluster takes its majority class.

A uniform random cluster per pixel is the chance floor.

    python benchmarks/ssl_vs_random.py [--data DIR] [--epochs 10] [--batch-size 32]
        [--image-size 96] [--clusters 30] [--seed 0] [--threads N] [--write-docs docs/backbones.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from fss_core.data.images import IGNORE_LABEL, load_label, load_rgb
from fss_core.data.synthetic import synthesize
from fss_core.embeddings.ssl_pretrain import pretrain_small_cnn
from fss_core.geometry import pad_geometry
from fss_core.models.backbones import Backbone, SmallCNN, imagenet_normalize

DOCS_BEGIN = "<!-- ssl_vs_random:begin -->"
DOCS_END = "<!-- ssl_vs_random:end -->"


def read_list(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``lists/{split}.txt``."""
    lines = (root / "lists" / f"{split}.txt").read_text().split("\n")
    return [(root / a, root / b) for a, b in (line.split() for line in lines if line.strip())]


@torch.no_grad()
def embed(model: Backbone, image_path: Path, long_side: int) -> torch.Tensor:
    """L2-normalised embedding map ``[C, h, w]`` of one image resized to ``long_side`` (sides ×8)."""
    rgb = torch.from_numpy(load_rgb(image_path)).permute(2, 0, 1).float().div(255)[None]
    geometry = pad_geometry(rgb.shape[2], rgb.shape[3], long_side)
    size = (geometry.new_h, geometry.new_w)
    rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.normalize(model(imagenet_normalize(rgb))[model.embedding_layer][0], dim=0)


def assign(embedding: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Nearest centroid per pixel ``[H, W]``: scores −‖f − c‖² upsampled bilinearly, then argmax."""
    scores = torch.einsum("chw,kc->khw", embedding, centroids) * 2 - (centroids**2).sum(1)[:, None, None]
    scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=True)[0]
    return scores.argmax(0).numpy()


def overlap(pred: np.ndarray, label: np.ndarray, k: int, classes: int) -> np.ndarray:
    """Pixel counts ``[k, classes]`` of (cluster, class), ignore pixels left out."""
    keep = label != IGNORE_LABEL
    return np.bincount(pred[keep] * classes + label[keep], minlength=k * classes).reshape(k, classes)


def hungarian_miou(counts: np.ndarray) -> float:
    """mIoU over classes after a one-to-one cluster→class matching that maximises overlap."""
    rows, cols = linear_sum_assignment(-counts)
    inter = np.zeros(counts.shape[1])
    union = counts.sum(0).astype(float)  # classes without a cluster: IoU 0
    inter[cols] = counts[rows, cols]
    union[cols] += counts[rows].sum(1) - counts[rows, cols]
    return float(np.mean(inter / np.maximum(union, 1)))


def many_to_one_miou(counts: np.ndarray) -> float:
    """mIoU over classes when every cluster predicts its majority class."""
    predicted = np.zeros((counts.shape[1], counts.shape[1]))
    np.add.at(predicted, counts.argmax(1), counts)  # [predicted class, true class]
    inter = np.diag(predicted)
    union = predicted.sum(0) + predicted.sum(1) - inter
    return float(np.mean(inter / np.maximum(union, 1)))


def evaluate(model: Backbone, root: Path, k: int, classes: int, long_side: int, seed: int) -> dict[str, float]:
    """k-means on the train images' embeddings; Hungarian / many-to-one mIoU on train and val."""
    model.eval()
    train = read_list(root, "train")
    features = [embed(model, image, long_side) for image, _ in train]
    cells = torch.cat([f.flatten(1).t() for f in features]).numpy()
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(cells)
    centroids = torch.from_numpy(kmeans.cluster_centers_).float()
    result = {}
    for split, pairs, maps in (("train", train, features), ("val", read_list(root, "val"), None)):
        counts = np.zeros((k, classes), dtype=np.int64)
        for i, (image, label_path) in enumerate(pairs):
            label = load_label(label_path)
            embedding = maps[i] if maps is not None else embed(model, image, long_side)
            counts += overlap(assign(embedding, centroids, label.shape), label, k, classes)
        result[f"{split} hungarian"] = hungarian_miou(counts)
        result[f"{split} many-to-one"] = many_to_one_miou(counts)
    return result


def random_assignment(root: Path, k: int, classes: int, seed: int) -> dict[str, float]:
    """The chance floor: a uniform random cluster for every pixel."""
    rng = np.random.default_rng(seed)
    result = {}
    for split in ("train", "val"):
        counts = np.zeros((k, classes), dtype=np.int64)
        for _, label_path in read_list(root, split):
            label = load_label(label_path)
            counts += overlap(rng.integers(0, k, size=label.shape), label, k, classes)
        result[f"{split} hungarian"] = hungarian_miou(counts)
        result[f"{split} many-to-one"] = many_to_one_miou(counts)
    return result


def table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the figures, one row per embedding."""
    columns = list(next(iter(rows.values())))
    lines = ["| embedding | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    """Replace the block between the benchmark's markers in ``path``."""
    doc = path.read_text()
    if DOCS_BEGIN not in doc or DOCS_END not in doc:
        raise ValueError(f"{path}: markers {DOCS_BEGIN} / {DOCS_END} not found")
    head, rest = doc.split(DOCS_BEGIN, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{text}\n{DOCS_END}{rest.split(DOCS_END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("workspace/bench/synthetic"),
                        help="synthetic dataset root (generated with seed 0, 20 classes, 400 images if absent)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--clusters", type=int, default=30)
    parser.add_argument("--long-side", type=int, default=128, help="input size for embedding extraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--write-docs", type=Path, default=None, help="Markdown file whose figures block to replace")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not (args.data / "lists" / "train.txt").exists():
        synthesize(args.data, seed=0, classes=20, images=400, size=128)
    classes = 1 + len(json.loads((args.data / "classes.json").read_text()))  # background + object classes

    torch.manual_seed(args.seed)
    random_model = SmallCNN()
    images = [image for image, _ in read_list(args.data, "train")]
    ssl_model, report = pretrain_small_cnn(images, args.image_size, args.epochs, args.batch_size, args.seed,
                                           progress=False)
    rows = {"uniform random clusters": random_assignment(args.data, args.clusters, classes, args.seed)}
    for name, model in (("small_cnn, random init", random_model), ("small_cnn, SSL-pretrained", ssl_model)):
        start = time.perf_counter()
        rows[name] = evaluate(model, args.data, args.clusters, classes, args.long_side, args.seed)
        logging.info("%s evaluated in %.1f s", name, time.perf_counter() - start)

    settings = (f"{len(images)} train images, views {args.image_size} px, {args.epochs} epochs, "
                f"batch {args.batch_size}, "
                f"seed {args.seed}: {report.seconds:.0f} s pretraining (torch threads: {torch.get_num_threads()}); "
                f"SSL loss {report.losses[0]:.3f} → {report.losses[-1]:.3f}. "
                f"K = {args.clusters} clusters, {classes} classes (bg + objects), embeddings at {args.long_side} px.")
    text = f"{table(rows)}\n\n{settings}"
    print(text)
    if args.write_docs is not None:
        write_docs(args.write_docs, text)


if __name__ == "__main__":
    main()
