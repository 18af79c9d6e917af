"""SQL records of the orchestrator (SQLAlchemy 2, Alembic)."""
