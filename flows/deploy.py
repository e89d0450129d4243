"""Deployments: the pipeline for manual runs from the Prefect UI, retraining on a schedule.

``fss serve`` calls :func:`serve_deployments`; it is a long-running process that polls the
Prefect server (``PREFECT_API_URL``) and runs triggered or scheduled flow runs.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.pipeline import pipeline


def build_deployments(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dask_address: str | None = None,
    retrain_cron: str | None = "0 2 * * *",
) -> list[RunnerDeployment]:
    """The deployments ``fss serve`` serves; parameters are editable per run in the UI.

    ``overrides`` (what ``fss serve --set``/``--mlflow-tracking-uri`` give) become the flows'
    ``serve_overrides``, and each run's own ``overrides`` start empty: Prefect replaces a
    parameter a custom run sets, so a run's overrides must not be where the workspace is."""
    params = {"config_path": config_path, "serve_overrides": list(overrides or []), "overrides": [],
              "dask_address": dask_address}
    deployments = [
        pipeline.to_deployment(
            name="manual",
            parameters=params,
            description="The whole pipeline; start it from the UI with a config path and overrides.",
            tags=["fss"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    ]
    # Imported here, not at the top, but never optional: an import error in its modules is a bug
    # to report, not a reason to serve without the scheduled retrain.
    from flows.retrain import retrain

    deployments.append(
        retrain.to_deployment(
            name="scheduled",
            cron=retrain_cron,
            parameters=params,
            description="Retrain when enough new unlabeled images have arrived.",
            tags=["fss"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    )
    return deployments


def serve_deployments(**kwargs) -> None:
    serve(*build_deployments(**kwargs))
