-- Runs once, when the Postgres data volume is first initialised (as POSTGRES_USER).
-- The entrypoint already created POSTGRES_DB (mlflow); Prefect gets its own database.
CREATE DATABASE prefect;
