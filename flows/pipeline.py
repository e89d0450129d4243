"""The end-to-end pipeline flow: ingest → extract → cluster → pseudo masks → task index →
train → (the ``compare.*`` models) → evaluate → register. Composition only; the work is in ``tasks/``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
from prefect import flow, unmapped
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from tqdm import tqdm

from flows.dask_runtime import dask_cluster
from fss_core.config import PipelineConfig, load_config
from tasks.cluster import cluster_task
from tasks.compare import compare_prepare_task, compare_train_task
from tasks.extract import extract_finish_task, extract_prepare_task, extract_shard_task
from tasks.ingest import ingest_task
from tasks.pseudo import pseudo_finish_task, pseudo_prepare_task, pseudo_shard_task
from tasks.task_index import task_index_task
from tasks.evaluate import evaluate_fold_task, evaluate_task
from tasks.register import register_task
from tasks.train import train_task
from tasks.tracking import ensure_experiment, pipeline_run
from tasks.workspace import save_resolved_config, workspace_lock, workspace_of

log = logging.getLogger(__name__)


STAGES = ("ingest", "extract", "cluster", "pseudo", "task_index", "train", "evaluate", "register")


@flow(name="fss-stages", log_prints=True)
def stages(config: dict, parent_run_id: str | None = None, warm_start: bool = False,
           init_bundle: str | None = None, until: str = "register") -> dict[str, Any]:
    """The DAG itself; runs on the Dask task runner it is given. Each stage skips itself
    when its build key matches what is stored. ``warm_start``: k-means starts from the
    current centroids; ``init_bundle``: training starts from that model (retraining);
    ``until``: the last stage to run (the per-stage CLI commands). With ``compare.*`` set, the
    comparison models are trained (each fold and method its own cached task, in parallel on the
    workers) before ``evaluate`` scores them with the rest."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    stop = STAGES.index(until)
    cfg = unmapped(config)
    results: dict[str, Any] = {}
    results["ingest"] = ingested = ingest_task.submit(config, parent_run_id).result()
    if stop < 1:
        return results

    plan = extract_prepare_task.submit(config, ingested.build_key, parent_run_id).result()
    computed = extract_shard_task.map(cfg, unmapped(plan.backbone), plan.blocks, plan.paths)
    show_progress(computed, "extract (runs of rows)", config, unit="task")
    plan = extract_finish_task.submit(config, plan, computed, parent_run_id).result()
    results["extracted"] = sum(f.result() for f in computed)
    if stop < 2:
        return results

    results["cluster"] = clusters = cluster_task.submit(config, plan.output_key, parent_run_id, warm_start).result()
    if stop < 3:
        return results

    masks = pseudo_prepare_task.submit(config, clusters.build_key).result()
    written = pseudo_shard_task.map(cfg, unmapped(masks.build_key), masks.blocks, masks.paths)
    show_progress(written, "pseudo masks (shards)", config)
    results["pseudo_quality"] = pseudo_finish_task.submit(config, masks, written, parent_run_id).result()
    if stop < 4:
        return results

    results["task_index"] = index = task_index_task.submit(config, masks.build_key, masks.image_ids,
                                                           parent_run_id).result()
    if stop < 5:
        return results

    with on_gpu_worker(config):
        trained = train_task.submit(config, index.build_key, plan.backbone, parent_run_id, init_bundle).result()
    results["train"] = trained
    if stop < 6:
        return results

    compared = []
    if PipelineConfig.model_validate(config).compare.enabled:
        data = compare_prepare_task.submit(config, ingested.build_key).result()
        with on_gpu_worker(config):
            futures = [compare_train_task.submit(config, spec.method, spec.fold, spec.fraction,
                                                 data.data_keys[spec.method], plan.backbone, trained.bundle,
                                                 parent_run_id)
                       for spec in data.specs]
        results["compare"] = compared = [f.result() for f in futures]

    # folds in parallel on the workers; the evaluate task then gathers them into the table
    per_fold = evaluate_fold_task.map(cfg, unmapped(trained), unmapped(plan.backbone), config["evaluate"]["folds"],
                                      unmapped(compared))
    show_progress(per_fold, "evaluate (folds)", config, unit="fold")
    results["evaluated_results"] = sum(f.result() for f in per_fold)  # a failed fold raises here
    results["evaluate"] = evaluation = evaluate_task.submit(config, trained, plan.backbone, parent_run_id,
                                                            compared).result()
    if stop < 7:
        return results

    results["register"] = register_task.submit(config, trained, evaluation, parent_run_id).result()
    return results


def show_progress(futures: list, desc: str, config: dict, unit: str = "shard") -> None:
    """A progress bar over mapped tasks as they finish (they run on Dask workers, whose own
    output does not reach this terminal)."""
    if not futures or not config["runtime"].get("progress", True):
        return
    with tqdm(total=len(futures), desc=desc, unit=unit) as bar:
        for _ in as_completed(futures):
            bar.update()


def on_gpu_worker(config: dict):
    """Route the next submitted task to a Dask worker offering the configured GPU resource."""
    resource = config["runtime"].get("gpu_resource")
    return dask.annotate(resources={resource: 1}) if resource else contextlib.nullcontext()


@flow(name="fss-pipeline", log_prints=True)
def pipeline(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dask_address: str | None = None,
    config: dict | None = None,
    until: str = "register",
    serve_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the pipeline on a config file (or dict) with ``section.key=value`` overrides,
    up to and including stage ``until``.

    Parameters are what the Prefect UI shows for a manual run of the deployment.
    ``serve_overrides`` are the settings ``fss serve`` was started with (workspace, tracking
    store), applied before ``overrides``: a run from the UI that sets its own overrides keeps them.
    """
    cfg = load_config(config_path, [*(serve_overrides or []), *(overrides or [])], base=config)
    if dask_address:
        cfg.runtime.dask_address = dask_address
    ws = workspace_of(cfg)
    run_dir = save_resolved_config(cfg, ws)
    log.info("workspace %s; resolved config in %s", ws.root, run_dir)
    with workspace_lock(ws.root, what="fss-pipeline flow"), cluster_and_run(cfg) as (address, run):
        runner = DaskTaskRunner(address=address)
        results = stages.with_options(task_runner=runner)(cfg.model_dump(mode="json"), run.info.run_id, until=until)
    return results


@contextlib.contextmanager
def cluster_and_run(cfg: PipelineConfig, run_name: str = "pipeline") -> Iterator[tuple[str, Any]]:
    """The Dask cluster's address and MLflow's parent run, for the flow's stages.

    The tracking store opens on a thread while the cluster starts: MLflow imports its SQL store
    (and alembic) and checks the database on a process's first call, about 0.6 s here that
    would otherwise follow the cluster's start (docs/benchmarks.md, "orchestration")."""
    with ThreadPoolExecutor(1, thread_name_prefix="tracking-store") as pool:
        store_open = pool.submit(ensure_experiment, cfg)
        with dask_cluster(cfg.runtime) as address:
            store_open.result()
            with pipeline_run(cfg, run_name=run_name) as run:
                yield address, run
