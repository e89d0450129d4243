"""Pseudo masks of large photos: made on the image itself, or on its copy shrunk to ``pseudo.max_side``.

One synthetic photo per size (a demo image enlarged, with sensor-like noise), random unit
features on the 473 px canvas of the extraction (stride 8) and K = 30 random centroids. Each
measurement runs ``fss_core.pseudo.masks.pseudo_mask`` once in a fresh child process, which
reports its wall time and its peak resident memory; the image is decoded before the clock.
A second table times loading such a photo, saved as JPEG, as its shrunk copy: decoded whole,
or at a reduced scale by the JPEG codec (``load_rgb(at_least=...)``).

    python benchmarks/large_images.py --out docs/benchmarks.md   # 2 and 12 megapixels, max_side 640
    python benchmarks/large_images.py --sizes 1600x1200 --max-side 640 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import write_section  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[1])
from fss_core.data.synthetic import class_model, render_image
from fss_core.geometry import pad_geometry
from fss_core.pseudo.masks import pseudo_mask

w, h = (int(v) for v in sys.argv[2].split("x"))
max_side = None if sys.argv[3] == "none" else int(sys.argv[3])
rgb, _ = render_image(1, 0, class_model(20), 256)
rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC), dtype=np.float32)
rgb = np.clip(rgb + np.random.default_rng(0).normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
rng = np.random.default_rng(1)
geometry = pad_geometry(h, w, 473)
cells = (-(-geometry.new_h // 8), -(-geometry.new_w // 8))
features = rng.standard_normal((64, 60, 60)).astype(np.float32)
features /= np.linalg.norm(features, axis=0, keepdims=True)
centroids = rng.standard_normal((30, 64)).astype(np.float32)
centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
start = time.perf_counter()
mask = pseudo_mask(features, cells, (h, w), 8, 473, centroids, rgb, area_reference=473, max_side=max_side)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(mask.shape)}))
"""


DECODE = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[1])
from fss_core.data.images import load_rgb
from fss_core.data.synthetic import class_model, render_image
from fss_core.geometry import working_size

w, h = (int(v) for v in sys.argv[2].split("x"))
max_side = int(sys.argv[3])
rgb, _ = render_image(1, 0, class_model(20), 256)
path = Path(tempfile.mkdtemp()) / "photo.jpg"
Image.fromarray(rgb).resize((w, h), Image.BICUBIC).save(path, quality=90)
target = working_size(h, w, max_side)[::-1]
times = {"whole": [], "reduced": []}
for _ in range(5):
    for name, at_least in (("whole", None), ("reduced", max_side)):
        start = time.perf_counter()
        Image.fromarray(load_rgb(path, at_least=at_least)).resize(target, Image.BILINEAR)
        times[name].append(time.perf_counter() - start)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def measure_decode(size: str, max_side: int) -> dict:
    done = subprocess.run([sys.executable, "-c", DECODE, str(REPO), size, str(max_side)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(size: str, max_side: int | None) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), size, str(max_side).lower()],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1600x1200", "4000x3000"], help="WIDTHxHEIGHT")
    parser.add_argument("--max-side", nargs="+", type=int, default=[640])
    parser.add_argument("--out", type=Path, default=None, help="markdown file whose 'large images' section is replaced")
    parser.add_argument("--quick", action="store_true", help="smoke run: one 800x600 image, max_side 320")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.max_side = ["800x600"], [320]
    lines = ["| image | pseudo mask made at | seconds | peak memory MiB | time / original's | memory / original's |",
             "|---|---|---:|---:|---:|---:|"]
    print("\n".join(lines))
    for size in args.sizes:
        original = measure(size, None)
        lines.append(f"| {size} | original size | {original['seconds']:.1f} | {original['peak_mib']:.0f} | 1 | 1 |")
        print(lines[-1], flush=True)
        for max_side in args.max_side:
            shrunk = measure(size, max_side)
            assert shrunk["shape"] == original["shape"]
            lines.append(f"| {size} | copy at max_side {max_side} | {shrunk['seconds']:.2f} | {shrunk['peak_mib']:.0f} | "
                         f"**{shrunk['seconds'] / original['seconds']:.3f}** | "
                         f"{shrunk['peak_mib'] / original['peak_mib']:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "Loading the photo as its copy shrunk to `max_side` (a JPEG, quality 90; median of 5 "
              "interleaved loads): decoded whole then resized, against decoded at 1/2, 1/4 or 1/8 scale by the "
              "codec then resized (`load_rgb(at_least=max_side)`, what the pseudo masks and the training "
              "episodes do; extraction does the same at its canvas size).", "",
              "| image | max_side | whole, s | reduced, s | reduced / whole |", "|---|---:|---:|---:|---:|"]
    for size in args.sizes:
        for max_side in args.max_side:
            t = measure_decode(size, max_side)
            lines.append(f"| {size} | {max_side} | {t['whole']:.3f} | {t['reduced']:.3f} | "
                         f"**{t['reduced'] / t['whole']:.2f}** |")
            print(lines[-1], flush=True)
    if args.out:
        head = (f"Run {datetime.date.today()} on {platform.machine()} with {os.cpu_count()} cores, one process at "
                f"a time. Command: `python benchmarks/large_images.py {' '.join(sys.argv[1:])}`.\n\n"
                "One pseudo mask (`fss_core.pseudo.masks.pseudo_mask`: nearest centroids of random features on the "
                "473 px canvas, K = 30, Felzenszwalb superpixels, the vote) of a synthetic photo, made on the image "
                "itself (`pseudo.max_side: null`, as the reference) or on its copy shrunk to `pseudo.max_side` and "
                "enlarged back. Peak memory: the child process's maximum resident set, the image included.\n")
        write_section(args.out, "large images", head + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
