"""A service without a scheduler: SQLite, the real reconciler, a FakeLauncher for every launcher name and a
recording stand-in for MLflow. Tests drive jobs through every branch in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Event, Job, Run
from orchestrator.db.session import Database
from orchestrator.jobs.fake import FakeArrayLauncher
from orchestrator.jobs.kinds import Context
from orchestrator.jobs.records import apply_report, get_job
from orchestrator.launchers import Launchers
from orchestrator.launchers.tune import TuneTrialLauncher
from orchestrator.lifecycle import Status
from orchestrator.mlflow_bridge import MLFLOW_STATUS
from orchestrator.reconciler import Reconciler
from orchestrator.runs import submit_run
from orchestrator.schemas import JobReport, RunCreate
from orchestrator.settings import Settings
from tests.support import MICRO, make_settings


@dataclass
class RecordingMlflow:
    """Stands in for the MLflow bridge: records what the reconciler tells MLflow."""

    tracking_uri: str = "sqlite:///unused.db"
    runs: dict[str, str] = field(default_factory=dict)  # run id -> status
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> tags it was created with
    artifacts: dict[str, dict[str, bytes]] = field(default_factory=dict)  # run id -> logged files
    histories: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)  # (run, key) -> curve
    fail: bool = False

    def experiment_id(self, name: str) -> str:
        return "1"

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        run_id = f"mlflow-{len(self.runs)}"
        self.runs[run_id] = "RUNNING"
        self.tags[run_id] = {"mlflow.runName": name, **tags}
        return run_id

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.histories.get((run_id, key), [])

    def log_files(self, run_id: str, files: dict[str, bytes]) -> None:
        self.artifacts.setdefault(run_id, {}).update(files)

    def terminate(self, run_id: str, status: Status) -> None:
        if self.fail:
            raise RuntimeError("MLflow is down")
        self.runs[run_id] = MLFLOW_STATUS.get(status, "KILLED")

    def run_url(self, experiment_id: str | None, run_id: str | None) -> str | None:
        return None


class Harness:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.settings: Settings = make_settings(tmp / "home", f"sqlite:///{tmp / 'orch.db'}", **settings)
        upgrade(self.settings.db_url)
        self.db = Database(self.settings.db_url)
        self.fake = FakeArrayLauncher()
        self.mlflow = RecordingMlflow()
        alone = self.fake.one_at_a_time()
        self.tune = TuneTrialLauncher(self.settings.runs_root)  # the real one: a mailbox in each trial's folder
        launchers = Launchers(
            self.settings, fixed={"local": alone, "ray": alone, "slurm": self.fake, "tune": self.tune}
        )
        self.ctx = Context(self.settings, self.mlflow)  # type: ignore[arg-type]
        self.reconciler = Reconciler(self.settings, self.db, launchers, self.mlflow)  # type: ignore[arg-type]

    def submit(self, *overrides: str, launcher: str = "local", gpus: int = 1) -> Any:
        body = RunCreate.model_validate(
            {
                "preset": "tiny_cpu",
                "overrides": [*MICRO, *overrides],
                "launcher": launcher,
                "resources": {"gpus_per_node": gpus},
            }
        )
        with self.db.transaction() as session:
            return submit_run(session, self.settings, body, "alice").id

    def tick(self, passes: int = 1) -> None:
        for _ in range(passes):
            stats = self.reconciler.reconcile_once()
            assert not stats.errors, stats.errors

    def job(self, job_id: Any) -> Job:
        with self.db.sessions() as session:
            job = get_job(session, Job, job_id, "job")
            if isinstance(job, Run):
                _ = job.checkpoints, job.experiment
            return job

    def statuses(self, job_id: Any) -> list[str]:
        with self.db.sessions() as session:
            events = session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
            return [e.to_status for e in events if e.to_status]

    def scheduler_id(self, job_id: Any) -> str:
        return self.fake.job_of(job_id)

    def report(self, job_id: Any, **report: Any) -> None:
        with self.db.transaction() as session:
            job = get_job(session, Job, job_id, "job", lock=True)
            apply_report(Context(self.settings, None), session, job, JobReport.model_validate(report))

    def final_checkpoint(self, job_id: Any) -> str:
        """A file where the trainer would leave the final checkpoint."""
        run = self.job(job_id)
        assert isinstance(run, Run)
        path = Path(run.output_dir) / "checkpoint.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return str(path)
