"""Request and response models of the orchestrator: one source of truth for the REST API and the CLI.

The run config inside a request is `trainer.config.TrainConfig`, the class the trainer itself validates.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from evaluator.config import BenchmarkName, ConfigName
from orchestrator.launchers import LauncherName
from orchestrator.launchers.base import Resources
from orchestrator.lifecycle import Status
from orchestrator.strict import (
    Count,
    ExperimentName,
    FilePath,
    FiniteFloat,
    Host,
    Integer,
    MetricName,
    Name,
    Override,
    Prose,
    Reason,
    SchedulerJobId,
    strict_keys,
)
from trainer.config import TrainConfig
from trainer.presets import preset_names

if TYPE_CHECKING:
    PresetName = str
else:  # the presets that ship with the service: a name from this list, never a path
    PresetName = Literal[tuple(preset_names())]

T = TypeVar("T")


class _Strict(BaseModel):
    """Request bodies: unknown fields refused, no coercion (`false` is not 0, `"2"` is not 2)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EvalSpec(_Strict):
    """One benchmark to run on a run's checkpoints."""

    benchmark: BenchmarkName
    data: FilePath = Field(description="Dataset root (Fashion-MNIST/ImageFolder, COCO or ADE20K layout).")
    config: ConfigName = Field("tiny", description="Benchmark config: 'tiny' (CPU minutes) or 'full' (the paper's).")
    overrides: list[Override] = Field(
        default_factory=list, max_length=100, description="Dotted overrides of the benchmark config."
    )
    every_n_epochs: Integer | None = Field(
        None, ge=1, le=100_000, description="Evaluate every N-th epoch's checkpoint."
    )
    final: bool = Field(True, description="Evaluate the final checkpoint when the run succeeds.")
    launcher: LauncherName | None = Field(None, description="Where evaluations run (default: the service default).")
    resources: Resources = Field(default_factory=Resources, description="Their own partition/QoS/GPUs.")
    max_attempts: Integer = Field(2, ge=1, le=10, description="Attempts before an evaluation is failed.")


class EvalPolicy(_Strict):
    """Which benchmarks run on which checkpoints of an experiment's runs."""

    benchmarks: list[EvalSpec] = Field(default_factory=list, max_length=50)


class ExperimentCreate(_Strict):
    name: ExperimentName = Field(description="Letters, digits, `_.-`, and `/` between segments (`selfpatch/in1k`).")
    description: Prose = ""
    eval_policy: EvalPolicy = Field(
        default_factory=EvalPolicy, description="Which benchmarks run on which checkpoints."
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "selfpatch/fashion-mnist",
                    "description": "tiny ablations",
                    "eval_policy": {
                        "benchmarks": [
                            {"benchmark": "knn", "data": "data/fashion-mnist", "every_n_epochs": 1},
                            {"benchmark": "det", "data": "data/composites", "final": True},
                        ]
                    },
                }
            ]
        },
    )


class ExperimentUpdate(_Strict):
    description: Prose | None = None
    eval_policy: EvalPolicy | None = None


class ExperimentPublic(BaseModel):
    id: uuid.UUID
    name: str
    description: str
    eval_policy: dict[str, Any]
    mlflow_experiment_id: str | None
    created_at: datetime


class RunCreate(_Strict):
    """A pretraining run to record and launch."""

    experiment: ExperimentName = Field("default", description="Experiment name (created if new).")
    name: Name | None = Field(None, description="Readable name; default <method>-<arch>-ep<E>-s<seed>.")
    preset: PresetName | None = Field(None, description="A preset the service ships (configs/) to start from.")
    config: TrainConfig | None = Field(None, description="A complete config (alternative to preset + overrides).")
    overrides: list[Override] = Field(
        default_factory=list, max_length=200, description="Dotted key=value overrides, e.g. selfpatch.k=4."
    )
    launcher: LauncherName | None = Field(
        None, description="Where it runs (local, slurm, ray, dryrun); default from settings."
    )
    resources: Resources = Field(default_factory=Resources)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "experiment": "selfpatch/fashion-mnist",
                    "preset": "tiny_cpu",
                    "overrides": ["optim.epochs=2", "selfpatch.k=4"],
                    "launcher": "local",
                    "resources": {"cpus_per_task": 2, "mem_gb": 4, "time_min": 30},
                }
            ]
        },
    )


