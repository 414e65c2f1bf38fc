"""The SQL key store: typed models and the few statements the key manager needs.

Rows hold *wrapped* key material only (wrapped by the master key, never
stored); destroying a key version overwrites its material and keeps its row, so
the audit trail and ``get_stats`` still see it.  (The database keeps old row
versions in its own files and logs for a while: docs/retention.md.)

The store knows no Celery and no serializer.  Every database error that a
retry could cure surfaces as :class:`KeyStoreUnavailable` (with the error's
class name only: driver messages can carry SQL parameters).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    inspect,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator, TypeEngine

from .exceptions import ConfigurationError, KeyStoreUnavailable

__all__ = [
    "ACTIVE",
    "DESTROYED",
    "RETIRED",
    "AuditRow",
    "Base",
    "KeyRow",
    "KeyStore",
    "WriteConflict",
    "utcnow",
]

ACTIVE: Final = "active"
RETIRED: Final = "retired"
DESTROYED: Final = "destroyed"

#: Size of the columns that record who did something (``created_by``, ``actor``).
ACTOR_MAX_LENGTH: Final = 255

KEYS_TABLE: Final = "celery_pii_keys"
AUDIT_TABLE: Final = "celery_pii_key_audit"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def aware(moment: datetime | None, what: str) -> datetime | None:
    """``moment`` as given, if it says its time zone (the store keeps UTC; a naive time is ambiguous).

    Raises:
        ConfigurationError: naming ``what`` (``"PII.rotate_keys: now"``).
    """
    if moment is not None and moment.utcoffset() is None:
        msg = f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc))"
        raise ConfigurationError(msg)
    return moment


# The key store's own clock, as naive UTC (clock_timestamp(): the moment asked, not the
# transaction's start).  SQLite's %f is seconds with three decimals.
_STORE_NOW: Final = {
    "postgresql": "SELECT timezone('UTC', clock_timestamp())",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",
    "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
}


def store_utcnow(session: Session) -> datetime | None:
    """The key store's current time (timezone-aware UTC); ``None`` for a database not known here."""
    query = _STORE_NOW.get(session.get_bind().dialect.name)
    if query is None:
        return None
    value = session.execute(text(query)).scalar_one()
    if isinstance(value, str):
        value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f")  # noqa: DTZ007 - UTC, made aware below
    return value.replace(tzinfo=timezone.utc) if isinstance(value, datetime) else None


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC everywhere (MariaDB and SQLite keep no zone), read back aware."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # MySQL/MariaDB DATETIME drops microseconds unless asked to keep them;
        # audit order and time windows need them.
        if dialect.name in {"mysql", "mariadb"}:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.utcoffset() is None:
            msg = "key store timestamps must be timezone-aware"
            raise ValueError(msg)
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (so migrations can drop them)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def _exact_text(length: int) -> TypeEngine[str]:
    """A string compared byte for byte on every backend (key ids, subject hashes, master-key refs).

    MySQL/MariaDB compare with the column's collation, case-insensitive by
    default: 'Payments' and 'payments' would be one key (migration 0004).
    """
    binary = mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin")
    return String(length).with_variant(binary, "mysql", "mariadb")


