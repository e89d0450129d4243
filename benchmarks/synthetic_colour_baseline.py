"""How far colour alone gets on the synthetic dataset.

Fits two per-pixel colour classifiers on the train images' object pixels and scores them on the
val images' object pixels (accuracy over classes 1..C, background and ignore excluded):
nearest class-mean RGB, and the Bayes-optimal rule on a 16³ RGB histogram (the best any
per-pixel colour rule can do, up to binning). Low figures mean the classes need shape/texture.

    python benchmarks/synthetic_colour_baseline.py [--images 400] [--size 128] [--classes 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fss_core.data.images import load_label, load_rgb
from fss_core.data.synthetic import synthesize


def object_pixels(root: Path, list_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """RGB ``[N, 3]`` and class ``[N]`` of every object pixel (labels 1..254) in a list."""
    colours, classes = [], []
    for line in list_file.read_text().splitlines():
        image_rel, label_rel = line.split()
        rgb, label = load_rgb(root / image_rel), load_label(root / label_rel)
        keep = (label > 0) & (label < 255)
        colours.append(rgb[keep])
        classes.append(label[keep])
    return np.concatenate(colours).astype(np.float64), np.concatenate(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        s = synthesize(tmp, seed=args.seed, classes=args.classes, images=args.images, size=args.size)
        seconds = time.perf_counter() - start
        x_train, y_train = object_pixels(s.root, s.train_list)
        x_val, y_val = object_pixels(s.root, s.val_list)
    ids = np.arange(1, args.classes + 1)
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in ids])
    nearest = ids[np.argmin(((x_val[:, None, :] - means[None]) ** 2).sum(-1), axis=1)]
    bins = lambda x: (x.astype(np.int64) // 16) @ np.array([256, 16, 1])  # noqa: E731
    counts = np.zeros((16**3, args.classes + 1))
    np.add.at(counts, (bins(x_train), y_train), 1)
    bayes = counts[bins(x_val)].argmax(axis=1)
    print(f"generated {args.images} images at {args.size} px in {seconds:.1f} s")
    print(f"object pixels: {len(y_train)} train, {len(y_val)} val; chance (majority) "
          f"{np.bincount(y_val).max() / len(y_val):.3f}")
    print(f"nearest class-mean colour accuracy: {np.mean(nearest == y_val):.3f}")
    print(f"RGB-histogram Bayes accuracy:       {np.mean(bayes == y_val):.3f}")


if __name__ == "__main__":
    main()
