"""The benchmark scripts still run: the cheapest parts of the quick set, each writing its section.

The slow parts (the pipeline runs, the k-means memory run) are covered by their helpers here and
by ``python benchmarks/run_all.py --quick``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import harness

    return harness


def _run(script: str, tmp_path: Path, *arguments: str) -> str:
    out = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out.read_text()


@pytest.mark.parametrize(("script", "section", "arguments", "header"), [
    ("extract_bench.py", "extraction", ("--repeats", "1"), "extract / forward"),
    ("train_bench.py", "training", (), "loader / in memory"),
    ("eval_bench.py", "evaluation", (), "protocol / forward"),
    ("codec_bench.py", "feature codecs", (), "read vs before"),
    ("gpu_bench.py", "GPU", ("--device", "cpu"), "fraction of measured bound"),
    ("kmeans_bench.py", "k-means", ("--no-cluster", "--skip-dask-ml", "--n", "20000", "--synthetic", "16"),
     "equal inertia"),
])
def test_quick_benchmark_writes_its_section(tmp_path, script, section, arguments, header):
    text = _run(script, tmp_path, "--work", str(tmp_path / "work"), *arguments)
    body = text.split(f"## {section}\n", 1)[1]
    assert f"Command: `python benchmarks/{script} --quick" in body
    assert header in body
    table = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) >= 2  # a header and at least one measured row


def test_large_images_benchmark_writes_its_section(tmp_path):
    body = _run("large_images.py", tmp_path).split("## large images\n", 1)[1]
    assert "Command: `python benchmarks/large_images.py --quick" in body
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| 800x600")]
    assert [row[1] for row in rows] == ["original size", "copy at max_side 320", "320"]  # masks, then loading
    assert "reduced / whole" in body and rows[-1][-1].startswith("**")


def test_a_section_is_replaced_and_the_others_kept(tmp_path, harness):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## a\n\nold a\n\n## demo re-run\n\n<!-- x -->kept<!-- y -->\n")
    harness.write_section(doc, "a", "new a")
    harness.write_section(doc, "b", "new b")
    text = doc.read_text()
    assert "old a" not in text and "new a" in text and "new b" in text
    assert text.index("## a") < text.index("## demo re-run") < text.index("## b")
    assert "<!-- x -->kept<!-- y -->" in text and "intro" in text


def test_pipeline_benchmark_measures_task_coverage(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import pipeline_bench

    # overlapping mapped tasks count once; gaps between them are overhead
    assert pipeline_bench._union([(1.0, 3.0), (2.0, 4.0), (6.0, 7.0)], 0.0, 10.0) == pytest.approx(4.0)
    assert pipeline_bench._union([(-1.0, 1.0), (9.0, 12.0)], 0.0, 10.0) == pytest.approx(2.0)
    assert pipeline_bench.stage_of("extract-shard-3aa") == "extract"
    assert pipeline_bench.stage_of("evaluate-fold0") == "evaluate"
    assert pipeline_bench.stage_of("task-index-c60") == "task_index"
    assert pipeline_bench.stage_of("fss-stages-0") is None  # the subflow's own run is not a stage's work
