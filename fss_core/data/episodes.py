"""Few-shot episodes: pseudo meta-tasks (unsupervised meta-training) and PFENet-style
supervised episodes (fine-tuning with a fraction of the labels).

An episode is one query image and ``S`` support images with binary masks of one class:
1 = the class, 0 = everything else, 255 = ignore (label boundaries, rotation borders, crop
padding). Every sample is drawn from a generator seeded by ``(seed, epoch, index)``, so a
resumed epoch reproduces exactly and every epoch differs. The epoch comes with the index (a key
``(epoch, index)``, as :class:`EpochBatchSampler` yields them) or, for an int index, from
``set_epoch``.

Support sampling, both datasets: supports never include the query image and never repeat.
When too few distinct candidates exist the pool is widened (pseudo: other members of the
cluster beyond the similarity prior); if the whole pool is still smaller than ``S``, supports
are drawn with replacement and this is logged once per class. Classes with no image other
than the query cannot form an episode, so such (image, class) pairs are never chosen as
queries. Pseudo episodes with ``distinct_supports=False`` instead draw their supports with
replacement from the similarity prior, as the reference did (still never the query image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from fss_core.data.augment import EvalTransform, TrainTransform
from fss_core.data.images import IGNORE_LABEL, is_reduced_decode, load_label, load_rgb
from fss_core.data.layouts import ImageRecord
from fss_core.geometry import scaled_min_area, working_size
from fss_core.pseudo.task_index import PseudoTaskIndex

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One few-shot task; ``H = W = size`` after the transform, ``S`` = shots."""

    query_img: torch.Tensor  # [3, H, W] float32, ImageNet-normalised
    query_mask: torch.Tensor  # [H, W] int64 in {0, 1, 255}
    query_padding: torch.Tensor  # [H, W] bool, True = not image content
    support_imgs: torch.Tensor  # [S, 3, H, W]
    support_masks: torch.Tensor  # [S, H, W] int64 in {0, 1, 255}
    support_padding: torch.Tensor  # [S, H, W] bool
    class_id: int  # cluster id (pseudo) or dataset class id (supervised)
    query_id: str
    support_ids: list[str]
    query_hw: tuple[int, int]  # (H0, W0) of the query image as loaded (shrunk to max_side when larger)


