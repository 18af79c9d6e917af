"""The launcher interface: submit, poll, cancel, logs and a dry-run rendering, one module per backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from trainer.config import Integer


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
    exit_code: Integer | None = None
    reason: str | None = None
    host: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    restarts: int = 0  # scheduler-side requeues of the same job id (SLURM)


#: SLURM names (partition, account, QoS, reservation): sbatch's own grammar, nothing a shell could read.
SLURM_NAME = r"^[A-Za-z0-9_.\-]+$"
_NODES = r"^[A-Za-z0-9_.,\[\]\-]+$"
#: The sbatch options a run may pass through `resources.extra`, each with the grammar of its value; every
#: other option is refused. Values land in `#SBATCH` lines: no newline, quote, `$`, backtick or `;` passes.
SLURM_EXTRA: dict[str, str] = {
    "constraint": r"^[A-Za-z0-9_.,&|()\[\]*:\-]+$",
    "exclude": _NODES,
    "nodelist": _NODES,
    "reservation": SLURM_NAME,
    "comment": r"^[^\x00-\x1f\x7f'\"\\$`;&|]*$",
    "mail_type": r"^[A-Z_0-9,]+$",
    "mail_user": r"^[A-Za-z0-9_.+\-]+@[A-Za-z0-9_.\-]+$",
    "exclusive": r"^(|true|false|user|mcs|topo)$",
    "gres": r"^[A-Za-z0-9_:,.\-]+$",
    "signal": r"^(R:)?(SIG)?(USR1|USR2)(@[0-9]{1,5})?$",
    "requeue": r"^(1|0|true|false|yes|no|on|off)$",
    "dependency": r"^[A-Za-z0-9_:,?+\-]+$",
    "begin": r"^[A-Za-z0-9_:+.\-]+$",
    "nice": r"^-?[0-9]{1,5}$",
    "licenses": r"^[A-Za-z0-9_:,@.\-]+$",
}
SLURM_EXTRA_WHITELIST = frozenset(SLURM_EXTRA)


class SlurmExtra(BaseModel):
    """Extra sbatch options (the whitelist of `SLURM_EXTRA`, each value checked against its grammar)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    constraint: Annotated[str, StringConstraints(max_length=200, pattern=SLURM_EXTRA["constraint"])] | None = None
    exclude: Annotated[str, StringConstraints(max_length=1000, pattern=SLURM_EXTRA["exclude"])] | None = None
    nodelist: Annotated[str, StringConstraints(max_length=1000, pattern=SLURM_EXTRA["nodelist"])] | None = None
    reservation: Annotated[str, StringConstraints(max_length=100, pattern=SLURM_EXTRA["reservation"])] | None = None
    comment: Annotated[str, StringConstraints(max_length=500, pattern=SLURM_EXTRA["comment"])] | None = None
    mail_type: Annotated[str, StringConstraints(max_length=100, pattern=SLURM_EXTRA["mail_type"])] | None = None
    mail_user: Annotated[str, StringConstraints(max_length=200, pattern=SLURM_EXTRA["mail_user"])] | None = None
    exclusive: Annotated[str, StringConstraints(max_length=10, pattern=SLURM_EXTRA["exclusive"])] | None = None
    gres: Annotated[str, StringConstraints(max_length=200, pattern=SLURM_EXTRA["gres"])] | None = None
    signal: Annotated[str, StringConstraints(max_length=30, pattern=SLURM_EXTRA["signal"])] | None = None
    requeue: Annotated[str, StringConstraints(max_length=10, pattern=SLURM_EXTRA["requeue"])] | None = None
    dependency: Annotated[str, StringConstraints(max_length=500, pattern=SLURM_EXTRA["dependency"])] | None = None
    begin: Annotated[str, StringConstraints(max_length=50, pattern=SLURM_EXTRA["begin"])] | None = None
    nice: Annotated[str, StringConstraints(max_length=6, pattern=SLURM_EXTRA["nice"])] | None = None
    licenses: Annotated[str, StringConstraints(max_length=200, pattern=SLURM_EXTRA["licenses"])] | None = None

    @model_validator(mode="before")
    @classmethod
    def _whitelisted(cls, value: Any) -> Any:
        if isinstance(value, dict):
            bad = sorted(set(value) - SLURM_EXTRA_WHITELIST)
            if bad:
                raise ValueError(f"sbatch options not allowed: {', '.join(map(str, bad))[:200]}")
        return value

    def options(self) -> dict[str, str]:
        """The options that are set, as sbatch names them."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Resources(BaseModel):
    """What a run asks of its scheduler; each launcher maps it to its own terms."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    nodes: Integer = Field(1, ge=1, le=1024, description="Nodes (multi-node DDP on SLURM).")
    gpus_per_node: Integer = Field(0, ge=0, le=16, description="GPUs per node; one training process per GPU.")
    cpus_per_task: Integer = Field(2, ge=1, le=512, description="CPU cores per training process.")
    mem_gb: float = Field(4.0, gt=0, le=4096, description="Memory per node in GiB.")
    time_min: Integer = Field(60, ge=1, le=60 * 24 * 30, description="Wall-time limit in minutes.")
    partition: Annotated[str, StringConstraints(max_length=100, pattern=SLURM_NAME)] | None = Field(
        None, description="SLURM partition."
    )
    account: Annotated[str, StringConstraints(max_length=100, pattern=SLURM_NAME)] | None = Field(
        None, description="SLURM account."
    )
    qos: Annotated[str, StringConstraints(max_length=100, pattern=SLURM_NAME)] | None = Field(
        None, description="SLURM quality of service."
    )
    extra: SlurmExtra = Field(default_factory=SlurmExtra, description="Extra sbatch options (a whitelist).")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    def extra_options(self) -> dict[str, str]:
        """The extra sbatch options; a Resources built without validation is checked again by the launcher."""
        extra: Any = self.extra
        if isinstance(extra, SlurmExtra):
            return extra.options()
        return {str(k): str(v) for k, v in dict(extra).items() if v is not None}


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


@runtime_checkable
class ArrayLauncher(Protocol):
    """A backend that can send many jobs with the same resources as one array (SLURM `--array=0-N%P`)."""

    def submit_array(self, specs: list[JobSpec], parallelism: int) -> list[str]:
        """Submit the specs as one array running at most `parallelism` at once; one job id per spec, in
        order. Idempotent on each spec's key, like `submit`: a spec already submitted keeps its id."""
        ...
