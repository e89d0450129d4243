"""Orchestration and scaling of the whole pipeline flow on synthetic data.

Every run is a fresh process (as ``fss run`` is) running ``flows.pipeline.pipeline`` or
``flows.retrain.retrain`` against one Prefect server started for the benchmark; this process
samples the run's memory (the run and its Dask workers). A stage's *work* is what its Prefect
task runs cover, from the task-run start and end times the server records; the flow's
*overhead* is the flow's wall time when no task runs (Prefect, the Dask cluster, the MLflow
parent run, scheduling gaps).

- **orchestration** (section "orchestration"): a first run on a fresh workspace, a cached
  re-run (also once without a Prefect server: Prefect's temporary server, as a bare ``fss run``
  starts it), then +10 % training images and the retrain flow. Targets: overhead <= 5 % of the
  first run's flow time; cached re-run <= 5 % of the first run; the incremental extraction <= 15 %
  of the first run's. The costs of a run that do not grow with the data (imports, the cluster,
  Prefect and MLflow calls: seconds) weigh differently at different sizes, so the first run, the
  cached re-run and the incremental run are measured at two sizes (``--large-images``).
- **scaling** (section "scaling"): first runs at 1x, 2x and 4x the images; wall time and peak
  memory per stage, and the per-image time relative to 1x (1.0 = linear).

    python benchmarks/pipeline_bench.py                   # both parts, demo-like data
    python benchmarks/pipeline_bench.py --part scaling
    python benchmarks/pipeline_bench.py --quick           # the tests' tiny settings
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from harness import REPO, RunInfo, add_common_arguments, mib, out_path, table, verdict, write_section

STAGE_OF_TASK = {"ingest": "ingest", "extract-prepare": "extract", "extract-shard": "extract",
                 "extract-finish": "extract", "cluster": "cluster", "pseudo-prepare": "pseudo",
                 "pseudo-shard": "pseudo", "pseudo-finish": "pseudo", "task-index": "task_index", "train": "train",
                 "compare-prepare": "compare", "compare-train": "compare", "evaluate": "evaluate",
                 "register": "register"}
STAGES = ["ingest", "extract", "cluster", "pseudo", "task_index", "train", "compare", "evaluate", "register"]
OVERHEAD_TARGET, CACHED_TARGET, INCREMENTAL_TARGET = 0.05, 0.05, 0.15

# Synthetic data and CPU-sized settings: demo-like images, a short SSL pretraining, few epochs.
COMMON = ["runtime.n_workers=2", "runtime.threads_per_worker=1", "runtime.progress=false",
          "extract.long_side=128", "extract.batch_size=32", "extract.shard_size=64", "extract.ssl.epochs=2",
          "cluster.num_clusters=16", "train.image_size=65", "train.hidden=32", "train.ffn=64", "train.heads=4",
          "train.batch_size=8", "train.epochs=2", "retrain.epochs=1", "evaluate.folds=[0]", "evaluate.shots=[1]",
          "evaluate.seeds=[0]", "evaluate.episodes=40", "evaluate.overlays=0"]
QUICK_COMMON = ["runtime.n_workers=2", "runtime.progress=false",
                "extract.long_side=64", "extract.shard_size=16", "extract.ssl.epochs=1", "extract.ssl.image_size=48",
                "cluster.num_clusters=8", "train.epochs=1", "train.image_size=65", "train.hidden=32", "train.ffn=64",
                "train.heads=4", "train.fg_prototypes=4", "train.bg_prototypes=8", "train.batch_size=4",
                "retrain.epochs=1", "evaluate.folds=[0]", "evaluate.shots=[1]", "evaluate.seeds=[0]",
                "evaluate.episodes=6", "evaluate.overlays=0"]


def data_settings(images: int, quick: bool) -> list[str]:
    classes = 4 if quick else 8
    size = 64 if quick else 128
    return [f"data.synthetic.images={images}", f"data.synthetic.classes={classes}", f"data.synthetic.size={size}"]


# --- the run, in its own process ----------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    """Run one flow and write its timings (epoch seconds) and task runs to ``args.result``."""
    started = time.time()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from fss_cli.process import console_process, heavy_imports, start_temporary_prefect_server

    if not args.gc_default:  # as the `fss` command sets its collector
        console_process()
    from fss_cli.errors import quiet_local_workers
    from fss_core.config import load_config

    quiet_local_workers()
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"runtime.workspace={args.workspace}", *args.set]
    cfg = load_config(None, overrides)
    with heavy_imports():
        if args.spawn:  # the forkserver's baseline: each worker spawned, importing the stack itself
            import flows.dask_runtime

            flows.dask_runtime.start_worker_forkserver = lambda: False
        else:  # as `fss run` does: the forkserver's imports overlap with this process's own
            from flows.dask_runtime import start_worker_forkserver

            start_worker_forkserver()
        server = None if args.late_server else start_temporary_prefect_server()
        import flows.pipeline
        import flows.retrain

    phases: dict[str, float] = {}
    # time the Dask cluster's start and stop (both flows start it through flows.pipeline)
    flows.pipeline.dask_cluster = _timed_cluster(flows.pipeline.dask_cluster, phases)
    if args.without_preload:  # the baseline of the workers' preload: task modules imported on first use
        import distributed

        start_cluster = distributed.LocalCluster.__init__

        def without_preload(self, *a, **kw):
            kw["preload"] = [m for m in kw.get("preload", []) if m != "flows.worker_setup"]
            start_cluster(self, *a, **kw)

        distributed.LocalCluster.__init__ = without_preload
    if server is not None:
        server.join()
    imported = time.time()
    if args.flow == "retrain":
        results = flows.retrain.retrain(overrides=overrides)
    else:
        results = flows.pipeline.pipeline(config=cfg.model_dump(mode="json"))
    finished = time.time()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    after = dt.datetime.fromtimestamp(imported, dt.timezone.utc)
    runs = []
    with get_client(sync_client=True) as client:
        while True:  # the API serves at most 200 a page
            page = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=after)),
                                         limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    tasks = [{"name": r.name, "stage": stage_of(r.name), "start": r.start_time.timestamp(),
              "end": r.end_time.timestamp()}
             for r in runs if r.start_time and r.end_time and stage_of(r.name)]  # not the subflow's own run
    ssl_seconds = _ssl_seconds(cfg, imported)
    summary = {"process_start": started, "flow_start": imported, "flow_end": finished, "tasks": tasks,
               "query_seconds": time.time() - finished,  # this benchmark's own reading of the runs
               "extracted": results.get("extracted"), "ssl_seconds": ssl_seconds, **phases}
    Path(args.result).write_text(json.dumps(summary))


def _timed_cluster(dask_cluster, phases: dict[str, float]):
    """``flows.dask_runtime.dask_cluster``, recording the seconds its start and its stop take."""

    @contextmanager
    def timed(runtime):
        start = time.time()
        with dask_cluster(runtime) as address:
            phases["cluster_start"] = time.time() - start
            yield address
            stop = time.time()
        phases["cluster_stop"] = time.time() - stop

    return timed


def _ssl_seconds(cfg, since: float) -> float:
    """Seconds of the small CNN's self-supervised pretraining in this run (part of extract-prepare)."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import experiment_name, tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(experiment_name(cfg))
    if experiment is None:
        return 0.0
    runs = client.search_runs([experiment.experiment_id], "tags.`fss.stage` = 'ssl_pretrain'")
    return sum(r.data.metrics.get("ssl_seconds", 0.0) for r in runs if r.info.start_time / 1000 >= since)


