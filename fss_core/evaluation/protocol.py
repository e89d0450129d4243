"""The few-shot evaluation protocol (PFENet family, docs/evaluation.md) with materialised episodes.

One run of the protocol, for one fold, shot count and seed:

1. ``materialise_episodes``: draw exactly ``n_episodes`` (query, class, supports) triples from the
   labelled val images and write them to ``episodes.jsonl``, so a run can be replayed and audited.
2. ``evaluate_episodes``: preprocess each episode with the evaluation geometry, ask the predictor
   for logits, crop the valid region, resize it to the original label size and score it there.

``run_protocol`` repeats this for several seeds and reports mean ± std over the seeds.

Any model is evaluated through the ``Predictor`` protocol: a callable taking an ``EpisodeInput``
(a batch of B episodes on the square canvas) and returning logits ``[B, 2, L, L]``.
``ModelPredictor`` adapts the FSS network; ``baseline.PrototypeBaseline`` is one already.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fss_core.data.augment import EvalTransform
from fss_core.data.folds import FoldSplit, scheme_for
from fss_core.data.images import IGNORE_LABEL, load_label, load_rgb, save_label
from fss_core.data.layouts import ImageRecord
from fss_core.evaluation.metric import FewShotSegMetric
from fss_core.evaluation.overlays import render_overlay
from fss_core.geometry import PadGeometry, pad_geometry, scaled_min_area

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 473
DEFAULT_MIN_AREA = 2 * 32 * 32  # a class counts in an image from this many pixels on
EPISODES_FILE = "episodes.jsonl"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class EpisodeSpec:
    """One test episode: segment ``class_id`` in the query given the support images."""

    index: int
    class_id: int
    query_id: str
    support_ids: tuple[str, ...]


@dataclass(frozen=True)
class EpisodeInput:
    """A batch of B episodes with S shots each, on the ``L × L`` canvas.

    Attributes:
        query_img: ``[B, 3, L, L]`` ImageNet-normalised.
        support_imgs: ``[B, S, 3, L, L]``.
        support_masks: ``[B, S, L, L]`` int64, 1 = class, 0 = background, 255 = ignore/padding.
        query_padding: ``[B, L, L]`` bool, True where the canvas is padding.
        support_padding: ``[B, S, L, L]`` bool.
        generator: CPU generator for any random draw the predictor makes, or one per episode.
    """

    query_img: torch.Tensor
    support_imgs: torch.Tensor
    support_masks: torch.Tensor
    query_padding: torch.Tensor
    support_padding: torch.Tensor
    generator: torch.Generator | Sequence[torch.Generator] | None = None


Predictor = Callable[[EpisodeInput], torch.Tensor]  # EpisodeInput → logits [B, 2, L, L] (0 = bg, 1 = fg)


class ModelPredictor:
    """Adapts a network with the FSS model's ``forward`` signature to the ``Predictor`` protocol.

    The network runs in eval mode without gradients on ``device``; logits come back as float32 on CPU.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def __call__(self, episode: EpisodeInput) -> torch.Tensor:
        """``EpisodeInput`` → logits ``[B, 2, L, L]``."""
        self.model.eval()
        with torch.inference_mode():
            logits = self.model(
                episode.query_img.to(self.device),
                episode.support_imgs.to(self.device),
                episode.support_masks.to(self.device),
                query_padding=episode.query_padding.to(self.device),
                support_padding=episode.support_padding.to(self.device),
                generator=episode.generator,
            )
        return logits.float().cpu()


@dataclass(frozen=True)
class CanvasImage:
    """One image on the evaluation canvas: ``image [3, L, L]``, ``mask [L, L]`` int64, ``padding [L, L]`` bool."""

    image: torch.Tensor
    mask: torch.Tensor
    padding: torch.Tensor
    geometry: PadGeometry


def to_canvas(rgb: np.ndarray, mask: np.ndarray, image_size: int) -> CanvasImage:
    """Evaluation geometry: longer side → ``image_size`` (sides floored to ×8), pasted top-left on
    an ``image_size²`` canvas; the mask (``uint8 [H, W]``) follows by nearest neighbour, 255 outside."""
    h, w = mask.shape
    image, canvas_mask, padding = EvalTransform(image_size)(rgb, mask)
    return CanvasImage(image, canvas_mask, padding, pad_geometry(h, w, image_size))


def logits_to_mask(logits: torch.Tensor, geometry: PadGeometry) -> np.ndarray:
    """Logits ``[2, L, L]`` on the canvas → mask ``uint8 [orig_h, orig_w]`` (0 bg, 1 fg).

    Only the valid ``[:new_h, :new_w]`` region is resized back (bilinear, pixel centres aligned as
    in the forward resize), so padding never stretches into the prediction.
    """
    valid = logits[:, : geometry.new_h, : geometry.new_w].float()
    resized = F.interpolate(valid[None], size=(geometry.orig_h, geometry.orig_w), mode="bilinear", align_corners=False)
    return resized[0].argmax(0).to(torch.uint8).numpy()


