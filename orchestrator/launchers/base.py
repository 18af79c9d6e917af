"""The launcher interface: submit, poll, cancel, logs and a dry-run rendering, one module per backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobState(StrEnum):
    PENDING = "pending"  # accepted, not started (SLURM PENDING, Ray PENDING)
    RUNNING = "running"
    COMPLETED = "completed"  # the process exited 0
    FAILED = "failed"  # non-zero exit, node failure, out of memory, timeout
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"  # stopped to give resources back (exit 75, SLURM PREEMPTED): resubmit to resume
    LOST = "lost"  # the scheduler knows nothing of it any more and it left no exit status

    @property
    def ended(self) -> bool:
        """No process of this job runs and none will without a new submission."""
        return self not in {JobState.PENDING, JobState.RUNNING}


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    exit_code: int | None = None
    reason: str | None = None
    host: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    restarts: int = 0  # scheduler-side requeues of the same job id (SLURM)


#: sbatch options a run may pass through `resources.extra`; anything else is refused.
SLURM_EXTRA_WHITELIST = frozenset(
    {
        "constraint",
        "exclude",
        "nodelist",
        "reservation",
        "comment",
        "mail_type",
        "mail_user",
        "exclusive",
        "gres",
        "signal",
        "requeue",
        "dependency",
        "begin",
        "nice",
        "licenses",
    }
)


class Resources(BaseModel):
    """What a run asks of its scheduler; each launcher maps it to its own terms."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1, le=1024, description="Nodes (multi-node DDP on SLURM).")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per node; one training process per GPU.")
    cpus_per_task: int = Field(2, ge=1, le=512, description="CPU cores per training process.")
    mem_gb: float = Field(4.0, gt=0, le=4096, description="Memory per node in GiB.")
    time_min: int = Field(60, ge=1, le=60 * 24 * 30, description="Wall-time limit in minutes.")
    partition: str | None = Field(None, max_length=100, description="SLURM partition.")
    account: str | None = Field(None, max_length=100, description="SLURM account.")
    qos: str | None = Field(None, max_length=100, description="SLURM quality of service.")
    extra: dict[str, str] = Field(
        default_factory=dict, description=f"Extra sbatch options, one of: {', '.join(sorted(SLURM_EXTRA_WHITELIST))}."
    )

    @field_validator("extra")
    @classmethod
    def _whitelisted(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(value) - SLURM_EXTRA_WHITELIST)
        if bad:
            raise ValueError(f"sbatch options not allowed: {', '.join(bad)}")
        for key, item in value.items():
            if any(ch in item for ch in "\n\r;&|`$"):
                raise ValueError(f"resources.extra.{key} contains a forbidden character")
        return value

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


@dataclass(frozen=True)
class JobSpec:
    """One attempt of one job, as a command any backend can start."""

    job_id: str
    attempt: int
    name: str
    argv: list[str]  # e.g. [python, -m, orchestrator.jobs, JOB_FOLDER, --attempt, N]
    workdir: Path  # the job's folder (shared with the job)
    resources: Resources
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def key(self) -> str:
        """Unique per (job, attempt): launchers use it to make `submit` idempotent."""
        return f"orch-{self.job_id}-a{self.attempt}"


class LauncherError(RuntimeError):
    """The backend refused or failed an operation; the message says why."""


class Launcher(Protocol):
    name: str

    def submit(self, spec: JobSpec) -> str:
        """Start the job and return the backend's job id. Idempotent on `spec.key`: if that job exists
        already (a service that crashed after submitting), return its id instead of starting another."""
        ...

    def poll(self, job_id: str) -> JobStatus: ...

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """One scheduler query for many jobs where the backend allows it."""
        ...

    def cancel(self, job_id: str) -> None: ...

    def logs(self, job_id: str, tail: int = 200) -> str: ...

    def render(self, spec: JobSpec) -> str:
        """What `submit` would send (sbatch script, Ray job spec, command line), with no side effect."""
        ...

    def capacity(self) -> int | None:
        """How many more jobs it takes now (None = the scheduler queues them itself)."""
        ...
