"""Experiments: named groups of runs (one MLflow experiment each)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import Admin, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from orchestrator.db.models import Experiment
from orchestrator.evaluations import validate_policy
from orchestrator.schemas import ExperimentCreate, ExperimentPublic, ExperimentUpdate, Page
from orchestrator.service import create_experiment, encode_cursor, get_experiment, page_after

router = APIRouter(prefix="/experiments", tags=["experiments"])


def experiment_public(experiment: Experiment) -> ExperimentPublic:
    return ExperimentPublic.model_validate(experiment, from_attributes=True)


@router.post("", status_code=201, response_model=ExperimentPublic, summary="Create an experiment")
def create(
    body: ExperimentCreate,
    state: StateDep,
    principal: Admin,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    if body.eval_policy.benchmarks:
        validate_policy(body.eval_policy)

    def work(session: Any) -> tuple[int, dict[str, Any]]:
        data: dict[str, Any] = experiment_public(create_experiment(session, body)).model_dump(mode="json")
        return 201, data

    return idempotent_post(state, principal, request, idempotency_key, body.model_dump(mode="json"), work)


@router.get("", response_model=Page[ExperimentPublic], summary="List experiments, newest first")
def list_(
    session: SessionDep,
    _: Reader,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: str | None = None,
) -> Page[ExperimentPublic]:
    import uuid

    query = page_after(select(Experiment), Experiment.created_at, Experiment.id, page_token, uuid.UUID)
    rows = list(session.scalars(query.limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    token = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return Page[ExperimentPublic](items=[experiment_public(e) for e in rows], next_page_token=token)


@router.patch("/{experiment}", response_model=ExperimentPublic, summary="Change the description or evaluation policy")
def update(experiment: str, body: ExperimentUpdate, state: StateDep, _: Admin) -> ExperimentPublic:
    if body.eval_policy is not None:
        validate_policy(body.eval_policy)
    with state.db.transaction() as session:
        found = get_experiment(session, experiment)
        if body.description is not None:
            found.description = body.description
        if body.eval_policy is not None:
            found.eval_policy = body.eval_policy.model_dump(mode="json")
        return experiment_public(found)


@router.get("/{experiment}", response_model=ExperimentPublic, summary="Show an experiment (id or name)")
def show(experiment: str, session: SessionDep, _: Reader) -> ExperimentPublic:
    return experiment_public(get_experiment(session, experiment))