def binary_target(label: np.ndarray, class_id: int) -> np.ndarray:
    """Label ``uint8 [H, W]`` → ``uint8 [H, W]``: 1 where ``class_id``, 255 where ignored, else 0."""
    target = (label == class_id).astype(np.uint8)
    target[label == IGNORE_LABEL] = IGNORE_LABEL
    return target


def episode_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, episode index): each episode's random draws are reproducible."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def default_episodes(dataset_scheme: str) -> int:
    """Episodes per run: 5000 for COCO-20i (1000 is too noisy there), 1000 otherwise."""
    return 5000 if scheme_for(dataset_scheme) in ("coco", "coco_consecutive") else 1000


_AREA_CACHE: dict[tuple[str, int], tuple[dict[int, int], tuple[int, int]]] = {}


def label_areas(label_path: str | os.PathLike) -> tuple[dict[int, int], tuple[int, int]]:
    """Pixel count of every class id in a label (0 and 255 left out), and the label's (H, W);
    cached per file and mtime."""
    key = (str(label_path), os.stat(label_path).st_mtime_ns)
    if key not in _AREA_CACHE:
        label = load_label(label_path)
        counts = np.bincount(label.ravel(), minlength=256)
        areas = {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c not in (0, IGNORE_LABEL)}
        _AREA_CACHE[key] = areas, (int(label.shape[0]), int(label.shape[1]))
    return _AREA_CACHE[key]


def class_min_area(min_area: int, area_reference: int | None, h: int, w: int) -> int:
    """Pixels of an ``h × w`` label from which a class counts in it (to be a query's or a
    support's class).

    ``min_area`` is the protocol's threshold in original pixels (2·32·32 on PASCAL-5i and
    COCO-20i, whose images are about 500 px and larger). An image whose longer side is below
    ``area_reference`` has it scaled by ``(longer side / area_reference)²``, so that a small
    image's class counts from the same share of the canvas it is shown on; larger images keep
    ``min_area`` as it is. ``area_reference=None`` never scales. The threshold depends on the
    dataset only, never on a model's input size, so every model is scored on the same episodes.
    """
    return scaled_min_area(min_area, area_reference, h, w)


def materialise_episodes(
    records: Iterable[ImageRecord],
    novel_classes: Sequence[int],
    shots: int,
    n_episodes: int,
    seed: int,
    min_area: int = DEFAULT_MIN_AREA,
    area_reference: int | None = None,
) -> list[EpisodeSpec]:
    """Draw exactly ``n_episodes`` test episodes, PFENet's way.

    - A val image qualifies as a query if it holds a novel class with ≥ ``min_area`` px.
    - The query class is drawn among the novel classes present in the query at any area
      (kept from the reference for comparability), restricted to classes with ``shots``
      support images besides the query (the reference would loop forever otherwise).
    - The ``shots`` supports are distinct images holding the class with ≥ ``min_area`` px,
      none of them the query.
    - Queries come in a seeded permutation, cycled through as often as ``n_episodes`` needs.

    Args:
        records: labelled val images.
        novel_classes: the fold's test classes.
        shots: supports per episode (S).
        n_episodes: episodes to draw.
        seed: the only source of randomness; the same seed gives the same episodes.
        min_area: minimum class area in pixels for queries and supports.
        area_reference: scales ``min_area`` down for images smaller than it (see
            :func:`class_min_area`); None applies ``min_area`` to every image, as the reference does.
    """
    if shots < 1 or n_episodes < 1:
        raise ValueError(f"shots and n_episodes must be >= 1, got shots={shots}, n_episodes={n_episodes}")
    novel = sorted(set(int(c) for c in novel_classes))
    present: dict[str, list[int]] = {}  # qualifying query → novel classes it contains
    class_images: dict[int, list[str]] = {c: [] for c in novel}  # class → images with ≥ min_area px of it
    for record in sorted(records, key=lambda r: r.image_id):
        if record.label_path is None:
            raise ValueError(f"image {record.image_id} ({record.image_path}) has no label; evaluation needs labels")
        areas, (h, w) = label_areas(record.label_path)
        threshold = class_min_area(min_area, area_reference, h, w)
        large = [c for c in novel if areas.get(c, 0) >= threshold]
        for c in large:
            class_images[c].append(record.image_id)
        if large:
            present[record.image_id] = [c for c in novel if c in areas]
    members = {c: set(ids) for c, ids in class_images.items()}
    choices = {
        query: usable
        for query, classes in present.items()
        if (usable := [c for c in classes if len(members[c] - {query}) >= shots])
    }
    if len(choices) < len(present):
        log.warning("%d of %d qualifying queries dropped: no novel class with %d support images besides them",
                    len(present) - len(choices), len(present), shots)
    if not choices:
        raise ValueError(
            f"no val image holds a novel class of {novel} with >= {min_area} px (scaled for images smaller than "
            f"{area_reference} px: {area_reference is not None}) and {shots} other support images"
        )
    queries = sorted(choices)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(queries))
    specs = []
    for index in range(n_episodes):
        query = queries[order[index % len(queries)]]
        class_id = choices[query][rng.integers(len(choices[query]))]
        pool = [x for x in class_images[class_id] if x != query]
        supports = tuple(pool[j] for j in rng.choice(len(pool), size=shots, replace=False))
        specs.append(EpisodeSpec(index, class_id, query, supports))
    log.info("materialised %d %d-shot episodes from %d qualifying queries (seed %d, classes %s)",
             n_episodes, shots, len(queries), seed, novel)
    return specs