class KeyRow(Base):
    """One version of one data key."""

    __tablename__ = KEYS_TABLE
    __table_args__ = (
        UniqueConstraint("key_id", "version"),
        Index("ix_celery_pii_keys_status", "status"),
        Index("ix_celery_pii_keys_next_rotation_at", "next_rotation_at"),
        Index("ix_celery_pii_keys_expires_at", "expires_at"),
        Index("ix_celery_pii_keys_subject_id", "subject_id"),
        # Every process asks for the versions destroyed or retired since its last check (recheck_cache).
        Index("ix_celery_pii_keys_destroyed_at", "destroyed_at"),
        Index("ix_celery_pii_keys_retired_at", "retired_at"),
    )

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(_exact_text(160))
    version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str] = mapped_column(String(32))
    #: Data key wrapped by the master key; NULL once destroyed.
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: Non-secret name of the master key that wrapped it (see _sources.MasterKey.ref).
    master_key_ref: Mapped[str | None] = mapped_column(_exact_text(160))
    #: A second wrapping, under the master key being rotated to (see _wrapping).
    wrapped_key_next: Mapped[bytes | None] = mapped_column(LargeBinary)
    master_key_ref_next: Mapped[str | None] = mapped_column(_exact_text(160))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(ACTOR_MAX_LENGTH))
    #: When a rotation replaced this version as the active one.
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When enforce_retention destroys this version (retention buckets).
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When rotate_keys makes a new version (active versions only).
    next_rotation_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    usage_count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Keyed hash of the data subject's id, for per-subject keys and erasure.
    subject_id: Mapped[str | None] = mapped_column(_exact_text(64))
    #: Latest message deadline sealed under a retention-bucket key.
    retention_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditRow(Base):
    """An append-only record of something done to (or with) a key."""

    __tablename__ = AUDIT_TABLE
    __table_args__ = (
        Index("ix_celery_pii_key_audit_key_id", "key_id"),
        Index("ix_celery_pii_key_audit_timestamp", "timestamp"),
    )

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str] = mapped_column(_exact_text(160))
    version: Mapped[int | None] = mapped_column(Integer)
    operation: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(ACTOR_MAX_LENGTH))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# Errors a retry can cure: the server is down, restarting, or a connection
# was cut.  Anything else (a bug, a missing table) is not retried.
_TRANSIENT = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError)
# Lost lock races, which the database resolves by rolling one transaction
# back: PostgreSQL's serialization failure and deadlock (SQLSTATE), and
# MySQL/MariaDB's deadlock (error 1213: two rotations' gap locks on the
# (key_id, version) index can cross).  Running the transaction again cures them.
_CONFLICT_SQLSTATES: Final = frozenset(("40001", "40P01"))
_MYSQL_DEADLOCK: Final = 1213


class WriteConflict(KeyStoreUnavailable):
    """A concurrent writer won a lock race and this transaction was rolled back; it can run again.

    A subclass of :class:`KeyStoreUnavailable`, so a caller that does not
    retry sees what it saw before; ``KeyManager`` retries its writes.
    """


def _is_write_conflict(error: exc.DBAPIError) -> bool:
    """Whether the database rolled this transaction back to break a lock conflict."""
    driver_error = error.orig
    if getattr(driver_error, "sqlstate", None) in _CONFLICT_SQLSTATES:  # psycopg
        return True
    args: tuple[Any, ...] = getattr(driver_error, "args", ())
    return bool(args) and args[0] == _MYSQL_DEADLOCK  # pymysql: (code, message)


