"""MLflow tracking for rank 0: flattened params, batched asynchronous metrics, the config, and the final export as
artifacts with its backbone registered (`trainer.registry`)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from trainer.config import TrainConfig, flatten

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_export(self, export_dir: Path, checkpoints: list[dict[str, Any]]) -> None: ...
    def finish(self, status: str) -> None: ...


class NullTracker:
    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_export(self, export_dir: Path, checkpoints: list[dict[str, Any]]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def default_tracking_uri(root: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store inside the local folder ./mlruns (MLflow 3 retired file stores)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = (root or Path.cwd()) / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve()}/mlflow.db"


def params_of(data: dict[str, Any]) -> dict[str, str]:
    """MLflow params: the config as dotted keys, values as text."""
    return {key: str(value) for key, value in flatten(data).items()}


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() or None if sha.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


class MLflowTracker:
    """One MLflow run per training run; a requeued attempt continues it through `logging.run_id`."""

    def __init__(self, cfg: TrainConfig) -> None:
        from mlflow import MlflowClient

        uri = cfg.logging.tracking_uri or default_tracking_uri()
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=uri)
        self._pending: list[Any] = []
        lg = cfg.logging
        if lg.run_id:  # a run created by the orchestrator, or an earlier attempt of this one
            self.run_id: str | None = lg.run_id
            self.client.update_run(lg.run_id, status="RUNNING")
            for key, value in {"orch.config_hash": cfg.config_hash(), "method": cfg.method, **lg.tags}.items():
                self.client.set_tag(lg.run_id, key, value)
            try:
                self.log_params(params_of(cfg.model_dump(mode="json")))
            except Exception as exc:  # params are immutable: a later attempt may differ in e.g. output paths
                log.warning("MLflow params not (re)logged: %s", exc)
        else:
            experiment = self.client.get_experiment_by_name(lg.experiment)
            if experiment is None:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = Path(uri.removeprefix("sqlite:///")).parent.joinpath("artifacts").as_uri()
                experiment_id = self.client.create_experiment(lg.experiment, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
            tags = {"orch.config_hash": cfg.config_hash(), "method": cfg.method, **lg.tags}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            run = self.client.create_run(experiment_id, run_name=lg.run_name or cfg.default_run_name(), tags=tags)
            self.run_id = run.info.run_id
            self.log_params(params_of(cfg.model_dump(mode="json")))
        self.tracking_uri = uri

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])  # type: ignore[arg-type]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))  # type: ignore[arg-type]
        if len(self._pending) > 64:
            self._drain(keep=16)

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            operation = self._pending.pop(0)
            if operation is not None:
                operation.wait()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self.run_id:
            self.client.set_tag(self.run_id, key, value)

    def log_export(self, export_dir: Path, checkpoints: list[dict[str, Any]]) -> None:
        """The final export as artifacts, the checkpoints as links, the backbone registered. Never fatal: the run
        folder holds the same files, and a training that completed stays completed."""
        from trainer.registry import log_export, register_export

        assert self.run_id is not None
        lg = self.cfg.logging
        try:
            manifest = log_export(
                self.client, self.run_id, export_dir, checkpoints, export_dir.parent, files=lg.export_artifacts
            )
        except Exception as exc:
            log.warning("MLflow: export not logged: %s", exc)
            return
        if not (lg.register_model and lg.export_artifacts):
            return
        try:
            experiment = self.client.get_experiment(self.client.get_run(self.run_id).info.experiment_id).name
            extra = {k: v for k, v in lg.tags.items() if k in ("orch.run_id", "orch.sweep_id", "orch.arm", "orch.seed")}
            version = register_export(self.client, self.run_id, experiment, manifest, extra)
            log.info("MLflow: registered models:/%s/%s", version.name, version.version)
        except Exception as exc:
            log.warning("MLflow: backbone not registered: %s", exc)

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED (a preempted attempt leaves the run RUNNING for its successor)."""
        self._drain()
        if status != "RUNNING":
            self.client.set_terminated(self.run_id, status)  # type: ignore[arg-type]


def build_tracker(cfg: TrainConfig, is_main: bool) -> Tracker:
    if not (cfg.logging.mlflow and is_main):
        return NullTracker()
    return MLflowTracker(cfg)
