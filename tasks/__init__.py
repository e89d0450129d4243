"""Prefect tasks: thin adapters that load config, call fss_core, write stores, log to MLflow."""
