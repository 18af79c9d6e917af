"""What the REST API returns about sweeps."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from orchestrator.schemas import AttemptPublic


class TrialCell(BaseModel):
    """One (arm, seed): its latest trial."""

    arm: str
    seed: int
    run_id: uuid.UUID
    status: str
    primary: float | None
    accelerator_hours: float


class SweepPublic(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    status_reason: str | None
    spec_hash: str
    spec: dict[str, Any]
    experiment: str
    arms: list[str]
    seeds: list[int]
    baseline: str
    primary_metric: str
    search: SearchPublic | None = None
    plots: list[str] = []  # names for /sweeps/{id}/plots/{name}.png|svg
    counts: dict[str, int]  # trials per status
    trials: list[TrialCell]
    accelerator_hours: float
    budget_hours: float | None
    mlflow_run_id: str | None
    mlflow_url: str | None
    created_by: str
    created_at: datetime
    ended_at: datetime | None


class SweepCreated(BaseModel):
    sweep: SweepPublic
    created: bool
    added: int


class PlannedTrial(BaseModel):
    arm: str
    seed: int
    config_hash: str
    overrides: list[str]
    hours: float
    accelerator_hours: float


class SweepPlan(BaseModel):
    """A dry run: what `create` would record and launch; nothing is written."""

    name: str
    spec_hash: str
    exists: str  # "no", "same" (nothing to do), "extension" or "conflict"
    trials: list[PlannedTrial]  # an ablation's (a search samples its trials as it runs)
    search: str | None = None  # a search: its space, sampler, scheduler and objective
    rendered: str  # the submission of the first trial (of a search: its driver job)
    estimate_hours: float
    estimate_accelerator_hours: float
    assumption: str


class SweepEventPublic(BaseModel):
    id: int
    at: datetime
    kind: str
    actor: str
    reason: str | None
    data: dict[str, Any]


class SearchPublic(BaseModel):
    """The driver job of a search sweep (a Ray Tune experiment)."""

    id: uuid.UUID
    sweep_id: uuid.UUID
    status: str
    status_reason: str | None
    launcher: str
    requeues: int
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    attempts: list[AttemptPublic]
