"""Few-shot fold definitions: which classes are novel (tested) and which are base (trained) per fold.

Schemes:

- ``"pascal"``: PASCAL-5i, VOC class ids 1..20; fold i novel = 5i+1 .. 5i+5.
- ``"coco"``: COCO-20i, interleaved split (HSNet, PFENet ``use_split_coco``); contiguous ids
  1..80; fold i novel = {4k + i + 1 : k = 0..19}.
- ``"coco_consecutive"``: COCO-20i, consecutive ("PANet") split; fold i novel = 20i+1 .. 20i+20.
- ``"generic"``: any VOC-layout dataset with ``num_classes`` classes (ids 1..num_classes),
  split into 4 consecutive folds of equal size.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_FOLDS = 4
SCHEMES = ("pascal", "coco", "coco_consecutive", "generic")

# Index i holds the name of class id i + 1 (VOC order).
PASCAL_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Index i holds the name of contiguous class id i + 1 (COCO categories in category-id order).
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass(frozen=True)
class FoldSplit:
    """The class partition of one fold; ``novel`` and ``base`` are sorted, disjoint, and cover all ids."""

    dataset: str  # the scheme name
    fold: int
    novel: tuple[int, ...]
    base: tuple[int, ...]


def num_classes_of(scheme: str, num_classes: int | None = None) -> int:
    """Number of foreground classes of a scheme (``num_classes`` is required for ``"generic"``)."""
    if scheme == "pascal":
        return len(PASCAL_CLASS_NAMES)
    if scheme in ("coco", "coco_consecutive"):
        return len(COCO_CLASS_NAMES)
    if scheme == "generic":
        if num_classes is None:
            raise ValueError("scheme 'generic' needs num_classes")
        if num_classes < NUM_FOLDS or num_classes % NUM_FOLDS:
            raise ValueError(
                f"scheme 'generic' splits classes into {NUM_FOLDS} equal folds; "
                f"num_classes={num_classes} is not a positive multiple of {NUM_FOLDS}"
            )
        return num_classes
    raise ValueError(f"unknown fold scheme {scheme!r}; expected one of {SCHEMES}")


def fold_split(scheme: str, fold: int, num_classes: int | None = None) -> FoldSplit:
    """Novel and base class ids of ``fold`` (0..NUM_FOLDS-1) under ``scheme``."""
    n = num_classes_of(scheme, num_classes)
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    if scheme == "coco":
        novel = {NUM_FOLDS * k + fold + 1 for k in range(n // NUM_FOLDS)}
    else:  # pascal, coco_consecutive and generic all use consecutive blocks
        size = n // NUM_FOLDS
        novel = set(range(fold * size + 1, (fold + 1) * size + 1))
    base = set(range(1, n + 1)) - novel
    return FoldSplit(scheme, fold, tuple(sorted(novel)), tuple(sorted(base)))


def class_names(scheme: str, num_classes: int | None = None) -> dict[int, str]:
    """Class id → name for a scheme; generic classes are named ``class_<id>``."""
    n = num_classes_of(scheme, num_classes)
    if scheme == "pascal":
        return dict(enumerate(PASCAL_CLASS_NAMES, start=1))
    if scheme in ("coco", "coco_consecutive"):
        return dict(enumerate(COCO_CLASS_NAMES, start=1))
    return {i: f"class_{i}" for i in range(1, n + 1)}


def scheme_for(dataset_name: str) -> str:
    """Default fold scheme for a dataset name: PASCAL → "pascal", COCO → "coco" (interleaved), else "generic"."""
    if dataset_name in SCHEMES:
        return dataset_name
    name = dataset_name.strip().lower().replace("-", "").replace("_", "")
    if name in ("pascal", "pascal5i", "voc", "pascalvoc", "voc2012"):
        return "pascal"
    if name in ("coco", "coco20i", "coco2014"):
        return "coco"
    return "generic"
