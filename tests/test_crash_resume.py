"""Crash and resume: a run killed with SIGKILL anywhere in extraction, clustering, pseudo-mask
writing, task indexing or training is finished by the next run, and the stores then equal those
of a run that was never killed: the same embedding and mask bytes, the same centroids, the same
trained weights (training resumed from its last checkpoint), no image lost and none processed
twice into a store.

The killed runs are child processes forked from a server process that has already imported the
pipeline (multiprocessing's forkserver), so each costs a fork instead of a 10 s interpreter start.
A child is killed either by the test after a random delay, or by itself just before or just after
its k-th atomic file commit (``os.replace``), k drawn at random: every commit of every store is a
possible crash point. Each trial's seed picks the stage, the kind of kill and the point.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fss_core.config import load_config
from tests.tiny_config import TINY

pytestmark = pytest.mark.slow  # about 100 s: 14 killed runs and their reruns

STAGES = ("extract", "cluster", "pseudo", "task_index", "train")
TRIALS = 14  # 3 per stage, 2 for the task index (seconds, one small store)
EPOCHS = 3
SETTINGS = [*TINY, "extract.shard_size=2", "extract.batch_size=2", f"train.epochs={EPOCHS}", "train.device=cpu",
            "train.amp=false", "runtime.progress=false"]
PRELOAD = ["torch", "zarr", "mlflow", "tasks.extract", "tasks.cluster", "tasks.pseudo", "tasks.task_index",
           "tasks.train", "tests.test_crash_resume"]


def overrides(ws: Path) -> list[str]:
    return [*SETTINGS, f"runtime.workspace={ws}"]


# ------------------------------------------------------------------------------ the pipeline


@dataclasses.dataclass
class Tally:
    """What one run did: rows embedded, masks written, epochs trained, file commits per stage."""

    extracted: int = 0
    masks: int = 0
    epochs: list[int] = dataclasses.field(default_factory=list)
    commits: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    stage: str = ""
    target: str = ""  # the stage whose start sets ``entered`` (a multiprocessing Event)
    entered: object = None


def run_stages(ws: Path, tally: Tally | None = None, until: str = "train") -> dict[str, str]:
    """extract → cluster → pseudo masks → task index → train (up to ``until``), through the task
    functions the flow maps; each stage skips or resumes by itself. Returns each stage's build key."""
    from tasks.cluster import run_cluster
    from tasks.extract import extract_block, finish_extraction, prepare_extraction
    from tasks.pseudo import finish_pseudo, prepare_pseudo, pseudo_block
    from tasks.task_index import run_task_index
    from tasks.train import run_train

    tally = tally if tally is not None else Tally()
    cfg = load_config(None, overrides(ws))
    keys = {}

    def stage(name):
        tally.stage = name
        tally.seconds[name] = time.perf_counter()
        if tally.entered is not None and name == tally.target:
            tally.entered.set()
        return STAGES.index(name) <= STAGES.index(until)

    stage("extract")
    plan = prepare_extraction(cfg)
    tally.extracted += sum(extract_block(cfg, plan.backbone, rows, paths)
                           for rows, paths in zip(plan.blocks, plan.paths))
    keys["extract"] = finish_extraction(cfg, plan, [0]).output_key
    if not stage("cluster"):
        return keys
    keys["cluster"] = run_cluster(cfg, keys["extract"]).build_key
    if not stage("pseudo"):
        return keys
    masks = prepare_pseudo(cfg, keys["cluster"])
    tally.masks += sum(pseudo_block(cfg, masks.build_key, rows, paths)
                       for rows, paths in zip(masks.blocks, masks.paths))
    finish_pseudo(cfg, masks)
    keys["pseudo"] = masks.build_key
    if not stage("task_index"):
        return keys
    keys["task_index"] = run_task_index(cfg, masks.build_key, masks.image_ids).build_key
    if not stage("train"):
        return keys
    keys["train"] = run_train(cfg, keys["task_index"], plan.backbone).build_key
    tally.stage = "done"
    return keys


