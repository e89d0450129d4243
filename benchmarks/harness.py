"""What every benchmark script shares: the machine line, peak memory, timing repeats and the
sections of docs/benchmarks.md.

Every claim in docs/benchmarks.md is a ratio against a baseline measured in the same run, on the
same data and cores; each section names the command that made it. ``--quick`` runs write to
``build/benchmarks-quick.md`` unless ``--out`` says otherwise, so smoke runs never overwrite the
measured tables.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
QUICK_DOC = REPO / "build" / "benchmarks-quick.md"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--out`` and ``--work``: the options every script takes."""
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (seconds, not minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown file whose section is replaced (default {DOC.relative_to(REPO)}, "
                             f"or {QUICK_DOC.relative_to(REPO)} with --quick)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh temp folder)")


def parse_timed_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The common options plus ``--repeats`` (interleaved runs per variant; None leaves the
    script's default, 3 or 1 with ``--quick``), parsed; then WARNING logging and one torch thread,
    as every timed CPU script runs."""
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per variant (default 3, quick 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    single_thread()
    return args


def out_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    return QUICK_DOC if args.quick else DOC


def single_thread() -> None:
    """One torch and BLAS thread: the measurements compare code paths, not thread scheduling,
    and the second core stays free for the background work a code path may overlap."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command(script: str) -> str:
    """The command line that ran this script, as it goes into the document."""
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, sys.argv[1:])])


class RunInfo:
    """Date, machine and 1-minute load average before and after a run."""

    def __init__(self) -> None:
        self.started = datetime.datetime.now()
        self.load_before = os.getloadavg()[0]
        self.load_after: float | None = None

    def finish(self) -> RunInfo:
        self.load_after = os.getloadavg()[0]
        return self

    def line(self, script: str) -> str:
        after = self.load_after if self.load_after is not None else os.getloadavg()[0]
        return (f"Run {self.started:%Y-%m-%d %H:%M} on {os.cpu_count()} cores ({cpu_name()}, {platform.system()}), "
                f"1-minute load average {self.load_before:.1f} before and {after:.1f} after (the cores are "
                f"shared, so absolute times are inflated; compare within the table).\n"
                f"Command: `{command(script)}`.")


def repeat(fn: Callable[[], object], times: int) -> list[float]:
    """Wall seconds of ``times`` calls of ``fn``."""
    walls = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    return walls


def interleaved(fns: dict[str, Callable[[], object]], times: int,
                setup: dict[str, Callable[[], object]] | None = None,
                cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Median wall seconds of each function, the calls interleaved (a, b, a, b, ...) so that a
    change in the machine's load hits every variant alike; ``setup[name]`` runs untimed before
    each call of ``fns[name]``. ``cpu``, when given, receives the median CPU seconds of this
    process (all its threads) per call."""
    setup = setup or {}
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(times):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            start = time.process_time()
            walls[name] += repeat(fn, 1)
            cpus[name].append(time.process_time() - start)
    if cpu is not None:
        cpu.update({name: statistics.median(c) for name, c in cpus.items()})
    return {name: statistics.median(w) for name, w in walls.items()}


class PeakMemory:
    """Peak resident memory while the ``with`` block runs, sampled every ``interval`` seconds.

    ``peak`` is this process's peak RSS; ``peak_tree`` the peak of the summed RSS of this process
    and all its descendants (Dask workers, loader processes); ``peak_descendants`` the peak of the
    descendants' sum alone; ``peak_children`` the largest RSS any single descendant reached.
    Sampling can miss a spike shorter than ``interval``.
    """

    def __init__(self, interval: float = 0.02, children: bool = True):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.children = children
        self.baseline = self._process.memory_info().rss
        self.peak = self.peak_tree = self.baseline
        self.peak_children = self.peak_descendants = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self._process.memory_info().rss
        descendants = 0
        if self.children:
            for child in self._process.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                descendants += rss
                self.peak_children = max(self.peak_children, rss)
        self.peak = max(self.peak, own)
        self.peak_descendants = max(self.peak_descendants, descendants)
        self.peak_tree = max(self.peak_tree, own + descendants)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def table(header: list[str], rows: list[list[object]], align: str | None = None) -> list[str]:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_section(path: Path, title: str, body: str) -> None:
    """Replace the ``## {title}`` section of ``path`` with ``body`` (appended when missing).

    The file is read and written at once, so sections written by other scripts (even while this
    one ran) are kept.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    section = f"## {title}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


def verdict(ok: bool) -> str:
    return "on target" if ok else "**off target**"
