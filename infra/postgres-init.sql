-- Runs once, when the postgres volume is first created (docker-entrypoint-initdb.d).
-- The `mlflow` database is POSTGRES_DB; this adds one for Optuna studies (search.storage).
CREATE DATABASE optuna OWNER mlflow;
