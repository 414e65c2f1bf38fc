"""Alembic environment for the celery-pii key store.

It lives beside the host application's own migrations without touching them:
its own version table, only its own tables in autogenerate, and it never
calls ``logging.config.fileConfig`` (the host's logging stays as it is).
Run it through ``celery_pii.migrate(url_or_connection)`` or
``celery -A proj pii db upgrade``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool, text

from celery_pii._store import AUDIT_TABLE, KEYS_TABLE, Base

VERSION_TABLE = "celery_pii_alembic_version"
OUR_TABLES = frozenset({KEYS_TABLE, AUDIT_TABLE})

config = context.config
target_metadata = Base.metadata


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:  # noqa: ARG001
    """Only our tables (and their columns, indexes and constraints) are ours to compare."""
    if type_ == "table":
        return name in OUR_TABLES
    table = getattr(obj, "table", None)
    return table is None or table.name in OUR_TABLES


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        render_as_batch=True,  # SQLite can only ALTER through table copies
        transaction_per_migration=True,
        compare_type=True,
        **options,
    )


def run_migrations_offline() -> None:
    """Emit SQL for the configured URL without connecting."""
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over a shared connection if one was given, else over the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        with _one_migration_at_a_time(connection, in_callers_transaction=True):
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection, _one_migration_at_a_time(connection):
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


@contextlib.contextmanager
def _one_migration_at_a_time(
    connection: Connection, *, in_callers_transaction: bool = False
) -> Iterator[None]:
    """Processes migrating one store at once take turns (workers and beat starting on a fresh store).

    The revision is read once the turn has come, so a process that waited
    finds the work done.  On its own connection the lock is the session's:
    each migration commits on its own.  In the caller's transaction
    (``migrate(connection)``), PostgreSQL's lock is the transaction's, held
    until the caller commits (before, another process would not see the
    tables).  MySQL/MariaDB take none there: they commit each DDL statement
    at once, and the version row only with the caller (``migrate(url)``
    takes turns there).  SQLite takes no lock; ``celery_pii.migrate`` tries
    again after an error there.
    """
    dialect = connection.dialect.name
    if in_callers_transaction:
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _PG_LOCK})
        yield
        return
    lock: object
    if dialect == "postgresql":
        take, give = "SELECT pg_advisory_lock(:lock)", "SELECT pg_advisory_unlock(:lock)"
        lock = _PG_LOCK
    elif dialect in ("mysql", "mariadb"):
        take, give = "SELECT GET_LOCK(:lock, 600)", "SELECT RELEASE_LOCK(:lock)"
        lock = "celery_pii_migrate"
    else:
        yield
        return
    connection.execute(text(take), {"lock": lock})
    connection.commit()
    try:
        yield
    finally:
        connection.rollback()  # whatever a failed migration left open, so the lock can be given back
        connection.execute(text(give), {"lock": lock})
        connection.commit()


# pg_advisory_lock's key for migrating celery-pii's tables (any fixed 64-bit number).
_PG_LOCK = 0x63656C7279706969  # "celrypii"


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
