"""reconciler: an index on attempts (state, job_id), so finding open attempts costs what is open, not history

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_attempts_state", "attempts", ["state", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_attempts_state", table_name="attempts")
