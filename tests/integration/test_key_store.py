"""The SQL key store and KeyManager on PostgreSQL, MariaDB and SQLite (real databases)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
import weakref
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from celery_pii import _keys
from celery_pii._crypto import Algorithm
from celery_pii._keys import SUBJECT_INDEX_KEY, KeyManager, KeySpec, flush_all_usage
from celery_pii._migrate import VERSION_TABLE, alembic_config, current_revision, downgrade, migrate
from celery_pii._sources import LocalMasterKey
from celery_pii._store import KeyRow, KeyStore, WriteConflict, utcnow
from celery_pii.exceptions import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
)

from .conftest import MASTER, TcpProxy

pytestmark = pytest.mark.integration


def _tables(url):
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _execute(url, sql, **params):
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(sa.text(sql), params)
            return result.fetchall() if result.returns_rows else None
    finally:
        engine.dispose()


@pytest.fixture
def stalling_store(db_url, monkeypatch):
    """``(proxy, url)``: a proxy to the test database that the test can freeze; the store waited for 1 s."""
    from celery_pii import _keys

    url = sa.engine.make_url(db_url)
    if url.host is None:
        pytest.skip("SQLite has no network to stall")
    monkeypatch.setattr(_keys, "STORE_ANSWER_TIMEOUT", 1.0)
    proxy = TcpProxy(url.host, url.port)
    yield proxy, url
    proxy.close()


def _behind(proxy, url, *, recheck_interval):
    """A key manager reaching the test database through ``proxy`` (which the test cuts or stalls)."""
    store = KeyStore(url.set(port=proxy.port).render_as_string(hide_password=False), connect_timeout=1)
    return KeyManager(store, MASTER, recheck_interval=recheck_interval)


class TestMigrations:
    """Alembic migrations: upgrade from empty, downgrade, models == migrations, host left alone."""

    def test_the_start_up_check_logs_nothing_of_alembic(self, empty_db, caplog):
        """Checking the revision migrates nothing: Alembic's INFO lines printed in every process.

        (Once an app's logging is set up, as with setup_pii in Django's AppConfig.ready().)
        """
        from celery_pii._store import KeyStore

        migrate(empty_db)
        alembic_logger = logging.getLogger("alembic.runtime.migration")
        alembic_logger.setLevel(logging.INFO)
        try:
            with caplog.at_level(logging.INFO):
                store = KeyStore(empty_db)
                store.check_schema()
                store.dispose()
            assert not [record for record in caplog.records if record.name.startswith("alembic")]
            assert alembic_logger.level == logging.INFO  # left as the application set it
        finally:
            alembic_logger.setLevel(logging.NOTSET)

    def test_upgrade_check_downgrade(self, empty_db):
        """Upgrade creates only our tables and version table; check passes; downgrade removes them."""
        _execute(empty_db, "CREATE TABLE host_things (id INTEGER PRIMARY KEY)")
        _execute(empty_db, "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        root = logging.getLogger()
        before = (list(root.handlers), root.level, logging.getLogger("sqlalchemy").level)
        migrate(empty_db)
        assert (list(root.handlers), root.level, logging.getLogger("sqlalchemy").level) == before
        assert _tables(empty_db) == {
            "host_things",
            "alembic_version",
            VERSION_TABLE,
            "celery_pii_keys",
            "celery_pii_key_audit",
        }
        assert current_revision(empty_db) == "0005_retired_at_index"
        assert _execute(empty_db, "SELECT * FROM alembic_version") == []  # the host's version table untouched
        command.check(alembic_config(empty_db))  # raises if models and migrations disagree
        migrate(empty_db)  # idempotent
        downgrade(empty_db)
        assert _tables(empty_db) == {"host_things", "alembic_version", VERSION_TABLE}
        assert current_revision(empty_db) is None

    @pytest.mark.parametrize(
        ("reached", "undone"),
        [
            (  # 0001 killed after the keys table and three of its indexes
                "0001_key_store",
                [
                    "DROP TABLE celery_pii_key_audit",
                    "DROP INDEX ix_celery_pii_keys_subject_id ON celery_pii_keys",
                ],
            ),
            ("0002_master_key_rotation", ["ALTER TABLE celery_pii_keys DROP COLUMN master_key_ref_next"]),
            ("0003_destroyed_at_index", []),  # killed after its one statement, before the new revision
        ],
        ids=["0001", "0002", "0003"],
    )
    def test_a_migration_killed_halfway_on_mysql_runs_again(self, empty_db, reached, undone):
        """MySQL/MariaDB commit each DDL statement: a killed revision leaves some done, the revision behind.

        Running it again failed with "already exists" until each step was
        undone by hand; it now skips what is made.
        """
        if not empty_db.startswith("mysql"):
            pytest.skip("elsewhere a revision is one transaction, undone whole")
        migrate(empty_db, revision=reached)
        for statement in undone:
            _execute(empty_db, statement)
        script = ScriptDirectory.from_config(alembic_config(empty_db))
        previous = script.get_revision(reached).down_revision
        if previous is None:
            _execute(empty_db, "DELETE FROM celery_pii_alembic_version")
        else:
            _execute(
                empty_db, "UPDATE celery_pii_alembic_version SET version_num = :previous", previous=previous
            )
        migrate(empty_db)
        assert current_revision(empty_db) == "0005_retired_at_index"
        command.check(alembic_config(empty_db))  # raises if the tables differ from the models
        manager = KeyManager(KeyStore(empty_db), MASTER)
        try:
            assert manager.encryption_key(KeySpec("orders")).version == 1
        finally:
            manager.store.dispose()

    def test_offline_sql_for_mysql_is_written(self):
        """``alembic upgrade --sql`` writes the SQL without a database: the revisions ask it nothing then."""
        import io

        written = io.StringIO()
        config = alembic_config("mysql+pymysql://root@127.0.0.1:1/nowhere")
        config.output_buffer = written
        command.upgrade(config, "head", sql=True)
        sql = written.getvalue()
        assert "CREATE TABLE celery_pii_keys" in sql
        assert "CREATE INDEX ix_celery_pii_keys_retired_at" in sql

    @pytest.mark.parametrize("connections", [0, 2], ids=["by-url", "some-on-a-connection"])
    def test_processes_migrating_at_once(self, empty_db, testapp_module, connections):
        """Workers and beat starting together on a fresh store each run migrate(): all of them succeed.

        They failed with the database's "already exists" errors (the tables were
        right in the end, but those processes did not start).  Given a
        connection, migrate() takes its turn too, inside the caller's transaction.
        """
        if connections and not empty_db.startswith("postgresql"):
            pytest.skip("only PostgreSQL migrates inside a caller's transaction (SQLite takes no lock)")
        import pii_children

        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(4), context.Queue()
        children = [
            context.Process(
                target=pii_children.migrate, args=(empty_db, barrier, results, index < connections)
            )
            for index in range(4)
        ]
        for child in children:
            child.start()
        got = [results.get(timeout=120) for _ in children]
        for child in children:
            child.join(timeout=30)
        assert got == ["migrated"] * 4
        assert current_revision(empty_db) == "0005_retired_at_index"

    def test_key_ids_become_case_sensitive_on_an_existing_store(self, empty_db):
        """0004 keeps a store's keys and makes 'Payments' and 'payments' two keys (MySQL/MariaDB)."""
        migrate(empty_db, revision="0003_destroyed_at_index")
        manager = KeyManager(KeyStore(empty_db), MASTER)
        try:
            sealed = manager.encryption_key(KeySpec("Payments")).seal(b"4111 1111 1111 1111", b"ad")
            migrate(empty_db)
            downgrade(empty_db, revision="0003_destroyed_at_index")  # back and forth, the row survives
            migrate(empty_db)
            manager.cache.clear()
            assert manager.decryption_key("Payments", 1).open(sealed, b"ad") == b"4111 1111 1111 1111"
            assert manager.encryption_key(KeySpec("payments")).key_id == "payments"
            with pytest.raises(KeyNotFound):
                manager.decryption_key("PAYMENTS", 1)
        finally:
            manager.store.dispose()

    def test_migrate_over_shared_connection(self, empty_db):
        """A caller's open connection can be migrated inside its own transaction."""
        engine = sa.create_engine(empty_db, poolclass=sa.pool.NullPool)
        with engine.begin() as connection:
            migrate(connection)
        engine.dispose()
        assert "celery_pii_keys" in _tables(empty_db)

    def test_an_older_revision_is_a_configuration_error(self, empty_db):
        """A store not upgraded since celery-pii was: start-up names the revisions and the command.

        Without the check, the first query naming a newer column failed, and
        MariaDB's and SQLite's drivers call that an outage ("unreachable").
        """
        migrate(empty_db, revision="0001_key_store")
        manager = KeyManager(KeyStore(empty_db), MASTER)
        try:
            with pytest.raises(ConfigurationError, match=r"revision 0001_key_store, older .*pii db upgrade"):
                manager.check_master_key()
            migrate(empty_db)
            manager.check_master_key()
        finally:
            manager.store.dispose()

    def test_missing_tables_are_a_configuration_error(self, empty_db):
        """A store that was never migrated fails at start-up with the command to run."""
        manager = KeyManager(KeyStore(empty_db), MASTER)
        with pytest.raises(ConfigurationError, match="pii db upgrade"):
            manager.check_master_key()
        manager.store.dispose()


class _Clock:
    """A KeyManager clock that a test moves on."""

    def __init__(self):
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += timedelta(**delta)


