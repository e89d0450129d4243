"""The embeddings store's codec against the one it replaced, on real extracted features.

Features: the small CNN's (random weights; ReLU outputs, about half of them zeros, as trained
ones are) of synthetic images, L2-normalised and float16, exactly as extraction stores them. Each
codec gets a zarr array laid out as ``features`` is (one image per chunk, 64 per shard):

- **write**: one shard written in one call, as extraction writes it (no empty-chunk scan);
- **read**: every row read back, one image at a time, as the stages after extraction read it.

CPU milliseconds per image (this process, all threads: blosc may use a second one), medians of
interleaved runs, and the bytes on disk. The section "feature codecs" of docs/benchmarks.md.

    python benchmarks/codec_bench.py
    python benchmarks/codec_bench.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import RunInfo, interleaved, out_path, parse_timed_arguments, table, write_section

# (name in the table, blosc codec settings); the first is what storage_schemas uses for features
CODECS = [("lz4, no shuffle (stored)", dict(cname="lz4", clevel=5, shuffle="noshuffle")),
          ("zstd 1, byte shuffle (before)", dict(cname="zstd", clevel=1, shuffle="shuffle"))]


def features(long_side: int, images: int, work: Path) -> np.ndarray:
    from fss_core.data.images import load_rgb
    from fss_core.data.synthetic import synthesize
    from fss_core.embeddings.extract import embed_batch, preprocess
    from fss_core.models.backbones import build_backbone

    data = work / f"data-{long_side}"
    synthesize(data, seed=0, classes=8, images=images, size=long_side)
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn").eval()
    batch = torch.stack([preprocess(load_rgb(p), long_side)[0] for p in sorted((data / "JPEGImages").glob("*.jpg"))])
    return embed_batch(backbone, batch).half().numpy()


def measure(values: np.ndarray, work: Path, repeats: int) -> list[dict]:
    import zarr
    from zarr.codecs import BloscCodec

    n = len(values)
    arrays, fns, setup = {}, {}, {}
    for name, settings in CODECS:
        path = work / f"{settings['cname']}.zarr"

        def fresh(path=path, settings=settings, name=name):
            shutil.rmtree(path, ignore_errors=True)
            arrays[name] = zarr.create_array(path, shape=values.shape, chunks=(1, *values.shape[1:]),
                                             shards=values.shape, dtype="float16",
                                             compressors=BloscCodec(**settings),
                                             config={"write_empty_chunks": True})

        def write(name=name):
            arrays[name][:] = values

        def read(name=name):
            for row in range(n):
                arrays[name][row]

        fresh()
        write()
        fns[f"write {name}"], fns[f"read {name}"], setup[f"write {name}"] = write, read, fresh
    cpu: dict[str, float] = {}
    interleaved(fns, repeats, setup=setup, cpu=cpu)
    results = []
    for name, settings in CODECS:
        stored = sum(f.stat().st_size for f in (work / f"{settings['cname']}.zarr").rglob("*") if f.is_file())
        np.testing.assert_array_equal(arrays[name][:], values)  # lossless, whatever the codec
        results.append(dict(codec=name, write_ms=1000 * cpu[f"write {name}"] / n,
                            read_ms=1000 * cpu[f"read {name}"] / n, mib=stored / 2**20,
                            raw_mib=values.nbytes / 2**20))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_timed_arguments(parser)
    info = RunInfo()
    work = args.work or Path(tempfile.mkdtemp(prefix="codec-bench-"))
    repeats = args.repeats or (1 if args.quick else 5)
    rows = []
    for long_side in ([128] if args.quick else [128, 473]):
        values = features(long_side, 16 if args.quick else 64, work)
        zeros = float((values == 0).mean())
        results = measure(values, work, repeats)
        base = results[-1]
        for r in results:
            rows.append([f"{long_side} px", r["codec"], f"{len(values)} x {list(values.shape[1:])}", f"{zeros:.2f}",
                         f"{r['write_ms']:.2f}", f"**{r['write_ms'] / base['write_ms']:.2f}**",
                         f"{r['read_ms']:.2f}", f"**{r['read_ms'] / base['read_ms']:.2f}**",
                         f"{r['raw_mib'] / r['mib']:.2f}", f"{r['mib'] / base['mib']:.2f}"])
            print(rows[-1], flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join([
        info.finish().line("codec_bench.py"),
        "",
        f"One torch thread; the small CNN's features (random weights) of synthetic images, as extraction stores "
        f"them (L2-normalised, float16), in a zarr array laid out as `features` (one image per chunk, the "
        f"images in one shard). *write*: the shard in one call, without zarr's empty-chunk scan, as extraction "
        f"writes it; *read*: every image read back one at a time, as the later stages read them. CPU ms per "
        f"image, medians of {repeats} interleaved runs; *vs before*: against zstd 1 + byte shuffle, the codec "
        f"the store used before, in the same run. Every array reads back bit-identical.",
        "",
        *table(["canvas", "codec", "features", "zero fraction", "write CPU ms / img", "write vs before",
                "read CPU ms / img", "read vs before", "compression ratio", "size vs before"],
               rows, "lllrrrrrrr"),
    ])
    write_section(out_path(args), "feature codecs", body)
    print(body)


if __name__ == "__main__":
    main()
