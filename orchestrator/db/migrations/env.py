"""Alembic environment: our metadata, batch mode on SQLite (ALTER TABLE support)."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import event, func, pool, select

from orchestrator.db.models import Base
from orchestrator.db.session import make_engine
from orchestrator.leader import MIGRATION_LOCK_KEY

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url) if url.startswith("sqlite") else make_engine(url, poolclass=pool.NullPool)
    sqlite = url.startswith("sqlite")
    if sqlite:  # batch mode rebuilds tables that others reference: check the keys once, at the end

        def _keys_off(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # outside any transaction, where it counts

        event.listen(engine, "connect", _keys_off)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite)
        with context.begin_transaction():
            if not sqlite:  # replicas starting together: one migrates, the others wait, then find it done
                connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left foreign keys dangling: {broken[:5]}")
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