class TestEnvelopeEncryption:
    """Data keys are wrapped by the master key, never stored in the clear."""

    def test_material_is_wrapped_and_master_never_stored(self, manager, db_url):
        """The row holds wrapped material; neither the data key nor the master key appear in it."""
        manager.generate_key("orders")
        key = manager.decryption_key("orders", 1)
        row = _execute(db_url, "SELECT wrapped_key, master_key_ref FROM celery_pii_keys")[0]
        wrapped = bytes(row[0])
        material = key._cipher  # the cipher holds the material; check through a round trip instead
        assert material is not None
        assert bytes(range(32)) not in wrapped
        assert len(wrapped) == 1 + 12 + 32 + 16
        assert row[1] == MASTER.ref

    def test_wrapped_material_is_bound_to_its_row(self, manager, db_url):
        """Copying one key's wrapped material into another row makes that row fail to unwrap."""
        manager.generate_key("a")
        manager.generate_key("b")
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        with engine.begin() as connection:
            wrapped = connection.exec_driver_sql(
                "SELECT wrapped_key FROM celery_pii_keys WHERE key_id='a'"
            ).scalar()
            connection.execute(
                sa.text("UPDATE celery_pii_keys SET wrapped_key=:w WHERE key_id='b'"), {"w": wrapped}
            )
        engine.dispose()
        with pytest.raises(KeyNotFound, match="cannot be unwrapped"):
            manager.decryption_key("b", 1)

    def test_wrong_master_key_detected_at_start_up(self, manager, make_manager):
        """A master key that does not match the store fails check_master_key, naming the setting."""
        manager.generate_key("orders")
        manager.check_master_key()
        other = make_manager(master=LocalMasterKey(bytes(32)))
        with pytest.raises(ConfigurationError, match="pii_master_key") as info:
            other.check_master_key()
        assert bytes(32).hex() not in str(info.value)

    @staticmethod
    def _damage(db_url, key_id):
        """Flip one bit of a row's wrapped key (a storage fault, a restore in part)."""
        wrapped = bytearray(
            _execute(db_url, "SELECT wrapped_key FROM celery_pii_keys WHERE key_id = :k", k=key_id)[0][0]
        )
        wrapped[-1] ^= 0x01
        _execute(
            db_url,
            "UPDATE celery_pii_keys SET wrapped_key = :w WHERE key_id = :k",
            w=bytes(wrapped),
            k=key_id,
        )

    def test_one_damaged_row_does_not_stop_start_up(self, manager, make_manager, db_url, caplog):
        """The check reads a few rows: one that does not unwrap is reported, not blamed on the master key.

        One damaged row (the row the check read) stopped every process at its
        next start, with an error saying the master key does not match.
        """
        for key_id in ("orders", "reports", "invoices"):
            manager.generate_key(key_id)
        self._damage(db_url, "invoices")  # the newest: the first one read
        with caplog.at_level(logging.ERROR, logger="celery_pii.keys"):
            make_manager().check_master_key()
        assert "'invoices' version 1 cannot be unwrapped with the master key its row names" in caplog.text
        with pytest.raises(KeyNotFound, match="damaged row"):
            make_manager().decryption_key("invoices", 1)

    def test_rows_naming_the_master_key_that_none_unwraps_stop_start_up(self, manager, make_manager, db_url):
        """When no row read unwraps, start-up is refused, naming them and both causes."""
        for key_id in ("orders", "reports"):
            manager.generate_key(key_id)
            self._damage(db_url, key_id)
        with pytest.raises(
            ConfigurationError, match=r"^setting pii_master_key: .*'reports' v1, 'orders' v1.*damaged"
        ):
            make_manager().check_master_key()

    def test_store_holding_keys_of_two_master_keys_is_refused(self, make_manager):
        """Two processes with different master keys both started on an empty store and made keys.

        Each fails on the other's keys at first use, with a configuration error (a worker
        retries and keeps such a message; as KeyNotFound it parked every one as tampered);
        at their next start both are refused.
        """
        first, second = make_manager(), make_manager(master=LocalMasterKey(bytes(32)))
        first.check_master_key()
        second.check_master_key()  # the store is empty: nothing to mismatch yet
        first.generate_key("orders")
        second.generate_key("reports")
        with pytest.raises(
            ConfigurationError,
            match=r"^setting pii_master_key: key 'reports' v1 is wrapped by another master key",
        ):
            first.decryption_key("reports", 1)
        for manager in (first, second):
            with pytest.raises(
                ConfigurationError, match="also holds keys wrapped by another master key"
            ) as info:
                manager.check_master_key()
            assert "pii_master_key" in str(info.value)
            assert bytes(32).hex() not in str(info.value)

    def test_empty_store_accepts_any_master_key(self, make_manager):
        """With no keys yet, there is nothing to mismatch."""
        make_manager(master=LocalMasterKey(bytes(32))).check_master_key()


class TestKeyManager:
    """The KeyManager API of DESIGN §1."""

    def test_generate_then_use(self, manager):
        """generate_key makes version 1 active; it encrypts and decrypts."""
        assert manager.generate_key("orders", algorithm="chacha20-poly1305") == 1
        key = manager.encryption_key(KeySpec("orders"))
        assert (key.key_id, key.version, key.algorithm) == ("orders", 1, Algorithm.CHACHA20_POLY1305)
        sealed = key.seal(b"x", b"ad")
        assert manager.decryption_key("orders", 1).open(sealed, b"ad") == b"x"
        with pytest.raises(ConfigurationError, match="already exists"):
            manager.generate_key("orders")

    def test_first_use_creates_and_audits(self, manager):
        """A key named by a task is created on first use, with a 'generate' audit record."""
        key = manager.encryption_key(KeySpec("payments"))
        assert key.version == 1
        trail = manager.audit_trail("payments")
        assert [(r.operation, r.version, r.details["reason"]) for r in trail] == [
            ("generate", 1, "first use")
        ]
        assert trail[0].actor

    def test_rotation_retires_and_old_versions_still_decrypt(self, manager):
        """After rotation the new version encrypts and the retired one still decrypts."""
        old = manager.encryption_key(KeySpec("orders"))
        sealed = old.seal(b"v1 data", b"ad")
        assert manager.rotate_key("orders") == 2
        assert manager.encryption_key(KeySpec("orders")).version == 2
        assert manager.decryption_key("orders", 1).open(sealed, b"ad") == b"v1 data"
        stats = manager.get_stats()
        assert (stats.total_keys, stats.active_keys, stats.retired_keys, stats.rotations_performed) == (
            2,
            1,
            1,
            1,
        )

    def test_max_key_versions(self, make_manager):
        """Versions beyond pii_max_key_versions are destroyed, oldest first, and audited."""
        clock = _Clock()
        manager = make_manager(max_key_versions=3, clock=clock)
        manager.generate_key("orders")
        for _ in range(4):
            clock.advance(hours=1)  # a version retired an hour ago is no longer sealed with anywhere
            manager.rotate_key("orders")
        stats = manager.get_stats()
        assert (stats.active_keys, stats.retired_keys, stats.destroyed_keys) == (1, 2, 2)
        with pytest.raises(KeyDestroyed):
            manager.decryption_key("orders", 2)
        assert manager.decryption_key("orders", 3).version == 3
        destroys = [r for r in manager.audit_trail("orders") if r.operation == "destroy"]
        assert [(r.version, r.details["reason"]) for r in destroys] == [
            (1, "max_key_versions"),
            (2, "max_key_versions"),
        ]

    @pytest.mark.parametrize("max_key_versions", [1, 2])
    def test_a_version_retired_moments_ago_outlives_the_limit_until_others_know(
        self, make_manager, max_key_versions
    ):
        """A rotation keeps the version it retired: other processes seal with it until their next check.

        It used to be destroyed at once (always with a limit of 1, after quick
        rotations otherwise): what those processes published meanwhile was
        accepted, then could never open.
        """
        clock = _Clock()
        rotator = make_manager(max_key_versions=max_key_versions, clock=clock, recheck_interval=30)
        publisher = make_manager(recheck_interval=30)
        publisher.encryption_key(KeySpec("orders"))  # v1, cached as the active version
        for _ in range(max_key_versions):
            rotator.rotate_key("orders")
        # Until its next check the publisher still seals with v1; a worker must open that.
        key = publisher.encryption_key(KeySpec("orders"))
        assert key.version == 1
        sealed = key.seal(b"published after the rotation", b"ad")
        worker = make_manager()
        assert worker.decryption_key("orders", 1).open(sealed, b"ad") == b"published after the rotation"
        assert "destroyed" not in [k.status for k in rotator.list_keys("orders")]
        assert rotator.enforce_max_versions() == []
        # Once every process has checked, a later rotate_keys run trims what is over the limit.
        clock.advance(minutes=6)
        assert rotator.enforce_max_versions() == [("orders", 1)]

    def test_versions_in_their_grace_do_not_hold_up_the_others(self, make_manager):
        """Key ids rotated moments ago wait; those rotated long ago are trimmed, however many of either.

        The sweep took a batch of key ids over the limit and skipped those still in
        their grace: with enough of them, every batch was theirs and nothing went.
        """
        clock = _Clock()
        manager = make_manager(max_key_versions=1, clock=clock)
        for name in ("long-ago-0", "long-ago-1", "long-ago-2", "just-now-0", "just-now-1", "just-now-2"):
            manager.generate_key(name)
        for name in ("long-ago-0", "long-ago-1", "long-ago-2"):
            manager.rotate_key(name)
        clock.advance(minutes=60)  # (a clock behind the store's stamps by the store's: not back-dated)
        for name in ("just-now-0", "just-now-1", "just-now-2"):
            manager.rotate_key(name)
        destroyed = manager.enforce_max_versions(batch_size=2)
        assert sorted(destroyed) == [("long-ago-0", 1), ("long-ago-1", 1), ("long-ago-2", 1)]
        assert manager.enforce_max_versions(batch_size=2) == []

    def test_retire(self, manager):
        """A retired active version stops encrypting; the next use creates a new version."""
        manager.generate_key("orders")
        manager.retire_key("orders", 1)
        assert manager.encryption_key(KeySpec("orders")).version == 2
        manager.decryption_key("orders", 1)
        with pytest.raises(KeyNotFound, match="'orders' version 9"):
            manager.retire_key("orders", 9)

    def test_destroy(self, manager):
        """Destroying deletes material, keeps rows, and evicts this process's cache at once."""
        sealed = manager.encryption_key(KeySpec("orders")).seal(b"x", b"")
        manager.decryption_key("orders", 1)  # cached
        assert manager.destroy_key("orders") == 1
        with pytest.raises(KeyDestroyed, match="'orders' version 1"):
            manager.decryption_key("orders", 1)
        assert sealed  # the ciphertext still exists but nothing can open it
        assert manager.get_stats().destroyed_keys == 1
        assert manager.destroy_key("orders") == 0
        assert [r.operation for r in manager.audit_trail("orders")] == ["generate", "destroy"]

    def test_unknown_keys(self, manager):
        """Unknown key ids and versions raise KeyNotFound naming the key id only."""
        with pytest.raises(KeyNotFound, match="'nope' version 1"):
            manager.decryption_key("nope", 1)
        with pytest.raises(KeyNotFound, match="'nope'"):
            manager.rotate_key("nope")
        # Destroying a key id or version that never existed is not a silent success (a typo).
        manager.encryption_key(KeySpec("orders"))
        with pytest.raises(KeyNotFound, match="'Orders' not found"):
            manager.destroy_key("Orders")
        with pytest.raises(KeyNotFound, match="'orders' version 7 not found"):
            manager.destroy_key("orders", 7)
        assert manager.destroy_key("orders", 1) == 1

    def test_a_key_id_no_store_can_hold_is_named_as_such(self, manager):
        """A NUL byte in a key id given to the Python API: a clear error or nothing found, on every backend.

        PostgreSQL refused it with SQLAlchemy's DataError from most methods.
        """
        manager.encryption_key(KeySpec("orders"))
        for operation in (
            lambda: manager.rotate_key("or\x00ders"),
            lambda: manager.retire_key("or\x00ders", 1),
            lambda: manager.destroy_key("or\x00ders"),
        ):
            with pytest.raises(ConfigurationError, match=r"no key is named .*: key ids must be 1-64 letters"):
                operation()
        with pytest.raises(KeyNotFound, match="version 1 not found"):
            manager.decryption_key("or\x00ders", 1)
        assert manager.list_keys("or\x00ders") == []
        assert manager.audit_trail("or\x00ders") == []
        assert [k.key_id for k in manager.list_keys()] == ["orders"]

    def test_automatic_rotation_by_age_and_count(self, make_manager):
        """Keys older than the interval or past the message count rotate; others do not."""
        manager = make_manager(rotation_interval=timedelta(days=1), rotation_max_messages=50)
        for key_id in ("old", "busy", "fresh"):
            manager.encryption_key(KeySpec(key_id))
        for _ in range(60):
            manager.encryption_key(KeySpec("busy"))
        rotated = manager.perform_automatic_rotation(now=utcnow() + timedelta(hours=1))
        assert rotated == ["busy"]
        rotated = manager.perform_automatic_rotation(now=utcnow() + timedelta(days=2))
        assert sorted(rotated) == ["busy", "fresh", "old"]
        assert manager.perform_automatic_rotation(now=utcnow() + timedelta(days=2)) == []

    def test_automatic_rotation_takes_the_rotating_process_interval(self, make_manager):
        """A version created under a longer interval is due by the rotating process's own.

        Its creator's deadline (``next_rotation_at``) decided alone: a lowered
        ``pii_rotation_interval``, or a beat worker configured apart from the
        producers, left existing keys on their old deadline.
        """
        make_manager(rotation_interval=timedelta(days=90)).encryption_key(KeySpec("payments"))
        rotating = make_manager(rotation_interval=timedelta(days=30))
        assert rotating.perform_automatic_rotation(now=utcnow() + timedelta(days=29)) == []
        assert rotating.perform_automatic_rotation(now=utcnow() + timedelta(days=31)) == ["payments"]

    def test_automatic_rotation_leaves_a_bucket_past_its_deadline(self, manager):
        """It can seal nothing: a new version of it was counted as rotated, then destroyed with it."""
        deadline = (utcnow() + timedelta(days=1)).replace(microsecond=0)
        bucket = manager.encryption_key(KeySpec(f"receipts@{deadline:%Y%m%dT%H%M%SZ}", expires_at=deadline))
        later = utcnow() + timedelta(days=200)  # past the deadline and the interval both
        assert manager.perform_automatic_rotation(now=later) == []
        assert [k.version for k in manager.list_keys(bucket.key_id)] == [1]

    def test_audit_trail_filters(self, manager):
        """audit_trail filters by key id and time window, oldest first."""
        manager.generate_key("a")
        middle = utcnow()
        time.sleep(0.01)
        manager.generate_key("b")
        assert [r.key_id for r in manager.audit_trail()] == ["a", "b"]
        assert [r.key_id for r in manager.audit_trail(since=middle)] == ["b"]
        assert [r.key_id for r in manager.audit_trail(until=middle)] == ["a"]
        assert [r.key_id for r in manager.audit_trail("b")] == ["b"]

    @pytest.mark.parametrize(
        ("call", "named"),
        [
            (lambda manager, naive: manager.audit_trail(since=naive), "audit_trail: since"),
            (lambda manager, naive: manager.audit_trail(until=naive), "audit_trail: until"),
            (lambda manager, naive: manager.destroy_expired(now=naive), "destroy_expired: now"),
            (lambda manager, naive: manager.perform_automatic_rotation(now=naive), "automatic_rotation: now"),
        ],
        ids=["since", "until", "destroy_expired", "rotation"],
    )
    def test_a_time_without_a_zone_is_refused_naming_the_argument(self, manager, call, named):
        """``datetime.now() - timedelta(days=1)`` is what a hurried caller passes.

        The audit trail raised SQLAlchemy's ``StatementError`` (its text the SQL
        statement), neither a ``PIIError`` nor naming the argument.
        """
        manager.generate_key("a")
        naive = utcnow().replace(tzinfo=None) - timedelta(days=1)
        with pytest.raises(ConfigurationError, match=rf"{named} must be timezone-aware"):
            call(manager, naive)

    def test_an_unknown_algorithm_is_refused_with_the_choices(self, manager):
        with pytest.raises(ConfigurationError, match=r"generate_key: algorithm must be one of 'aes-256-gcm'"):
            manager.generate_key("a", algorithm="rot13")
        assert manager.list_keys() == []

    def test_key_ids_differing_in_case_are_distinct_keys(self, make_manager):
        """'Payments' and 'payments' are two keys on every backend: destroying one leaves the other."""
        manager = make_manager()
        sealed = manager.encryption_key(KeySpec("Payments")).seal(b"4111 1111 1111 1111", b"ad")
        lower = manager.encryption_key(KeySpec("payments"))
        assert (lower.key_id, lower.version) == ("payments", 1)
        with pytest.raises(DecryptionFailed):
            lower.open(sealed, b"ad")  # its own material, not Payments'
        assert manager.destroy_key("payments") == 1
        other = make_manager()
        assert other.decryption_key("Payments", 1).open(sealed, b"ad") == b"4111 1111 1111 1111"
        assert sorted((k.key_id, k.status) for k in other.list_keys()) == [
            ("Payments", "active"),
            ("payments", "destroyed"),
        ]
        assert [r.operation for r in other.audit_trail("Payments")] == ["generate"]

    @pytest.mark.parametrize(
        "key_id",
        ["has space", "subject.0123abcd", "celery_pii.subject-index", "orders@20270101T000000Z", "a:b"],
    )
    def test_bad_key_id(self, manager, key_id):
        """Malformed key ids are refused, and those the library makes itself (subjects, buckets, its own)."""
        with pytest.raises(ConfigurationError, match="key ids must be"):
            manager.generate_key(key_id)