# --- the benchmark ------------------------------------------------------------------------------

@contextmanager
def prefect_server(home: Path):
    """A Prefect server for the benchmark's runs; yields its API URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the Prefect server did not start; see {home / 'server.log'}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


class TreeMemory:
    """RSS of a process and its descendants, sampled every ``interval`` s with time stamps."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            try:
                procs = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.time(), total))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside, default=0)


def run_flow(flow: str, workspace: Path, overrides: list[str], env: dict, work: Path,
             flags: tuple[str, ...] = ()) -> dict:
    """One flow in a fresh process (``flags``: the child's baseline switches, ``--spawn``,
    ``--without-preload``); its timings, task runs and memory samples."""
    result = work / f"result-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", flow, "--workspace", str(workspace),
           "--result", str(result), *sum((["--set", s] for s in overrides), []),
           *flags]
    log = result.with_suffix(".log")
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        code = process.wait()
    end = time.time()
    memory.stop()
    if code:
        raise RuntimeError(f"{flow} run failed (exit {code}), log in {log}: {' '.join(cmd)}")
    run = json.loads(result.read_text())
    # what `fss run` would take: the process, less the child's reading of its task runs from the API
    run.update(process_wall=end - start - run["query_seconds"], memory=memory, peak=memory.peak(start, end))
    run["flow_wall"] = run["flow_end"] - run["flow_start"]
    run["work"] = _union([(t["start"], t["end"]) for t in run["tasks"]], run["flow_start"], run["flow_end"])
    run["stages"] = _stages(run)
    print(f"{flow}: process {run['process_wall']:.1f} s, flow {run['flow_wall']:.1f} s, "
          f"task work {run['work']:.1f} s, peak {mib(run['peak']):.0f} MiB", flush=True)
    return run


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    total, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def stage_of(task_run_name: str) -> str | None:
    """The stage of a task run (named ``{task name}-{suffix}``); None for the subflow's own run."""
    return STAGE_OF_TASK.get(task_run_name.rsplit("-", 1)[0])


