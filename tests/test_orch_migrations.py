"""Schema migrations keep every row: a database filled at revision 0002 (runs and evaluations as separate
records) upgrades to the job layer (0003), and on to the head, on SQLite and PostgreSQL with nothing lost."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Attempt, Checkpoint, Evaluation, Event, Job, Run
from orchestrator.db.session import Database
from orchestrator.lifecycle import Status

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _ident(engine: sa.engine.Engine, value: uuid.UUID) -> str:
    """How SQLAlchemy's Uuid type stores an id on this backend (hex on SQLite, uuid on PostgreSQL)."""
    return value.hex if engine.dialect.name == "sqlite" else str(value)


def _fill_revision_0002(url: str) -> dict[str, uuid.UUID]:
    upgrade(url, "0002")
    engine = sa.create_engine(url)
    ids = {name: uuid.uuid4() for name in ("experiment", "run", "retry", "ckpt", "eval_ok", "eval_failed", "eval_busy")}
    at = [(T0 + timedelta(minutes=i)).isoformat() for i in range(6)]

    def row(table: str, **values: object) -> None:
        columns = ", ".join(values)
        params = ", ".join(f":{k}" for k in values)
        conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({params})"), values)

    u = {k: _ident(engine, v) for k, v in ids.items()}
    with engine.begin() as conn:
        row("experiments", id=u["experiment"], name="exp", description="", eval_policy="{}", created_at=at[0])
        for key, status, retry_of in (("run", "failed", None), ("retry", "succeeded", u["run"])):
            row(
                "runs",
                id=u[key],
                experiment_id=u["experiment"],
                name=key,
                method="selfpatch",
                config=json.dumps({"seed": 0}),
                config_hash="h" * 64,
                launcher="local",
                resources="{}",
                status=status,
                status_reason=f"{key} ended",
                requeues=1 if key == "run" else 0,
                retry_of_id=retry_of,
                output_dir=f"/srv/runs/{ids[key]}/train",
                progress="{}",
                created_by="alice",
                created_at=at[1],
                updated_at=at[2],
            )
        for number in (1, 2):
            row(
                "attempts",
                id=_ident(engine, uuid.uuid4()),
                run_id=u["run"],
                number=number,
                backend="local",
                backend_job_id=f"job-{number}",
                state="ended",
                submitted_at=at[2],
                accelerators=1,
                accelerator_seconds=60.0 * number,
            )
        row(
            "checkpoints",
            id=u["ckpt"],
            run_id=u["retry"],
            attempt=1,
            path="/srv/c/checkpoint0000.pth",
            epoch=1,
            step=8,
            sha256="a" * 64,
            kind="epoch",
            created_at=at[3],
        )
        for event_id, run in ((1, "run"), (2, "run"), (3, "retry")):
            row(
                "events",
                id=event_id,
                run_id=u[run],
                at=at[3],
                kind="transition",
                to_status="queued",
                actor="alice",
                data="{}",
            )
        for key, status, attempts, error in (
            ("eval_ok", "succeeded", 1, None),
            ("eval_failed", "failed", 2, "corrupt checkpoint"),
            ("eval_busy", "submitting", 1, None),
        ):
            row(
                "evaluations",
                id=u[key],
                dedup_key=f"key-{key}",
                run_id=u["retry"],
                checkpoint_id=u["ckpt"],
                checkpoint_sha256="a" * 64,
                benchmark="knn",
                benchmark_version="1",
                config_name="tiny",
                config="{}",
                config_hash="c" * 64,
                dataset="/data/fm",
                trigger="manual",
                status=status,
                launcher="local",
                resources="{}",
                attempts=attempts,
                max_attempts=2,
                backend_job_id="eval-job" if key == "eval_busy" else None,
                metrics=json.dumps({"knn/top1_k20": 71.5} if key == "eval_ok" else {}),
                error=error,
                created_at=at[4],
            )
    engine.dispose()
    return ids


def test_upgrade_to_the_job_layer_keeps_every_row(db_url: str) -> None:
    ids = _fill_revision_0002(db_url)
    upgrade(db_url)
    db = Database(db_url)
    try:
        with Session(db.engine) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 5
            run = session.get(Run, ids["run"])
            retry = session.get(Run, ids["retry"])
            assert run is not None and retry is not None
            assert (run.status, run.status_reason, run.requeues, run.created_by) == ("failed", "run ended", 1, "alice")
            assert run.folder == f"/srv/runs/{ids['run']}" and run.output_dir == f"/srv/runs/{ids['run']}/train"
            assert run.listed_at == retry.listed_at == run.created_at == T0 + timedelta(minutes=1)  # 0008's list key
            assert retry.retry_of_id == run.id and [c.id for c in retry.checkpoints] == [ids["ckpt"]]
            assert [(a.number, a.backend_job_id, a.accelerator_seconds) for a in run.attempts] == [
                (1, "job-1", 60.0),
                (2, "job-2", 120.0),
            ]
            events = session.scalars(sa.select(Event).order_by(Event.id)).all()
            assert [(e.id, e.job_id) for e in events] == [(1, run.id), (2, run.id), (3, retry.id)]
            ok, failed, busy = (session.get(Evaluation, ids[k]) for k in ("eval_ok", "eval_failed", "eval_busy"))
            assert ok is not None and failed is not None and busy is not None
            assert ok.status == "succeeded" and ok.metrics == {"knn/top1_k20": 71.5} and ok.live
            assert failed.status == "failed" and failed.status_reason == "corrupt checkpoint" and not failed.live
            assert [a.state for a in failed.attempts] == ["ended", "ended"]
            assert busy.status == "submitted" and busy.live and busy.attempts[-1].backend_job_id == "eval-job"
            assert busy.attempts[-1].state == "pending"
            assert failed.folder == f"/srv/runs/{ids['retry']}/evals/{ids['eval_failed']}"
            assert {Status(j.status) for j in session.scalars(sa.select(Job))} <= set(Status)
            # new rows after the upgrade: event ids continue, a failed evaluation's key is free again
            session.add(Event(job_id=run.id, kind="note", actor="test", data={}))
            session.add(Attempt(job_id=ok.id, number=2, backend="local", state="ended", accelerators=0, log_path=None))
            session.flush()
            assert max(e.id for e in session.scalars(sa.select(Event))) == 4
            assert session.scalar(sa.select(sa.func.count()).select_from(Checkpoint)) == 1
            session.rollback()
    finally:
        db.dispose()