class TestCache:
    """The in-process key cache."""

    def test_hit_touches_no_database(self, manager):
        """Once cached, encryption and decryption lookups issue no SQL."""
        statements = []
        sa.event.listen(
            manager.store.engine, "before_cursor_execute", lambda *args: statements.append(args[2])
        )
        manager.encryption_key(KeySpec("orders"))
        manager.decryption_key("orders", 1)
        statements.clear()
        for _ in range(500):
            manager.encryption_key(KeySpec("orders"))
            manager.decryption_key("orders", 1)
        assert statements == []
        stats = manager.get_stats()
        assert stats.cache_hits >= 1000
        assert stats.cache_misses >= 1

    def test_a_key_dropped_for_size_is_read_again_from_the_store(self, make_manager):
        """``pii_key_cache_size`` bounds the keys held; one dropped still seals and opens (one read)."""
        manager = make_manager(cache_size=8)
        statements = []
        sa.event.listen(
            manager.store.engine, "before_cursor_execute", lambda *args: statements.append(args[2])
        )
        subjects = [manager.subject_key_id(f"user-{number}@example.com") for number in range(30)]
        sealed = [
            manager.encryption_key(KeySpec(key_id, subject_id=digest)).seal(b"5555555555554444", b"ad")
            for key_id, digest in subjects
        ]
        assert len(manager.cache) <= 8
        statements.clear()
        first_id = subjects[0][0]
        assert manager.decryption_key(first_id, 1).open(sealed[0], b"ad") == b"5555555555554444"
        assert statements  # it had been dropped: read from the store
        statements.clear()
        assert manager.decryption_key(first_id, 1).open(sealed[0], b"ad") == b"5555555555554444"
        assert statements == []  # and held again
        assert len(manager.cache) <= 8

    def test_recheck_evicts_keys_destroyed_by_another_process(self, make_manager):
        """A second manager serves its cached copy until it checks the store, then refuses it."""
        first, second = make_manager(), make_manager(recheck_interval=3600)
        first.encryption_key(KeySpec("orders"))
        second.decryption_key("orders", 1)
        first.destroy_key("orders")
        second.decryption_key("orders", 1)  # no check due yet: the cached copy still opens
        assert second.recheck_cache() == 1
        with pytest.raises(KeyDestroyed):
            second.decryption_key("orders", 1)
        assert second.recheck_cache() == 0  # nothing left to evict

    @pytest.mark.parametrize("change", ["rotate", "retire"])
    def test_recheck_stops_sealing_with_a_version_retired_elsewhere(self, make_manager, change):
        """After another process rotates or retires the active version, the next check moves sealing on.

        The retired version keeps opening what it sealed.
        """
        first, second = make_manager(), make_manager(recheck_interval=3600)
        first.encryption_key(KeySpec("orders"))
        assert second.encryption_key(KeySpec("orders")).version == 1
        if change == "rotate":
            assert first.rotate_key("orders") == 2
        else:
            first.retire_key("orders", 1)
        assert second.encryption_key(KeySpec("orders")).version == 1  # no check due yet: cached
        assert second.recheck_cache() == 1
        assert second.encryption_key(KeySpec("orders")).version == 2
        assert second.decryption_key("orders", 1).version == 1
        assert second.recheck_cache() == 0  # the retired version is no longer the active one here

    def test_a_rotation_run_that_lasts_is_seen_by_other_processes_checks(self, make_manager):
        """A version retired late in a long run is stamped when it was retired, not when the run began.

        Other processes' checks look back five minutes from their own last
        check: stamped with a long run's start, the retirement was missed, and
        they went on sealing under the retired version until their cache
        expired (an hour by default), past its destruction by pii_max_key_versions.
        """
        first = make_manager(rotation_max_messages=1)
        second = make_manager(recheck_interval=3600)
        first.encryption_key(KeySpec("orders"))
        first.encryption_key(KeySpec("orders"))  # past its message count: due
        assert second.encryption_key(KeySpec("orders")).version == 1
        second.recheck_cache()  # checked now: its next check looks back five minutes from here
        run_began = utcnow() - timedelta(minutes=10)  # the run reached "orders" ten minutes in
        assert first.perform_automatic_rotation(now=run_began) == ["orders"]
        assert second.recheck_cache() == 1
        assert second.encryption_key(KeySpec("orders")).version == 2

    def test_publish_and_consume_paths_run_the_check_when_due(self, make_manager):
        """With the check due, opening refuses a key destroyed elsewhere and sealing takes a new version."""
        first, second = make_manager(), make_manager(recheck_interval=0.2)
        first.encryption_key(KeySpec("orders"))
        second.decryption_key("orders", 1)
        assert second.encryption_key(KeySpec("orders")).version == 1
        first.destroy_key("orders")
        time.sleep(0.3)
        with pytest.raises(KeyDestroyed):
            second.decryption_key("orders", 1)
        assert second.encryption_key(KeySpec("orders")).version == 2

    def test_recheck_reaches_back_over_clock_skew(self, make_manager):
        """A destroying host whose clock runs two minutes behind is not missed by the next check."""
        behind = make_manager(clock=lambda: utcnow() - timedelta(minutes=2))
        second = make_manager(recheck_interval=3600)
        behind.encryption_key(KeySpec("orders"))
        second.decryption_key("orders", 1)
        assert second.recheck_cache() == 0
        behind.destroy_key("orders")  # destroyed_at two minutes before this process's last check
        assert second.recheck_cache() == 1

    @pytest.mark.parametrize("skewed", ["destroyer behind", "checker ahead"])
    @pytest.mark.parametrize("change", ["destroy", "forget_subject", "rotate"])
    def test_no_clock_skew_hides_a_change_from_checks(self, make_manager, skewed, change):
        """Hosts whose clocks differ from the store's by more than the checks' overlap still see changes.

        A destroying host ten minutes behind stamped the destruction before the
        other process's window: it went on opening the erased subject's messages
        until its cache expired (an hour by default).
        """
        ten_minutes = timedelta(minutes=10)
        destroyer = make_manager(
            clock=(lambda: utcnow() - ten_minutes) if skewed == "destroyer behind" else utcnow
        )
        checker = make_manager(
            recheck_interval=3600,
            clock=(lambda: utcnow() + ten_minutes) if skewed == "checker ahead" else utcnow,
        )
        key_id, digest = destroyer.subject_key_id("ann@example.com")
        spec = KeySpec(key_id, subject_id=digest)
        destroyer.encryption_key(spec)
        assert checker.encryption_key(spec).version == 1
        assert checker.recheck_cache() == 0
        {
            "destroy": lambda: destroyer.destroy_key(key_id),
            "forget_subject": lambda: destroyer.destroy_subject("ann@example.com"),
            "rotate": lambda: destroyer.rotate_key(key_id),
        }[change]()
        assert checker.recheck_cache() == 1
        if change == "rotate":
            assert checker.encryption_key(spec).version == 2
        else:
            with pytest.raises(KeyDestroyed):
                checker.decryption_key(key_id, 1)

    @pytest.mark.parametrize("run", ["rotation", "retention"])
    def test_destruction_in_a_run_with_an_old_now_is_seen_by_checks(self, make_manager, db_url, run):
        """destroyed_at is the moment of destruction, not the run's now, so other processes' checks see it."""
        earlier = utcnow() - timedelta(days=1)  # a long run's start, or an operator's chosen instant
        destroyer = make_manager(max_key_versions=2, rotation_max_messages=1)
        other = make_manager(recheck_interval=3600)
        if run == "rotation":
            destroyer.generate_key("orders")
            destroyer.rotate_key("orders")
            # v1 retired well before the run (a version retired moments ago is never destroyed).
            retired = f"{earlier - timedelta(hours=1):%Y-%m-%d %H:%M:%S.%f}"  # stored as naive UTC
            _execute(db_url, "UPDATE celery_pii_keys SET retired_at = :t WHERE version = 1", t=retired)
            destroyer.encryption_key(KeySpec("orders"))  # v2 reaches rotation_max_messages
            key_id = "orders"
        else:
            key_id = "orders@1"
            destroyer.encryption_key(KeySpec(key_id, expires_at=utcnow() + timedelta(hours=1)))
        other.decryption_key(key_id, 1)
        assert other.recheck_cache() == 0
        started = utcnow()
        if run == "rotation":
            assert destroyer.perform_automatic_rotation(now=earlier) == ["orders"]  # v1 goes (max 2)
        else:
            past = f"{earlier - timedelta(hours=1):%Y-%m-%d %H:%M:%S.%f}"  # stored as naive UTC
            _execute(db_url, "UPDATE celery_pii_keys SET expires_at = :t WHERE key_id = :k", t=past, k=key_id)
            assert destroyer.destroy_expired(now=earlier) == [(key_id, 1)]
        (v1,) = [k for k in destroyer.list_keys(key_id) if k.version == 1]
        assert v1.status == "destroyed"
        assert v1.destroyed_at >= started - timedelta(seconds=1)
        assert other.recheck_cache() == 1
        with pytest.raises(KeyDestroyed):
            other.decryption_key(key_id, 1)

    def test_ttl_still_bounds_the_cache_between_checks(self, make_manager):
        """Without a check, a cached copy is served only until pii_key_cache_ttl runs out."""
        # A ttl that a slow store's destroy cannot outlast (0.5 s did, once, on a busy CI machine).
        ttl = 2.0
        first, second = make_manager(cache_ttl=ttl), make_manager(cache_ttl=ttl, recheck_interval=3600)
        first.encryption_key(KeySpec("orders"))
        loading = time.monotonic()
        second.decryption_key("orders", 1)
        loaded = time.monotonic()  # the cached copy expires between loading + ttl and loaded + ttl
        first.destroy_key("orders")
        assert time.monotonic() - loading < ttl, "the destroy outlasted the ttl: the test proves nothing"
        second.decryption_key("orders", 1)  # cached, and no check due
        time.sleep(max(0.0, loaded + ttl + 0.1 - time.monotonic()))
        with pytest.raises(KeyDestroyed):
            second.decryption_key("orders", 1)

    def test_unreachable_store_at_a_check_keeps_serving_and_checks_again(self, make_manager, db_url, caplog):
        """A check that cannot reach the store warns, keeps the cache, backs off, and misses nothing after."""
        url = sa.engine.make_url(db_url)
        if url.host is None:
            pytest.skip("SQLite has no network to cut")
        proxy = TcpProxy(url.host, url.port)
        try:
            first = make_manager()
            second = _behind(proxy, url, recheck_interval=0.1)
            first.encryption_key(KeySpec("orders"))
            second.decryption_key("orders", 1)
            proxy.cut()
            first.destroy_key("orders")
            time.sleep(0.15)
            with caplog.at_level(logging.WARNING, logger="celery_pii.keys"):
                opened = second.decryption_key("orders", 1)  # the check fails: no outage for tasks
            assert opened.version == 1
            assert "could not check the key store for destroyed keys" in caplog.text
            proxy.restore()
            # One interval after a single failed check, the next one sees the erasure (it waited
            # ten: a blip of the store hid forget_subject for five minutes with the defaults).
            time.sleep(0.15)
            with pytest.raises(KeyDestroyed):
                second.decryption_key("orders", 1)
            second.store.dispose()
        finally:
            proxy.close()

    def test_a_store_that_hangs_holds_no_publish_of_a_cached_key(self, stalling_store, caplog):
        """The store accepts and never answers (a stalled pooler): the periodic check gives up, the key serves.

        A publish of a cached key ran the check on the publish path and waited
        as long as the store hung (90 s and more: TCP timeouts never fire when
        the peer acknowledges); the usage flush did the same.
        """
        proxy, url = stalling_store
        try:
            manager = _behind(proxy, url, recheck_interval=0.1)
            manager.encryption_key(KeySpec("orders"))
            proxy.freeze()
            time.sleep(0.15)  # the next use runs the check
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="celery_pii.keys"):
                assert manager.encryption_key(KeySpec("orders")).version == 1
                manager.flush_usage()
            assert time.monotonic() - started < 5
            assert "could not check the key store for destroyed keys" in caplog.text
            assert "usage counts kept in memory" in caplog.text
            assert manager.cache.take_usage()  # kept, to be written once the store answers
        finally:
            proxy.close()

    def test_a_store_that_hangs_fails_a_key_load_in_bounded_time(self, stalling_store):
        """A key not cached, asked of a store that never answers: KeyStoreUnavailable after the wait, not a hang.

        A publish under a new key (a new subject's), a task start needing a
        version not cached, and a refused message's audit record waited as
        long as the driver's own timeouts let them (35 s on MariaDB here).
        Once the store answers again, the same calls work.
        """
        proxy, url = stalling_store
        try:
            sealing = _behind(proxy, url, recheck_interval=3600)
            opening = _behind(proxy, url, recheck_interval=3600)
            sealing.encryption_key(KeySpec("orders"))
            proxy.freeze()
            calls = {
                "a new key": lambda: sealing.encryption_key(KeySpec("refunds")),
                "a version not cached": lambda: opening.decryption_key("orders", 1),
                "a data subject's key id": lambda: sealing.subject_key_id("cust-1"),
                "an audit record": lambda: opening.record("tamper_detected", "orders", 1, task="t.x"),
            }
            for what, call in calls.items():
                started = time.monotonic()
                with pytest.raises(KeyStoreUnavailable, match=r"pii_key_store_url.*did not answer"):
                    call()
                assert time.monotonic() - started < 5, what
            assert sealing.encryption_key(KeySpec("orders")).version == 1  # cached: still serves
            proxy.thaw()
            assert sealing.encryption_key(KeySpec("refunds")).version == 1
            assert opening.decryption_key("orders", 1).version == 1
        finally:
            proxy.close()

    def test_a_store_that_hangs_does_not_stop_an_eventlet_worker(self, db_url, tmp_path):
        """Under eventlet the wait for the store is bounded too, and the other green threads go on.

        There ``threading.Thread`` is a green thread, and psycopg waits in C:
        the hub stood still, the wait was never timed out, and every task of
        the worker stopped for as long as the store hung.
        """
        import importlib.util
        import subprocess
        import sys
        import textwrap

        if importlib.util.find_spec("eventlet") is None:  # not imported here: it belongs to the subprocess
            pytest.skip("eventlet is not installed")
        url = sa.engine.make_url(db_url)
        if url.host is None:
            pytest.skip("SQLite has no network to stall")
        proxy = TcpProxy(url.host, url.port)
        script = tmp_path / "eventlet_store.py"
        script.write_text(
            textwrap.dedent(
                """
                import eventlet
                eventlet.monkey_patch()
                import json, os, sys, time
                from celery_pii import _keys
                from celery_pii._keys import KeyManager, KeySpec
                from celery_pii._sources import LocalMasterKey
                from celery_pii._store import KeyStore

                _keys.STORE_ANSWER_TIMEOUT = 1.0
                manager = KeyManager(KeyStore(sys.argv[1], connect_timeout=1), LocalMasterKey(os.urandom(32)),
                                     recheck_interval=3600)
                assert manager.encryption_key(KeySpec("eventlet-warm")).version >= 1  # answered: on a pool thread
                print("ready", flush=True)
                sys.stdin.readline()  # the proxy is frozen now
                ticks = []
                def tick():
                    while True:
                        ticks.append(time.monotonic())
                        eventlet.sleep(0.05)
                eventlet.spawn(tick)
                started = time.monotonic()
                try:
                    manager.encryption_key(KeySpec("eventlet-cold"))
                    outcome = "answered"
                except Exception as error:
                    outcome = type(error).__name__
                waited = time.monotonic() - started
                print(json.dumps({"outcome": outcome, "waited": waited, "ticks": len(ticks)}), flush=True)
                os._exit(0)  # the pool thread still waits on the frozen store
                """
            )
        )
        through = url.set(port=proxy.port).render_as_string(hide_password=False)
        process = subprocess.Popen(
            [sys.executable, str(script), through],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
            proxy.freeze()
            process.stdin.write("go\n")
            process.stdin.flush()
            report = json.loads(process.stdout.readline())
            assert report["outcome"] == "KeyStoreUnavailable"
            assert report["waited"] < 5
            assert report["ticks"] >= 5  # the other green threads ran meanwhile
        finally:
            process.kill()
            process.communicate(timeout=30)
            proxy.close()

    def test_checks_back_off_while_the_store_stays_unreachable(self, make_manager, db_url):
        """One interval after a failed check, then two, four, eight, ten at most; one again once it answers."""
        url = sa.engine.make_url(db_url)
        if url.host is None:
            pytest.skip("SQLite has no network to cut")
        proxy = TcpProxy(url.host, url.port)
        try:
            manager = _behind(proxy, url, recheck_interval=100.0)
            manager.encryption_key(KeySpec("orders"))
            proxy.cut()
            waits = []
            for _ in range(6):
                manager.recheck_cache()
                waits.append(round((manager._next_recheck - time.monotonic()) / 100.0))
            assert waits == [1, 2, 4, 8, 10, 10]
            proxy.restore()
            manager.recheck_cache()
            assert round((manager._next_recheck - time.monotonic()) / 100.0) == 1
            manager.recheck_cache()
            assert round((manager._next_recheck - time.monotonic()) / 100.0) == 1
            manager.store.dispose()
        finally:
            proxy.close()

    def test_usage_counts_are_flushed_in_batches(self, manager, db_url):
        """2,500 encryptions cost a handful of UPDATEs, and the count is exact after a flush."""
        updates = []
        sa.event.listen(
            manager.store.engine,
            "before_cursor_execute",
            lambda _c, _cur, sql, *_rest: (
                updates.append(sql) if sql.lstrip().upper().startswith("UPDATE") else None
            ),
        )
        for _ in range(2500):
            manager.encryption_key(KeySpec("orders"))
        manager.flush_usage()
        assert 1 <= len(updates) <= 4
        assert _execute(db_url, "SELECT usage_count FROM celery_pii_keys")[0][0] == 2500

    def test_a_forked_child_counts_only_its_own_uses(self, manager, db_url):
        """Counts not yet flushed at a fork are the parent's: a child flushing its own adds only those."""
        for _ in range(300):
            manager.encryption_key(KeySpec("orders"))
        pid = os.fork()
        if pid == 0:  # the child, gone through os._exit as a pool child is
            code = 1
            try:
                for _ in range(5):
                    manager.encryption_key(KeySpec("orders"))
                manager.flush_usage()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        manager.flush_usage()
        assert _execute(db_url, "SELECT usage_count FROM celery_pii_keys WHERE key_id = 'orders'") == [(305,)]

    def test_the_flush_at_exit_gives_up_when_the_store_hangs(self, manager, db_url, caplog, monkeypatch):
        """A process ending while another transaction holds the key rows is not kept waiting."""
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN; a held row lock is what is tested")
        # Only this test's manager: one an earlier test left alive, with counts for a store it
        # stalled, would be flushed first, and hold up this one's write beyond the deadline below.
        monkeypatch.setattr(_keys, "_live_managers", weakref.WeakSet([manager]))
        manager.encryption_key(KeySpec("orders"))
        manager.flush_usage()
        uses = 1
        # One use not written yet (a pause of the machine longer than the flush interval
        # between two uses writes the second at once: use it again then).
        while not manager.cache.pending_uses():
            manager.encryption_key(KeySpec("orders"))
            uses += 1
        locker = sa.create_engine(db_url, poolclass=sa.pool.NullPool).connect()
        locker.exec_driver_sql("SELECT usage_count FROM celery_pii_keys FOR UPDATE").all()
        release = threading.Timer(6, locker.rollback)  # a flush that waits for the lock ends then
        release.start()
        try:
            started = time.monotonic()
            # An in-process Celery worker of an earlier test may have left the root logger at ERROR.
            with caplog.at_level(logging.WARNING, logger="celery_pii"):
                flush_all_usage(timeout=0.5)
            assert time.monotonic() - started < 3
            assert "usage counts not written within" in caplog.text
        finally:
            release.cancel()
            locker.rollback()
            locker.close()
        deadline = time.monotonic() + 30  # the writer, released, finishes in the background
        while _execute(db_url, "SELECT usage_count FROM celery_pii_keys")[0][0] != uses:
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def test_processes_flushing_at_once_lose_no_count(self, make_manager, db_url):
        """Two managers flushing the same key version at once: the stored count is the exact sum."""
        first, second = make_manager(), make_manager()
        for manager in (first, second):
            for _ in range(1000):
                manager.encryption_key(KeySpec("orders"))
        # The first flush stops after its first statement on the keys table (a read
        # of the count, or the update itself) while the second flushes in full.
        paused, resume, pausing = threading.Event(), threading.Event(), [True]

        def after_execute(_connection, _cursor, statement, *_rest):
            if pausing[0] and "celery_pii_keys" in statement:
                pausing[0] = False
                paused.set()
                resume.wait(30)

        sa.event.listen(first.store.engine, "after_cursor_execute", after_execute)
        errors: list[Exception] = []

        def flush(manager):
            try:
                manager.flush_usage()
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=flush, args=(first,))]
        threads[0].start()
        assert paused.wait(30)
        threads.append(threading.Thread(target=flush, args=(second,)))
        threads[1].start()
        time.sleep(0.5)  # the second flush commits, or waits for the first's row lock
        resume.set()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert _execute(db_url, "SELECT usage_count FROM celery_pii_keys WHERE key_id = 'orders'") == [
            (2000,)
        ]