def _stages(run: dict) -> dict[str, dict]:
    """Per stage: span (first task start to last task end), task seconds, peak memory in the span."""
    stages: dict[str, dict] = {}
    for t in run["tasks"]:
        s = stages.setdefault(t["stage"], {"start": t["start"], "end": t["end"], "task_seconds": 0.0})
        s["start"], s["end"] = min(s["start"], t["start"]), max(s["end"], t["end"])
        s["task_seconds"] += t["end"] - t["start"]
    for s in stages.values():
        s["span"] = s["end"] - s["start"]
        s["peak"] = run["memory"].peak(s["start"], s["end"])
    return stages


def _orchestration_runs(args, env: dict, work: Path, images: int, baselines: bool) -> dict:
    """A first run on a fresh workspace of ``images`` synthetic images, a cached re-run (and, with
    ``baselines``, the re-runs' baselines), then +10 % training images and the retrain flow."""
    # the default canvas (473 px) in the measured run: extraction and clustering at their real size
    canvas = ["extract.long_side=473", "extract.batch_size=16"]
    common = QUICK_COMMON if args.quick else [*(o for o in COMMON if not o.startswith(("extract.long_side=",
                                                                                       "extract.batch_size="))),
                                              *canvas]
    overrides = [*common, *data_settings(images, args.quick)]
    ws = work / f"orchestration-{images}"
    runs = {"overrides": overrides, "first": run_flow("pipeline", ws, overrides, env, work)}
    runs["cached"] = run_flow("pipeline", ws, overrides, env, work)
    ephemeral_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    # no server (Prefect's temporary one, as a bare `fss run` starts it); the re-run's baselines
    runs["cached_ephemeral"] = run_flow("pipeline", ws, overrides, ephemeral_env, work) if baselines else None
    runs["with_preload"], runs["without_preload"], runs["spawned"], runs["gc_default"] = [], [], [], []
    runs["no_server_early"], runs["no_server_late"] = [], []
    for _ in range(2 if baselines else 0):  # interleaved cached re-runs against the baselines
        runs["with_preload"].append(run_flow("pipeline", ws, overrides, env, work)["process_wall"])
        runs["without_preload"].append(run_flow("pipeline", ws, overrides, env, work,
                                                ("--without-preload",))["process_wall"])
        runs["spawned"].append(run_flow("pipeline", ws, overrides, env, work, ("--spawn",))["process_wall"])
        runs["gc_default"].append(run_flow("pipeline", ws, overrides, env, work, ("--gc-default",))["process_wall"])
        runs["no_server_early"].append(run_flow("pipeline", ws, overrides, ephemeral_env, work)["process_wall"])
        runs["no_server_late"].append(run_flow("pipeline", ws, overrides, ephemeral_env, work,
                                               ("--late-server",))["process_wall"])
    from fss_core.data.synthetic import append_train_images
    from storage_schemas import EMBEDDINGS, open_store

    known = len(open_store(ws / "embeddings.zarr", EMBEDDINGS).attrs["image_ids"])
    runs["new"] = new = max(1, round(known / 10))
    append_train_images(ws / "data" / "synthetic", new, 4 if args.quick else 8, 64 if args.quick else 128)
    runs["incremental"] = run_flow("retrain", ws, overrides, env, work)
    if runs["incremental"]["extracted"] != new:
        raise RuntimeError(f"the retrain flow embedded {runs['incremental']['extracted']} images, "
                           f"expected the {new} new ones")
    return runs


