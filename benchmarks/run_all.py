"""Run every benchmark, one after the other, each in its own process.

    python benchmarks/run_all.py            # the measured tables of docs/benchmarks.md (about 50 minutes)
    python benchmarks/run_all.py --quick    # CI-sized smoke runs into build/benchmarks-quick.md (about 6 minutes)
    python benchmarks/run_all.py --only extract train

Each script replaces its own section of the output file and writes nothing else, so one can be
re-run alone. ``gpu_bench.py`` runs only where CUDA is available (with ``--quick``, it runs on the
CPU in its tiny mode). ``demo_rerun.py`` (two full ``fss demo`` runs) is not part of the set.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script, arguments of the measured run); --quick replaces each script's sizes by its own
BENCHMARKS = [
    ("extract", "extract_bench.py", []),
    ("codecs", "codec_bench.py", []),
    ("kmeans", "kmeans_bench.py", ["--n", "1000000", "--synthetic", "1000"]),
    ("kmeans-memory", "kmeans_memory_bench.py", []),
    ("train", "train_bench.py", []),
    ("eval", "eval_bench.py", []),
    ("orchestration", "pipeline_bench.py", ["--part", "orchestration"]),
    ("scaling", "pipeline_bench.py", ["--part", "scaling"]),
    ("gpu", "gpu_bench.py", []),
]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke runs")
    parser.add_argument("--out", type=Path, default=None, help="markdown file the sections go to")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in BENCHMARKS], default=None)
    args = parser.parse_args()
    failed, summary = [], []
    for name, script, arguments in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script)]
        if args.quick:
            cmd += ["--quick", *(a for a in arguments if name in ("orchestration", "scaling"))]
        else:
            cmd += arguments
        if name == "gpu":
            if not cuda_available():
                if not args.quick:
                    summary.append(f"{name:14s} skipped: no CUDA device")
                    continue
                cmd += ["--device", "cpu"]
        if args.out is not None:
            cmd += ["--out", str(args.out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        wall = time.perf_counter() - start
        summary.append(f"{name:14s} {'ok' if code == 0 else f'FAILED (exit {code})':18s} {wall:7.1f} s")
        if code:
            failed.append(name)
    print("\n".join(["", "benchmarks:", *summary]))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