class TestSubjects:
    """Per-subject keys and erasure."""

    def test_subject_keys_and_forget(self, manager, db_url):
        """A subject's key id is a keyed hash; destroying the subject shreds all its versions."""
        key_id, digest = manager.subject_key_id("ann@example.com")
        assert "ann" not in key_id and digest in key_id
        assert manager.subject_key_id("ann@example.com") == (key_id, digest)
        assert manager.subject_key_id("bob@example.com")[0] != key_id
        key = manager.encryption_key(KeySpec(key_id, subject_id=digest))
        manager.rotate_key(key_id)
        other = manager.encryption_key(
            KeySpec(manager.subject_key_id(7)[0], subject_id=manager.subject_key_id(7)[1])
        )
        assert manager.destroy_subject("ann@example.com") == 2
        with pytest.raises(KeyDestroyed):
            manager.decryption_key(key.key_id, 1)
        with pytest.raises(KeyDestroyed):
            manager.decryption_key(key.key_id, 2)
        assert manager.decryption_key(other.key_id, 1)
        reasons = {r.details.get("reason") for r in manager.audit_trail(key_id) if r.operation == "destroy"}
        assert reasons == {"forget_subject"}
        assert "ann@example.com" not in str(_execute(db_url, "SELECT * FROM celery_pii_key_audit"))

    def test_forgetting_a_subject_reaches_keys_named_before_ids_were_normalised(self, manager):
        """Earlier builds hashed the text as given: a decomposed id's keys are destroyed by either form."""
        import unicodedata

        from celery_pii._keys import SUBJECT_KEY_PREFIX

        composed = "zo\u00eb@example.com"
        decomposed = unicodedata.normalize("NFD", composed)
        for erased_as in (decomposed, composed):  # the request in either form
            old_digest = manager._subject_digest(decomposed)  # what an earlier build named its key by
            new_key_id, new_digest = manager.subject_key_id(decomposed)
            assert old_digest != new_digest
            old = manager.encryption_key(KeySpec(f"{SUBJECT_KEY_PREFIX}{old_digest}", subject_id=old_digest))
            new = manager.encryption_key(KeySpec(new_key_id, subject_id=new_digest))
            assert manager.destroy_subject(erased_as) == 2
            for key in (old, new):
                with pytest.raises(KeyDestroyed):
                    manager.decryption_key(key.key_id, key.version)

    def test_a_blank_subject_an_earlier_build_took_can_be_forgotten(self, manager):
        """Refused as a subject now, ``""`` named keys before: forget_subject("") still destroys them."""
        from celery_pii._keys import SUBJECT_KEY_PREFIX

        digest = manager._subject_digest("")
        manager.encryption_key(KeySpec(f"{SUBJECT_KEY_PREFIX}{digest}", subject_id=digest))
        assert manager.destroy_subject("") == 1

    def test_subject_hash_survives_a_new_manager(self, make_manager):
        """The subject index key lives in the store, so every process derives the same key id."""
        assert make_manager().subject_key_id(42) == make_manager().subject_key_id(42)

    @pytest.mark.parametrize("operation", ["rotate", "retire", "destroy"])
    def test_subject_index_key_is_never_changed_by_hand(self, make_manager, operation):
        """rotate/retire/destroy refuse the subject-index key, so forget_subject still finds a subject's keys."""
        manager = make_manager()
        key_id, digest = manager.subject_key_id("ann@example.com")
        manager.encryption_key(KeySpec(key_id, subject_id=digest))
        by_hand = {
            "rotate": lambda: manager.rotate_key(SUBJECT_INDEX_KEY),
            "retire": lambda: manager.retire_key(SUBJECT_INDEX_KEY, 1),
            "destroy": lambda: manager.destroy_key(SUBJECT_INDEX_KEY),
        }
        with pytest.raises(ConfigurationError, match=r"'celery_pii\.subject-index' is celery-pii's own key"):
            by_hand[operation]()
        assert [(k.version, k.status) for k in manager.list_keys(SUBJECT_INDEX_KEY)] == [(1, "active")]
        assert make_manager().destroy_subject("ann@example.com") == 1  # a fresh process, as the CLI is

    @pytest.mark.parametrize("change", ["retire", "delete"])
    def test_a_subject_index_changed_by_hand_is_never_replaced(self, make_manager, db_url, change):
        """Without an active subject index but with subjects' keys, none is created: erasure would miss them.

        A new secret was created quietly: every subject got a new key id, and
        forget_subject answered "destroyed 0" while the old messages still opened.
        """
        manager = make_manager()
        key_id, digest = manager.subject_key_id("ann@example.com")
        manager.encryption_key(KeySpec(key_id, subject_id=digest))
        if change == "retire":
            _execute(
                db_url, "UPDATE celery_pii_keys SET status = 'retired' WHERE key_id = :k", k=SUBJECT_INDEX_KEY
            )
        else:
            _execute(db_url, "DELETE FROM celery_pii_keys WHERE key_id = :k", k=SUBJECT_INDEX_KEY)
        fresh = make_manager()
        with pytest.raises(
            KeyNotFound, match=r"'celery_pii\.subject-index' has no active version.*restore its row"
        ):
            fresh.destroy_subject("ann@example.com")
        with pytest.raises(KeyNotFound, match="subject-index"):
            fresh.subject_key_id("bob@example.com")
        assert (
            _execute(db_url, "SELECT count(*) FROM celery_pii_keys WHERE key_id = :k", k=SUBJECT_INDEX_KEY)[
                0
            ][0]
            <= 1
        )

    def test_erasure_finds_a_subjects_keys_by_their_key_id(self, manager, db_url):
        """The subject_id column is not authenticated: cleared, erasure still finds the keys by their ids."""
        key_id, digest = manager.subject_key_id("ann@example.com")
        manager.encryption_key(KeySpec(key_id, subject_id=digest))
        bucket = utcnow().replace(microsecond=0) + timedelta(days=30)
        manager.encryption_key(
            KeySpec(f"{key_id}@{bucket:%Y%m%dT%H%M%SZ}", subject_id=digest, expires_at=bucket)
        )
        other_id, other_digest = manager.subject_key_id("bob@example.com")
        manager.encryption_key(KeySpec(other_id, subject_id=other_digest))
        _execute(db_url, "UPDATE celery_pii_keys SET subject_id = NULL")
        assert manager.destroy_subject("ann@example.com") == 2
        assert [(k.key_id, k.status) for k in manager.list_keys(other_id)] == [(other_id, "active")]

    def test_erasure_finds_a_subjects_keys_through_an_index(self, manager, db_url):
        """Finding a subject's keys by their key ids too uses the key id's index (PostgreSQL's plan says).

        A ``substr`` test alone scanned the whole key store for every erasure
        (164 ms on 300,000 rows against 0.13 ms).
        """
        if not db_url.startswith("postgresql"):
            pytest.skip("PostgreSQL's EXPLAIN")
        from celery_pii._keys import subject_keys

        query = subject_keys(["0" * 32, "f" * 32]).with_for_update()
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(  # a store large enough that a scan costs more than the index
                    "INSERT INTO celery_pii_keys (key_id, version, algorithm, status, created_at, created_by, "
                    "usage_count, subject_id) SELECT 'subject.' || md5(n::text) || '@20990101T000000Z', 1, "
                    "'aes-256-gcm', 'active', now(), 'test', 0, md5(n::text) FROM generate_series(1, 20000) n"
                )
                connection.exec_driver_sql("ANALYZE celery_pii_keys")
                compiled = query.compile(connection, compile_kwargs={"literal_binds": True})
                plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {compiled}"))
        finally:
            engine.dispose()
        assert "Seq Scan" not in plan, plan

    def test_every_reserved_key_id_is_refused(self, manager):
        """Any celery_pii.* id is refused by name, even one that does not exist (not KeyNotFound)."""
        with pytest.raises(ConfigurationError, match=r"'celery_pii\.other'"):
            manager.rotate_key("celery_pii.other")
        with pytest.raises(ConfigurationError, match=r"'celery_pii\.other'"):
            manager.retire_key("celery_pii.other", 1)
        with pytest.raises(ConfigurationError, match=r"'celery_pii\.other'"):
            manager.destroy_key("celery_pii.other", 1)

    def test_automatic_rotation_skips_the_subject_index_key(self, make_manager):
        """rotate_keys rotates subject keys that are due, never the subject-index key."""
        manager = make_manager(rotation_interval=timedelta(days=1))
        key_id, digest = manager.subject_key_id("ann@example.com")
        manager.encryption_key(KeySpec(key_id, subject_id=digest))
        assert manager.perform_automatic_rotation(now=utcnow() + timedelta(days=2)) == [key_id]
        assert [k.version for k in manager.list_keys(SUBJECT_INDEX_KEY)] == [1]
        assert make_manager().destroy_subject("ann@example.com") == 2


