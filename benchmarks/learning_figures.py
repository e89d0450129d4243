"""Does the demo's unsupervised meta-trained model learn? Figures for docs/results.md.

Runs the pipeline's stages in-process (no Prefect, no Dask cluster) on a workspace, with the
demo config plus ``--set`` overrides, and writes a JSON of figures:

- pseudo-mask quality (Hungarian mIoU) against random masks;
- unsupervised model vs the training-free prototype baseline, per fold and shot count;
- optionally (``--finetune``) fine-tuning with 20 % labels from the unsupervised model, per fold,
  against the unsupervised model on the same fold's novel classes;
- wall time of every stage.

Stages already done in the workspace are reused (build keys), so several training settings can
be compared on one workspace by re-running with different ``train.*`` overrides.

    python benchmarks/learning_figures.py --workspace /tmp/learn-a --threads 2 \
        --set evaluate.episodes=200 --set "evaluate.seeds=[0]" --finetune --out /tmp/learn-a/figures.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fss_core.config import load_config
from tasks.cluster import run_cluster
from tasks.compare import ensure_fraction_lists
from tasks.evaluate import run_evaluate
from tasks.extract import extract_block, finish_extraction, prepare_extraction
from tasks.ingest import run_ingest
from tasks.pseudo import finish_pseudo, prepare_pseudo, pseudo_block
from tasks.task_index import run_task_index
from tasks.train import run_train

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
log = logging.getLogger("learning_figures")


@contextmanager
def timed(timings: dict[str, dict[str, float]], stage: str):
    """Wall and CPU seconds of a stage; on a shared machine CPU / threads estimates a dedicated run."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    entry = timings.setdefault(stage, {"wall": 0.0, "cpu": 0.0})
    entry["wall"] += time.perf_counter() - wall
    entry["cpu"] += time.process_time() - cpu
    log.info("%s: %.1f s wall, %.1f s CPU", stage, entry["wall"], entry["cpu"])


def upstream(cfg, timings: dict[str, dict[str, float]]):
    """Ingest → extract (with SSL pretraining) → cluster → pseudo masks → task index."""
    with timed(timings, "ingest"):
        run_ingest(cfg)
    with timed(timings, "ssl+extract"):
        plan = prepare_extraction(cfg)
        computed = [extract_block(cfg, plan.backbone, rows, paths) for rows, paths in zip(plan.blocks, plan.paths)]
        plan = finish_extraction(cfg, plan, computed)
    with timed(timings, "cluster"):
        clusters = run_cluster(cfg, plan.output_key)
    with timed(timings, "pseudo"):
        masks = prepare_pseudo(cfg, clusters.build_key)
        for rows, paths in zip(masks.blocks, masks.paths):
            pseudo_block(cfg, masks.build_key, rows, paths)
        quality = finish_pseudo(cfg, masks)
    with timed(timings, "task_index"):
        index = run_task_index(cfg, masks.build_key, masks.image_ids)
    return plan, quality, index


def rows_of(summary) -> list[dict]:
    return [dict(method=r.method, fold=r.fold, shots=r.shots, miou=r.miou, miou_std=r.miou_std) for r in summary.rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune", action="store_true", help="also fine-tune with 20 %% labels per fold")
    parser.add_argument("--finetune-set", action="append", default=[], help="overrides for the finetune runs only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("mlflow", "alembic", "distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    base = [*args.overrides, f"runtime.workspace={args.workspace}", "runtime.progress=false"]
    cfg = load_config(DEMO_CONFIG, base)
    timings: dict[str, dict[str, float]] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    plan, quality, index = upstream(cfg, timings)
    with timed(timings, "train"):
        trained = run_train(cfg, index.build_key, plan.backbone)
    with timed(timings, "evaluate"):
        evaluated = run_evaluate(cfg, trained, plan.backbone)
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.processor()}",
        "threads": args.threads, "overrides": args.overrides,
        "pseudo_miou": quality.miou, "pseudo_random_miou": quality.random_baseline_miou,
        "task_index": {"occurrences": index.occurrences, "query_images": index.query_images,
                       "clusters_used": index.clusters_used},
        "train": {"bundle": trained.bundle, "best_epoch": trained.best_epoch, "best_score": trained.best_score,
                  "final_train_loss": trained.final_train_loss, "cached": trained.cached},
        "unsupervised": rows_of(evaluated), "table": evaluated.table,
        "means": {f"{m}_{s}shot": evaluated.mean(m, s) for m in ("unsupervised", "baseline") for s in cfg.evaluate.shots},
    }
    log.info("evaluation:\n%s", evaluated.table)

    if args.finetune:
        ensure_fraction_lists(cfg, [20])  # the lists the pipeline's compare stage writes
        figures["finetune"] = []
        for fold in cfg.evaluate.folds:
            ft = load_config(DEMO_CONFIG, [*base, "train.mode=finetune", "train.label_fraction=20",
                                           f"train.fold={fold}", f"train.init_checkpoint={trained.bundle}",
                                           f"evaluate.folds=[{fold}]", *args.finetune_set])
            with timed(timings, "finetune_train"):
                tuned = run_train(ft, index.build_key, plan.backbone)
            with timed(timings, "finetune_evaluate"):
                tuned_eval = run_evaluate(ft, tuned, plan.backbone)
            figures["finetune"] += [r for r in rows_of(tuned_eval) if r["method"] == "finetune"]
            log.info("finetune fold %d:\n%s", fold, tuned_eval.table)
    figures["timings_s"] = timings
    figures["total_wall_s"] = time.perf_counter() - started
    figures["total_cpu_s"] = time.process_time() - cpu_started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    log.info("figures written to %s", args.out)


if __name__ == "__main__":
    main()
