"""Alembic environment for the celery-pii key store.

It lives beside the host application's own migrations without touching them:
its own version table, only its own tables in autogenerate, and it never
calls ``logging.config.fileConfig`` (the host's logging stays as it is).
Run it through ``celery_pii.migrate(url_or_connection)`` or
``celery -A proj pii db upgrade``.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import engine_from_config, pool

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
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