def _extraction(run: dict, ssl: bool = False) -> float:
    """The extract stage's span, without the small CNN's self-supervised pretraining unless ``ssl``."""
    return run["stages"]["extract"]["span"] - (0.0 if ssl else run["ssl_seconds"])


def _target_rows(runs: dict, label: str) -> list[list[str]]:
    first, cached, incremental, new = runs["first"], runs["cached"], runs["incremental"], runs["new"]
    overhead = first["flow_wall"] - first["work"]
    return [
        [f"{label}first run: flow overhead / flow time",
         f"{first['flow_wall']:.1f} s flow, {first['work']:.1f} s of tasks",
         f"**{overhead / first['flow_wall']:.3f}**", f"<= {OVERHEAD_TARGET}",
         verdict(overhead / first["flow_wall"] <= OVERHEAD_TARGET)],
        [f"{label}cached re-run / first run (process wall)",
         f"{cached['process_wall']:.1f} s / {first['process_wall']:.1f} s",
         f"**{cached['process_wall'] / first['process_wall']:.3f}**", f"<= {CACHED_TARGET}",
         verdict(cached["process_wall"] / first["process_wall"] <= CACHED_TARGET)],
        [f"{label}incremental extraction (+{new} images, retrain flow) / first run's extraction",
         f"{_extraction(incremental):.1f} s / {_extraction(first):.1f} s",
         f"**{_extraction(incremental) / _extraction(first):.3f}**", f"<= {INCREMENTAL_TARGET}",
         verdict(_extraction(incremental) / _extraction(first) <= INCREMENTAL_TARGET)],
    ]


