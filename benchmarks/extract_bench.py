"""Extraction throughput against the bare backbone forward pass on the same images and batch size.

For each setting, synthetic images are drawn once; then, alternating, in the same process:

- **forward only**: the canvases already preprocessed in memory, batches of ``batch_size``
  through the backbone exactly as extraction calls it (inference mode, the same autocast);
- **extract_rows**: :func:`fss_core.embeddings.extract.extract_rows` over every shard of a fresh
  embeddings store (what each mapped ``extract-shard`` task runs): reading and decoding the JPEGs,
  preprocessing, the forward pass, normalising, float16 and the zarr writes.

Target: extraction images/s >= 0.9x the forward pass's (the I/O and the writes hide behind compute).
The section "extraction" of docs/benchmarks.md.

    python benchmarks/extract_bench.py            # small_cnn at 128 and 473 px (128 and 512 images), resnet50 at 473 px
    python benchmarks/extract_bench.py --quick    # small_cnn at 128 px, 64 images
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import PeakMemory, RunInfo, interleaved, mib, out_path, parse_timed_arguments, table, \
    verdict, write_section
from storage_schemas.stores import IMAGES_PER_BLOCK

TARGET = 0.9


@dataclass(frozen=True)
class Setting:
    backbone: str
    long_side: int
    images: int
    batch_size: int


# The small CNN at 473 px runs at two sizes: a quarter of a task (128 images) and a whole task as large
# datasets make them (MAX_SHARDS_PER_TASK = 8 shards of 64 images, tasks/extract.py), because a call's
# fill (the first batch's decoding) and drain (the last write) weigh four times more in the former.
FULL = [Setting("small_cnn", 128, 512, 32), Setting("small_cnn", 473, 128, 16), Setting("small_cnn", 473, 512, 16),
        Setting("resnet50", 473, 48, 16)]
QUICK = [Setting("small_cnn", 128, 128, 32)]


def measure(setting: Setting, work: Path, repeats: int) -> dict:
    from PIL import Image

    from fss_core.data.images import load_rgb
    from fss_core.data.synthetic import synthesize
    from fss_core.embeddings.extract import (
        autocast_dtype,
        create_embeddings_store,
        extract_rows,
        feature_grid,
        preprocess,
        shard_blocks,
    )
    from fss_core.models.backbones import build_backbone

    data = work / f"data-{setting.long_side}-{setting.images}"
    if not data.is_dir():
        synthesize(data, seed=0, classes=8, images=setting.images, size=setting.long_side)
    paths = sorted((data / "JPEGImages").glob("*.jpg"))
    ids = [p.stem for p in paths]
    hw = np.array([Image.open(p).size[::-1] for p in paths])
    torch.manual_seed(0)
    backbone = build_backbone(setting.backbone).eval()
    backbone.freeze()
    layer = backbone.embedding_layer
    grid = feature_grid(backbone, setting.long_side)
    canvases = torch.stack([preprocess(load_rgb(p), setting.long_side)[0] for p in paths])
    dtype = autocast_dtype(torch.device("cpu"))
    store = work / "embeddings.zarr"

    def forward_only():
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            for start in range(0, len(canvases), setting.batch_size):
                backbone(canvases[start:start + setting.batch_size])[layer]

    def fresh_store():
        shutil.rmtree(store, ignore_errors=True)
        create_embeddings_store(store, ids, hw, backbone.channels[layer], grid, build_key="be4c4000",
                                extractor=setting.backbone, stride=backbone.strides[layer],
                                long_side=setting.long_side)

    def extraction():
        done = extract_rows(store, range(len(ids)), paths, backbone, setting.long_side, setting.batch_size)
        assert done == len(ids)

    def per_shard():
        for block in shard_blocks(len(ids), IMAGES_PER_BLOCK):
            extract_rows(store, block, paths[block.start:block.stop], backbone, setting.long_side, setting.batch_size)

    forward_only()  # warm-up: first-call allocations and kernel selection
    cpu: dict[str, float] = {}
    walls = interleaved({"forward": forward_only, "extract": extraction, "per_shard": per_shard}, repeats,
                        setup={"extract": fresh_store, "per_shard": fresh_store}, cpu=cpu)
    fresh_store()
    with PeakMemory(children=False) as memory:
        extraction()
    n = len(ids)
    return dict(setting=setting, forward=n / walls["forward"], extract=n / walls["extract"],
                per_shard=n / walls["per_shard"], ratio=walls["forward"] / walls["extract"],
                ratio_per_shard=walls["forward"] / walls["per_shard"],
                cpu_forward=cpu["forward"] / n, cpu_extract=cpu["extract"] / n,
                dtype=str(dtype).replace("torch.", "") if dtype else "float32",
                store_mib=mib(sum(f.stat().st_size for f in store.rglob("*") if f.is_file())),
                peak_mib=mib(memory.peak), repeats=repeats)


def markdown(results: list[dict], info: RunInfo) -> str:
    rows = []
    for r in results:
        s = r["setting"]
        rows.append([s.backbone, f"{s.long_side} px", s.images, s.batch_size, r["dtype"], f"{r['forward']:.1f}",
                     f"{r['extract']:.1f}", f"**{r['ratio']:.2f}**", verdict(r["ratio"] >= TARGET),
                     f"{r['per_shard']:.1f}", f"{r['ratio_per_shard']:.2f}", f"{1000 * r['cpu_forward']:.1f}",
                     f"{1000 * r['cpu_extract']:.1f}", f"{r['cpu_forward'] / r['cpu_extract']:.2f}",
                     f"{r['store_mib']:.0f}", f"{r['peak_mib']:.0f}"])
    lines = [
        info.line("extract_bench.py"),
        "",
        "One torch thread, so that the second core can take the decoding and writing extraction overlaps "
        "with the forward pass — when other jobs leave it free (a load average near 2 or above means they "
        "do not, and then the CPU ratio below is the bound); "
        "random backbone weights; synthetic JPEGs whose longer side is the canvas side. Images/s are medians of "
        f"{results[0]['repeats']} interleaved runs. *forward only*: preprocessed canvases in memory through the "
        "backbone (inference mode, the autocast extraction uses). *extract_rows*: every shard of a fresh "
        "embeddings store (created before the clock): JPEG decoding, preprocessing, forward, L2 normalisation, "
        "float16, zarr writes; in one call (what one `extract-shard` task runs over its run of rows), and "
        f"in one call per shard of {IMAGES_PER_BLOCK} images (the pipeline fills and drains the decode/write "
        "overlap once per call; the pipeline's extract tasks each take a run of rows, see `tasks/extract.py`). "
        "The small CNN at 473 px is measured on a quarter of a task (128 images) and on a whole one as large "
        "datasets make them (512 images: 8 shards of 64, the most one task takes), since a call's fill and "
        "drain weigh four times more in the former. "
        "*CPU ms / img*: CPU time of the process (all threads) per image; their ratio is the best "
        "extract / forward can reach when the machine has no core to spare for the background thread that "
        "decodes, normalises and writes. Peak RSS: the process during one whole-store extraction.",
        "",
        *table(["backbone", "canvas", "images", "batch", "autocast", "forward only img/s", "extract_rows img/s",
                "extract / forward", f"target >= {TARGET}", "one call per shard img/s", "per shard / forward",
                "forward CPU ms / img", "extract CPU ms / img", "CPU ratio", "store MiB", "peak RSS MiB"],
               rows, "lrrrlrrrlrrrrrrr"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_timed_arguments(parser)
    info = RunInfo()
    work = args.work or Path(tempfile.mkdtemp(prefix="extract-bench-"))
    repeats = args.repeats or (1 if args.quick else 5)  # the forward pass alone varies most with other jobs
    results = []
    for setting in QUICK if args.quick else FULL:
        results.append(measure(setting, work, repeats))
        r = results[-1]
        print(f"{setting}: forward {r['forward']:.1f} img/s, extract {r['extract']:.1f} img/s (ratio {r['ratio']:.2f}), "
              f"per shard {r['per_shard']:.1f} img/s (ratio {r['ratio_per_shard']:.2f})", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    write_section(out_path(args), "extraction", markdown(results, info.finish()))


if __name__ == "__main__":
    main()
