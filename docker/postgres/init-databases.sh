#!/bin/sh
# Runs once, when the Postgres volume is empty: one database and one user per service.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE USER labelstudio WITH PASSWORD '${LABEL_STUDIO_DB_PASSWORD}';
CREATE DATABASE labelstudio OWNER labelstudio;
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
CREATE USER prefect WITH PASSWORD '${PREFECT_DB_PASSWORD}';
CREATE DATABASE prefect OWNER prefect;
SQL