def write_episodes(path: str | os.PathLike, specs: Sequence[EpisodeSpec]) -> None:
    """Write ``episodes.jsonl``: one ``{"episode", "class_id", "query_id", "support_ids"}`` object a line."""
    lines = "".join(
        json.dumps({"episode": s.index, "class_id": s.class_id, "query_id": s.query_id,
                    "support_ids": list(s.support_ids)}) + "\n"
        for s in specs
    )
    _write_text(Path(path), lines)


def read_episodes(path: str | os.PathLike) -> list[EpisodeSpec]:
    """Read an ``episodes.jsonl`` written by ``write_episodes``; a bad line raises ``ValueError`` naming it."""
    specs = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            spec = EpisodeSpec(int(row["episode"]), int(row["class_id"]), str(row["query_id"]),
                               tuple(str(x) for x in row["support_ids"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: not an episode record ({exc!r})") from exc
        if not spec.support_ids:
            raise ValueError(f"{path}:{lineno}: episode {spec.index} has no support image")
        specs.append(spec)
    return specs


def evaluate_episodes(
    predictor: Predictor,
    specs: Sequence[EpisodeSpec],
    records_by_id: Mapping[str, ImageRecord],
    image_size: int,
    novel_classes: Sequence[int],
    seed: int,
    save_predictions_dir: str | os.PathLike | None = None,
    overlays_dir: str | os.PathLike | None = None,
    n_overlays: int = 0,
    progress: bool = False,
) -> dict:
    """Run and score every episode, one at a time (batch of 1).

    Predictions are scored at the original label size against the binary label (0/1/255).
    With ``save_predictions_dir``, episode i's prediction is written as ``{i:05d}.png``
    (palette PNG, 0 = bg, 1 = fg, original label size); with ``overlays_dir``, the first
    ``n_overlays`` episodes are rendered as ``{i:05d}.png`` there.

    Returns:
        ``FewShotSegMetric.evaluate()`` plus ``shots``.
    """
    if not specs:
        raise ValueError("no episodes to evaluate")
    shot_counts = {len(s.support_ids) for s in specs}
    if len(shot_counts) != 1:
        raise ValueError(f"episodes mix shot counts {sorted(shot_counts)}")
    shots = shot_counts.pop()
    metric = FewShotSegMetric(novel_classes)
    for position, spec in enumerate(tqdm(specs, desc="episodes", disable=not progress)):
        query_rgb, query_label = _load_record(records_by_id, spec.query_id)
        target = binary_target(query_label, spec.class_id)
        query = to_canvas(query_rgb, target, image_size)
        supports = []
        for support_id in spec.support_ids:
            rgb, label = _load_record(records_by_id, support_id)
            supports.append((rgb, binary_target(label, spec.class_id)))
        canvases = [to_canvas(rgb, mask, image_size) for rgb, mask in supports]
        episode = EpisodeInput(
            query_img=query.image[None],
            support_imgs=torch.stack([c.image for c in canvases])[None],
            support_masks=torch.stack([c.mask for c in canvases])[None],
            query_padding=query.padding[None],
            support_padding=torch.stack([c.padding for c in canvases])[None],
            generator=episode_generator(seed, spec.index),
        )
        logits = predictor(episode)
        if tuple(logits.shape) != (1, 2, image_size, image_size):
            raise ValueError(f"predictor returned logits of shape {tuple(logits.shape)}, "
                             f"expected {(1, 2, image_size, image_size)}")
        pred = logits_to_mask(logits[0], query.geometry)
        metric.process(pred, target, spec.class_id)
        if save_predictions_dir is not None:
            save_label(Path(save_predictions_dir) / f"{spec.index:05d}.png", pred)
        if overlays_dir is not None and position < n_overlays:
            Path(overlays_dir).mkdir(parents=True, exist_ok=True)
            render_overlay(query_rgb, pred, target, supports).save(Path(overlays_dir) / f"{spec.index:05d}.png")
    result = metric.evaluate()
    log.info("%d-shot, seed %d:\n%s", shots, seed, metric.table())
    result["shots"] = shots
    return result


def run_protocol(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    fold_split: FoldSplit,
    shots: int,
    n_episodes: int,
    seeds: Sequence[int],
    image_size: int,
    min_area: int,
    out_dir: str | os.PathLike,
    predictions_dir: str | os.PathLike | None = None,
    n_overlays: int = 0,
    progress: bool = False,
    area_reference: int | None = None,
) -> dict:
    """The protocol over several seeds for one fold and shot count.

    For each seed ``s``, ``out_dir/seed{s}/`` receives ``episodes.jsonl`` (written before any
    prediction), ``metrics.json`` and, if asked, ``overlays/``. With ``predictions_dir``, episode
    i's prediction is written to ``predictions_dir/seed{s}/{i:05d}.png`` (0 = bg, 1 = fg, at the
    original label size).
    ``out_dir/metrics.json`` gets the aggregate, also returned: ``miou``/``fbiou`` (mean over
    seeds), ``miou_std``/``fbiou_std`` (population std, ddof = 0), ``per_class`` (mean over seeds),
    ``seeds`` (the per-seed results), ``shots``, ``fold``, ``dataset``, ``novel_classes``,
    ``episodes``, ``image_size``, ``min_area``, ``area_reference`` (the episodes' area rule, see
    :func:`class_min_area`). IoUs are fractions; an undefined IoU is null.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    out_dir = Path(out_dir)
    records_by_id = {r.image_id: r for r in records}
    novel = list(fold_split.novel)
    per_seed = []
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        specs = materialise_episodes(records, novel, shots, n_episodes, seed, min_area, area_reference)
        write_episodes(seed_dir / EPISODES_FILE, specs)
        result = evaluate_episodes(
            predictor, specs, records_by_id, image_size, novel, seed,
            save_predictions_dir=Path(predictions_dir) / f"seed{seed}" if predictions_dir is not None else None,
            overlays_dir=seed_dir / "overlays" if n_overlays else None,
            n_overlays=n_overlays,
            progress=progress,
        )
        seed_result = {"seed": seed, **_jsonable(result)}
        _write_text(seed_dir / METRICS_FILE, json.dumps(seed_result, indent=2) + "\n")
        per_seed.append(seed_result)
    summary = {
        "miou": _mean([r["miou"] for r in per_seed]),
        "miou_std": _std([r["miou"] for r in per_seed]),
        "fbiou": _mean([r["fbiou"] for r in per_seed]),
        "fbiou_std": _std([r["fbiou"] for r in per_seed]),
        "per_class": {str(c): _mean([r["per_class"][str(c)] for r in per_seed]) for c in novel},
        "seeds": per_seed,
        "shots": shots,
        "fold": fold_split.fold,
        "dataset": fold_split.dataset,
        "novel_classes": novel,
        "episodes": n_episodes,
        "image_size": image_size,
        "min_area": min_area,
        "area_reference": area_reference,
    }
    _write_text(out_dir / METRICS_FILE, json.dumps(summary, indent=2) + "\n")
    log.info("fold %d, %d-shot over seeds %s: mIoU %s ± %s, FB-IoU %s ± %s", fold_split.fold, shots, list(seeds),
             *(_percent(summary[k]) for k in ("miou", "miou_std", "fbiou", "fbiou_std")))
    return summary


def _load_record(records_by_id: Mapping[str, ImageRecord], image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 [H, W, 3], label uint8 [H, W])`` of an image, checking they have one size."""
    record = records_by_id.get(image_id)
    if record is None:
        raise ValueError(f"episode refers to image {image_id!r}, which is not among the evaluation records")
    if record.label_path is None:
        raise ValueError(f"image {image_id} ({record.image_path}) has no label; evaluation needs labels")
    rgb, label = load_rgb(record.image_path), load_label(record.label_path)
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"{record.image_path} is {rgb.shape[1]}x{rgb.shape[0]} but its label "
                         f"{record.label_path} is {label.shape[1]}x{label.shape[0]} (width x height)")
    return rgb, label


def _jsonable(result: dict) -> dict:
    """Metric dict → JSON-ready: class ids as strings, NaN as None."""
    def number(x):
        return None if x is None or math.isnan(x) else float(x)

    out = dict(result)
    out["miou"], out["fbiou"] = number(result["miou"]), number(result["fbiou"])
    out["per_class"] = {str(c): number(v) for c, v in result["per_class"].items()}
    return out


def _mean(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return float(np.mean(values))


def _std(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return float(np.std(values))


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _write_text(path: Path, text: str) -> None:
    """Write atomically (temp file + rename), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
