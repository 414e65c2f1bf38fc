"""Master-key rotation: re-wrap every data key under a new master key, switch, finish — no downtime."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_pii import ConfigurationError, _rewrap
from celery_pii._keys import KeySpec
from celery_pii._rewrap import abort, finish, pending, rewrap
from celery_pii._sources import LocalMasterKey

from .conftest import MASTER

pytestmark = pytest.mark.integration

NEW = LocalMasterKey(bytes([7]) * 32)


def _seal(manager, key_id):
    key = manager.encryption_key(KeySpec(key_id))
    return key.key_id, key.version, key.seal(b"payload of " + key_id.encode(), b"ad")


def _opens(manager, sealed):
    key_id, version, blob = sealed
    manager.cache.clear()
    return manager.decryption_key(key_id, version).open(blob, b"ad")


class TestRotation:
    """The three steps of docs/operations.md, with processes on both keys in between."""

    def test_full_rotation_keeps_every_process_working(self, make_manager, db_url):
        """Old-key and new-key processes both work during the switch; after finish only the new key does."""
        old = make_manager()  # configured with the old master key
        sealed = [_seal(old, f"k{i}") for i in range(5)]
        old.destroy_key("k4")
        assert pending(old, NEW.ref) == 4

        progress = []
        report = rewrap(old, NEW, batch_size=2, progress=progress.append)
        assert (report.done, report.unreadable, report.complete) == (4, 0, True)
        assert sum(progress) >= 4
        assert pending(old, NEW.ref) == 0
        assert any(r.operation == "master_rewrap" for r in old.audit_trail("*"))

        new_only = make_manager(master=NEW)
        switching = make_manager(master=NEW, previous_master=MASTER)
        for manager in (old, new_only, switching):
            manager.check_master_key()
            assert [_opens(manager, s) for s in sealed[:4]] == [f"payload of k{i}".encode() for i in range(4)]
        # Keys created by an upgraded process during the switch still open for old ones.
        during = _seal(switching, "created-during-switch")
        assert _opens(old, during) == b"payload of created-during-switch"
        # Step 3, from an upgraded process: what old processes created meanwhile gets the new wrapping.
        by_old = _seal(old, "created-by-an-old-process")
        assert pending(switching, NEW.ref) == 1
        assert rewrap(switching, NEW).done == 1
        assert pending(switching, NEW.ref) == 0

        # A version destroyed between the two steps (retention, an erasure) names no master key either,
        # nor one an earlier build destroyed (it left the references).
        switching.destroy_key("k3")
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE celery_pii_keys SET master_key_ref = :ref WHERE key_id = 'k4'"),
                {"ref": MASTER.ref},
            )
        engine.dispose()

        # Step 4: the fleet drops pii_previous_master_key first; a process that still has it may not finish.
        with pytest.raises(ConfigurationError, match="pii_previous_master_key is still set"):
            finish(switching)
        done = finish(new_only, batch_size=2)
        assert done.complete
        assert _opens(new_only, sealed[0]) == b"payload of k0"
        assert _opens(new_only, by_old) == b"payload of created-by-an-old-process"
        # A process left on the old key: a deployment error (its tasks are retried, not parked).
        with pytest.raises(
            ConfigurationError, match="pii_master_key: key 'k0' v1 is wrapped by another master key"
        ):
            _opens(old, sealed[0])
        with pytest.raises(ConfigurationError, match="pii_master_key"):
            old.check_master_key()
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        with engine.connect() as connection:
            refs = connection.exec_driver_sql(
                "SELECT status, master_key_ref, master_key_ref_next FROM celery_pii_keys"
            ).fetchall()
        engine.dispose()
        # No row names the old master key (destroyed ones kept it: docs/operations.md says none does).
        assert {tuple(r) for r in refs} == {("destroyed", None, None), ("active", NEW.ref, None)}

    def test_rewrap_resumes_after_an_interruption(self, make_manager):
        """A rewrap stopped half-way picks up where it stopped; nothing is wrapped twice."""
        old = make_manager()
        for i in range(6):
            _seal(old, f"r{i}")

        def stop_after_two_batches(count, seen=[]):  # noqa: B006 - a counter across calls
            seen.append(count)
            if len(seen) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rewrap(old, NEW, batch_size=2, progress=stop_after_two_batches)
        assert pending(old, NEW.ref) == 2
        report = rewrap(old, NEW, batch_size=2)
        assert report.done == 2 and report.complete
        assert pending(old, NEW.ref) == 0

    def test_finish_before_rewrap_changes_nothing(self, make_manager):
        """Finishing with rows not yet re-wrapped leaves them readable and reports it."""
        old = make_manager()
        sealed = _seal(old, "early")
        report = finish(make_manager(master=NEW))
        assert not report.complete and report.skipped >= 1
        assert _opens(old, sealed) == b"payload of early"

    def test_finish_from_a_process_on_the_old_key_is_refused(self, make_manager):
        """It would drop the new wrappings and keep the old: every process on the new key would fail."""
        old = make_manager()
        sealed = _seal(old, "kept")
        assert rewrap(old, NEW).complete
        with pytest.raises(ConfigurationError, match=rf"not the one the last rewrap added \({NEW.ref}\)"):
            finish(old)
        assert _opens(make_manager(master=NEW), sealed) == b"payload of kept"

    def test_a_rotation_over_an_unfinished_one_is_refused(self, make_manager):
        """Re-wrapping under a third key would replace the second's wrapping: its processes would lose keys."""
        old = make_manager()
        sealed = _seal(old, "midway")
        assert rewrap(old, NEW).complete
        third = LocalMasterKey(bytes([8]) * 32)
        with pytest.raises(
            ConfigurationError, match=rf"second wrapping under master key {NEW.ref}.*unfinished"
        ):
            rewrap(old, third)
        assert _opens(make_manager(master=NEW), sealed) == b"payload of midway"

    def test_a_rotation_run_alongside_another_does_not_replace_its_wrappings(self, make_manager, monkeypatch):
        """Two rewraps to different keys, both past the check before either wrote: the later one stops.

        Its check ran before the other rewrap's batches committed (the check
        is replaced by that moment's result); the second wrappings found in its
        batches were replaced, stranding every process on the other new key.
        """
        old = make_manager()
        sealed = [_seal(old, f"both{i}") for i in range(3)]
        assert rewrap(old, NEW, batch_size=2).complete
        monkeypatch.setattr(_rewrap, "refuse_overwriting_another_rotation", lambda *_: None)
        third = LocalMasterKey(bytes([8]) * 32)
        with pytest.raises(
            ConfigurationError, match=rf"second wrapping under master key {NEW.ref}.*unfinished"
        ):
            rewrap(old, third, batch_size=2)
        assert {k.master_key_ref_next for k in old.list_keys()} == {NEW.ref}
        assert [_opens(make_manager(master=NEW), s) for s in sealed] == [
            f"payload of both{i}".encode() for i in range(3)
        ]

    def test_an_unfinished_rotation_can_be_abandoned(self, make_manager):
        """The new key is lost (or exposed) before the rotation is finished: the store goes back to the old one.

        There was no way back: another rotation was refused as unfinished,
        ``finish`` from the old key was refused, and only hand-written SQL
        could clear the new key's wrappings.
        """
        old = make_manager()
        sealed = _seal(old, "before")
        assert rewrap(old, NEW).complete
        switching = make_manager(master=NEW, previous_master=MASTER)
        during = _seal(switching, "created-during-switch")  # wrapped under NEW first, the old key second
        third = LocalMasterKey(bytes([8]) * 32)
        with pytest.raises(
            ConfigurationError, match=r"unfinished; finish it \(rewrap --finish\), or abandon"
        ):
            rewrap(old, third)

        # Refused from a process that still has both keys, or that is on the new key.
        with pytest.raises(ConfigurationError, match="pii_previous_master_key is set"):
            abort(switching)
        with pytest.raises(ConfigurationError, match="is the one the last rewrap added"):
            abort(make_manager(master=NEW))

        report = abort(old, batch_size=1)
        assert (report.done, report.complete) == (2, True)
        assert {(k.master_key_ref, k.master_key_ref_next) for k in old.list_keys()} == {(MASTER.ref, None)}
        assert [_opens(old, s) for s in (sealed, during)] == [
            b"payload of before",
            b"payload of created-during-switch",
        ]
        with pytest.raises(ConfigurationError, match="wrapped by another master key"):
            _opens(make_manager(master=NEW), sealed)
        assert sum(r.details.get("abandoned", 0) for r in old.audit_trail("*")) == 2  # one record a batch
        # Another rotation may start now.
        assert rewrap(old, third).complete
        assert _opens(make_manager(master=third), during) == b"payload of created-during-switch"

    def test_rewrap_under_the_key_already_in_use_is_refused(self, make_manager):
        """It reported success having re-wrapped nothing (and left an unfinished rotation as it was)."""
        old = make_manager()
        _seal(old, "same")
        with pytest.raises(ConfigurationError, match="is this process's own master key"):
            rewrap(old, MASTER)

    def test_unreadable_rows_are_counted_not_touched(self, make_manager):
        """A rewrap by a process that holds neither wrapping's key reports those rows."""
        _seal(make_manager(), "mine")
        stranger = make_manager(master=LocalMasterKey(bytes([9]) * 32))
        report = rewrap(stranger, NEW)
        assert report.unreadable >= 1 and not report.complete