class TestDestructionRacingRotation:
    """A destruction that waits for a concurrent rotation also destroys the version the rotation made."""

    @pytest.mark.parametrize("operation", ["destroy_subject", "destroy_key"])
    def test_version_committed_while_waiting_is_destroyed(self, make_manager, db_url, monkeypatch, operation):
        """Erasure blocked behind a rotation's locks destroys v1 and the v2 that rotation inserted."""
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN, so the two writers queue instead")
        rotator, eraser = make_manager(), make_manager()
        key_id, digest = rotator.subject_key_id("ann@example.com")
        rotator.encryption_key(KeySpec(key_id, subject_id=digest))
        eraser.subject_key_id("ann@example.com")  # its secret is read before the race

        # The rotation inserts v2 and holds its transaction open until told to commit.
        inserted, commit = threading.Event(), threading.Event()
        insert_version = rotator._insert_version

        def insert_then_wait(*args, **kwargs):
            row = insert_version(*args, **kwargs)
            inserted.set()
            commit.wait(30)
            return row

        monkeypatch.setattr(rotator, "_insert_version", insert_then_wait)
        locking = threading.Event()

        def before_execute(_connection, _cursor, statement, *_rest):
            if "FOR UPDATE" in statement:
                locking.set()

        sa.event.listen(eraser.store.engine, "before_cursor_execute", before_execute)
        erase = {
            "destroy_subject": lambda: eraser.destroy_subject("ann@example.com"),
            "destroy_key": lambda: eraser.destroy_key(key_id),
        }[operation]
        outcomes: list[object] = []

        def run(work):
            try:
                outcomes.append(work())
            except Exception as error:  # noqa: BLE001 - reported below
                outcomes.append(error)

        rotation = threading.Thread(target=run, args=(lambda: rotator.rotate_key(key_id),))
        rotation.start()
        assert inserted.wait(30)
        erasure = threading.Thread(target=run, args=(erase,))
        erasure.start()
        assert locking.wait(30)
        time.sleep(0.5)  # the erasure's locking SELECT now waits for the rotation's row lock
        commit.set()
        rotation.join(60)
        erasure.join(60)
        assert sorted(outcomes, key=str) == [2, 2]  # rotate_key -> v2; the erasure destroyed 2 versions
        assert [(k.version, k.status) for k in eraser.list_keys(key_id)] == [
            (1, "destroyed"),
            (2, "destroyed"),
        ]


