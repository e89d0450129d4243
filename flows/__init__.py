"""Prefect flows: composition of the tasks into the pipeline, retraining and deployments."""
