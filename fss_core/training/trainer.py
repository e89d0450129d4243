"""The training loop of the FSS model, with exact resume and model selection (see docs/training.md).

- Each iteration steps both optimisers on the dice loss; the SGD learning rate follows
  :func:`poly_warmup_lr` (warm-up over the first epoch, then poly, times ``sgd_lr_scale``).
- Epoch ``e`` (0-based) reseeds the torch, NumPy and Python RNGs with ``seed + e`` and shuffles
  with a generator seeded by ``seed + e``; the last partial batch is dropped. One ``DataLoader``
  serves the whole run; with ``num_workers > 0`` its worker processes persist across epochs. The
  epoch reaches them with every index (:class:`~fss_core.data.episodes.EpochBatchSampler`): the
  episode datasets take ``(epoch, index)`` keys, other datasets get ``set_epoch(e)`` on the copy
  that loads, before its first item of the epoch. Any ``num_workers`` gives the same batches.
- After every epoch ``checkpoint_dir/last.pt`` is replaced atomically. Calling :func:`train` again
  with the same ``checkpoint_dir`` continues after the last finished epoch; on CPU the result is
  bit-identical to an uninterrupted run.
- Model selection uses only ``val_dataset`` (held-out pseudo episodes, or base-class episodes):
  ``best.pt`` is written when the validation mIoU improves, ``final.pt`` at the end.
- On CUDA: autocast (bf16 where supported, else fp16 with a grad scaler) and channels-last.
  On CPU: plain fp32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens an extra DataLoader iterator

from fss_core.data.episodes import EpisodeBatch, EpochBatchSampler, collate_episodes, epoch_keyed
from fss_core.data.images import IGNORE_LABEL
from fss_core.data.prefetch import prefetched
from fss_core.models.fss import dice_loss
from fss_core.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fss_core.training.optim import build_optimizers, poly_warmup_lr

logger = logging.getLogger(__name__)

# settings that may change between a run and its resume: they do not alter the trajectory on CPU
RESUMABLE_CHANGES = frozenset({"device", "amp", "num_workers", "checkpoint_dir"})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Training hyper-parameters; the defaults other than the first four are the reference's."""

    epochs: int
    batch_size: int
    base_lr: float
    checkpoint_dir: Path
    sgd_lr_scale: float = 15.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    transformer_lr: float = 1e-4
    transformer_weight_decay: float = 1e-2
    seed: int = 123
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_workers: int = 0
    val_every: int = 1
    dice_ignores_void: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_lr", "sgd_lr_scale", "transformer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"TrainSettings.num_workers must be >= 0, got {self.num_workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainSettings.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the folder as a string), as stored in checkpoints."""
        values = dataclasses.asdict(self)
        values["checkpoint_dir"] = str(self.checkpoint_dir)
        return values