def counting_commits(tally: Tally, kill_at: int | None = None, before: bool = False):
    """Wrap ``os.replace`` (every atomic commit: zarr chunks, PNGs, checkpoints, JSON) to count
    commits per stage and, with ``kill_at``, SIGKILL this process just before/after the target
    stage's commit number ``kill_at``."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        stage = tally.stage
        tally.commits[stage] = number = tally.commits.get(stage, 0) + 1
        fatal = kill_at is not None and stage == tally.target and number == kill_at
        if fatal and before:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if fatal:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return real, replace


def child(ws: str, target: str, kill_at: int | None, before: bool, started, entered) -> None:
    """A run up to stage ``target``, to be killed inside it (the forkserver's child)."""
    torch.set_num_threads(1)
    tally = Tally(target=target, entered=entered)
    _, replace = counting_commits(tally, kill_at, before)
    os.replace = replace
    started.set()
    run_stages(Path(ws), tally, until=target)


# ------------------------------------------------------------------------------ comparisons


def store_state(ws: Path, until: str = "train") -> dict:
    """What later stages and users read from the stores up to stage ``until``, as plain values."""
    stages = STAGES[: STAGES.index(until) + 1]
    state = {}
    emb = zarr.open_group(str(ws / "embeddings.zarr"), mode="r")
    for name in ("features", "valid_hw", "image_hw", "done"):
        state[f"embeddings/{name}"] = np.asarray(emb[name][...]).tobytes()
    state["embeddings/image_ids"] = list(emb.attrs["image_ids"])
    if "cluster" in stages:
        clusters = zarr.open_group(str(ws / "clusters.zarr"), mode="r")
        for name in ("centroids", "assignments"):
            state[f"clusters/{name}"] = np.asarray(clusters[name][...]).tobytes()
        state["clusters/attrs"] = {k: v for k, v in clusters.attrs.asdict().items() if k != "created_at"}
    if "pseudo" in stages:
        masks = ws / "pseudo_masks"
        state["masks"] = {p.relative_to(masks).as_posix(): p.read_bytes() for p in sorted(masks.rglob("*.png"))}
        state["masks/meta"] = json.loads((masks / "meta.json").read_text())["build_key"]
    if "task_index" in stages:
        tasks = zarr.open_group(str(ws / "tasks.zarr"), mode="r")
        for name in ("occ_image", "occ_cluster", "occ_area", "occ_prototype", "prior_offsets", "prior_rows"):
            state[f"tasks/{name}"] = np.asarray(tasks[name][...]).tobytes()
    if "train" in stages:
        (bundle,) = (ws / "models").glob("unsupervised-*/weights.pt")
        weights = torch.load(bundle, map_location="cpu", weights_only=True)
        state["model"] = {k: v.numpy().tobytes() for k, v in weights.items()}
    return state


def assert_same_state(state: dict, reference: dict, trial: str) -> None:
    assert state.keys() == reference.keys()
    for key in reference:
        if key == "model":
            differing = sorted(k for k in reference[key] if state[key].get(k) != reference[key][k])
            assert not differing, f"{trial}: trained weights differ from the uninterrupted run: {differing[:5]}"
        assert state[key] == reference[key], f"{trial}: {key} differs from the uninterrupted run"


def leftovers(ws: Path) -> list[str]:
    """Unfinished temporary files or folders the pipeline should have cleaned up or never exposed."""
    found = [p.name for p in ws.glob(".*.zarr.*")]
    if (ws / "pseudo_masks").is_dir():
        found += [p.name for p in (ws / "pseudo_masks").rglob(".*.png.tmp*")]
    return found


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@pytest.fixture(scope="module")
def reference(tmp_path_factory, single_thread, forkserver):
    """An uninterrupted run, with a copy of its workspace taken before each crash stage."""
    from tasks.extract import resolve_backbone
    from tasks.ingest import run_ingest, training_rows

    warm = forkserver.Process(target=time.sleep, args=(0,))  # the forkserver imports PRELOAD meanwhile
    warm.start()

    root = tmp_path_factory.mktemp("crash")
    ws = root / "reference"
    cfg = load_config(None, overrides(ws))
    run_ingest(cfg)
    resolve_backbone(cfg, training_rows(cfg))
    snapshots = {"extract": root / "before-extract"}
    shutil.copytree(ws, snapshots["extract"])

    tally = Tally()
    real, replace = counting_commits(tally)
    os.replace = replace
    try:
        keys = run_stages(ws, tally)
    finally:
        os.replace = real
    starts = [tally.seconds[s] for s in STAGES] + [time.perf_counter()]
    seconds = {s: starts[i + 1] - starts[i] for i, s in enumerate(STAGES)}
    states = {s: store_state(ws, until=s) for s in STAGES}
    # Snapshots "before cluster/pseudo/train": the reference workspace with that stage's store removed
    # is what a run sees when the previous stages finished (the later stores are rebuilt anyway).
    later = {"cluster": ["clusters.zarr", "pseudo_masks", "tasks.zarr", "models"],
             "pseudo": ["pseudo_masks", "tasks.zarr", "models"], "task_index": ["tasks.zarr", "models"],
             "train": ["models"]}
    for name, remove in later.items():
        snapshots[name] = root / f"before-{name}"
        shutil.copytree(ws, snapshots[name])
        for item in remove:
            shutil.rmtree(snapshots[name] / item)
    warm.join(120)
    return {"ws": ws, "keys": keys, "tally": tally, "seconds": seconds, "snapshots": snapshots,
            "states": states, "n": len(training_rows(cfg))}


# ------------------------------------------------------------------------------ the test


def before_rerun(ws: Path, reference: dict) -> dict:
    """What the killed run left that the rerun may keep: rows done, whole masks, the last epoch."""
    from fss_core.training import read_checkpoint

    left = {"done": 0, "masks": 0, "epoch": -1, "trained": False}
    try:
        left["done"] = int(np.asarray(zarr.open_group(str(ws / "embeddings.zarr"), mode="r")["done"][...]).sum())
    except Exception:  # killed before the store existed: nothing is kept
        pass
    masks = ws / "pseudo_masks"
    if (masks / "meta.json").is_file() or (masks / ".pending_build_key").is_file():
        left["masks"] = len(list(masks.rglob("*.png")))
    models = ws / "models"
    checkpoints = list(models.glob("unsupervised-*.checkpoints/last.pt")) if models.is_dir() else []
    if checkpoints:
        left["epoch"] = read_checkpoint(checkpoints[0])["epoch"]
    left["trained"] = models.is_dir() and bool(list(models.glob("unsupervised-*/model.json")))
    return left


def test_sigkill_anywhere_then_rerun_equals_an_uninterrupted_run(reference, forkserver, tmp_path, monkeypatch):
    import tasks.train

    real_train = tasks.train.train
    kills, report = 0, []
    for seed in range(TRIALS):
        rng = np.random.default_rng(seed)
        stage = STAGES[seed % len(STAGES)]
        ws = tmp_path / f"trial{seed}"
        shutil.copytree(reference["snapshots"][stage], ws)
        by_timer = seed % 3 == 2
        kill_at, before = None, False
        if not by_timer:
            kill_at, before = int(rng.integers(1, reference["tally"].commits[stage] + 1)), bool(rng.integers(2))
        started, entered = forkserver.Event(), forkserver.Event()
        process = forkserver.Process(target=child, args=(str(ws), stage, kill_at, before, started, entered))
        process.start()
        assert started.wait(60), "the child never started"
        if by_timer:
            if entered.wait(60):
                time.sleep(float(rng.uniform(0, reference["seconds"][stage])))
            process.kill()
        process.join(120)
        assert process.exitcode is not None, "the child hung"
        killed = process.exitcode == -signal.SIGKILL
        kills += killed
        assert killed or process.exitcode == 0, f"trial {seed}: the child failed with exit code {process.exitcode}"

        left = before_rerun(ws, reference)
        tally = Tally()

        def counting_train(model, train_set, val_set, settings, callbacks=None, progress=True):
            on_epoch_end = callbacks.on_epoch_end if callbacks else None

            def record(epoch, metrics):
                tally.epochs.append(epoch)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics)

            callbacks = dataclasses.replace(callbacks or tasks.train.TrainCallbacks(), on_epoch_end=record)
            return real_train(model, train_set, val_set, settings, callbacks, progress=progress)

        monkeypatch.setattr(tasks.train, "train", counting_train)
        keys = run_stages(ws, tally, until=stage)
        when = "after a random delay" if by_timer else f"{'before' if before else 'after'} commit {kill_at}"
        report.append(f"seed {seed}: {stage}, killed={killed} {when}, kept {left}, redone {tally.extracted} "
                      f"rows/{tally.masks} masks/epochs {tally.epochs}")
        assert keys == {k: v for k, v in reference["keys"].items() if k in keys}, report[-1]
        assert_same_state(store_state(ws, until=stage), reference["states"][stage], report[-1])
        n = reference["n"]
        assert left["done"] + tally.extracted == n, report[-1]  # no row lost, none embedded twice
        if STAGES.index(stage) >= STAGES.index("pseudo"):
            assert left["masks"] + tally.masks == n, report[-1]  # no mask lost, none written twice
        if stage == "train":
            expected_epochs = [] if left["trained"] else list(range(left["epoch"] + 1, EPOCHS))
            assert tally.epochs == expected_epochs, report[-1]  # training resumed after the last checkpoint
        assert not leftovers(ws), report[-1]
        shutil.rmtree(ws)
    print("\n".join(report))
    assert kills >= 10, "\n".join(report)