@dataclass
class EpisodeBatch:
    """A batch of ``B`` episodes: the tensors of :class:`Episode` stacked on a new first axis."""

    query_img: torch.Tensor  # [B, 3, H, W]
    query_mask: torch.Tensor  # [B, H, W]
    query_padding: torch.Tensor  # [B, H, W]
    support_imgs: torch.Tensor  # [B, S, 3, H, W]
    support_masks: torch.Tensor  # [B, S, H, W]
    support_padding: torch.Tensor  # [B, S, H, W]
    class_id: torch.Tensor  # [B] int64
    query_id: list[str]
    support_ids: list[list[str]]
    query_hw: torch.Tensor  # [B, 2] int64, original (H0, W0)

    def _map_tensors(self, fn) -> EpisodeBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        """The same batch with every tensor moved to ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> EpisodeBatch:
        """Page-locked copy (called by ``DataLoader(pin_memory=True)``)."""
        return self._map_tensors(lambda t: t.pin_memory())


def _stacked(groups: Sequence[Sequence[torch.Tensor]], shared: bool) -> list[torch.Tensor]:
    """``torch.stack`` of each group; with ``shared``, every result is a view of one new
    shared-memory buffer, so a loader worker hands the whole batch to the training process as one
    file descriptor (one connection to the worker each) instead of one per tensor."""
    if not shared:
        return [torch.stack(list(group)) for group in groups]
    offsets, end = [], 0
    for group in groups:
        start = -(-end // 8) * 8  # 8-byte aligned for every dtype
        offsets.append(start)
        end = start + len(group) * group[0].numel() * group[0].element_size()
    buffer = torch.UntypedStorage._new_shared(end)
    out = []
    for group, offset in zip(groups, offsets):
        first = group[0]
        view = torch.empty(0, dtype=first.dtype).set_(buffer, offset // first.element_size(),
                                                       (len(group), *first.shape))
        out.append(torch.stack(list(group), out=view))
    return out


def collate_episodes(episodes: Sequence[Episode]) -> EpisodeBatch:
    """Stack episodes into an :class:`EpisodeBatch` (use as ``DataLoader(collate_fn=...)``).

    In a loader worker process the batch's tensors share one shared-memory buffer (see
    :func:`_stacked`); the values are the same either way."""
    if not episodes:
        raise ValueError("cannot collate an empty list of episodes")
    names = ("query_img", "query_mask", "query_padding", "support_imgs", "support_masks", "support_padding")
    groups = [[getattr(e, name) for e in episodes] for name in names]
    groups.append([torch.tensor(e.class_id, dtype=torch.int64) for e in episodes])
    groups.append([torch.tensor(e.query_hw, dtype=torch.int64) for e in episodes])
    tensors = _stacked(groups, shared=get_worker_info() is not None)
    return EpisodeBatch(**dict(zip(names, tensors)), class_id=tensors[-2], query_hw=tensors[-1],
                        query_id=[e.query_id for e in episodes],
                        support_ids=[list(e.support_ids) for e in episodes])


def binary_label(label: np.ndarray, class_id: int) -> np.ndarray:
    """``uint8 [H, W]``: 1 where ``label == class_id``, 255 where ``label == 255``, else 0."""
    return np.where(label == IGNORE_LABEL, IGNORE_LABEL, label == class_id).astype(np.uint8)


def _draw_distinct(primary: np.ndarray, fallback: np.ndarray, shots: int, rng: np.random.Generator,
                   warned: set[int], class_id: int) -> np.ndarray:
    """``shots`` distinct entries from ``primary``, topped up from ``fallback`` if it is too short;
    with replacement from both (logged once per class) if even together they are too few."""
    if len(primary) >= shots:
        return rng.choice(primary, shots, replace=False)
    if len(primary) + len(fallback) >= shots:
        extra = rng.choice(fallback, shots - len(primary), replace=False)
        return rng.permutation(np.concatenate([primary, extra]))
    pool = np.concatenate([primary, fallback])
    if class_id not in warned:
        warned.add(class_id)
        log.warning("class %d has only %d support candidates for %d shots; sampling with replacement",
                    class_id, len(pool), shots)
    return rng.choice(pool, shots, replace=True)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(epoch, index)`` keys for the epoch set in this process.

    The epoch travels with every index, so loader worker processes that persist across epochs
    draw the episodes of the epoch set here without a ``set_epoch`` on their own copies of the
    dataset. Give it to ``DataLoader(batch_sampler=...)`` over a dataset that takes such keys
    (the episode datasets, or :class:`EpochKeyed` around any other).

    Epoch ``e``'s order is the one of ``DataLoader(shuffle=True, drop_last=True,
    generator=torch.Generator().manual_seed(seed + e))``: that loader's iterator first draws its
    workers' base seed (one int64) from the generator, then ``RandomSampler`` takes
    ``torch.randperm(n)`` from it (torch 2.13). Batches of ``batch_size`` in that order; the last
    partial batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the batches of the next ``iter()``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the shuffling loader's base seed
        keys = [(self.epoch, i) for i in torch.randperm(self.n, generator=generator).tolist()]
        size = self.batch_size
        return iter([keys[start : start + size] for start in range(0, len(self) * size, size)])


class EpochKeyed(Dataset):
    """``dataset``, indexed by ``(epoch, index)`` keys, for a dataset that takes the epoch only
    through ``set_epoch``: each copy (one per loader process) calls ``set_epoch`` whenever the
    key's epoch differs from the one it last set."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if epoch != self._epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._epoch = epoch
        return self.dataset[index]


def epoch_keyed(dataset: Dataset) -> Dataset:
    """``dataset`` itself when it takes ``(epoch, index)`` keys (``takes_epoch_keys``), else
    :class:`EpochKeyed` around it."""
    return dataset if getattr(dataset, "takes_epoch_keys", False) else EpochKeyed(dataset)


DECODE_CACHE_MB = 256


