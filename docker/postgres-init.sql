-- A second database on the same server for MLflow's own tables.
CREATE DATABASE mlflow OWNER orch;