@dataclasses.dataclass
class TrainCallbacks:
    """Hooks for the caller's logging; exceptions raised in them stop training.

    ``on_epoch_end(epoch, metrics)`` runs after ``last.pt`` is written, with ``metrics`` as in
    :attr:`TrainResult.history`. ``on_checkpoint(path, kind)`` runs after each write, ``kind``
    in ``"last"``, ``"best"``, ``"final"``.
    """

    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[Path, str], None] | None = None


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``history`` has one dict per epoch: ``epoch`` (0-based), ``train_loss`` (mean dice loss),
    ``sgd_lr`` (at the epoch's last iteration), ``transformer_lr``, ``seconds`` (wall time of
    the epoch, validation included) and, for validated epochs, ``val_loss`` and ``val_miou``.
    ``best_epoch``/``best_score``/``best_path`` are None when no validation ran.
    """

    best_epoch: int | None
    best_score: float | None
    history: list[dict[str, float]]
    last_path: Path
    best_path: Path | None
    final_path: Path


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainSettings.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Mixed-precision dtype: bf16 on CUDA where supported, else fp16; None (fp32) on CPU or without amp."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    """Seed the torch (all devices), NumPy and Python global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _forward(model: nn.Module, batch: EpisodeBatch, dtype: torch.dtype | None, channels_last: bool,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits ``[B, 2, H, W]`` in fp32 for a batch already on the model's device."""
    query = batch.query_img.contiguous(memory_format=torch.channels_last) if channels_last else batch.query_img
    with torch.autocast(query.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(query, batch.support_imgs, batch.support_masks, batch.query_padding, batch.support_padding,
                       generator=generator)
    return logits.float()


def _worker_context(num_workers: int) -> str | None:
    """Loader workers are spawned, not forked: training runs inside threaded processes (Dask
    workers, Prefect), and forking a process that holds threads can crash the child."""
    return "spawn" if num_workers > 0 else None


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The training ``DataLoader`` of a whole run: call ``loader.batch_sampler.set_epoch(e)``
    before iterating epoch ``e``. Worker processes (``num_workers > 0``) start at the first
    iteration and persist until the loader is released."""
    return DataLoader(epoch_keyed(dataset), batch_sampler=EpochBatchSampler(len(dataset), batch_size, seed),
                      collate_fn=collate_episodes, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory,
                      # each iterator draws the workers' base seed from it, never from the global RNG
                      generator=torch.Generator().manual_seed(seed),
                      multiprocessing_context=_worker_context(num_workers))


def _stop_workers(loader: DataLoader) -> None:
    """Shut down a loader's persistent worker processes now rather than at garbage collection."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    dice_ignores_void: bool = True,
) -> tuple[float, float]:
    """Mean dice loss and foreground mIoU of ``model`` on the episodes of ``dataset``.

    Runs in eval mode, with the prototype clustering drawing from a CPU generator seeded by
    ``seed``, so the same weights give the same numbers. mIoU: for each ``class_id``,
    ``sum(I_fg) / sum(U_fg)`` over its episodes, on the ``[H, W]`` canvas, ignoring 255 and
    padding; then the mean over classes (classes with an empty union are left out).
    The model's train/eval mode is restored afterwards.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_episodes,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        multiprocessing_context=_worker_context(num_workers))
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    intersection: dict[int, int] = {}
    union: dict[int, int] = {}
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        logits = _forward(model, batch, dtype, device.type == "cuda", generator)
        size = batch.query_img.shape[0]
        loss = dice_loss(logits, batch.query_mask, batch.query_padding, ignore_void=dice_ignores_void)
        loss_sum += float(loss) * size
        count += size
        valid = (batch.query_mask != IGNORE_LABEL) & ~batch.query_padding
        predicted = (logits.argmax(1) == 1) & valid
        target = (batch.query_mask == 1) & valid
        inter = (predicted & target).sum((1, 2)).tolist()
        uni = (predicted | target).sum((1, 2)).tolist()
        for class_id, i, u in zip(batch.class_id.tolist(), inter, uni):
            intersection[class_id] = intersection.get(class_id, 0) + i
            union[class_id] = union.get(class_id, 0) + u
    model.train(was_training)
    if count == 0:
        raise ValueError("validate: the validation dataset is empty")
    ious = [intersection[c] / union[c] for c in union if union[c] > 0]
    return loss_sum / count, float(np.mean(ious)) if ious else 0.0


def _check_resume(saved: dict[str, Any], settings: TrainSettings, steps_per_epoch: int, path: Path) -> None:
    """Refuse to resume a run whose trajectory-relevant settings or epoch length differ. A setting
    the saved run predates counts as its default, which is what that run used."""
    current = settings.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings) if f.default is not dataclasses.MISSING}
    changed = sorted(k for k in current
                     if k not in RESUMABLE_CHANGES and saved["settings"].get(k, defaults.get(k)) != current[k])
    if saved["steps_per_epoch"] != steps_per_epoch:
        changed.append(f"iterations per epoch ({saved['steps_per_epoch']} → {steps_per_epoch})")
    if changed:
        raise ValueError(f"cannot resume from {path}: settings differ from the saved run: {changed}; "
                         "use a new checkpoint_dir to start over")


def train(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    settings: TrainSettings,
    callbacks: TrainCallbacks | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on episodes of ``train_dataset``; resume from ``checkpoint_dir/last.pt`` if present.

    Args:
        model: the FSS network (e.g. :class:`~fss_core.models.fss.FSSNetwork`); moved to the device.
        train_dataset: a dataset of ``Episode`` records, taking ``(epoch, index)`` keys when it
            has ``takes_epoch_keys``; else ``set_epoch(e)`` is called when present.
        val_dataset: episodes for model selection, never the test fold's novel classes; None
            skips validation (then no ``best.pt``). Validated every ``val_every`` epochs and after
            the last one.
        settings: hyper-parameters and the checkpoint folder.
        callbacks: logging hooks.
        progress: show a tqdm bar per epoch.

    Returns:
        best epoch and score, per-epoch history and the checkpoint paths.
    """
    callbacks = callbacks or TrainCallbacks()
    device = resolve_device(settings.device)
    dtype = autocast_dtype(device, settings.amp)
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    sgd, adamw = build_optimizers(model, settings.base_lr, settings.sgd_lr_scale, settings.momentum,
                                  settings.weight_decay, settings.transformer_lr, settings.transformer_weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    steps_per_epoch = len(train_dataset) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train: {len(train_dataset)} training episodes give no full batch of {settings.batch_size}")
    max_it = settings.epochs * steps_per_epoch

    folder = settings.checkpoint_dir
    last_path, best_path, final_path = folder / "last.pt", folder / "best.pt", folder / "final.pt"
    start_epoch, global_it, history = 0, 0, []
    best_epoch: int | None = None
    best_score: float | None = None
    if last_path.exists():
        saved = load_checkpoint(last_path, model, sgd, adamw, scaler)
        _check_resume(saved, settings, steps_per_epoch, last_path)
        set_rng_state(saved["rng"])
        start_epoch, global_it, history = saved["epoch"] + 1, saved["global_it"], saved["history"]
        best_epoch, best_score = saved["best_epoch"], saved["best_score"]
        logger.info("resuming from %s after epoch %d (iteration %d)", last_path, saved["epoch"], global_it)
    logger.info("training on %s (%s) for %d epochs × %d iterations; SGD lr %g × %g (explicit scale), AdamW lr %g",
                device, dtype or torch.float32, settings.epochs, steps_per_epoch, settings.base_lr,
                settings.sgd_lr_scale, settings.transformer_lr)

    def notify_checkpoint(path: Path, kind: str) -> None:
        if callbacks.on_checkpoint is not None:
            callbacks.on_checkpoint(path, kind)

    loader = train_loader(train_dataset, settings.batch_size, settings.seed, settings.num_workers,
                          pin_memory=device.type == "cuda")
    try:
        for epoch in range(start_epoch, settings.epochs):
            started = time.perf_counter()
            seed_everything(settings.seed + epoch)
            loader.batch_sampler.set_epoch(epoch)
            model.train()
            loss_sum, sgd_lr = 0.0, 0.0
            # On CUDA without loader processes, a thread prepares the next batches while the training
            # thread waits on the GPU. On CPU it would compete with the step for the GIL and the cores
            # (measured no faster: benchmarks/train_bench.py), so batches load in this thread.
            batches = prefetched(loader) if settings.num_workers == 0 and device.type == "cuda" else loader
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.epochs}",
                       disable=not progress, leave=False)
            for batch in bar:
                global_it += 1
                sgd_lr = poly_warmup_lr(settings.base_lr, global_it, max_it, steps_per_epoch, settings.power,
                                        settings.sgd_lr_scale)
                for group in sgd.param_groups:
                    group["lr"] = sgd_lr
                batch = batch.to(device, non_blocking=True)
                logits = _forward(model, batch, dtype, channels_last)
                loss = dice_loss(logits, batch.query_mask, batch.query_padding,
                                 ignore_void=settings.dice_ignores_void)
                value = loss.detach().item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"train: loss is {value} at epoch {epoch}, iteration {global_it}")
                sgd.zero_grad(set_to_none=True)
                adamw.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(sgd)
                scaler.step(adamw)
                scaler.update()
                loss_sum += value
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{sgd_lr:.2e}")
            bar.close()

            metrics: dict[str, float] = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "sgd_lr": sgd_lr,
                                         "transformer_lr": adamw.param_groups[0]["lr"]}
            if val_dataset is not None and ((epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs):
                metrics["val_loss"], metrics["val_miou"] = validate(model, val_dataset, settings.batch_size, device,
                                                                    settings.seed, dtype, settings.num_workers,
                                                                    settings.dice_ignores_void)
                if best_score is None or metrics["val_miou"] > best_score:
                    best_epoch, best_score = epoch, metrics["val_miou"]
                    save_checkpoint({"model": model.state_dict(), "epoch": epoch, "score": best_score,
                                     "settings": settings.to_dict()}, best_path)
                    notify_checkpoint(best_path, "best")
            metrics["seconds"] = time.perf_counter() - started
            history.append(metrics)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
            save_checkpoint({"model": model.state_dict(), "sgd": sgd.state_dict(), "adamw": adamw.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch, "global_it": global_it,
                             "steps_per_epoch": steps_per_epoch, "history": history, "best_epoch": best_epoch,
                             "best_score": best_score, "rng": rng_state(), "settings": settings.to_dict()}, last_path)
            notify_checkpoint(last_path, "last")
            if callbacks.on_epoch_end is not None:
                callbacks.on_epoch_end(epoch, dict(metrics))
    finally:
        _stop_workers(loader)

    save_checkpoint({"model": model.state_dict(), "epoch": settings.epochs - 1,
                     "score": history[-1].get("val_miou"), "settings": settings.to_dict()}, final_path)
    notify_checkpoint(final_path, "final")
    return TrainResult(best_epoch=best_epoch, best_score=best_score, history=history, last_path=last_path,
                       best_path=best_path if best_epoch is not None else None, final_path=final_path)