class TestRetentionKeys:
    """Bucket keys with an expiry."""

    def test_a_key_ids_buckets_are_its_own_only(self, manager):
        """``Payments`` reaches ``Payments@...`` only: not ``payments@...`` (SQLite's LIKE ignores case),
        nor ``Pay_ments@...`` or ``Payments2@...`` (LIKE wildcards, a longer id).
        """
        later = utcnow() + timedelta(days=5)
        for key_id in ("Payments@1", "payments@1", "PaymentsX@1", "Payments2@1", "Payments"):
            manager.encryption_key(KeySpec(key_id, expires_at=later if "@" in key_id else None))
        manager.encryption_key(KeySpec("Pay_ments@1", expires_at=later))
        assert sorted({k.key_id for k in manager.list_keys("Payments", buckets=True)}) == [
            "Payments",
            "Payments@1",
        ]
        assert manager.bucket_key_ids("Payments") == ["Payments@1"]
        assert [r.key_id for r in manager.audit_trail("Pay_ments", buckets=True)] == ["Pay_ments@1"]

    def test_destroy_expired(self, manager):
        """Versions whose expiry passed are destroyed by destroy_expired, others stay."""
        now = utcnow()
        manager.encryption_key(KeySpec("orders@1", expires_at=now + timedelta(seconds=5)))
        manager.encryption_key(KeySpec("orders@2", expires_at=now + timedelta(days=5)))
        assert manager.destroy_expired(now=now + timedelta(seconds=10)) == [("orders@1", 1)]
        with pytest.raises(KeyDestroyed):
            manager.decryption_key("orders@1", 1)
        manager.decryption_key("orders@2", 1)

    def test_past_deadline_refuses_to_open_everywhere(self, make_manager):
        """Once its deadline passes, a bucket key opens nothing, even from a cache, before enforcement."""
        moment = [utcnow()]
        manager = make_manager(clock=lambda: moment[0])
        key = manager.encryption_key(KeySpec("orders@t", expires_at=moment[0] + timedelta(seconds=60)))
        assert manager.decryption_key("orders@t", 1) is not None
        moment[0] += timedelta(seconds=61)
        with pytest.raises(KeyDestroyed, match="retention deadline"):
            manager.decryption_key(key.key_id, key.version)

    @pytest.mark.parametrize("column", [None, "2999-01-01 00:00:00"])
    def test_a_deadline_is_read_from_the_key_id_not_its_column(self, make_manager, db_url, column):
        """A bucket's deadline is in its key id, which the master key authenticates: the column is not.

        With its expires_at cleared or moved on by a database writer, a bucket key
        opened its data past the deadline.
        """
        clock = _Clock()
        clock.now = clock.now.replace(microsecond=0)
        deadline = clock.now + timedelta(seconds=60)
        key_id = f"orders@{deadline:%Y%m%dT%H%M%SZ}"
        make_manager(clock=clock).encryption_key(KeySpec(key_id, expires_at=deadline))
        _execute(db_url, "UPDATE celery_pii_keys SET expires_at = :e WHERE key_id = :k", e=column, k=key_id)
        clock.advance(seconds=61)
        with pytest.raises(KeyDestroyed, match="retention deadline"):
            make_manager(clock=clock).decryption_key(key_id, 1)

    def test_rotating_an_expired_bucket_keeps_its_deadline(self, manager):
        """A bucket key with no active version gets a new one with the same deadline."""
        deadline = utcnow() + timedelta(hours=1)
        manager.encryption_key(KeySpec("orders@r", expires_at=deadline))
        manager.retire_key("orders@r", 1)
        renewed = manager.encryption_key(KeySpec("orders@r"))
        assert renewed.version == 2
        assert renewed.expires_at == pytest.approx(deadline.timestamp(), abs=0.001)

    def test_expired_bucket_refuses_to_seal(self, manager):
        """Sealing under a bucket whose deadline passed fails instead of writing dead data."""
        with pytest.raises(EncryptionFailed, match="retention deadline"):
            manager.encryption_key(KeySpec("orders@0", expires_at=utcnow() - timedelta(seconds=1)))

    def test_cached_bucket_key_past_its_deadline_seals_nothing(self, make_manager):
        """A cached bucket key stops sealing at its deadline, before enforce_retention destroys it.

        New data is refused (EncryptionFailed); data derived from a message of
        that bucket (a result, a retry) finds its source gone (KeyDestroyed).
        """
        clock = _Clock()
        manager = make_manager(clock=clock)
        deadline = clock.now + timedelta(seconds=60)
        key = manager.encryption_key(KeySpec("orders@c", expires_at=deadline))
        clock.advance(seconds=61)
        with pytest.raises(EncryptionFailed, match="retention deadline"):
            manager.encryption_key(KeySpec("orders@c", expires_at=deadline))
        with pytest.raises(KeyDestroyed, match="retention deadline"):
            manager.encryption_key(KeySpec("orders@c", derived_from=((key.key_id, key.version),)))