def orchestration(args, env: dict, work: Path) -> str:
    images = 40 if args.quick else 240
    small = _orchestration_runs(args, env, work, images, baselines=not args.quick)
    large_images = 0 if args.quick else args.large_images
    large = _orchestration_runs(args, env, work, large_images, baselines=False) if large_images else None
    first, cached, incremental = small["first"], small["cached"], small["incremental"]
    cached_ephemeral = small["cached_ephemeral"]
    with_preload, without_preload, spawned = small["with_preload"], small["without_preload"], small["spawned"]
    rows = [
        *_target_rows(small, f"{images} images: " if large else ""),
        *([[f"{images} images: cached re-run without a Prefect server / first run",
            f"{cached_ephemeral['process_wall']:.1f} s / {first['process_wall']:.1f} s",
            f"{cached_ephemeral['process_wall'] / first['process_wall']:.3f}", f"<= {CACHED_TARGET}",
            verdict(cached_ephemeral["process_wall"] / first["process_wall"] <= CACHED_TARGET)]]
          if cached_ephemeral else []),
        [f"{images} images: the incremental extraction against the first run's extract stage with its "
         "self-supervised pretraining",
         f"{_extraction(incremental):.1f} s / {_extraction(first, ssl=True):.1f} s",
         f"{_extraction(incremental) / _extraction(first, ssl=True):.3f}", f"<= {INCREMENTAL_TARGET}",
         verdict(_extraction(incremental) / _extraction(first, ssl=True) <= INCREMENTAL_TARGET)],
        *([["cached re-run: workers forked from the forkserver / spawned (median of "
            f"{len(with_preload)} interleaved runs each)",
            f"{statistics.median(with_preload):.1f} s / {statistics.median(spawned):.1f} s",
            f"{statistics.median(with_preload) / statistics.median(spawned):.3f}", "", ""]]
          if with_preload else []),
        *([["cached re-run: workers preloading the task modules / importing them on first use (median of "
            f"{len(with_preload)} interleaved pairs)",
            f"{statistics.median(with_preload):.1f} s / {statistics.median(without_preload):.1f} s",
            f"{statistics.median(with_preload) / statistics.median(without_preload):.3f}", "", ""]]
          if with_preload else []),
        *([["cached re-run: the run's process with the `fss` command's garbage-collector settings / "
            f"Python's defaults (median of {len(with_preload)} interleaved runs each)",
            f"{statistics.median(with_preload):.1f} s / {statistics.median(small['gc_default']):.1f} s",
            f"{statistics.median(with_preload) / statistics.median(small['gc_default']):.3f}", "", ""]]
          if with_preload else []),
        *([["cached re-run without a Prefect server: its temporary server started as the run's process starts / "
            f"when the flow begins (median of {len(with_preload)} interleaved runs each)",
            f"{statistics.median(small['no_server_early']):.1f} s / {statistics.median(small['no_server_late']):.1f} s",
            f"{statistics.median(small['no_server_early']) / statistics.median(small['no_server_late']):.3f}", "", ""]]
          if with_preload else []),
        [f"{images} images: retrain flow (+10 % images) / first run (process wall)",
         f"{incremental['process_wall']:.1f} s / {first['process_wall']:.1f} s",
         f"{incremental['process_wall'] / first['process_wall']:.3f}", "", ""],
        *(_target_rows(large, f"{large_images} images: ") if large else []),
    ]
    runs = {"first run": first, "cached re-run": cached, "cached, no server": cached_ephemeral,
            "retrain +10 %": incremental}
    if large:
        runs.update({f"{large_images} images: first run": large["first"],
                     f"{large_images} images: cached re-run": large["cached"],
                     f"{large_images} images: retrain +10 %": large["incremental"]})
    runs = {name: run for name, run in runs.items() if run is not None}
    large_ssl = f", {large['first']['ssl_seconds']:.1f} s at {large_images}" if large else ""
    breakdown = []
    for name, run in runs.items():
        starting = run["flow_start"] - run["process_start"]
        first_task = min(t["start"] for t in run["tasks"]) - run["flow_start"]
        breakdown.append([name, f"{run['process_wall']:.1f}", f"{starting:.1f}", f"{run['flow_wall']:.1f}",
                          f"{run['work']:.1f}", f"{run['flow_wall'] - run['work']:.1f}",
                          f"{run.get('cluster_start', float('nan')):.1f}", f"{first_task:.1f}",
                          f"{run.get('cluster_stop', float('nan')):.1f}",
                          *(f"{run['stages'][s]['span']:.1f}" if s in run["stages"] else "-" for s in STAGES
                            if s != "compare")])
    body = [
        f"Synthetic data: {images} images ({'64' if args.quick else '128'} px)"
        f"{f', then {large_images} on a second workspace' if large else ''}, settings "
        f"`{' '.join(small['overrides'])}` (the image count aside). Each run is a fresh process against one "
        "Prefect server (except the row without one), with a LocalCluster of 2 workers x 1 thread. *flow*: the "
        "`pipeline()` (or `retrain()`) call; *tasks*: the union of the Prefect task runs' intervals; overhead = "
        "flow - tasks. The incremental rows compare the extract stage (first extract task start to last end, "
        "minus the small CNN's self-supervised pretraining, which only the first run does: "
        f"{first['ssl_seconds']:.1f} s at {images} images"
        f"{large_ssl}).",
        "",
        *table(["measure", "values", "ratio", "target", ""], rows, "llrll"),
        "",
        "Where the time goes (seconds; *process* = the run's process from start to exit, less this "
        "benchmark's reading of its task runs from the API afterwards, the time the ratios use; "
        "*imports* = process start to the flow call (without a server, the wait for its temporary server too); *cluster start* / *stop* = "
        "the LocalCluster (2 worker processes) starting and closing inside the flow; *first task* = flow call "
        "to the first task's start (cluster start, with MLflow's store opening meanwhile on a thread, then the "
        "MLflow parent run and the subflow); stages = span of their task runs, which include the imports (torch, "
        "MLflow, the science) each worker process makes on its first task of a module):",
        "",
        *table(["run", "process", "imports", "flow", "tasks", "overhead", "cluster start", "first task",
                "cluster stop", *(s for s in STAGES if s != "compare")],
               breakdown, "lrrrrrrrr" + "r" * (len(STAGES) - 1)),
    ]
    return "\n".join(body)


