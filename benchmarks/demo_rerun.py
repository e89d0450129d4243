"""Time `fss demo` twice on a fresh workspace: the second, unchanged run must be a cached no-op.

Writes the figures (first run, second run, their ratio) into docs/benchmarks.md under
"## demo re-run". Usage: python benchmarks/demo_rerun.py [--workspace DIR] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- demo_rerun:begin -->", "<!-- demo_rerun:end -->"


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/fss-demo-bench"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    shutil.rmtree(args.workspace, ignore_errors=True)
    fss = str(Path(sys.executable).parent / "fss")
    cmd = [fss, "demo", "-w", str(args.workspace), *sum((["--set", s] for s in args.sets), [])]
    first = timed(cmd)
    second = timed(cmd)
    load = os.getloadavg()[0]
    section = (
        f"{BEGIN}\nRun {dt.date.today()} on {platform.machine()} with {os.cpu_count()} cores, load average "
        f"{load:.1f} at the end. Command: `python benchmarks/demo_rerun.py {' '.join('--set ' + s for s in args.sets)}`.\n\n"
        "| run | wall s |\n|---|---:|\n"
        f"| first `fss demo` (fresh workspace) | {first:.1f} |\n"
        f"| second `fss demo` (unchanged: every stage cached) | {second:.1f} |\n"
        f"| ratio | {second / first:.3f} |\n{END}"
    )
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), section, text, flags=re.S)
    else:
        text += f"\n## demo re-run\n\n{section}\n"
    DOCS.write_text(text)
    print(f"first {first:.1f} s, second {second:.1f} s, ratio {second / first:.3f}")


if __name__ == "__main__":
    main()
