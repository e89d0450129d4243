"""The model registry: every trained model becomes a version of the workspace's registered model.

Aliases: ``candidate`` is the latest registered version; ``champion`` is the best by score
(model-version tag ``fss.score``), and moves only when a new version beats it. Retraining
starts from the champion's bundle.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from fss_core.config import PipelineConfig
from tasks.pyfunc_model import log_fss_model
from tasks.tracking import ensure_experiment, experiment_name, stage_run

log = logging.getLogger(__name__)

CHAMPION = "champion"
CANDIDATE = "candidate"
SCORE_TAG = "fss.score"
SCORE_KEY_TAG = "fss.score_key"
BUNDLE_TAG = "fss.bundle_key"  # the train build key of the bundle a version was registered from


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version and whether it became the champion."""

    name: str
    version: int
    model_uri: str
    score: float | None  # None: registered without a score
    is_champion: bool


def registered_model_name(cfg: PipelineConfig) -> str:
    """The registered model of a workspace is named after its experiment."""
    return experiment_name(cfg)


def _champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such registered model, or no champion alias yet
        return None


def _score_of(version: ModelVersion) -> float | None:
    text = version.tags.get(SCORE_TAG)
    return float(text) if text is not None else None


def register_model(
    cfg: PipelineConfig,
    bundle_dir: str | os.PathLike,
    metrics: dict[str, float],
    parent_run_id: str | None = None,
    score_key: str | None = "miou_1shot",
    bundle_key: str | None = None,
) -> RegisteredVersion:
    """Log ``bundle_dir`` as a pyfunc model in a ``register`` stage run and register it.

    The new version gets the alias ``candidate``. It also becomes ``champion`` when there is
    no champion yet, when the champion has no score, or when ``metrics[score_key]`` is strictly
    higher than the champion's score under the same key. Scores under different keys (1-shot
    against 5-shot mIoU, or a pseudo-episode score) do not rank each other: the champion then
    stays, and the log says why. ``score_key=None`` registers an unscored version, which becomes
    champion only where there is none.

    ``bundle_key`` (the bundle's train build key) is recorded on the version; a bundle already
    registered under it (by a run killed before it noted the version) is not registered again:
    that version gets the aliases it should have.
    """
    score = None
    if score_key is not None:
        if score_key not in metrics:
            raise KeyError(f"metrics lack the score {score_key!r} that ranks models; got {sorted(metrics)}")
        score = float(metrics[score_key])
        if not math.isfinite(score):
            raise ValueError(f"metrics[{score_key!r}] must be a finite number to rank models, got {score}")
    name = registered_model_name(cfg)
    with stage_run(cfg, "register", parent_run_id):
        client = MlflowClient()
        version = _registered_from(client, name, bundle_key)
        if version is None:
            mlflow.log_metrics({key: float(value) for key, value in metrics.items()})
            info = log_fss_model(bundle_dir)
            tags = {SCORE_TAG: str(score), SCORE_KEY_TAG: score_key} if score_key is not None else {}
            if bundle_key is not None:
                tags[BUNDLE_TAG] = bundle_key
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        else:
            log.info("%s version %s was already registered from %s; not registered again", name, version.version,
                     bundle_dir)
        client.set_registered_model_alias(name, CANDIDATE, version.version)
        champion = _champion_version(client, name)
        if champion is not None and champion.version == version.version:
            champion = None  # it already is the champion
        best = _score_of(champion) if champion is not None else None
        best_key = champion.tags.get(SCORE_KEY_TAG) if champion is not None else None
        comparable = best is not None and score is not None and best_key == score_key
        is_champion = champion is None or best is None or (comparable and score > best)
        if is_champion:
            client.set_registered_model_alias(name, CHAMPION, version.version)
        mlflow.set_tags({"fss.registered_model": name, "fss.registered_version": version.version,
                         "fss.champion": str(is_champion).lower()})
    if champion is not None and best is not None and not comparable:
        log.warning("registered %s version %s (%s) without ranking it: the champion (version %s) is scored by "
                    "%s = %.4f; move the alias by hand if the new version should serve", name, version.version,
                    "unscored" if score is None else f"{score_key} = {score:.4f}", champion.version, best_key, best)
    else:
        log.info("registered %s version %s (%s; champion's was %s): %s", name, version.version,
                 "unscored" if score is None else f"{score_key} = {score:.4f}",
                 "none" if best is None else f"{best:.4f}", "new champion" if is_champion else "champion unchanged")
    return RegisteredVersion(name, int(version.version), f"models:/{name}/{version.version}", score, is_champion)


def _registered_from(client: MlflowClient, name: str, bundle_key: str | None) -> ModelVersion | None:
    """The version registered from the bundle with ``bundle_key``, if there is one."""
    if bundle_key is None:
        return None
    try:
        # MLflow's filter strings have no escapes: a name holding ' is quoted with "
        quote = '"' if "'" in name else "'"
        found = client.search_model_versions(f"name = {quote}{name}{quote} and tags.`{BUNDLE_TAG}` = '{bundle_key}'")
    except MlflowException:  # no such registered model yet
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def champion_score(cfg: PipelineConfig) -> float | None:
    """The champion's score, or None when no model is registered yet."""
    ensure_experiment(cfg)
    champion = _champion_version(MlflowClient(), registered_model_name(cfg))
    return _score_of(champion) if champion is not None else None


def champion_bundle(cfg: PipelineConfig, dest_dir: str | os.PathLike) -> Path | None:
    """Download the champion's model bundle into ``dest_dir`` (replacing what is there).

    Returns ``dest_dir``, loadable with ``load_bundle``, or None when there is no champion.
    """
    ensure_experiment(cfg)
    client = MlflowClient()
    champion = _champion_version(client, registered_model_name(cfg))
    if champion is None:
        return None
    model_root = client.get_model_version_download_uri(champion.name, champion.version)
    dest = Path(dest_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        # The bundle sits where the pyfunc flavour says: artifacts/<bundle folder name>.
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_root}/MLmodel", dst_path=tmp)
        bundle_subpath = Model.load(mlmodel).flavors["python_function"]["artifacts"]["bundle"]["path"]
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_root}/{bundle_subpath}", dst_path=tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(local, dest)
    log.info("champion %s version %s downloaded to %s", champion.name, champion.version, dest)
    return dest
