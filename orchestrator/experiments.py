"""Experiments: named groups of runs, each with the evaluation policy its runs' checkpoints follow."""

from __future__ import annotations

import re
import uuid
import weakref
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.db.models import Experiment
from orchestrator.errors import ConflictError, NotFoundError
from orchestrator.evaluations import validate_policy
from orchestrator.schemas import ExperimentCreate, ExperimentUpdate
from orchestrator.strict import EXPERIMENT_NAME


def get_or_create_experiment(session: Session, name: str, description: str = "") -> Experiment:
    """Race-safe: concurrent first submits to a new experiment create it once (a savepoint absorbs the loser)."""
    found = session.scalar(select(Experiment).where(Experiment.name == name))
    if found is not None:
        return found
    try:
        with session.begin_nested():
            experiment = Experiment(name=name, description=description, eval_policy={})
            session.add(experiment)
        return experiment
    except IntegrityError:
        found = session.scalar(select(Experiment).where(Experiment.name == name))
        if found is None:
            raise
        return found


#: Committed experiment ids by database engine and name. Experiments are never deleted or renamed, so an id
#: once committed stays right; ids seen inside a transaction are staged in `session.info` and join the cache
#: only when that transaction commits (a rolled-back creation must not be remembered).
_COMMITTED_IDS: weakref.WeakKeyDictionary[Engine, dict[str, uuid.UUID]] = weakref.WeakKeyDictionary()
_STAGED = "orchestrator.experiment_ids"


def get_experiment_id(session: Session, name: str) -> uuid.UUID:
    """The experiment's id, created on first use; a name seen in a committed transaction costs no query."""
    engine = session.get_bind()
    committed = _COMMITTED_IDS.get(engine) if isinstance(engine, Engine) else None
    if committed is not None and name in committed:
        return committed[name]
    table = Experiment.__table__
    found: uuid.UUID | None = session.execute(select(table.c.id).where(table.c.name == name)).scalar()
    if found is None:
        found = get_or_create_experiment(session, name).id
    if isinstance(engine, Engine):
        session.info.setdefault(_STAGED, {})[name] = (engine, found)
    return found


@event.listens_for(Session, "after_commit")
def _remember_committed_ids(session: Session) -> None:
    for name, (engine, ident) in session.info.pop(_STAGED, {}).items():
        _COMMITTED_IDS.setdefault(engine, {})[name] = ident


@event.listens_for(Session, "after_soft_rollback")
def _forget_staged_ids(session: Session, previous_transaction: Any) -> None:
    session.info.pop(_STAGED, None)  # a savepoint's too: what it created is gone, and re-reading is cheap


def create_experiment(session: Session, body: ExperimentCreate) -> Experiment:
    validate_policy(body.eval_policy)
    if session.scalar(select(Experiment.id).where(Experiment.name == body.name)) is not None:
        raise ConflictError(f"an experiment named {body.name!r} exists", field="name")
    experiment = Experiment(
        name=body.name, description=body.description, eval_policy=body.eval_policy.model_dump(mode="json")
    )
    session.add(experiment)
    session.flush()
    return experiment


def update_experiment(session: Session, ident: str, body: ExperimentUpdate) -> Experiment:
    if body.eval_policy is not None:
        validate_policy(body.eval_policy)
    found = get_experiment(session, ident)
    if body.description is not None:
        found.description = body.description
    if body.eval_policy is not None:
        found.eval_policy = body.eval_policy.model_dump(mode="json")
    return found


def get_experiment(session: Session, ident: str) -> Experiment:
    """By id or by name; what can be neither (a NUL, a path) is simply not found."""
    query = select(Experiment)
    try:
        query = query.where(Experiment.id == uuid.UUID(ident))
    except ValueError:
        if len(ident) > 200 or re.fullmatch(EXPERIMENT_NAME, ident) is None:
            raise NotFoundError(f"no experiment {ident[:200]!r}") from None
        query = query.where(Experiment.name == ident)
    found = session.scalar(query)
    if found is None:
        raise NotFoundError(f"no experiment {ident!r}")
    return found