class AttemptPublic(BaseModel):
    number: int
    backend: str
    backend_job_id: str | None
    host: str | None
    state: str
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    exit_reason: str | None
    accelerators: int
    accelerator_seconds: float | None


class CheckpointPublic(BaseModel):
    id: uuid.UUID
    attempt: int
    path: str
    epoch: int
    step: int
    sha256: str
    kind: str
    created_at: datetime


class EventPublic(BaseModel):
    id: int
    at: datetime
    kind: str
    from_status: str | None
    to_status: str | None
    actor: str
    reason: str | None
    data: dict[str, Any]


class RunSummary(BaseModel):
    """A run as lists show it: everything but the config (GET /runs/{id} has it), so a page stays small."""

    id: uuid.UUID
    experiment: str
    name: str
    method: str
    status: Status
    status_reason: str | None
    launcher: str
    resources: dict[str, Any]
    config_hash: str
    requeues: int
    retry_of: uuid.UUID | None
    output_dir: str
    progress: dict[str, Any]
    collapsed: str | None = Field(
        None, description="Why the trainer flagged the run as collapsed (DINO's collapse diagnostics), or null."
    )
    mlflow_run_id: str | None
    mlflow_url: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    attempts: list[AttemptPublic] = Field(default_factory=list)


class RunPublic(RunSummary):
    config: dict[str, Any]


class Page(BaseModel, Generic[T]):
    """Cursor pagination: the list is complete when next_page_token is null."""

    items: list[T]
    next_page_token: str | None


class JobReport(BaseModel):
    """What a job tells the service about itself (authenticated with the job's own token).

    Bounded in every field: a report is input from a process the service does not control. Fields of newer
    job versions are ignored; the scheduler job id, when sent, must be the one the launcher recorded.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    kind: Literal["start", "heartbeat", "checkpoint", "end"]
    attempt: Integer = Field(ge=1, le=100_000)
    at: FiniteFloat | None = None
    host: Host | None = None
    pid: Integer | None = Field(None, ge=0, le=2**31)
    job_id: SchedulerJobId | None = None
    iteration: Count | None = None
    total_iterations: Count | None = None
    metrics: dict[MetricName, FiniteFloat] = Field(default_factory=dict, max_length=500, json_schema_extra=strict_keys)
    path: FilePath | None = None
    epoch: Count | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    checkpoint_kind: Literal["epoch", "periodic", "step", "interrupt"] | None = None
    status: Literal["completed", "interrupted", "failed", "stopped"] | None = None
    reason: Reason | None = None


class EvaluationCreate(_Strict):
    """Evaluate one checkpoint now (deduplicated: an identical evaluation is returned, not recomputed)."""

    benchmark: BenchmarkName
    data: FilePath
    config: ConfigName = "tiny"
    overrides: list[Override] = Field(default_factory=list, max_length=100)
    launcher: LauncherName | None = None
    resources: Resources = Field(default_factory=Resources)
    max_attempts: Integer = Field(2, ge=1, le=10)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"benchmark": "knn", "data": "data/fashion-mnist", "config": "tiny"}]},
    )


class EvaluationPublic(BaseModel):
    id: uuid.UUID
    run_id: uuid.UUID
    retry_of: uuid.UUID | None
    checkpoint_id: uuid.UUID
    checkpoint_sha256: str
    checkpoint_epoch: int
    checkpoint_step: int
    benchmark: str
    benchmark_version: str
    config_name: str
    config_hash: str
    dataset: str
    trigger: str
    status: Status
    status_reason: str | None
    error: str | None = Field(description="Why it failed (the last failed attempt's reason while it is retried).")
    launcher: str
    requeues: int
    max_attempts: int
    metrics: dict[str, float]
    mlflow_run_id: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    seconds: float | None
    attempts: list[AttemptPublic] = Field(default_factory=list)


class Comparison(BaseModel):
    """Checkpoints side by side: metrics[name][checkpoint id] (None where not evaluated)."""

    checkpoints: list[CheckpointPublic]
    metrics: dict[str, dict[str, float | None]]


class DryRun(BaseModel):
    """What a submission would do, rendered without side effects."""

    config: dict[str, Any]
    config_hash: str
    launcher: str
    rendered: str
    resources: dict[str, Any]
