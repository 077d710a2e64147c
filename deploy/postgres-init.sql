-- Run once by the postgres image, on an empty data volume, as POSTGRES_USER (digit), who owns what it creates.
-- POSTGRES_DB (mlflow) exists already: MLflow's runs. Here: the MLflow server's login users, and the Optuna studies.
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
