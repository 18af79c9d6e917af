"""sweeps: the sweep, its arms and events, its search job; trials are runs with their arm and seed

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("experiment_id", sa.Uuid(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("mlflow_experiment_id", sa.String(64), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("report_logged", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("ended_at", TZ, nullable=True),
    )
    op.create_index("ix_sweeps_created", "sweeps", ["created_at", "id"])
    op.create_table(
        "sweep_arms",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("sweep_id", sa.Uuid(), sa.ForeignKey("sweeps.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.UniqueConstraint("sweep_id", "name", name="uq_sweep_arms_name"),
    )
    op.create_index("ix_sweep_arms_sweep_id", "sweep_arms", ["sweep_id"])
    op.create_table(
        "sweep_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("sweep_id", sa.Uuid(), sa.ForeignKey("sweeps.id"), nullable=False),
        sa.Column("at", TZ, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_sweep_events_sweep", "sweep_events", ["sweep_id", "id"])
    op.create_table(
        "searches",
        sa.Column("id", sa.Uuid(), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("sweep_id", sa.Uuid(), sa.ForeignKey("sweeps.id"), nullable=False),
    )
    op.create_index("ix_searches_sweep_id", "searches", ["sweep_id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("arm", sa.String(100), nullable=True))
        batch.add_column(sa.Column("seed", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_runs_sweep", "sweeps", ["sweep_id"], ["id"])
        batch.create_index("ix_runs_sweep_id", ["sweep_id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_sweep_id")
        batch.drop_constraint("fk_runs_sweep", type_="foreignkey")
        batch.drop_column("seed")
        batch.drop_column("arm")
    op.drop_table("searches")
    op.drop_table("sweep_events")
    op.drop_table("sweep_arms")
    op.drop_table("sweeps")