class DecodedSamples:
    """Decoded ``(image, label)`` pairs kept in memory up to ``budget_bytes``, so that epochs after
    the first skip JPEG and PNG decoding.

    First come, first kept: once the budget is spent, further files are decoded on every use.
    Episodes draw their images uniformly, so any choice of which to keep saves the same share.
    Kept arrays are read-only. A copy made by pickling (a loader worker's) starts empty, so each
    loading process fills its own cache and the budget holds per process.
    """

    def __init__(self, budget_bytes: int, max_side: int | None = None):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.max_side = max_side
        self.used_bytes = 0
        self._kept: dict[tuple[Path, Path], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def __getstate__(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "max_side": self.max_side, "used_bytes": 0, "_kept": {}}

    def load(self, image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint8 [H, W, 3], label uint8 [H, W])``, decoded or kept from an earlier call; an
        image whose longer side exceeds ``max_side`` comes shrunk to it (:func:`working_size`; the
        image bilinearly, the label by nearest neighbour)."""
        kept = self._kept.get((image_path, label_path))
        if kept is not None:
            return kept
        image = load_rgb(image_path, at_least=self.max_side)
        label = load_label(label_path)
        h, w = working_size(*label.shape, self.max_side)
        if label.shape != image.shape[:2] and ((h, w) == label.shape or not is_reduced_decode(image.shape[:2],
                                                                                            label.shape)):
            raise ValueError(f"{label_path}: label is {label.shape[0]}x{label.shape[1]} but image "
                             f"{image_path} is {image.shape[0]}x{image.shape[1]}")
        if (h, w) != label.shape:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        size = image.nbytes + label.nbytes
        if self.used_bytes + size <= self.budget_bytes:
            image.flags.writeable = False
            label.flags.writeable = False
            self._kept[(image_path, label_path)] = (image, label)
            self.used_bytes += size
        return image, label


class _EpisodeDataset(Dataset):
    """Seeding, transforms and sample loading shared by both episode datasets.

    ``dataset[(epoch, index)]`` is episode ``index`` of ``epoch``; ``dataset[index]`` the one of
    the epoch last given to ``set_epoch`` (0 before). Subclasses draw in ``_draw``. Decoded images
    and labels are kept in memory up to ``decode_cache_mb`` per loading process
    (:class:`DecodedSamples`; 0 decodes them on every use). An image larger than ``max_side``
    (longer side) is shrunk to it on loading, before the transforms: the reference's crops of
    ``size`` then cover as much of a large photo as of a COCO image (None: never shrunk).
    """

    takes_epoch_keys = True

    def __init__(self, shots: int, size: int, scale_range: tuple[float, float], rotate_degrees: float,
                 seed: int, train: bool, decode_cache_mb: float = DECODE_CACHE_MB, max_side: int | None = None):
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        if decode_cache_mb < 0:
            raise ValueError(f"decode_cache_mb must be >= 0, got {decode_cache_mb}")
        self.shots = shots
        self.seed = seed
        self.train = train
        self.epoch = 0
        self.transform = TrainTransform(size, scale_range, rotate_degrees) if train else EvalTransform(size)
        self.decoded = DecodedSamples(int(decode_cache_mb * 2**20), max_side)
        self._warned: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's episodes (training only; evaluation episodes are the same every epoch)."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> Episode:
        epoch, index = key if isinstance(key, (tuple, list)) else (self.epoch, key)
        index = int(index)
        return self._draw(index, np.random.default_rng([self.seed, int(epoch) if self.train else 0, index]))

    def _draw(self, i: int, rng: np.random.Generator) -> Episode:
        raise NotImplementedError

    def _sample(self, image_path: Path, label_path: Path, class_id: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Load, binarise and transform one image: ``(img [3,H,W], mask [H,W], padding [H,W], (H0, W0))``."""
        image, label = self.decoded.load(image_path, label_path)
        binary = binary_label(label, class_id)
        out = self.transform(image, binary, rng) if self.train else self.transform(image, binary)
        return (*out, label.shape)

    def _episode(self, query: tuple[str, Path, Path], supports: list[tuple[str, Path, Path]], class_id: int,
                 rng: np.random.Generator) -> Episode:
        q_img, q_mask, q_pad, q_hw = self._sample(query[1], query[2], class_id, rng)
        s = [self._sample(path, label, class_id, rng) for _, path, label in supports]
        return Episode(
            query_img=q_img, query_mask=q_mask, query_padding=q_pad,
            support_imgs=torch.stack([x[0] for x in s]),
            support_masks=torch.stack([x[1] for x in s]),
            support_padding=torch.stack([x[2] for x in s]),
            class_id=int(class_id), query_id=query[0], support_ids=[sid for sid, _, _ in supports],
            query_hw=(int(q_hw[0]), int(q_hw[1])),
        )


class PseudoEpisodeDataset(_EpisodeDataset):
    """Pseudo meta-tasks from a :class:`PseudoTaskIndex`.

    One episode per query image per epoch. The query image picks one of its valid clusters
    at random; the ``shots`` supports are distinct images drawn uniformly from the
    similarity prior of that (image, cluster) occurrence. Masks are 1 where the pseudo mask
    (``mask_dir/{image_id}.png``) equals the cluster. Only clusters with at least two
    images can form an episode; images whose clusters are all singletons are not queries.

    ``distinct_supports=False`` reproduces the reference's sampler: with ``shots > 1`` the
    supports are drawn uniformly *with replacement* from the prior, so one image can appear
    several times in an episode; the query image is still never a support. With one shot both
    settings draw the same support.
    """

    def __init__(self, index: PseudoTaskIndex, image_paths: Mapping[str, str | os.PathLike],
                 mask_dir: str | os.PathLike, shots: int = 1, size: int = 473,
                 scale_range: tuple[float, float] = (0.9, 1.1), rotate_degrees: float = 10.0, seed: int = 0,
                 decode_cache_mb: float = DECODE_CACHE_MB, distinct_supports: bool = True, max_side: int | None = None):
        super().__init__(shots, size, scale_range, rotate_degrees, seed, train=True, decode_cache_mb=decode_cache_mb,
                         max_side=max_side)
        self.distinct_supports = distinct_supports
        self.index = index
        self.mask_dir = Path(mask_dir)
        counts = np.bincount(index.occ_cluster.astype(np.int64), minlength=index.num_clusters)
        self._members = {int(c): np.flatnonzero(index.occ_cluster == c) for c in np.flatnonzero(counts)}
        eligible = np.flatnonzero(counts[index.occ_cluster.astype(np.int64)] >= 2)
        images = np.unique(index.occ_image[eligible])
        self._query_occurrences = [eligible[index.occ_image[eligible] == i] for i in images]
        indexed = np.unique(index.occ_image)
        used = [index.image_ids[i] for i in indexed]
        missing = [i for i in used if i not in image_paths]
        if missing:
            raise ValueError(f"image_paths has no path for {len(missing)} indexed images, e.g. {missing[:3]}")
        self._paths = {i: Path(image_paths[i]) for i in used}
        if len(images) < len(indexed):
            log.info("%d of %d indexed images have only single-image clusters and are not queries",
                     len(indexed) - len(images), len(indexed))

    def __len__(self) -> int:
        return len(self._query_occurrences)

    def support_occurrences(self, occurrence: int, rng: np.random.Generator) -> np.ndarray:
        """``[shots]`` occurrence rows supporting ``occurrence``: distinct images, never its own.

        With ``distinct_supports=False`` and ``shots > 1``, drawn with replacement from the prior
        (the reference); an empty prior falls back to the distinct draw from other cluster members.
        """
        index = self.index
        cluster = int(index.occ_cluster[occurrence])
        own_image = index.occ_image[occurrence]
        prior = index.prior(occurrence)
        prior = prior[index.occ_image[prior] != own_image]
        if not self.distinct_supports and self.shots > 1 and len(prior) > 0:
            return rng.choice(prior, self.shots, replace=True)
        members = self._members[cluster]
        others = members[(index.occ_image[members] != own_image) & ~np.isin(members, prior)]
        return _draw_distinct(prior, others, self.shots, rng, self._warned, cluster)

    def _item(self, row: int) -> tuple[str, Path, Path]:
        image_id = self.index.image_ids[self.index.occ_image[row]]
        return image_id, self._paths[image_id], self.mask_dir / f"{image_id}.png"

    def _draw(self, i: int, rng: np.random.Generator) -> Episode:
        candidates = self._query_occurrences[i]
        occurrence = int(candidates[rng.integers(len(candidates))])
        supports = self.support_occurrences(occurrence, rng)
        cluster = int(self.index.occ_cluster[occurrence])
        return self._episode(self._item(occurrence), [self._item(int(r)) for r in supports], cluster, rng)


class SupervisedEpisodeDataset(_EpisodeDataset):
    """PFENet episodes from labelled images, restricted to ``classes`` (e.g. a fold's base classes).

    - An image qualifies if it holds a class of ``classes`` with at least
      ``scaled_min_area(min_area, area_reference, H, W, max_side)`` pixels; the query class is drawn
      uniformly among its qualifying classes.
    - Supports are other qualifying images of that class, distinct.
    - Masks: 1 for the class, 255 kept, 0 elsewhere — pixels of every other class, including
      classes outside ``classes`` (novel classes in base-class images), are background.
    - ``image_ids`` restricts queries and supports to a subset (a label-fraction list).
    - ``train=False``: the deterministic :class:`EvalTransform`, and the same episodes every epoch.
    """

    def __init__(self, records: Sequence[ImageRecord], classes: Sequence[int], shots: int = 1, size: int = 473,
                 min_area: int = 2048, area_reference: int | None = 473, image_ids: Sequence[str] | None = None,
                 scale_range: tuple[float, float] = (0.9, 1.1), rotate_degrees: float = 10.0, seed: int = 0,
                 train: bool = True, decode_cache_mb: float = DECODE_CACHE_MB, max_side: int | None = None):
        super().__init__(shots, size, scale_range, rotate_degrees, seed, train, decode_cache_mb, max_side)
        classes = sorted({int(c) for c in classes})
        bad = [c for c in classes if not 0 < c < IGNORE_LABEL]
        if bad:
            raise ValueError(f"classes must be ids in 1..254, got {bad}")
        if image_ids is not None:
            wanted = set(image_ids)
            unknown = wanted - {r.image_id for r in records}
            if unknown:
                raise ValueError(f"image_ids names {len(unknown)} images not in records, e.g. {sorted(unknown)[:3]}")
            records = [r for r in records if r.image_id in wanted]
        unlabeled = [r.image_id for r in records if r.label_path is None]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} records have no label_path, e.g. {unlabeled[:3]}")
        self.records = list(records)
        present: list[list[int]] = []
        for record in self.records:
            label = load_label(record.label_path)
            areas = np.bincount(label.ravel(), minlength=256)
            threshold = scaled_min_area(min_area, area_reference, *label.shape, max_side)
            present.append([c for c in classes if areas[c] >= threshold])
        self.class_images = {c: np.asarray([i for i, p in enumerate(present) if c in p], dtype=np.int64)
                             for c in classes}
        self._query_classes = []
        self._query_records = []
        for i, p in enumerate(present):
            usable = [c for c in p if len(self.class_images[c]) >= 2]
            if usable:
                self._query_records.append(i)
                self._query_classes.append(usable)
        log.info("%d of %d images qualify as queries for %d classes", len(self._query_records),
                 len(self.records), len(classes))

    def __len__(self) -> int:
        return len(self._query_records)

    def _item(self, record_index: int) -> tuple[str, Path, Path]:
        record = self.records[record_index]
        return record.image_id, Path(record.image_path), Path(record.label_path)

    def _draw(self, i: int, rng: np.random.Generator) -> Episode:
        query = self._query_records[i]
        class_id = int(rng.choice(self._query_classes[i]))
        others = self.class_images[class_id][self.class_images[class_id] != query]
        supports = _draw_distinct(others, others[:0], self.shots, rng, self._warned, class_id)
        return self._episode(self._item(query), [self._item(int(r)) for r in supports], class_id, rng)
