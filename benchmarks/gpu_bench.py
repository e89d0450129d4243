"""GPU throughput against the theoretical bound: ResNet-50 extraction in bf16 and a full-size training step with AMP.

For a lent device. Measured, each next to its bound = (counted FLOPs) / (peak bf16 FLOP/s):

- **extraction**: the ResNet-50 backbone (``fss_core.models.backbones``, random weights) on
  ``L x L`` canvases as extraction runs it (:func:`fss_core.embeddings.extract.backbone_features`:
  inference mode, bf16 autocast, channels-last), images/s on batches already on the device; then
  :func:`fss_core.embeddings.extract.extract_rows` from JPEGs into a zarr store (decoding and writes
  included), to show what the input/output path leaves of it;
- **training step**: the FSS model at full size (``train.image_size`` 473, ``hidden`` 256, the
  reference's other settings) on its frozen deep-stem ResNet-50 (``resnet50_v2``, output stride 8),
  one step as the trainer takes it (bf16
  autocast, channels-last, dice loss, backward, SGD + AdamW steps) on an in-memory batch.

Then the trainer itself for two short epochs, with the episode loader (JPEGs at the canvas size)
and with the same episodes in memory: the loader's cost per step on the device.

FLOPs are counted by ``torch.utils.flop_counter`` on the run's own shapes (convolutions and matrix
products; element-wise work and grid sampling are not counted, so the bound is optimistic). The
peak is the data-sheet dense bf16 rate for known GPUs, and also measured with a large bf16 matmul.

    python benchmarks/gpu_bench.py                           # on CUDA: 473 px, batch 32 / 4
    python benchmarks/gpu_bench.py --quick --device cpu      # tiny smoke run anywhere
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import RunInfo, add_common_arguments, out_path, table, write_section

# dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (without sparsity)
PEAK_BF16 = [("H200", 989e12), ("H100 SXM", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
             ("H100", 756e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
             ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
             ("RTX 3090", 71e12)]


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    """(device name, data-sheet bf16 peak or None when unknown)."""
    if device.type != "cuda":
        from harness import cpu_name

        return cpu_name(), None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key.lower() in name.lower():
            return name, peak
    return name, None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    return float(np.median(walls))


def matmul_peak(device: torch.device, size: int) -> float:
    """Measured FLOP/s of a square bf16 matmul (float32 on a CPU without native bf16)."""
    from fss_core.embeddings.extract import autocast_dtype

    dtype = torch.bfloat16 if device.type == "cuda" or autocast_dtype(device) else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * size**3 / seconds


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def extraction(device: torch.device, image_size: int, batch: int, images: int, repeats: int, work: Path) -> dict:
    from PIL import Image

    from fss_core.data.synthetic import synthesize
    from fss_core.embeddings.extract import (
        backbone_features,
        create_embeddings_store,
        extract_rows,
        feature_grid,
    )
    from fss_core.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet50").eval().to(device)
    backbone.freeze()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    flops = count_flops(lambda: backbone_features(backbone, x, device, amp=True)) / batch
    seconds = timed(lambda: backbone_features(backbone, x, device, amp=True), device, warmup=3, repeats=repeats)
    result = dict(flops=flops, forward=batch / seconds)

    data = work / "jpegs"
    synthesize(data, seed=0, classes=2, images=max(images, 4), size=image_size)
    paths = sorted((data / "JPEGImages").glob("*.jpg"))
    hw = np.array([Image.open(p).size[::-1] for p in paths])
    layer = backbone.embedding_layer
    store = work / "embeddings.zarr"

    def extract():
        shutil.rmtree(store, ignore_errors=True)
        create_embeddings_store(store, [p.stem for p in paths], hw, backbone.channels[layer],
                                feature_grid(backbone, image_size), build_key="69b00000", extractor="resnet50",
                                stride=backbone.strides[layer], long_side=image_size)
        start = time.perf_counter()
        extract_rows(store, range(len(paths)), paths, backbone, image_size, batch, device=str(device), amp=True)
        return time.perf_counter() - start

    extract()  # warm-up: kernel selection at the canvas size
    result["extract"] = len(paths) / float(np.median([extract() for _ in range(max(1, repeats // 5))]))
    shutil.rmtree(work, ignore_errors=True)
    return result


def training_step(device: torch.device, image_size: int, hidden: int, batch: int, repeats: int) -> dict:
    from fss_core.models.backbones import build_backbone
    from fss_core.models.fss import FSSModelConfig, FSSNetwork, dice_loss
    from fss_core.training import autocast_dtype, build_optimizers

    torch.manual_seed(0)
    model = FSSNetwork(build_backbone("resnet50_v2"), FSSModelConfig(hidden=hidden)).to(device).train()
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, amp=True)
    sgd, adamw = build_optimizers(model, 0.002)
    query = torch.randn(batch, 3, image_size, image_size, device=device)
    if channels_last:
        query = query.contiguous(memory_format=torch.channels_last)
    supports = torch.randn(batch, 1, 3, image_size, image_size, device=device)
    masks = torch.zeros(batch, 1, image_size, image_size, dtype=torch.int64, device=device)
    masks[..., image_size // 4: 3 * image_size // 4, image_size // 4: 3 * image_size // 4] = 1
    target = masks[:, 0].clone()
    padding = torch.zeros(batch, image_size, image_size, dtype=torch.bool, device=device)
    support_padding = padding[:, None].clone()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(query, supports, masks, padding, support_padding)
        loss = dice_loss(logits.float(), target, padding)
        sgd.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        sgd.step()
        adamw.step()

    step()  # warm-up before counting: lazily built state is not part of a step
    flops = count_flops(step)
    seconds = timed(step, device, warmup=2, repeats=repeats)
    return dict(flops=flops, seconds=seconds,
                autocast=f"{str(dtype).replace('torch.', '')} autocast" if dtype else "float32 (no autocast)",
                memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def training_epochs(device: torch.device, image_size: int, hidden: int, batch: int, episodes: int,
                    work: Path) -> dict:
    """Seconds per step of the trainer itself (``fss_core.training.train``, one epoch) on episodes
    loaded from synthetic JPEGs (the trainer's DataLoader, its prefetch thread on CUDA) and on the
    same episodes held in memory."""
    from fss_core.data.episodes import SupervisedEpisodeDataset
    from fss_core.data.layouts import read_voc
    from fss_core.data.synthetic import synthesize
    from fss_core.models.backbones import build_backbone
    from fss_core.models.fss import FSSModelConfig, FSSNetwork
    from fss_core.training import TrainSettings, train
    from train_bench import InMemoryEpisodes

    data = work / "episodes"
    synthesize(data, seed=0, classes=4, images=max(episodes * 4 // 3 + 4, 8), size=image_size)
    dataset = SupervisedEpisodeDataset(read_voc(data, "train"), classes=range(1, 5), shots=1, size=image_size,
                                       min_area=64, area_reference=None, seed=0)
    memory = InMemoryEpisodes(dataset, epochs=2)

    def per_step(episodes_dataset, folder: str) -> float:
        torch.manual_seed(0)
        model = FSSNetwork(build_backbone("resnet50_v2"), FSSModelConfig(hidden=hidden))
        settings = TrainSettings(epochs=2, batch_size=batch, base_lr=0.002, checkpoint_dir=work / folder,
                                 device=device.type, amp=True)
        history = train(model, episodes_dataset, None, settings, progress=False).history
        return history[-1]["seconds"] / (len(episodes_dataset) // batch)  # the second epoch: warmed up

    result = dict(loader=per_step(dataset, "loader"), memory=per_step(memory, "memory"), episodes=len(dataset))
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=None, help="canvas side (default 473, quick 65)")
    parser.add_argument("--hidden", type=int, default=None, help="FSS model width (default 256, quick 32)")
    parser.add_argument("--extract-batch", type=int, default=None, help="default 32, quick 2")
    parser.add_argument("--train-batch", type=int, default=None, help="default 4 (train.batch_size), quick 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20, quick 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu (e.g. --quick --device cpu for a smoke run)")
    if device.type == "cpu":
        torch.set_num_threads(1)
    image_size = args.image_size or (65 if args.quick else 473)
    hidden = args.hidden or (32 if args.quick else 256)
    extract_batch = args.extract_batch or (2 if args.quick else 32)
    train_batch = args.train_batch or (1 if args.quick else 4)
    repeats = args.repeats or (2 if args.quick else 20)
    info = RunInfo()
    name, sheet = datasheet_peak(device)
    measured_peak = matmul_peak(device, 512 if args.quick else 8192)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    ext = extraction(device, image_size, extract_batch, 4 * extract_batch if args.quick else 512, repeats, work)
    step = training_step(device, image_size, hidden, train_batch, repeats)
    epochs = training_epochs(device, image_size, hidden, train_batch, 8 if args.quick else 64, work)
    info.finish()

    def bound(flops: float, peak: float | None) -> str:
        return "-" if peak is None else f"{peak / flops:.1f}"

    def fraction(rate: float, flops: float, peak: float | None) -> str:
        return "-" if peak is None else f"{rate * flops / peak:.2f}"

    rows = [
        ["extraction, forward only (batch on device)", f"{ext['flops'] / 1e9:.1f}", f"{ext['forward']:.1f}",
         bound(ext["flops"], sheet), fraction(ext["forward"], ext["flops"], sheet),
         bound(ext["flops"], measured_peak), fraction(ext["forward"], ext["flops"], measured_peak)],
        ["extraction, extract_rows from JPEGs to zarr", f"{ext['flops'] / 1e9:.1f}", f"{ext['extract']:.1f}",
         bound(ext["flops"], sheet), fraction(ext["extract"], ext["flops"], sheet),
         bound(ext["flops"], measured_peak), fraction(ext["extract"], ext["flops"], measured_peak)],
        [f"training step, batch {train_batch} (steps/s)", f"{step['flops'] / 1e9:.1f}", f"{1 / step['seconds']:.2f}",
         bound(step["flops"], sheet), fraction(1 / step["seconds"], step["flops"], sheet),
         bound(step["flops"], measured_peak), fraction(1 / step["seconds"], step["flops"], measured_peak)],
    ]
    memory = f" Peak GPU memory of the training step: {step['memory'] / 2**30:.1f} GiB." if step["memory"] else ""
    loader_ratio = epochs["loader"] / epochs["memory"]
    body = "\n".join([
        info.line("gpu_bench.py"),
        "",
        f"Device: {name}; data-sheet dense bf16 peak "
        f"{'unknown' if sheet is None else f'{sheet / 1e12:.0f} TFLOP/s'}; measured matmul peak "
        f"{measured_peak / 1e12:.2f} TFLOP/s. ResNet-50 (random weights), canvas {image_size} px, extraction "
        f"batch {extract_batch}, bf16 autocast; FSS model hidden {hidden} on the deep-stem ResNet-50 "
        f"(resnet50_v2, stride 8), 1 shot, "
        f"{step['autocast']}. GFLOP per image (extraction) or per step (training), counted on these "
        f"shapes. Rates are medians of {repeats} timed runs after warm-up.{memory}",
        "",
        *table(["what", "GFLOP", "measured per s", "bound per s (data sheet)", "fraction of bound",
                "bound per s (measured matmul)", "fraction of measured bound"], rows, "lrrrrrr"),
        "",
        f"The trainer itself (`fss_core.training.train`, second of 2 epochs, {epochs['episodes']} episodes, "
        f"batch {train_batch}): {1000 * epochs['loader']:.0f} ms per step with the episode loader (JPEG "
        f"decoding and augmentation at {image_size} px) against {1000 * epochs['memory']:.0f} ms on the same "
        f"episodes in memory: **{loader_ratio:.2f}x** (target <= 1.1).",
    ])
    print(body)
    write_section(out_path(args), "GPU", body)


if __name__ == "__main__":
    main()
