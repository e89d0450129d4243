"""The few-shot segmentation metric: per-class foreground IoU (mIoU) and FB-IoU.

Each episode contributes its foreground and background intersection and union, counted over
the pixels whose target is not 255. Sums are pooled, never per-episode IoUs averaged:

- IoU_c = Σ I_fg / Σ U_fg over the episodes of class c; mIoU = mean of IoU_c over the classes.
- FB-IoU = mean over {background, foreground} of Σ I / Σ U pooled over all episodes.

A class given at construction that received no episode (or whose pooled union is 0) has no
IoU: it is reported as NaN, listed under ``missing``, and excluded from the mean with a
warning. The evaluation protocol gives every novel class episodes, so this only shows up
with hand-made episode lists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fss_core.data.images import IGNORE_LABEL

log = logging.getLogger(__name__)


class FewShotSegMetric:
    """Accumulates episodes with ``process`` and reduces them with ``evaluate``.

    Args:
        class_ids: the classes of the fold; mIoU is their mean.
        class_names: optional id → name, shown by ``table``.
    """

    def __init__(self, class_ids: Sequence[int], class_names: Mapping[int, str] | None = None):
        if not class_ids:
            raise ValueError("FewShotSegMetric needs at least one class id")
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"FewShotSegMetric: duplicate class ids in {list(class_ids)}")
        self.class_ids = tuple(int(c) for c in class_ids)
        self.class_names = dict(class_names or {})
        self.reset()

    def reset(self) -> None:
        """Forget every processed episode."""
        self._fg_inter = dict.fromkeys(self.class_ids, 0)
        self._fg_union = dict.fromkeys(self.class_ids, 0)
        self._class_episodes = dict.fromkeys(self.class_ids, 0)
        self._inter = np.zeros(2, dtype=np.int64)  # pooled over all episodes: [bg, fg]
        self._union = np.zeros(2, dtype=np.int64)
        self._episodes = 0

    def process(self, pred: np.ndarray, target: np.ndarray, class_id: int) -> None:
        """Add one episode.

        Args:
            pred: ``[H, W]`` with 0 = background, 1 = foreground.
            target: ``[H, W]`` with 0 = background, 1 = foreground, 255 = ignored.
            class_id: the episode's class, one of ``class_ids``.
        """
        pred, target = np.asarray(pred), np.asarray(target)
        if class_id not in self._fg_inter:
            raise ValueError(f"class {class_id} is not one of the metric's classes {self.class_ids}")
        if pred.shape != target.shape or pred.ndim != 2:
            raise ValueError(f"pred {pred.shape} and target {target.shape} must be the same 2-D shape")
        if not np.isin(pred, (0, 1)).all():
            raise ValueError(f"pred must hold only 0 and 1, got values {np.unique(pred)[:10].tolist()}")
        if not np.isin(target, (0, 1, IGNORE_LABEL)).all():
            raise ValueError(f"target must hold only 0, 1 and 255, got values {np.unique(target)[:10].tolist()}")
        valid = target != IGNORE_LABEL
        pred_fg, target_fg = (pred == 1) & valid, target == 1
        pred_bg, target_bg = (pred == 0) & valid, target == 0
        inter = np.array([(pred_bg & target_bg).sum(), (pred_fg & target_fg).sum()], dtype=np.int64)
        union = np.array([(pred_bg | target_bg).sum(), (pred_fg | target_fg).sum()], dtype=np.int64)
        self._inter += inter
        self._union += union
        self._fg_inter[class_id] += int(inter[1])
        self._fg_union[class_id] += int(union[1])
        self._class_episodes[class_id] += 1
        self._episodes += 1

    def evaluate(self) -> dict:
        """Reduce the processed episodes.

        Returns:
            ``{"miou", "fbiou", "per_class": {class id: IoU or NaN}, "missing": [class ids
            without an IoU], "episodes"}``; IoUs are fractions in [0, 1].
        """
        result = self._reduce()
        if result["missing"]:
            log.warning("classes %s have no episode with foreground; excluded from the mIoU", result["missing"])
        return result

    def _reduce(self) -> dict:
        per_class = {
            c: self._fg_inter[c] / self._fg_union[c] if self._fg_union[c] else math.nan for c in self.class_ids
        }
        missing = [c for c, iou in per_class.items() if math.isnan(iou)]
        defined = [iou for iou in per_class.values() if not math.isnan(iou)]
        miou = float(np.mean(defined)) if defined else math.nan
        fbiou = float(np.mean(self._inter / self._union)) if self._union.all() else math.nan
        return {"miou": miou, "fbiou": fbiou, "per_class": per_class, "missing": missing, "episodes": self._episodes}

    def table(self) -> str:
        """A per-class text table (episodes and IoU in %), then mIoU and FB-IoU."""
        result = self._reduce()
        names = {c: self.class_names.get(c, "") for c in self.class_ids}
        width = max([len("class")] + [len(f"{c} {n}".strip()) for c, n in names.items()])
        lines = [f"{'class':<{width}}  episodes    IoU %", "-" * (width + 19)]
        for c in self.class_ids:
            lines.append(f"{f'{c} {names[c]}'.strip():<{width}}  {self._class_episodes[c]:>8}  {100 * result['per_class'][c]:>7.2f}")
        lines.append("-" * (width + 19))
        lines.append(f"{'mIoU':<{width}}  {result['episodes']:>8}  {100 * result['miou']:>7.2f}")
        lines.append(f"{'FB-IoU':<{width}}  {'':>8}  {100 * result['fbiou']:>7.2f}")
        return "\n".join(lines)
