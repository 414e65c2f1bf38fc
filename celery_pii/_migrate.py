"""Run the key store's Alembic migrations from Python (the CLI wraps this)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Final, TextIO

from alembic import command, context, op
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, exc, inspect, make_url, pool
from sqlalchemy.engine import URL, Connection

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "downgrade",
    "known_revision",
    "left_by_a_killed_run",
    "migrate",
    "older_revision",
]

VERSION_TABLE: Final = "celery_pii_alembic_version"
# How often a process migrating a SQLite store tries again after running into another's work.
_SQLITE_ATTEMPTS: Final = 5


def _script_location() -> str:
    # The revisions ship as the package celery_pii.migrations (the top-level
    # migrations/ folder of the repository).  Resolving the package, rather
    # than Alembic's "celery_pii:migrations" resource form, also works for
    # editable installs, where that package does not sit inside celery_pii/.
    try:
        return str(resources.files("celery_pii.migrations"))
    except ModuleNotFoundError:
        # Imported from a source checkout (PYTHONPATH=., or `python -m celery`
        # run from the repository root): the folder sits beside the package.
        checkout = Path(__file__).resolve().parent.parent / "migrations"
        if (checkout / "env.py").is_file():
            return str(checkout)
        raise


def alembic_config(url_or_connection: str | URL | Connection, *, stdout: TextIO | None = None) -> Config:
    """An Alembic ``Config`` for our migrations, bound to a URL or a shared connection."""
    config = Config(stdout=stdout) if stdout is not None else Config()
    config.set_main_option("script_location", _script_location())
    if isinstance(url_or_connection, Connection):
        config.attributes["connection"] = url_or_connection
    else:
        url = url_or_connection
        text = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        # Config is a ConfigParser: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", text.replace("%", "%%"))
    return config


def migrate(url_or_connection: str | URL | Connection, *, revision: str = "head") -> None:
    """Create or upgrade the key store's tables.

    Processes may run it at once (workers and beat starting on a fresh
    store): on PostgreSQL and MySQL/MariaDB they take turns (a lock in the
    migrations' environment); SQLite takes no lock, so there a process that
    ran into another's tables tries again, from the revision the store is at.
    Given a connection, the migration runs in the caller's transaction; on
    MySQL/MariaDB, which commit each DDL statement at once, it is then
    neither undone with that transaction nor safe beside other processes
    migrating: give those a URL.

    Arguments:
        url_or_connection: a SQLAlchemy URL, or an open ``Connection`` to
            migrate inside the caller's transaction.
        revision: the target revision (``"head"`` for the newest).
    """
    config = alembic_config(url_or_connection)
    is_sqlite = (
        not isinstance(url_or_connection, Connection)
        and make_url(url_or_connection).get_backend_name() == "sqlite"
    )
    for attempt in range(_SQLITE_ATTEMPTS if is_sqlite else 1):
        try:
            command.upgrade(config, revision)
        except (exc.OperationalError, CommandError):  # noqa: PERF203 - "table ... already exists",
            # "duplicate column name", or the revision another process moved on meanwhile
            if attempt == _SQLITE_ATTEMPTS - 1 or not is_sqlite:
                raise
            time.sleep(0.2 * (attempt + 1))
        else:
            return


def downgrade(url_or_connection: str | URL | Connection, *, revision: str = "base") -> None:
    """Downgrade the key store's tables (``"base"`` drops them all)."""
    command.downgrade(alembic_config(url_or_connection), revision)


def current_revision(url: str | URL) -> str | None:
    """The revision the key store is at, or ``None`` before the first migration."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def known_revision(revision: str) -> str | None:
    """The full id of ``revision`` (of this release, or a unique prefix of one); ``None`` if unknown."""
    try:
        found = ScriptDirectory(_script_location()).get_revision(revision)
    except CommandError:
        return None
    return found.revision if found is not None else None


def older_revision(connection: Connection) -> tuple[str, str] | None:
    """``(revision, head)`` if the store is at an older revision of this release's migrations.

    ``None`` when it is at the head, at a revision this release does not know
    (a newer release migrated it: older processes keep working on upgraded
    tables), or at none (tables made another way).
    """
    with _quiet_alembic():
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    current = context.get_current_revision()
    script = ScriptDirectory(_script_location())
    head = script.get_current_head()
    if current is None or head is None or current == head:
        return None
    try:
        script.get_revision(current)
    except CommandError:  # a newer release's revision
        return None
    return current, head


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic's INFO lines (``Context impl PostgresqlImpl.``) out of a check that migrates nothing.

    Every process checks the store's revision when ``setup_pii`` runs: once an
    application's logging is set up (``setup_pii`` from Django's
    ``AppConfig.ready()``), every command and web process printed two of them.
    """
    alembic_logger = logging.getLogger("alembic.runtime.migration")
    level = alembic_logger.level
    alembic_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        alembic_logger.setLevel(level)


def left_by_a_killed_run(table: str, *, index: str | None = None, column: str | None = None) -> bool:
    """In a revision: whether a run of it killed halfway already made this table, index or column.

    MySQL and MariaDB commit each DDL statement at once: a revision killed
    between two of them leaves the first done and the store at the previous
    revision, and running it again failed with "already exists".  Each step
    asks first, there only; elsewhere a revision is one transaction, undone
    whole, and a step found made would mean another process's work (which
    the migrations' lock and SQLite's retry handle).
    """
    if context.is_offline_mode():  # SQL written for later: nothing to look at
        return False
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return False
    inspector = inspect(bind)  # a fresh one: it caches what it has read
    if not inspector.has_table(table):
        return False
    if index is not None:
        return any(found["name"] == index for found in inspector.get_indexes(table))
    if column is not None:
        return any(found["name"] == column for found in inspector.get_columns(table))
    return True