class TestDerivedKeys:
    """Data derived from an opened message is never sealed once the version that opened it is destroyed."""

    @pytest.mark.parametrize("seen", ["destroyed here", "checked since", "cache expired"])
    def test_no_version_is_created_for_data_derived_from_a_destroyed_one(self, make_manager, seen):
        """An erased subject's running task gets no new version to seal its result or retry under.

        Whether this process destroyed the key, learnt it at its periodic
        check, or has no cached key left and asks the store.
        """
        manager = make_manager()
        key_id, digest = manager.subject_key_id("abc")
        source = manager.encryption_key(KeySpec(key_id, subject_id=digest))
        derived = KeySpec(key_id, subject_id=digest, derived_from=((source.key_id, source.version),))
        eraser = manager if seen == "destroyed here" else make_manager()
        assert eraser.destroy_subject("abc") == 1
        if seen == "checked since":
            assert manager.recheck_cache() == 1
        elif seen == "cache expired":
            manager.cache.clear()
        with pytest.raises(KeyDestroyed, match=f"'{key_id}' version 1 was destroyed"):
            manager.encryption_key(derived)
        assert [(k.version, k.status) for k in manager.list_keys(key_id)] == [(1, "destroyed")]
        # New data of the subject (a publish after the erasure) gets a new version; derived data still not.
        assert manager.encryption_key(KeySpec(key_id, subject_id=digest)).version == 2
        with pytest.raises(KeyDestroyed):
            manager.encryption_key(derived)

    def test_a_task_outliving_the_memory_of_the_destruction_still_seals_nothing(self, make_manager):
        """What a process remembers of destructions expires with its cache; the store still says so.

        Meanwhile a new task of the subject cached the subject's new version:
        a task running since before the erasure must not seal under it.
        """
        manager = make_manager(cache_ttl=0.5)
        key_id, digest = manager.subject_key_id("abc")
        fresh = KeySpec(key_id, subject_id=digest)
        source = manager.encryption_key(fresh)
        make_manager().destroy_subject("abc")
        assert manager.recheck_cache() == 1
        time.sleep(0.6)  # the remembered destruction, and every cached key, expire
        assert manager.encryption_key(fresh).version == 2  # a new task of the subject: v2 cached as active
        with pytest.raises(KeyDestroyed, match="version 1 was destroyed"):
            manager.encryption_key(
                KeySpec(key_id, subject_id=digest, derived_from=((key_id, source.version),))
            )

    def test_a_live_source_seals_under_the_active_version(self, manager):
        """A source rotated since (not destroyed): derived data is sealed under the new active version."""
        source = manager.encryption_key(KeySpec("orders"))
        manager.rotate_key("orders")
        derived = manager.encryption_key(KeySpec("orders", derived_from=((source.key_id, source.version),)))
        assert derived.version == 2


class TestFailures:
    """An unreachable store fails fast with KeyStoreUnavailable."""

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql+psycopg://postgres@127.0.0.1:1/test",
            "mysql+pymysql://root@127.0.0.1:1/test",
            "postgresql+psycopg://postgres@10.255.255.1:5432/test",
        ],
    )
    def test_unreachable(self, url):
        """A closed port or an unroutable host raises within the connect timeout."""
        manager = KeyManager(KeyStore(url, connect_timeout=1), MASTER)
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable, match="unreachable") as info:
            manager.encryption_key(KeySpec("orders"))
        assert time.monotonic() - started < 10
        assert "postgres@" not in str(info.value)

    def test_a_url_whose_driver_is_not_installed_names_the_missing_module(self):
        """``mysql://`` means MySQLdb to SQLAlchemy (pymysql is ``mysql+pymysql://``): say which module is missing."""
        with pytest.raises(ConfigurationError) as info:
            KeyStore("mysql://root:S3cretPw@127.0.0.1/test")
        assert "pii_key_store_url" in str(info.value)
        assert "no module 'MySQLdb'" in str(info.value)
        assert "S3cretPw" not in str(info.value)

    def test_passwords_are_hidden_in_the_url_shown(self, empty_db):
        """A password given in the query (psycopg takes ``?password=``) is hidden as one in the user part is."""
        if not empty_db.startswith("postgresql"):
            pytest.skip("the test server's PostgreSQL ignores passwords (trust); MariaDB's root has none")
        url = sa.engine.make_url(empty_db).set(query={"password": "s3cret-query"})
        store = KeyStore(url.render_as_string(hide_password=False), connect_timeout=2)
        with pytest.raises(ConfigurationError, match="no celery-pii tables") as info:
            store.check_schema()
        for shown in (str(info.value), store.url):
            assert "s3cret" not in shown
            assert "password=hidden" in shown
        store.dispose()

    def test_bad_url(self):
        """A URL without an installed driver is a configuration error naming the setting."""
        with pytest.raises(ConfigurationError, match="pii_key_store_url"):
            KeyStore("nosuchdb+driver://x/y")


def _spawn(db_url, count, automatic, testapp_module):
    """Start ``count`` spawned processes that rotate at the same moment; return their results."""
    import pii_children

    context = multiprocessing.get_context("spawn")  # no fork of a process that has threads
    barrier, results = context.Barrier(count), context.Queue()
    master = bytes(range(32))
    children = [
        context.Process(target=pii_children.rotate, args=(db_url, master, barrier, results, automatic))
        for _ in range(count)
    ]
    for child in children:
        child.start()
    got = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    return got


@pytest.mark.usefixtures("manager")
class TestConcurrency:
    """Racing rotations: exactly one new version per logical rotation."""

    def _versions(self, url, key_id="shared"):
        query = "SELECT version, status FROM celery_pii_keys WHERE key_id=:k ORDER BY version"
        rows = _execute(url, query, k=key_id)
        return [tuple(r) for r in rows]

    def test_processes_rotating_explicitly(self, manager, db_url, testapp_module):
        """N processes each calling rotate_key at once give N new, distinct, consecutive versions."""
        manager.generate_key("shared")
        got = _spawn(db_url, 4, False, testapp_module)
        assert sorted(got) == [2, 3, 4, 5]
        versions = self._versions(db_url)
        assert [v for v, _ in versions] == [1, 2, 3, 4, 5]
        assert [s for _, s in versions].count("active") == 1

    def test_processes_rotating_automatically(self, manager, db_url, testapp_module):
        """Two beat-like processes running automatic rotation at once make exactly one new version per key."""
        for key_id in ("shared", "other"):
            manager.generate_key(key_id)
        rotated = _spawn(db_url, 2, True, testapp_module)
        assert sorted(rotated[0] + rotated[1]) == ["other", "shared"]
        assert [v for v, _ in self._versions(db_url)] == [1, 2]
        assert [v for v, _ in self._versions(db_url, "other")] == [1, 2]

    def test_rotations_racing_over_many_due_keys_all_finish(self, make_manager, db_url):
        """Two rotate_keys runs at once over many due keys: no run fails, every key gets one new version.

        On MariaDB (REPEATABLE READ, gap locks) the two runs' scans and inserts
        deadlocked: one run failed with KeyStoreUnavailable and the due keys of
        its batch stayed due until the next run.
        """
        keys = [f"due-{i:03d}" for i in range(80)]
        setup = make_manager()
        for key_id in keys:
            setup.generate_key(key_id)
        runners = [make_manager(), make_manager()]
        for round_ in range(1, 6):
            when = utcnow() + timedelta(days=100 * round_)
            start = threading.Barrier(2)
            rotated, errors = [], []

            def run(manager, when=when, start=start, rotated=rotated, errors=errors):
                start.wait()
                try:
                    rotated.extend(manager.perform_automatic_rotation(now=when))
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=run, args=(runner,)) for runner in runners]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert errors == [], f"round {round_}"
            assert sorted(rotated) == keys, f"round {round_}"

    def test_mariadb_sessions_read_committed(self, manager, db_url):
        """The key store runs MySQL/MariaDB transactions as PostgreSQL does (READ COMMITTED: no gap locks)."""
        if not db_url.startswith("mysql"):
            pytest.skip("MariaDB only")
        with manager.store.transaction() as session:
            level = session.connection().exec_driver_sql("SELECT @@tx_isolation").scalar()
        assert level == "READ-COMMITTED"

    def test_threads_rotating(self, manager, db_url):
        """Threads sharing one manager rotate without duplicates or lost versions."""
        manager.generate_key("shared")
        got, errors = [], []

        def rotate():
            try:
                got.append(manager.rotate_key("shared"))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=rotate) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert sorted(got) == [2, 3, 4, 5]
        assert [v for v, _ in self._versions(db_url)] == [1, 2, 3, 4, 5]

    @staticmethod
    def _lose_the_race_to(racer, other, action, at="_inherit"):
        """Make ``racer``, having found no active version, see ``other`` commit one (``action``) first.

        What happens between two processes' first uses under READ COMMITTED, made
        certain: ``other`` commits when ``racer`` calls its method ``at`` (by
        default when it numbers its own version; ``_active_row``: right after it
        found none).
        """
        step = getattr(racer, at)
        raced = []

        def after_the_other_committed(*args):
            found = step(*args)
            if not raced:
                raced.append(action(other))
            return found

        def before_the_other_committed(*args):
            if not raced:
                raced.append(action(other))
            return step(*args)

        setattr(racer, at, after_the_other_committed if at == "_active_row" else before_the_other_committed)
        return raced

    def test_first_uses_racing_make_one_active_version(self, make_manager, db_url):
        """A first use that finds no version while another commits one uses that one (not a second active)."""
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN, so two first uses queue instead")
        first, racer = make_manager(), make_manager()
        raced = self._lose_the_race_to(racer, first, lambda other: other.encryption_key(KeySpec("shared")))
        key = racer.encryption_key(KeySpec("shared"))
        assert raced  # the other process did commit first
        assert self._versions(db_url) == [(1, "active")]
        assert key.version == raced[0].version == 1

    @pytest.mark.parametrize("at", ["_inherit", "_active_row"])
    def test_first_subjects_racing_share_one_subject_index(self, make_manager, db_url, at):
        """Processes naming their first subjects at once agree on its key id, so forget_subject finds it.

        The other's index committed right after this one found none made the
        check for a hand-removed index say "restore its row from a backup".
        """
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN, so two first uses queue instead")
        first, racer = make_manager(), make_manager()
        raced = self._lose_the_race_to(racer, first, lambda other: other.subject_key_id("cust-42"), at=at)
        assert racer.subject_key_id("cust-42") == raced[0]
        assert self._versions(db_url, SUBJECT_INDEX_KEY) == [(1, "active")]
        first.encryption_key(KeySpec(raced[0][0], subject_id=raced[0][1]))
        assert first.destroy_subject("cust-42") == 1
        with pytest.raises(KeyDestroyed):
            racer.decryption_key(raced[0][0], 1)

    def test_a_process_starting_while_another_makes_the_first_key(self, make_manager, db_url):
        """The start-up check sees the first key appear (same master key) between its reads: no error.

        Under READ COMMITTED its second read saw the row the first did not, and
        it reported a master key that does not match, naming its own.
        """
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN, so the two queue instead")
        starting, other = make_manager(), make_manager()
        made = []

        def after_the_first_read(conn, cursor, statement, parameters, context, executemany):
            if not made and "celery_pii_keys" in statement:
                made.append(other.encryption_key(KeySpec("orders")))

        sa.event.listen(starting.store.engine, "after_cursor_execute", after_the_first_read)
        try:
            starting.check_master_key()
        finally:
            sa.event.remove(starting.store.engine, "after_cursor_execute", after_the_first_read)
        assert made  # the other process made the store's first key meanwhile

    def test_one_rotation_per_key_id_with_two_active_versions(self, manager, db_url):
        """A store holding two active versions of a key (made before first uses gave way) rotates it once."""
        manager.generate_key("shared")
        with manager.store.transaction() as session:
            row = session.scalars(sa.select(KeyRow).where(KeyRow.key_id == "shared")).one()
            columns = {c.key: getattr(row, c.key) for c in sa.inspect(KeyRow).column_attrs if c.key != "id"}
            session.add(KeyRow(**{**columns, "version": 2}))
        rotated = manager.perform_automatic_rotation(now=utcnow() + manager.rotation_interval)
        assert rotated == ["shared"]
        assert self._versions(db_url) == [(1, "retired"), (2, "retired"), (3, "active")]


