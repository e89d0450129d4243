"""Training step time with the real episode loader against the same steps on in-memory batches.

Both variants call :func:`fss_core.training.train` the way the train stage does (episode dataset,
``DataLoader`` with the trainer's settings, SGD + AdamW, dice loss, checkpoint per epoch), from the
same initial weights, on the same episodes:

- **episode loader**: :class:`fss_core.data.episodes.SupervisedEpisodeDataset` over synthetic VOC
  images (each episode decodes the query and support JPEGs and labels and runs the training
  augmentation — the same per-episode work as the pseudo episodes of the unsupervised stage);
- **in memory**: the very same episodes, drawn before the clock and served from a list.

Target: loader step time <= 1.1x the in-memory step time (the loader never starves the model).
One row per loader worker count (``train.num_workers``; workers persist across epochs, so only the
first epoch pays their start, shown apart). Also shown: the loader alone (iterating the DataLoader,
no model). The section "training" of docs/benchmarks.md.

    python benchmarks/train_bench.py            # demo-sized model (129 px, hidden 64), 3 x 3 epochs
    python benchmarks/train_bench.py --quick    # 65 px, hidden 32, 1 x 2 epochs
    python benchmarks/train_bench.py --num-workers 0 1 2 --repeats 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from harness import RunInfo, out_path, parse_timed_arguments, table, verdict, write_section

TARGET = 1.1


@dataclass(frozen=True)
class Setting:
    image_size: int
    hidden: int
    ffn: int
    heads: int
    batch_size: int
    images: int
    epochs: int
    repeats: int
    num_workers: tuple[int, ...] = (0, 1)


FULL = Setting(image_size=129, hidden=64, ffn=192, heads=8, batch_size=8, images=160, epochs=3, repeats=3)
QUICK = Setting(image_size=65, hidden=32, ffn=64, heads=4, batch_size=4, images=48, epochs=2, repeats=1)


class InMemoryEpisodes(Dataset):
    """The episodes a dataset draws in each epoch, drawn once up front and served from memory."""

    def __init__(self, dataset, epochs: int):
        self.by_epoch = []
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            self.by_epoch.append([dataset[i] for i in range(len(dataset))])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.by_epoch[0])

    def __getitem__(self, i: int):
        return self.by_epoch[self.epoch][i]


def build(setting: Setting, work: Path, decode_cache_mb: float | None = None):
    from fss_core.data.episodes import SupervisedEpisodeDataset
    from fss_core.data.layouts import read_voc
    from fss_core.data.synthetic import synthesize

    data = work / "data"
    if not data.is_dir():
        synthesize(data, seed=0, classes=8, images=setting.images, size=128)
    records = read_voc(data, "train")
    cache = {} if decode_cache_mb is None else {"decode_cache_mb": decode_cache_mb}
    dataset = SupervisedEpisodeDataset(records, classes=range(1, 9), shots=1, size=setting.image_size,
                                       min_area=256, area_reference=None, seed=0, **cache)
    return dataset


def model(setting: Setting):
    from fss_core.models.backbones import build_backbone
    from fss_core.models.fss import FSSModelConfig, FSSNetwork

    torch.manual_seed(0)
    config = FSSModelConfig(hidden=setting.hidden, ffn=setting.ffn, heads=setting.heads)
    return FSSNetwork(build_backbone("small_cnn"), config)


def run_train(setting: Setting, dataset, folder: Path, num_workers: int) -> list[float]:
    """Seconds per step of each epoch."""
    from fss_core.training import TrainSettings, train

    shutil.rmtree(folder, ignore_errors=True)
    settings = TrainSettings(epochs=setting.epochs, batch_size=setting.batch_size, base_lr=0.002,
                             checkpoint_dir=folder, device="cpu", num_workers=num_workers)
    result = train(model(setting), dataset, None, settings, progress=False)
    steps = len(dataset) // setting.batch_size
    return [h["seconds"] / steps for h in result.history]


def loader_alone(setting: Setting, dataset, num_workers: int) -> float:
    """Seconds per batch of iterating the trainer's DataLoader without a model: its second epoch,
    after the first has started the workers."""
    from fss_core.training.trainer import train_loader

    loader = train_loader(dataset, setting.batch_size, seed=0, num_workers=num_workers)
    for _ in loader:
        pass
    loader.batch_sampler.set_epoch(1)
    start = time.perf_counter()
    steps = sum(1 for _ in loader)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, nargs="+", default=None,
                        help="DataLoader worker counts (train.num_workers), one row each (default 0 1)")
    args = parse_timed_arguments(parser)
    setting = QUICK if args.quick else FULL
    if args.num_workers is not None:
        setting = Setting(**{**setting.__dict__, "num_workers": tuple(args.num_workers)})
    if args.repeats is not None:
        setting = Setting(**{**setting.__dict__, "repeats": args.repeats})
    info = RunInfo()
    work = args.work or Path(tempfile.mkdtemp(prefix="train-bench-"))
    dataset = build(setting, work)
    memory = InMemoryEpisodes(dataset, setting.epochs)
    loader_step = {w: loader_alone(setting, dataset, w) for w in setting.num_workers}
    decoding = {w: loader_alone(setting, build(setting, work, decode_cache_mb=0), w) for w in setting.num_workers}
    real: dict[int, list[list[float]]] = {w: [] for w in setting.num_workers}
    cached: list[list[float]] = []
    for _ in range(setting.repeats):  # interleaved, so a change of load hits every variant alike
        for w in setting.num_workers:
            real[w].append(run_train(setting, dataset, work / "real", w))
        cached.append(run_train(setting, memory, work / "memory", 0))  # served from this process's memory
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    info.finish()

    def medians(runs: list[list[float]]) -> tuple[float, float]:
        """Median step time over all epochs, and over first epochs alone."""
        return statistics.median(t for run in runs for t in run), statistics.median(run[0] for run in runs)

    step_memory, first_memory = medians(cached)
    s = setting
    rows = []
    for w in s.num_workers:
        step_real, first_real = medians(real[w])
        ratio = step_real / step_memory
        print(f"{w} loader workers: step {step_real:.3f} s, in memory {step_memory:.3f} s, ratio {ratio:.2f}; "
              f"first epoch {first_real:.3f} s against {first_memory:.3f} s; loader alone {loader_step[w]:.3f} "
              f"s/batch ({decoding[w]:.3f} decoding every image on every use)", flush=True)
        rows.append([f"{s.image_size} px", f"{s.hidden} / {s.ffn} / {s.heads}", s.batch_size, len(dataset), w,
                     f"{1000 * step_memory:.0f}", f"{1000 * step_real:.0f}", f"**{ratio:.2f}**",
                     verdict(ratio <= TARGET), f"{first_real / first_memory:.2f}", f"{1000 * loader_step[w]:.0f}",
                     f"{loader_step[w] / step_memory:.2f}", f"{1000 * decoding[w]:.0f}"])
    body = "\n".join([
        info.line("train_bench.py"),
        "",
        "One torch thread; CPU, float32 (the trainer's CPU path); small_cnn backbone (random weights), 1 shot. "
        f"Step times are medians over {s.repeats} x {s.epochs} epochs (epoch seconds / steps, as the trainer "
        "records them: loading, forward, loss, backward, both optimiser steps), the variants interleaved. "
        "*in memory*: the same episodes drawn before the clock and served from a list through the same "
        "DataLoader and collate, in the training process, with no loader workers. *loader workers*: "
        "`train.num_workers` of the episode-loader run (0, the default: episodes are loaded in the training "
        "thread; >= 1: spawned loader processes that persist across the run's epochs). *first epoch*: the "
        "same ratio over first epochs alone, which pay the workers' start. *loader alone*: the second epoch "
        "of the trainer's DataLoader with no model; *decoding on every use*: the same with "
        "`train.decode_cache_mb: 0`, so every epoch decodes the JPEGs and label PNGs again (by default "
        "each episode dataset keeps them decoded in each loading process, up to 256 MiB).",
        "",
        *table(["image", "hidden / ffn / heads", "batch", "episodes / epoch", "loader workers",
                "in-memory step ms", "episode-loader step ms", "loader / in memory", f"target <= {TARGET}",
                "first epoch: loader / in memory", "loader alone ms / batch", "loader alone / in-memory step",
                "loader alone, decoding on every use ms / batch"],
               rows, "llrrrrrrlrrrr"),
    ])
    write_section(out_path(args), "training", body)
    print(body)


if __name__ == "__main__":
    main()