def scaling(args, env: dict, work: Path) -> str:
    base = 40 if args.quick else 120
    runs = {}
    for factor in (1, 2, 4):
        overrides = [*(QUICK_COMMON if args.quick else COMMON), *data_settings(base * factor, args.quick)]
        runs[factor] = run_flow("pipeline", work / f"scaling-{factor}", overrides, env, work)
    rows = []
    for stage in ["total", *STAGES]:
        if stage != "total" and stage not in runs[1]["stages"]:
            continue
        times = [run["process_wall"] if stage == "total" else run["stages"][stage]["span"] for run in runs.values()]
        peaks = [run["peak"] if stage == "total" else run["stages"][stage]["peak"] for run in runs.values()]
        per_image = [t / f / times[0] for t, f in zip(times, runs)]
        rows.append([stage, *(f"{t:.1f}" for t in times), f"{per_image[1]:.2f}", f"**{per_image[2]:.2f}**",
                     *(f"{mib(m):.0f}" for m in peaks), f"{mib(peaks[2] - peaks[0]):+.0f}"])
    body = [
        f"First runs on fresh workspaces with {base}, {2 * base} and {4 * base} synthetic images "
        f"({'64' if args.quick else '128'} px), settings as in the orchestration section"
        f"{'' if args.quick else ' but a 128 px canvas (extract.long_side=128, batch 32)'}. Time: the stage's span "
        "(first task start to last task end), *total* = the whole process. *per-image time* = (time / images) / "
        "(time at 1x / images at 1x): 1.00 is linear growth, below 1 a fixed cost being amortised, above 1 a "
        "cost that grows faster than the data. Memory: peak RSS of the run's process, the forkserver and "
        "the Dask workers forked from it together during the span (sampled every 50 ms; about 2.4 GB of it is "
        "the processes themselves: Python, torch, Prefect, MLflow in each, counted once per process although "
        "the workers share the forkserver's pages). Evaluation draws a fixed number of episodes, so it does "
        "not grow with the images.",
        "",
        *table(["stage", "1x s", "2x s", "4x s", "per-image time 2x", "per-image time 4x", "1x MiB", "2x MiB",
                "4x MiB", "memory 4x - 1x MiB"], rows, "lrrrrrrrrr"),
    ]
    return "\n".join(body)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        parser = argparse.ArgumentParser()
        parser.add_argument("child")
        parser.add_argument("flow", choices=["pipeline", "retrain"])
        parser.add_argument("--workspace", required=True)
        parser.add_argument("--result", required=True)
        parser.add_argument("--set", action="append", default=[])
        parser.add_argument("--without-preload", action="store_true")
        parser.add_argument("--spawn", action="store_true")
        parser.add_argument("--late-server", action="store_true",
                            help="without a Prefect server: the flow starts the temporary one itself, when it begins")
        parser.add_argument("--gc-default", action="store_true",
                            help="the baseline of fss_cli.process: the run's process keeps Python's collector settings")
        child(parser.parse_args())
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--part", choices=["orchestration", "scaling", "all"], default="all")
    parser.add_argument("--large-images", type=int, default=1200,
                        help="orchestration: the images of the second, larger workspace (0: none)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "prefect"
    home.mkdir(exist_ok=True)
    with prefect_server(home) as api:
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        for part, run in (("orchestration", orchestration), ("scaling", scaling)):
            if args.part in (part, "all"):
                info = RunInfo()
                body = run(args, env, work)
                section = info.finish().line("pipeline_bench.py") + "\n\n" + body
                write_section(out_path(args), part, section)
                print(section, flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
