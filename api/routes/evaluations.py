"""Evaluations of checkpoints: list, show, compare side by side, ask for one; the benchmark catalogue."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import Admin, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from api.routes.runs import IdempotencyKey
from orchestrator.db.models import Checkpoint, Evaluation
from orchestrator.evaluations import compare, get_checkpoint, get_evaluation, request
from orchestrator.schemas import CheckpointPublic, Comparison, EvaluationCreate, EvaluationPublic, Page
from orchestrator.service import InvalidInputError, encode_cursor, get_run, page_after

router = APIRouter(tags=["evaluations"])


def evaluation_public(evaluation: Evaluation) -> EvaluationPublic:
    return EvaluationPublic(
        id=evaluation.id,
        run_id=evaluation.run_id,
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
        status=evaluation.status,
        launcher=evaluation.launcher,
        attempts=evaluation.attempts,
        max_attempts=evaluation.max_attempts,
        metrics=evaluation.metrics,
        error=evaluation.error,
        mlflow_run_id=evaluation.mlflow_run_id,
        created_at=evaluation.created_at,
        started_at=evaluation.started_at,
        ended_at=evaluation.ended_at,
        seconds=evaluation.seconds,
    )


@router.get("/evaluations", response_model=Page[EvaluationPublic], summary="List evaluations, newest first")
def list_(
    session: SessionDep,
    _: Reader,
    run_id: uuid.UUID | None = None,
    benchmark: str | None = None,
    status: str | None = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: str | None = None,
) -> Page[EvaluationPublic]:
    query = select(Evaluation)
    if run_id is not None:
        query = query.where(Evaluation.run_id == run_id)
    if benchmark:
        query = query.where(Evaluation.benchmark == benchmark)
    if status:
        query = query.where(Evaluation.status == status)
    query = page_after(query, Evaluation.created_at, Evaluation.id, page_token, uuid.UUID).limit(page_size + 1)
    rows = list(session.scalars(query))
    more = len(rows) > page_size
    rows = rows[:page_size]
    token = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
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
    summary="Evaluate a checkpoint (200 with the existing record if this exact evaluation exists)",
    responses={200: {"description": "Already evaluated or under way: nothing new is computed"}},
)
def create(
    checkpoint_id: str,
    body: EvaluationCreate,
    state: StateDep,
    principal: Admin,
    request_: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    def work(session: Any) -> tuple[int, dict[str, Any]]:
        checkpoint = session.get(Checkpoint, get_checkpoint(session, checkpoint_id).id)
        run = get_run(session, checkpoint.run_id)
        evaluation, created = request(session, state.settings, run, checkpoint, body, "manual", f"api:{principal.name}")
        data: dict[str, Any] = evaluation_public(evaluation).model_dump(mode="json")
        return (202 if created else 200), data

    return idempotent_post(state, principal, request_, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/benchmarks", summary="Benchmark definitions: name, version, configs and their hashes")
def benchmarks(_: Reader) -> list[dict[str, Any]]:
    from evaluator.benchmarks import describe

    return describe()
