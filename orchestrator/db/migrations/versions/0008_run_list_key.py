"""pages of one experiment or one sweep as index walks: runs gets `listed_at` (its job's created_at, which never
changes), and runs (experiment_id, listed_at, id) and runs (sweep_id, listed_at, id) replace the single-column
indexes, so such a page reads its runs newest first and stops at the page size instead of sorting them all (an
index cannot span the jobs and runs tables; the leading columns still serve lookups by experiment or sweep)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("listed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE runs SET listed_at = (SELECT jobs.created_at FROM jobs WHERE jobs.id = runs.id)")
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("listed_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.drop_index("ix_runs_experiment")
        batch.drop_index("ix_runs_sweep_id")
        batch.create_index("ix_runs_experiment_listed", ["experiment_id", "listed_at", "id"])
        batch.create_index("ix_runs_sweep_listed", ["sweep_id", "listed_at", "id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_sweep_listed")
        batch.drop_index("ix_runs_experiment_listed")
        batch.create_index("ix_runs_sweep_id", ["sweep_id"])
        batch.create_index("ix_runs_experiment", ["experiment_id"])
        batch.drop_column("listed_at")