class TestBusyRows:
    """Rows another transaction holds are skipped (SKIP LOCKED), and the report says so."""

    @pytest.fixture
    def hold_row_lock(self, db_url):
        """Lock one key's rows in another transaction until the test ends."""
        if db_url.startswith("sqlite"):
            pytest.skip("SQLite takes its write lock at BEGIN: a second writer waits, nothing is skipped")
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        connections = []

        def hold(key_id):
            connection = engine.connect()
            connections.append(connection)
            connection.execute(
                sa.text("SELECT id FROM celery_pii_keys WHERE key_id = :k FOR UPDATE"), {"k": key_id}
            )
            return connection

        yield hold
        for connection in connections:
            connection.rollback()
            connection.close()
        engine.dispose()

    def test_rewrap_is_incomplete_while_a_row_is_locked(self, make_manager, hold_row_lock):
        """A locked row is not re-wrapped, the run reports complete=False, and the next run finishes."""
        old = make_manager()
        for i in range(3):
            _seal(old, f"busy{i}")
        holder = hold_row_lock("busy0")  # e.g. a rotation or a usage flush in flight
        report = rewrap(old, NEW)
        assert (report.done, report.skipped, report.unreadable, report.complete) == (2, 1, 0, False)
        assert pending(old, NEW.ref) == 1
        holder.rollback()
        report = rewrap(old, NEW)
        assert (report.done, report.skipped, report.complete) == (1, 0, True)
        assert pending(old, NEW.ref) == 0

    def test_finish_is_incomplete_while_a_row_is_locked(self, make_manager, hold_row_lock):
        """finish leaves a locked row with two wrappings and reports complete=False until it is done."""
        old = make_manager()
        sealed = [_seal(old, f"busy{i}") for i in range(3)]
        assert rewrap(old, NEW).complete
        new_only = make_manager(master=NEW)
        holder = hold_row_lock("busy1")
        report = finish(new_only)
        assert (report.done, report.skipped, report.complete) == (2, 1, False)
        holder.rollback()
        report = finish(new_only)
        assert (report.done, report.skipped, report.complete) == (1, 0, True)
        assert _opens(make_manager(master=NEW), sealed[1]) == b"payload of busy1"
