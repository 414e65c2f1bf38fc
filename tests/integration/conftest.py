"""Real databases for the key-store tests: a fresh schema (PostgreSQL), database (MariaDB) or file (SQLite)."""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from celery_pii._keys import KeyManager
from celery_pii._migrate import migrate
from celery_pii._sources import LocalMasterKey
from celery_pii._store import KeyStore

POSTGRES_URL = os.environ.get("PII_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("PII_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("PII_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PII_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

BACKENDS = ("postgresql", "mariadb", "sqlite")


def _fresh_postgres() -> tuple[str, object]:
    schema = f"pii_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}", drop


def _fresh_mariadb() -> tuple[str, object]:
    name = f"pii_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(MARIADB_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def drop() -> None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP DATABASE `{name}`")
        admin.dispose()

    return MARIADB_URL.rsplit("/", 1)[0] + "/" + name + "?charset=utf8mb4", drop


def fresh_database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """A URL of an empty database of the given kind, and a function that drops it."""
    if backend == "postgresql":
        return _fresh_postgres()
    if backend == "mariadb":
        return _fresh_mariadb()
    path = tmp_path_factory.mktemp("sqlite") / "keys.db"
    return f"sqlite:///{path}", lambda: None


@pytest.fixture(params=BACKENDS)
def empty_db(request, tmp_path_factory):
    """An empty database (no celery-pii tables) on each backend."""
    url, drop = fresh_database(request.param, tmp_path_factory)
    yield url
    drop()


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_db(request, tmp_path_factory):
    """A migrated database per backend, shared by a session (tables emptied per test)."""
    url, drop = fresh_database(request.param, tmp_path_factory)
    migrate(url)
    yield url
    drop()


MASTER = LocalMasterKey(bytes(range(32)))


@pytest.fixture
def db_url(migrated_db):
    """A migrated database with empty tables."""
    engine = sa.create_engine(migrated_db, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM celery_pii_keys")
        connection.exec_driver_sql("DELETE FROM celery_pii_key_audit")
    engine.dispose()
    return migrated_db


@pytest.fixture
def make_manager(db_url):
    """Build KeyManagers on the test database (closed at the end)."""
    managers = []

    def make(master=MASTER, **options):
        manager = KeyManager(KeyStore(db_url), master, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.store.dispose()


@pytest.fixture
def manager(make_manager):
    """A KeyManager on the test database."""
    return make_manager()
