"""MLflow as the deep-dive view: one MLflow run per orchestrator run, ids stored in SQL (the source of truth)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.lifecycle import Status

log = logging.getLogger(__name__)

#: How our terminal states show in MLflow.
MLFLOW_STATUS = {
    Status.SUCCEEDED: "FINISHED",
    Status.STOPPED: "FINISHED",  # stopped early by a search: its curve up to there is a finished result
    Status.FAILED: "FAILED",
    Status.CANCELLED: "KILLED",
}


def finish_migration(tracking_uri: str) -> None:
    """MLflow creates a new SQLite store by migrating it in place, so a service killed in those seconds leaves
    a half-migrated file that every later client refuses ("out-of-date database schema"). Finish it, as
    `mlflow db upgrade` would: the store is ours (the embedded default), and the migrations resume from the
    revision the file records."""
    import sqlalchemy
    from mlflow.store.db.utils import _upgrade_db

    log.warning("MLflow store %s was left half-migrated (killed while created): finishing the migration", tracking_uri)
    engine = sqlalchemy.create_engine(tracking_uri)
    try:
        _upgrade_db(engine)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()


class MlflowBridge:
    def __init__(self, tracking_uri: str, ui_url: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.ui_url = ui_url.rstrip("/") if ui_url else None
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            try:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            except Exception as exc:
                if "out-of-date database schema" not in str(exc) or not self.tracking_uri.startswith("sqlite:"):
                    raise
                finish_migration(self.tracking_uri)
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        """Look the experiment up by name, creating it if needed (never assume a name is free: mlflow#2651)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        artifacts = None
        if self.tracking_uri.startswith("sqlite:///"):
            folder = Path(self.tracking_uri.removeprefix("sqlite:///")).parent
            artifacts = (folder / "artifacts").as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=artifacts))
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        return str(run.info.run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_files(self, run_id: str, files: dict[str, bytes]) -> None:
        """Artifacts of a run from bytes (a sweep's report and plots), written through a temporary folder."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="orch-artifacts-") as tmp:
            root = Path(tmp)
            for name, data in files.items():
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.client.log_artifacts(run_id, str(root))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric of a run, in step order (a sweep's training curves)."""
        history = self.client.get_metric_history(run_id, key)
        return sorted((int(m.step), float(m.value)) for m in history)

    def metric_after(self, run_id: str, key: str, step: int, limit: int = 2500) -> list[tuple[int, float]] | None:
        """The points of one metric logged after `step`, read by step range on the store's side (cheap while a
        run's history grows); None when the store cannot or when more than `limit` arrived (MLflow would have
        sampled them): read the whole history then."""
        end = 2**62
        if self.tracking_uri.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(
                f"{self.tracking_uri.rstrip('/')}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                params={
                    "run_ids": run_id,
                    "metric_key": key,
                    "start_step": step + 1,
                    "end_step": end,
                    "max_results": limit,
                },
                timeout=30,
            )
            if response.status_code != 200:
                return None
            rows = [(int(m.get("step", 0)), float(m["value"])) for m in response.json().get("metrics", [])]
        else:
            store = self.client._tracking_client.store
            if not hasattr(store, "get_metric_history_bulk_interval") or not hasattr(store, "ManagedSessionMaker"):
                return None  # only the SQL store samples by range in the database
            found = store.get_metric_history_bulk_interval([run_id], key, limit, step + 1, end)
            rows = [(int(m.step), float(m.value)) for m in found]
        return None if len(rows) >= limit else sorted(rows)

    def terminate(self, run_id: str, status: Status) -> None:
        if status in MLFLOW_STATUS:
            self.client.set_terminated(run_id, MLFLOW_STATUS[status])

    def run_url(self, experiment_id: str | None, run_id: str | None) -> str | None:
        if not (self.ui_url and experiment_id and run_id):
            return None
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"
