"""Evaluations of checkpoints: list, show, compare, ask for one, cancel, retry; their attempts, events and
logs; the report endpoint their jobs call; the benchmark catalogue."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Admin, IdempotencyKey, PageToken, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from api.routes.jobs import add_job_routes, attempts_of
from evaluator.config import BenchmarkName
from orchestrator.db.models import Evaluation, Job
from orchestrator.errors import InvalidInputError
from orchestrator.evaluations import compare, error_of, get_checkpoint, get_evaluation, request, retry_evaluation
from orchestrator.lifecycle import Status
from orchestrator.pages import page, page_after
from orchestrator.runs import get_run
from orchestrator.schemas import (
    CheckpointPublic,
    Comparison,
    EvaluationCreate,
    EvaluationPublic,
    Page,
)

router = APIRouter(tags=["evaluations"])
jobs_router = APIRouter(prefix="/evaluations")


def evaluation_public(evaluation: Evaluation) -> EvaluationPublic:
    return EvaluationPublic(
        id=evaluation.id,
        run_id=evaluation.run_id,
        retry_of=evaluation.retry_of_id,
        checkpoint_id=evaluation.checkpoint_id,
        checkpoint_sha256=evaluation.checkpoint_sha256,
        checkpoint_epoch=evaluation.checkpoint.epoch,
        checkpoint_step=evaluation.checkpoint.step,
        benchmark=evaluation.benchmark,
        benchmark_version=evaluation.benchmark_version,
        config_name=evaluation.config_name,
        config_hash=evaluation.config_hash,
        dataset=evaluation.dataset,
        trigger=evaluation.trigger,
        status=Status(evaluation.status),
        status_reason=evaluation.status_reason,
        error=error_of(evaluation),
        launcher=evaluation.launcher,
        requeues=evaluation.requeues,
        max_attempts=evaluation.max_attempts,
        metrics=evaluation.metrics,
        mlflow_run_id=evaluation.mlflow_run_id,
        created_by=evaluation.created_by,
        created_at=evaluation.created_at,
        started_at=evaluation.started_at,
        ended_at=evaluation.ended_at,
        seconds=evaluation.seconds,
        attempts=attempts_of(evaluation),
    )


def _dump(evaluation: Evaluation) -> dict[str, Any]:
    data: dict[str, Any] = evaluation_public(evaluation).model_dump(mode="json")
    return data


@router.get("/evaluations", response_model=Page[EvaluationPublic], summary="List evaluations, newest first")
def list_(
    session: SessionDep,
    _: Reader,
    run_id: uuid.UUID | None = None,
    benchmark: BenchmarkName | None = None,
    status: Status | None = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: PageToken = None,
) -> Page[EvaluationPublic]:
    query = select(Evaluation)
    if run_id is not None:
        query = query.where(Evaluation.run_id == run_id)
    if benchmark:
        query = query.where(Evaluation.benchmark == benchmark)
    if status:
        query = query.where(Evaluation.status == status.value)
    query = page_after(query, Job.created_at, Job.id, page_token, uuid.UUID).limit(page_size + 1)
    rows, token = page(list(session.scalars(query)), page_size)
    return Page[EvaluationPublic](items=[evaluation_public(e) for e in rows], next_page_token=token)


@router.get("/evaluations/compare", response_model=Comparison, summary="Checkpoints side by side")
def compare_(
    session: SessionDep,
    _: Reader,
    checkpoint: Annotated[list[str], Query(description="Checkpoint ids (repeat the parameter).")],
) -> Comparison:
    if len(checkpoint) < 1:
        raise InvalidInputError("give at least one checkpoint", field="checkpoint")
    checkpoints, table = compare(session, checkpoint)
    return Comparison(
        checkpoints=[CheckpointPublic.model_validate(c, from_attributes=True) for c in checkpoints], metrics=table
    )


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationPublic, summary="Show one evaluation")
def show(evaluation_id: str, session: SessionDep, _: Reader) -> EvaluationPublic:
    return evaluation_public(get_evaluation(session, evaluation_id))


@router.post(
    "/evaluations/{evaluation_id}/retry",
    response_model=EvaluationPublic,
    status_code=202,
    summary="Evaluate again after a failure or cancel (a new evaluation linked by retry_of)",
)
def retry(
    evaluation_id: str,
    state: StateDep,
    principal: Admin,
    request_: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    def work(session: Session) -> tuple[int, dict[str, Any]]:
        old = get_evaluation(session, evaluation_id, lock=True)
        return 202, _dump(retry_evaluation(session, state.settings, old, f"api:{principal.name}"))

    return idempotent_post(state, principal, request_, idempotency_key, {"retry": evaluation_id}, work)


@router.get("/runs/{run_id}/evaluations", response_model=list[EvaluationPublic], summary="Evaluations of a run")
def of_run(run_id: str, session: SessionDep, _: Reader) -> list[EvaluationPublic]:
    run = get_run(session, run_id)
    rows = session.scalars(select(Evaluation).where(Evaluation.run_id == run.id).order_by(Evaluation.created_at))
    return [evaluation_public(e) for e in rows]


@router.get(
    "/checkpoints/{checkpoint_id}/evaluations",
    response_model=list[EvaluationPublic],
    summary="Evaluations of a checkpoint (by content: the same sha256 anywhere counts)",
)
def of_checkpoint(checkpoint_id: str, session: SessionDep, _: Reader) -> list[EvaluationPublic]:
    checkpoint = get_checkpoint(session, checkpoint_id)
    rows = session.scalars(
        select(Evaluation).where(Evaluation.checkpoint_sha256 == checkpoint.sha256).order_by(Evaluation.created_at)
    )
    return [evaluation_public(e) for e in rows]


@router.post(
    "/checkpoints/{checkpoint_id}/evaluations",
    response_model=EvaluationPublic,
    status_code=202,
    summary="Evaluate a checkpoint (200 with the existing record if this exact evaluation is live)",
    responses={
        200: {"model": EvaluationPublic, "description": "Already evaluated or under way: nothing new is computed"}
    },
)
def create(
    checkpoint_id: str,
    body: EvaluationCreate,
    state: StateDep,
    principal: Admin,
    request_: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    def work(session: Session) -> tuple[int, dict[str, Any]]:
        checkpoint = get_checkpoint(session, checkpoint_id)
        run = get_run(session, checkpoint.run_id)
        evaluation, created = request(session, state.settings, run, checkpoint, body, "manual", f"api:{principal.name}")
        return (202 if created else 200), _dump(evaluation)

    return idempotent_post(state, principal, request_, idempotency_key, body, work)


@router.get("/benchmarks", summary="Benchmark definitions: name, version, configs and their hashes")
def benchmarks(_: Reader) -> list[dict[str, Any]]:
    from evaluator.config import describe

    return describe()


add_job_routes(
    jobs_router, Evaluation, "evaluation", lambda evaluation, _: evaluation_public(evaluation), EvaluationPublic
)
router.include_router(jobs_router)
