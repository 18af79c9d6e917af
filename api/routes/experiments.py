"""Experiments: named groups of runs (one MLflow experiment each)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import Admin, IdempotencyKey, PageToken, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from orchestrator.db.models import Experiment
from orchestrator.experiments import create_experiment, get_experiment, update_experiment
from orchestrator.pages import page, page_after
from orchestrator.schemas import ExperimentCreate, ExperimentPublic, ExperimentUpdate, Page

router = APIRouter(prefix="/experiments", tags=["experiments"])


def experiment_public(experiment: Experiment) -> ExperimentPublic:
    return ExperimentPublic.model_validate(experiment, from_attributes=True)


@router.post("", status_code=201, response_model=ExperimentPublic, summary="Create an experiment")
def create(
    body: ExperimentCreate,
    state: StateDep,
    principal: Admin,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    def work(session: Any) -> tuple[int, dict[str, Any]]:
        data: dict[str, Any] = experiment_public(create_experiment(session, body)).model_dump(mode="json")
        return 201, data

    return idempotent_post(state, principal, request, idempotency_key, body, work)


@router.get("", response_model=Page[ExperimentPublic], summary="List experiments, newest first")
def list_(
    session: SessionDep,
    _: Reader,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: PageToken = None,
) -> Page[ExperimentPublic]:
    query = page_after(select(Experiment), Experiment.created_at, Experiment.id, page_token, uuid.UUID)
    rows, token = page(list(session.scalars(query.limit(page_size + 1))), page_size)
    return Page[ExperimentPublic](items=[experiment_public(e) for e in rows], next_page_token=token)


@router.patch("/{experiment}", response_model=ExperimentPublic, summary="Change the description or evaluation policy")
def update(experiment: str, body: ExperimentUpdate, state: StateDep, _: Admin) -> ExperimentPublic:
    with state.db.transaction() as session:
        return experiment_public(update_experiment(session, experiment, body))


@router.get("/{experiment}", response_model=ExperimentPublic, summary="Show an experiment (id or name)")
def show(experiment: str, session: SessionDep, _: Reader) -> ExperimentPublic:
    return experiment_public(get_experiment(session, experiment))