class TestWriteConflicts:
    """Lost lock races (deadlocks) are told apart from outages, and key writes run again."""

    def test_a_deadlock_is_a_write_conflict(self, manager, db_url):
        """Two transactions locking two keys in opposite orders: the database's victim raises WriteConflict."""
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN, so two writers queue instead")
        for key_id in ("left", "right"):
            manager.generate_key(key_id)
        both_hold_one = threading.Barrier(2, timeout=30)
        outcomes: list[object] = []

        def lock_in_order(first: str, second: str) -> None:
            store = KeyStore(db_url)
            try:
                with store.transaction() as session:
                    lock = sa.select(KeyRow).with_for_update()
                    session.scalars(lock.where(KeyRow.key_id == first)).all()
                    both_hold_one.wait()
                    session.scalars(lock.where(KeyRow.key_id == second)).all()
                outcomes.append("committed")
            except Exception as error:  # noqa: BLE001 - the outcome is what is checked
                outcomes.append(error)
            finally:
                store.dispose()

        threads = [
            threading.Thread(target=lock_in_order, args=("left", "right")),
            threading.Thread(target=lock_in_order, args=("right", "left")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert outcomes.count("committed") == 1
        (error,) = [outcome for outcome in outcomes if outcome != "committed"]
        assert isinstance(error, WriteConflict)
        assert isinstance(error, KeyStoreUnavailable)  # what callers that do not retry catch
        assert "lock race" in str(error)

    def test_only_lost_lock_races_are_write_conflicts(self):
        """Serialization failures and deadlocks are conflicts; outages and shutdowns stay outages."""
        import psycopg
        import pymysql

        from celery_pii._store import _is_write_conflict

        def wrapped(driver_error):
            return sa.exc.OperationalError("SELECT 1", {}, driver_error)

        assert _is_write_conflict(wrapped(psycopg.errors.SerializationFailure("could not serialize")))
        assert _is_write_conflict(wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
        assert _is_write_conflict(wrapped(pymysql.err.OperationalError(1213, "Deadlock found")))
        assert not _is_write_conflict(wrapped(psycopg.errors.AdminShutdown("terminating connection")))
        assert not _is_write_conflict(wrapped(pymysql.err.OperationalError(2003, "Can't connect")))
        assert not _is_write_conflict(wrapped(pymysql.err.OperationalError(1205, "Lock wait timeout")))

    def test_key_writes_run_again_after_a_lost_race(self, manager):
        """A key write rolled back by a lost lock race runs again; a write that keeps losing gives up."""
        calls = []

        def loses_once(session):
            calls.append(session)
            if len(calls) == 1:
                raise WriteConflict("lost")  # what KeyStore.transaction raises for a deadlock victim
            return "written"

        assert manager._transact(loses_once) == "written"
        assert len(calls) == 2

        def always_loses(session):
            raise WriteConflict("lost")

        with pytest.raises(KeyStoreUnavailable, match="kept conflicting"):
            manager._transact(always_loses)

    @pytest.mark.parametrize("erasure", ["forget_subject", "destroy_key"])
    def test_an_erasure_that_lost_a_lock_race_runs_again(self, manager, erasure):
        """Erasure rolled back by a lost lock race (a rotation of the same key, on MariaDB) runs again.

        It raised KeyStoreUnavailable to the caller: the erasure request failed.
        """
        key_id, digest = manager.subject_key_id("ann@example.com")
        manager.encryption_key(KeySpec(key_id, subject_id=digest))
        destroy_row = manager._destroy_row
        lost = []

        def loses_the_first_race(session, row, **options):
            if not lost:
                lost.append(row.key_id)
                raise WriteConflict("lost")  # what KeyStore.transaction raises for a deadlock victim
            return destroy_row(session, row, **options)

        manager._destroy_row = loses_the_first_race
        if erasure == "forget_subject":
            assert manager.destroy_subject("ann@example.com") == 1
        else:
            assert manager.destroy_key(key_id) == 1
        assert lost == [key_id]
        with pytest.raises(KeyDestroyed):
            manager.decryption_key(key_id, 1)


class TestLinguisticCollation:
    """A PostgreSQL database whose collation ignores punctuation (as ``en_US.UTF-8`` and ICU's do)."""

    @pytest.fixture
    def icu_url(self):
        """A migrated key store in a database of its own, ordering text by ICU's rules, punctuation ignored."""
        import uuid

        from .conftest import POSTGRES_URL

        name = f"pii_test_icu_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                "ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C.UTF-8'"
            )
        url = str(sa.engine.make_url(POSTGRES_URL).set(database=name))
        try:
            migrate(url)
            assert not _execute(url, "SELECT 'subject.ab' < 'subject/'")[0][0]  # as such collations order
            yield url
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
            admin.dispose()

    def test_subject_keys_and_the_index_are_found_by_key_id(self, icu_url):
        """Erasure by key id finds bucket keys, and a removed index is refused, under such a collation.

        A range on ``subject.`` held nothing there: a subject index removed by
        hand was made anew, and erasure then destroyed nothing.
        """
        manager = KeyManager(KeyStore(icu_url), MASTER)
        fresh = KeyManager(KeyStore(icu_url), MASTER)
        try:
            key_id, digest = manager.subject_key_id("ann@example.com")
            manager.encryption_key(KeySpec(key_id, subject_id=digest))
            bucket = utcnow().replace(microsecond=0) + timedelta(days=30)
            bucket_id = f"{key_id}@{bucket:%Y%m%dT%H%M%SZ}"
            manager.encryption_key(KeySpec(bucket_id, subject_id=digest, expires_at=bucket))
            manager.generate_key("pay")
            manager.encryption_key(KeySpec(f"pay@{bucket:%Y%m%dT%H%M%SZ}", expires_at=bucket))
            manager.generate_key("pay_x")
            assert manager.bucket_key_ids("pay") == [f"pay@{bucket:%Y%m%dT%H%M%SZ}"]
            _execute(icu_url, "UPDATE celery_pii_keys SET subject_id = NULL")
            _execute(icu_url, "DELETE FROM celery_pii_keys WHERE key_id = :k", k=SUBJECT_INDEX_KEY)
            with pytest.raises(KeyNotFound, match="subject-index"):
                fresh.destroy_subject("ann@example.com")
            assert manager.destroy_subject("ann@example.com") == 2  # its index secret is still in memory
        finally:
            manager.store.dispose()
            fresh.store.dispose()


class TestLeastPrivilege:
    """docs/operations.md's grants: the application never updates or deletes audit records, nor deletes keys."""

    def test_every_key_operation_runs_with_the_documented_grants(self):
        """A PostgreSQL role with SELECT, INSERT on the audit table (append-only) runs every key operation."""
        import uuid

        from .conftest import POSTGRES_URL, _fresh_postgres

        url, drop = _fresh_postgres()
        migrate(url)
        role = f"pii_app_{uuid.uuid4().hex[:8]}"
        schema = sa.engine.make_url(url).query["options"].removeprefix("-csearch_path=")
        grants = [
            f'CREATE ROLE "{role}" LOGIN',
            f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
            f'GRANT SELECT ON "{schema}".celery_pii_alembic_version TO "{role}"',
            f'GRANT SELECT, INSERT, UPDATE ON "{schema}".celery_pii_keys TO "{role}"',
            f'GRANT SELECT, INSERT ON "{schema}".celery_pii_key_audit TO "{role}"',
            f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"',
        ]
        for statement in grants:
            _execute(POSTGRES_URL, statement)
        manager = None
        try:
            manager = KeyManager(
                KeyStore(str(sa.engine.make_url(url).set(username=role))),
                MASTER,
                rotation_interval=timedelta(days=1),
            )
            manager.check_master_key()
            manager.generate_key("orders")
            manager.encryption_key(KeySpec("orders"))
            manager.flush_usage()
            manager.rotate_key("orders")
            manager.retire_key("orders", 1)
            key_id, digest = manager.subject_key_id("ann@example.com")
            manager.encryption_key(KeySpec(key_id, subject_id=digest))
            assert manager.destroy_subject("ann@example.com") == 1
            manager.encryption_key(KeySpec("orders@x", expires_at=utcnow() + timedelta(seconds=1)))
            assert manager.destroy_expired(now=utcnow() + timedelta(seconds=5)) == [("orders@x", 1)]
            assert manager.perform_automatic_rotation(now=utcnow() + timedelta(days=2)) == ["orders"]
            manager.enforce_max_versions()
            assert manager.destroy_key("orders", 1) == 1
            manager.recheck_cache()
            assert {record.operation for record in manager.audit_trail()} >= {"generate", "rotate", "destroy"}
        finally:
            if manager is not None:
                manager.store.dispose()
            drop()
            _execute(POSTGRES_URL, f'DROP ROLE "{role}"')