class KeyStore:
    """The database behind a key manager: engine, sessions, error mapping."""

    def __init__(self, url: str | URL, *, connect_timeout: float = 5.0) -> None:
        """Create the engine (connections are opened lazily).

        Raises:
            ConfigurationError: the URL cannot be parsed or names no installed driver.
        """
        try:
            parsed = make_url(url)
            self.engine = create_engine(
                parsed,
                pool_pre_ping=True,
                connect_args=_connect_args(parsed, connect_timeout),
                **_engine_options(parsed),
            )
        except (exc.ArgumentError, ImportError, ValueError) as error:
            # The driver's module name, never the error's text (it may quote the URL).
            missing = f": no module {error.name!r}" if isinstance(error, ImportError) and error.name else ""
            msg = (
                f"setting pii_key_store_url: cannot use this URL ({type(error).__name__}{missing}); "
                "expected e.g. postgresql+psycopg://user@host/db (extra 'postgres'), "
                "mysql+pymysql://user@host/db (extra 'mysql') or sqlite:///path.db"
            )
            raise ConfigurationError(msg) from None
        if self.engine.dialect.name == "sqlite":
            _serialize_sqlite_writers(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        _live_stores.add(self)

    @property
    def url(self) -> str:
        """The URL with any password hidden, and the values of its query (``?password=`` works too)."""
        url = self.engine.url
        if url.query:
            url = url.set(query=dict.fromkeys(url.query, "hidden"))
        return url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a transaction; outages become ``KeyStoreUnavailable``."""
        try:
            with self._sessions.begin() as session:
                yield session
        except _TRANSIENT as error:
            if isinstance(error, exc.DBAPIError) and _is_write_conflict(error):
                msg = "key store write lost a lock race with a concurrent writer (rolled back)"
                raise WriteConflict(msg) from None
            msg = f"setting pii_key_store_url: key store unreachable ({failure_reason(error)})"
            raise KeyStoreUnavailable(msg) from None

    def check_schema(self) -> None:
        """Make sure the celery-pii tables exist, at this release's newest revision.

        Raises:
            ConfigurationError: they do not (migrations were not run, or not
                since celery-pii was upgraded).
            KeyStoreUnavailable: the database cannot be reached.
        """
        from ._migrate import older_revision  # noqa: PLC0415 - the revisions import this module

        try:
            with self.engine.connect() as connection:
                tables = set(inspect(connection).get_table_names())
                older = older_revision(connection) if {KEYS_TABLE, AUDIT_TABLE} <= tables else None
        except _TRANSIENT as error:
            msg = f"key store unreachable ({failure_reason(error)})"
            raise KeyStoreUnavailable(msg) from None
        if not {KEYS_TABLE, AUDIT_TABLE} <= tables:
            msg = (
                f"setting pii_key_store_url: the key store at {self.url} has no celery-pii tables; "
                "run `celery -A proj pii db upgrade` or celery_pii.migrate(url)"
            )
            raise ConfigurationError(msg)
        if older is not None:
            # Else the first query naming a newer column fails, and some drivers call that an outage.
            msg = (
                f"setting pii_key_store_url: the key store at {self.url} is at revision {older[0]}, "
                f"older than this release's {older[1]}; run `celery -A proj pii db upgrade` "
                "or celery_pii.migrate(url)"
            )
            raise ConfigurationError(msg)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# A prefork worker child must not share its parent's connections: after a
# fork, every live store forgets (without closing) the pooled connections.
_live_stores: weakref.WeakSet[KeyStore] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for store in list(_live_stores):
        store.engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_connections_after_fork)


# Enough of a driver's message to tell a refused connection from a missing database.
_REASON_LENGTH: Final = 160


def failure_reason(error: BaseException) -> str:
    """The error's type, and for an operational one the first line of the driver's message.

    Operational errors (connecting, authenticating, a missing database, a lost
    connection, a lock timeout) name hosts, users, databases and tables, never
    a row's values: they say why the store cannot be used.  Others say only
    their type: their text may quote what a statement carried.
    """
    kind = type(error).__name__
    if not isinstance(error, exc.OperationalError):
        return kind
    lines = str(error.orig).strip().splitlines()
    reason = lines[0].strip() if lines else ""
    if len(reason) > _REASON_LENGTH:
        reason = reason[: _REASON_LENGTH - 1] + "…"
    return f"{kind}: {reason}" if reason else kind


def _connect_args(url: URL, timeout: float) -> dict[str, Any]:
    backend = url.get_backend_name()
    if backend == "postgresql":
        return {"connect_timeout": max(1, round(timeout))}
    if backend in {"mysql", "mariadb"}:
        return {"connect_timeout": max(1, round(timeout)), "read_timeout": 30, "write_timeout": 30}
    if backend == "sqlite":
        return {"timeout": timeout}
    return {}


def _engine_options(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {}
    # Fail fast when the pool is exhausted rather than hang a publish.
    options: dict[str, Any] = {"pool_size": 5, "max_overflow": 10, "pool_timeout": 10, "pool_recycle": 3600}
    if url.get_backend_name() in {"mysql", "mariadb"}:
        # PostgreSQL's default.  MySQL's and MariaDB's, REPEATABLE READ, takes gap locks:
        # two rotate_keys runs (FOR UPDATE SKIP LOCKED scans, then inserts of new
        # versions into the same index gaps) deadlocked, and one run's due keys stayed due.
        options["isolation_level"] = "READ COMMITTED"
    return options


def _serialize_sqlite_writers(engine: Engine) -> None:
    # SQLite's default deferred transactions let two writers deadlock; taking
    # the write lock at BEGIN makes concurrent rotations queue instead.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
