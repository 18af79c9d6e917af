"""reconciler: indexes so a pass costs what is active, not history: open attempts (attempts (state, job_id))
and jobs whose terminal status MLflow has not been told yet (partial, WHERE NOT mlflow_synced)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_attempts_state", "attempts", ["state", "job_id"])
    op.create_index(
        "ix_jobs_unsynced",
        "jobs",
        ["status"],
        postgresql_where=sa.text("NOT mlflow_synced"),
        sqlite_where=sa.text("mlflow_synced = 0"),  # the form SQLAlchemy gives NOT on SQLite
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_unsynced", table_name="jobs")
    op.drop_index("ix_attempts_state", table_name="attempts")
