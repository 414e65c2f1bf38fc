"""`celery -A proj pii ...`: CliRunner in-process, and real subprocesses against PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from celery.bin.celery import celery
from click.testing import CliRunner
from kombu import Exchange

from celery_pii import _celery
from celery_pii._quarantine import park
from celery_pii._sources import LocalMasterKey
from celery_pii._store import KeyRow

from .conftest import (
    APP_DIR,
    BACKEND_DB,
    BROKER_DB,
    RABBITMQ_URL,
    REDIS_URL,
    _fresh_postgres,
    message_bytes,
    queued_messages,
    redis_client,
)
from .test_celery_roundtrip import CARD, EMAIL

pytestmark = pytest.mark.integration

COMMANDS = [
    [],
    ["db"],
    ["db", "upgrade"],
    ["db", "current"],
    ["keys"],
    ["keys", "list"],
    ["keys", "generate"],
    ["keys", "rotate"],
    ["keys", "retire"],
    ["keys", "destroy"],
    ["keys", "audit"],
    ["keys", "stats"],
    ["master-key"],
    ["master-key", "generate"],
    ["master-key", "rewrap"],
    ["scan"],
    ["forget-subject"],
    ["quarantine"],
    ["quarantine", "list"],
    ["quarantine", "replay"],
    ["quarantine", "purge"],
]


@pytest.fixture
def cli_app(tmp_path, monkeypatch, key_store_url, queue_name):
    """A module `cliapp_<queue>` holding a PII app, importable with -A."""
    return _app_module(tmp_path, monkeypatch, key_store_url, queue_name)


def _app_module(tmp_path, monkeypatch, key_store_url, queue_name):
    name = "cliapp_" + queue_name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from pii_testapp import make_app
            app = make_app(broker={f"{REDIS_URL}/{BROKER_DB}"!r}, backend={f"{REDIS_URL}/{BACKEND_DB}"!r},
                           key_store={key_store_url!r}, queue={queue_name!r})
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(APP_DIR)
    return name


def run(module, *args, answer=None):
    return CliRunner().invoke(celery, ["-A", module, "pii", *args], input=answer, catch_exceptions=False)


class TestHelp:
    """Every command explains itself."""

    @pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pii")
    def test_help(self, cli_app, command):
        """--help exits 0 and shows usage."""
        result = run(cli_app, *command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


class TestCall:
    """Celery's own `celery call`, whose --serializer defaults to json."""

    def test_celery_call_publishes_a_sealed_message_workers_accept(self, cli_app, queue_name):
        """The sealed body went out as json: every worker refused it and parked it."""
        called = CliRunner().invoke(
            celery, ["-A", cli_app, "call", "t.echo", "--args", json.dumps([CARD])], catch_exceptions=False
        )
        assert called.exit_code == 0, called.output
        (message,) = queued_messages(queue_name)
        assert message["content-type"] == "application/x-celery-pii"
        assert CARD.encode() not in message_bytes(message)
        assert message["headers"]["id"] == called.output.strip()


class TestKeys:
    """Key commands on the real key store."""

    def test_lifecycle_and_listing(self, cli_app):
        """generate, rotate, retire, list --json, audit --json, stats --json."""
        assert run(cli_app, "keys", "generate", "cli-orders").exit_code == 0
        assert "version 2" in run(cli_app, "keys", "rotate", "cli-orders").output
        assert run(cli_app, "keys", "retire", "cli-orders", "2").exit_code == 0
        listed = json.loads(run(cli_app, "keys", "list", "cli-orders", "--json").output)
        assert [(k["version"], k["status"]) for k in listed] == [(1, "retired"), (2, "retired")]
        assert all("wrapped" not in key for key in listed[0])
        table = run(cli_app, "keys", "list", "cli-orders").output
        assert table.splitlines()[0].startswith("KEY_ID")
        audit = json.loads(run(cli_app, "keys", "audit", "cli-orders", "--json").output)
        assert [r["operation"] for r in audit] == ["generate", "rotate", "retire"]
        stats = json.loads(run(cli_app, "keys", "stats", "--json").output)
        assert stats["total_keys"] >= 2
        assert "cache_hits" not in stats  # the CLI process's own cache, always 0: not shown

    def test_audit_since_takes_the_timestamps_it_prints(self, cli_app):
        """``--json`` prints ISO 8601 with an offset; ``--since`` refused that form (and ``...Z``)."""
        assert run(cli_app, "keys", "generate", "cli-when").exit_code == 0
        (record,) = json.loads(run(cli_app, "keys", "audit", "cli-when", "--json").output)
        printed = record["timestamp"]
        # Python 3.10's fromisoformat read none of the forms after the first three.
        basic = printed[:19].replace("-", "").replace(":", "") + "Z"
        tenths = printed[:21] + "+0000"
        for since in (printed, printed.replace("+00:00", "Z"), printed[:19], basic, tenths):
            shown = run(cli_app, "keys", "audit", "cli-when", "--since", since, "--json")
            assert shown.exit_code == 0, shown.output
            assert [r["operation"] for r in json.loads(shown.output)] == ["generate"]
        later = run(cli_app, "keys", "audit", "cli-when", "--since", "2999-01-01T00:00:00+02:00", "--json")
        assert json.loads(later.output) == []
        refused = run(cli_app, "keys", "audit", "--since", "yesterday")
        assert refused.exit_code == 2
        assert "ISO 8601" in refused.output

    def test_rotate_past_the_version_limit_asks_first_and_says_what_it_destroyed(
        self, cli_app, key_store_url
    ):
        """It destroyed the oldest version beyond pii_max_key_versions, unasked and unsaid ("rotated ...")."""
        assert run(cli_app, "keys", "generate", "cli-trim").exit_code == 0
        for _ in range(4):  # five versions: the limit
            assert run(cli_app, "keys", "rotate", "cli-trim", "--yes").exit_code == 0
        engine = sa.create_engine(key_store_url, poolclass=sa.pool.NullPool)
        with engine.begin() as connection:  # retired long ago: past the grace a fresh retirement gets
            connection.execute(
                sa.update(KeyRow)
                .where(KeyRow.key_id == "cli-trim", KeyRow.status == "retired")
                .values(retired_at=datetime(2020, 1, 1, tzinfo=timezone.utc))
            )
        engine.dispose()
        refused = run(cli_app, "keys", "rotate", "cli-trim", answer="n\n")
        assert refused.exit_code == 1
        assert "destroys its oldest versions beyond pii_max_key_versions=5" in refused.output
        listed = json.loads(run(cli_app, "keys", "list", "cli-trim", "--json").output)
        assert [(k["version"], k["status"]) for k in listed][:1] == [(1, "retired")] and len(listed) == 5
        done = run(cli_app, "keys", "rotate", "cli-trim", answer="y\n")
        assert done.exit_code == 0
        assert "rotated cli-trim to version 6" in done.output
        assert "destroyed cli-trim version 1 (beyond pii_max_key_versions=5)" in done.output

    def test_destroy_asks_first(self, cli_app):
        """destroy aborts without confirmation and destroys with --yes."""
        run(cli_app, "keys", "generate", "cli-doomed")
        refused = run(cli_app, "keys", "destroy", "cli-doomed", answer="n\n")
        assert refused.exit_code == 1
        assert "Aborted" in refused.output
        done = run(cli_app, "keys", "destroy", "cli-doomed", "--yes")
        assert done.exit_code == 0 and "destroyed 1 version" in done.output

    @pytest.mark.parametrize(
        "command", [["destroy", "cli-never-made"], ["destroy", "cli-made", "--version", "7"]]
    )
    def test_destroy_refuses_what_is_not_there_before_asking(self, cli_app, command):
        """An unknown key or version is KeyNotFound at once: it asked "can never be read again" first."""
        run(cli_app, "keys", "generate", "cli-made")
        result = run(cli_app, "keys", *command)  # no answer given: a question would abort
        assert result.exit_code == 1
        assert "KeyNotFound" in result.output
        assert "Destroy" not in result.output

    def test_a_key_ids_retention_buckets_are_handled_with_it(self, cli_app):
        """A task with a pii_retention seals under KEY@deadline keys: the commands given KEY reach them.

        Following operations.md's steps for a compromised key, rotate and destroy
        said KeyNotFound and audit printed nothing, as if the key had never been used.
        """
        from celery_pii import get_pii
        from celery_pii._keys import KeySpec
        from celery_pii._store import utcnow

        run(cli_app, "keys", "list")  # imports the app module
        manager = get_pii(sys.modules[cli_app].app).keys
        soon, later = utcnow() + timedelta(days=1), utcnow() + timedelta(days=2)
        buckets = [f"cli-kept@{moment:%Y%m%dT%H%M%SZ}" for moment in (soon, later)]
        for bucket, moment in zip(buckets, (soon, later), strict=True):
            manager.encryption_key(KeySpec(bucket, expires_at=moment))
        manager.encryption_key(KeySpec("cli-kept-other"))  # another key id, sharing the prefix
        listed = json.loads(run(cli_app, "keys", "list", "cli-kept", "--json").output)
        assert sorted({k["key_id"] for k in listed}) == buckets
        assert {k["status"] for k in listed} == {"active"}
        rotated = run(cli_app, "keys", "rotate", "cli-kept")
        assert rotated.exit_code == 0, rotated.output
        assert rotated.output.splitlines() == [f"rotated {bucket} to version 2" for bucket in buckets]
        audit = json.loads(run(cli_app, "keys", "audit", "cli-kept", "--json").output)
        assert {(r["key_id"], r["operation"]) for r in audit} >= {(b, "rotate") for b in buckets}
        by_version = run(cli_app, "keys", "destroy", "cli-kept", "--version", "1", "--yes")
        assert by_version.exit_code == 1
        assert (
            "retention bucket keys take --version with their whole id (keys list cli-kept)"
            in by_version.output
        )
        destroyed = run(cli_app, "keys", "destroy", "cli-kept", "--yes")
        assert destroyed.exit_code == 0, destroyed.output
        assert destroyed.output.count("destroyed 2 version(s)") == 2
        assert {k.status for k in manager.list_keys("cli-kept", buckets=True)} == {"destroyed"}
        assert {k.status for k in manager.list_keys("cli-kept-other")} == {"active"}

    def test_a_bucket_past_its_deadline_is_listed_as_expired(self, cli_app):
        """It opens nowhere once its deadline passed; it was listed ``active`` until the beat task destroyed it."""
        import sqlalchemy as sa

        from celery_pii import get_pii
        from celery_pii._keys import KeySpec
        from celery_pii._store import KeyRow, utcnow

        run(cli_app, "keys", "list")  # imports the app module
        manager = get_pii(sys.modules[cli_app].app).keys
        moment = utcnow() + timedelta(days=1)
        bucket = f"cli-lapsed@{moment:%Y%m%dT%H%M%SZ}"
        manager.encryption_key(KeySpec(bucket, expires_at=moment))
        with manager.store.transaction() as session:  # its deadline comes
            session.execute(
                sa.update(KeyRow)
                .where(KeyRow.key_id == bucket)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        listed = json.loads(run(cli_app, "keys", "list", "cli-lapsed", "--json").output)
        assert [(k["key_id"], k["status"]) for k in listed] == [(bucket, "expired")]
        table = run(cli_app, "keys", "list", "cli-lapsed").output.splitlines()
        assert [line.split()[:3] for line in table if bucket in line] == [[bucket, "1", "expired"]]
        # (The shared key store may hold other tests' expired buckets: this run destroys them too.)
        assert bucket in get_pii(sys.modules[cli_app].app).enforce_retention().key_ids
        listed = json.loads(run(cli_app, "keys", "list", "cli-lapsed", "--json").output)
        assert [k["status"] for k in listed] == ["destroyed"]

    @pytest.mark.parametrize(
        "command",
        [
            ["rotate", "celery_pii.subject-index"],
            ["retire", "celery_pii.subject-index", "1"],
            ["destroy", "celery_pii.subject-index"],
        ],
        ids=lambda c: c[0],
    )
    def test_own_keys_are_refused(self, cli_app, command):
        """rotate/retire/destroy of a celery_pii.* key exit 1 with the reason, before any question."""
        result = run(cli_app, "keys", *command)
        assert result.exit_code == 1
        assert (
            "ConfigurationError: key 'celery_pii.subject-index' is celery-pii's own key "
            "and is never rotated, retired or destroyed by hand"
        ) in result.output
        assert "Destroy" not in result.output  # refused before the confirmation question
        assert "Traceback" not in result.output

    def test_errors_exit_1_usage_errors_exit_2(self, cli_app):
        """A library error is exit 1 with its message; a bad argument is exit 2."""
        missing = run(cli_app, "keys", "rotate", "cli-no-such-key")
        assert missing.exit_code == 1
        assert "KeyNotFound" in missing.output
        assert run(cli_app, "keys", "retire", "x", "not-a-number").exit_code == 2
        assert run(cli_app, "master-key", "rewrap").exit_code == 2

    @pytest.mark.parametrize(
        "command",
        [
            ["keys", "retire", "cli-orders", "99999999999999999999"],
            ["keys", "destroy", "cli-orders", "--version", "2147483648"],
            ["keys", "retire", "cli-orders", "0"],
            ["keys", "audit", "--until", "9999-12-31T23:59:59-05:00"],
            ["keys", "audit", "--since", "0001-01-01T00:00:00+05:00"],
        ],
        ids=["huge-version", "version-past-32-bits", "version-0", "until-past-9999", "since-before-1"],
    )
    def test_out_of_range_arguments_are_usage_errors(self, cli_app, command):
        """A version the store cannot hold or a moment out of range in UTC: exit 2, naming the option.

        They gave a traceback (SQLite, and the dates), "the key store failed" (PostgreSQL) or KeyNotFound.
        """
        result = run(cli_app, *command)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "Invalid value" in result.output

    def test_without_an_app_it_says_to_give_one(self, tmp_path):
        """``celery pii ...`` without -A: Celery's default app is no setup_pii app; it said to call setup_pii.

        In a process of its own: here another test's app may be Celery's current one.
        """
        env = {name: value for name, value in os.environ.items() if name != "APP"}
        result = subprocess.run(
            [sys.executable, "-m", "celery", "pii", "keys", "list"],
            capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "celery -A proj pii" in result.stderr


class TestMasterKey:
    """Generating and moving to a new master key."""

    def test_generate_prints_a_valid_key(self, cli_app):
        """The printed key is base64 of 32 bytes."""
        printed = run(cli_app, "master-key", "generate").output.strip()
        assert len(base64.b64decode(printed)) == 32

    def test_rewrap(self, cli_app, monkeypatch):
        """rewrap --new-master-key adds a wrapping to every key, with a progress bar and an audit record."""
        run(cli_app, "keys", "generate", "cli-rewrap")
        monkeypatch.setenv("PII_TEST_NEW_MASTER", base64.b64encode(bytes([5]) * 32).decode())
        result = run(cli_app, "master-key", "rewrap", "--new-master-key", "env:PII_TEST_NEW_MASTER", "--yes")
        assert result.exit_code == 0, result.output
        assert "re-wrapped" in result.output
        assert base64.b64encode(bytes([5]) * 32).decode() not in result.output
        audit = json.loads(run(cli_app, "keys", "audit", "*", "--json").output)
        assert any(r["operation"] == "master_rewrap" for r in audit)
        # keys list --json tells the operator which master keys wrap each version.
        (listed,) = json.loads(run(cli_app, "keys", "list", "cli-rewrap", "--json").output)
        assert (
            listed["master_key_ref_next"] == LocalMasterKey(bytes([5]) * 32).ref != listed["master_key_ref"]
        )

    def test_a_second_rotation_is_refused_before_asking(self, cli_app, monkeypatch):
        """Over an unfinished rotation to another key, rewrap asked to re-wrap (and started) first."""
        run(cli_app, "keys", "generate", "cli-rewrap-twice")
        # The key test_rewrap moves to (this class shares one store): re-running it resumes.
        monkeypatch.setenv("PII_TEST_NEW_MASTER", base64.b64encode(bytes([5]) * 32).decode())
        monkeypatch.setenv("PII_TEST_OTHER_MASTER", base64.b64encode(bytes([7]) * 32).decode())
        first = run(cli_app, "master-key", "rewrap", "--new-master-key", "env:PII_TEST_NEW_MASTER", "--yes")
        assert first.exit_code == 0, first.output
        second = run(cli_app, "master-key", "rewrap", "--new-master-key", "env:PII_TEST_OTHER_MASTER")
        assert second.exit_code == 1
        assert "rotation is unfinished" in second.output
        assert "Re-wrap" not in second.output

    def test_rewrap_abort_abandons_an_unfinished_rotation(self, tmp_path, monkeypatch, queue_name):
        """``rewrap --abort``: the new key's wrappings go, and another rotation may start."""
        url, drop = _fresh_postgres()  # its own store: the session's is left midway through a rotation
        try:
            from celery_pii._migrate import migrate

            migrate(url)
            module = _app_module(tmp_path, monkeypatch, url, queue_name)
            assert run(module, "keys", "generate", "cli-abandoned").exit_code == 0
            monkeypatch.setenv("PII_TEST_NEW_MASTER", base64.b64encode(bytes([9]) * 32).decode())
            monkeypatch.setenv("PII_TEST_OTHER_MASTER", base64.b64encode(bytes([10]) * 32).decode())
            new, other = "env:PII_TEST_NEW_MASTER", "env:PII_TEST_OTHER_MASTER"
            assert run(module, "master-key", "rewrap", "--new-master-key", new, "--yes").exit_code == 0
            assert run(module, "master-key", "rewrap", "--new-master-key", other, "--yes").exit_code == 1
            assert run(module, "master-key", "rewrap", "--abort", "--finish").exit_code == 2  # one of them

            aborted = run(module, "master-key", "rewrap", "--abort", "--yes")
            assert aborted.exit_code == 0, aborted.output
            assert "abandoned 1 key version(s); 0 not abandoned" in aborted.output
            (listed,) = json.loads(run(module, "keys", "list", "cli-abandoned", "--json").output)
            assert listed["master_key_ref_next"] is None
            again = run(module, "master-key", "rewrap", "--new-master-key", other, "--yes")
            assert again.exit_code == 0, again.output
            _celery.get_pii(sys.modules[module].app).keys.store.dispose()
        finally:
            drop()

    def test_rewrap_with_a_busy_row_says_to_run_again(self, tmp_path, monkeypatch, queue_name):
        """A row locked by another transaction is not reported as done: exit 1, run rewrap again."""
        import sqlalchemy as sa

        from celery_pii._migrate import migrate

        url, drop = _fresh_postgres()  # its own store: the count of what is left is this test's
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            migrate(url)
            module = _app_module(tmp_path, monkeypatch, url, queue_name)
            for key_id in ("cli-busy", "cli-free"):
                assert run(module, "keys", "generate", key_id).exit_code == 0
            monkeypatch.setenv("PII_TEST_NEW_MASTER", base64.b64encode(bytes([6]) * 32).decode())
            rewrap = ["master-key", "rewrap", "--new-master-key", "env:PII_TEST_NEW_MASTER", "--yes"]
            with engine.connect() as other:  # e.g. a rotation in flight holds the row
                other.execute(sa.text("SELECT id FROM celery_pii_keys WHERE key_id = 'cli-busy' FOR UPDATE"))
                busy = run(module, *rewrap)
                other.rollback()
            assert busy.exit_code == 1
            assert "re-wrapped 1 key version(s)" in busy.output
            assert "1 key version(s) still have no wrapping" in busy.output
            assert "run rewrap again" in busy.output
            again = run(module, *rewrap)
            assert again.exit_code == 0, again.output
            assert "re-wrapped 1 key version(s)" in again.output
            _celery.get_pii(sys.modules[module].app).keys.store.dispose()
        finally:
            engine.dispose()
            drop()


class TestScanAndErasure:
    """scan and forget-subject."""

    def test_scan_file_and_stdin(self, cli_app, tmp_path):
        """Findings list paths and categories, never the values."""
        document = {"customer": {"note": f"card {CARD}, mail {EMAIL}"}}
        path = tmp_path / "payload.json"
        path.write_text(json.dumps(document))
        from_file = json.loads(run(cli_app, "scan", str(path), "--json").output)
        assert {"path": "customer.note", "category": "credit_card"} in from_file
        from_stdin = run(cli_app, "scan", "-", answer=json.dumps(document))
        assert "customer.note" in from_stdin.output and "email" in from_stdin.output
        assert CARD not in from_stdin.output and EMAIL not in from_stdin.output
        assert run(cli_app, "scan", "-", answer="not json").exit_code == 1
        keyed = json.dumps({"by_card": {CARD: f"mail {EMAIL}"}})
        from_keys = json.loads(run(cli_app, "scan", "-", "--json", answer=keyed).output)
        assert from_keys == [{"path": 'by_card["[pii:redacted]"]', "category": "email"}]
        deep = run(cli_app, "scan", "-", answer="[" * 100_000 + "]" * 100_000)  # Python 3.13 parses 5,000
        assert deep.exit_code == 1 and "nested too deeply" in deep.output
        # A key longer than a field path may be (its path could not be read back).
        long_key = json.dumps({f"{EMAIL} " + "x" * 1100: f"mail {EMAIL}"})
        from_long_key = run(cli_app, "scan", "-", "--json", answer=long_key)
        assert from_long_key.exit_code == 0
        assert json.loads(from_long_key.output) == [{"path": '["[pii:redacted]"]', "category": "email"}]

    def test_forget_subject(self, cli_app):
        """forget-subject destroys the subject's keys (after confirmation)."""
        from celery_pii import get_pii
        from celery_pii._keys import KeySpec

        run(cli_app, "keys", "list")  # imports the app module
        pii = get_pii(sys.modules[cli_app].app)
        key_id, digest = pii.keys.subject_key_id("cli-user-7")
        pii.keys.encryption_key(KeySpec(key_id, subject_id=digest))
        result = run(cli_app, "forget-subject", "cli-user-7", "--yes")
        assert result.exit_code == 0 and "destroyed 1 key version" in result.output
        assert "no live key" not in result.output
        again = run(cli_app, "forget-subject", "CLI-user-7", "--yes")  # another id, as far as keys go
        assert again.exit_code == 0
        assert "destroyed 0 key version(s)" in again.output and "no live key of this subject" in again.output


def _park_undecodable(app, quarantine, task_id, *, back_to):
    """Park a message of ``t.charge`` that did not decode, which came from (and replays to) ``back_to``."""
    park(
        app,
        quarantine,
        body=b"\x01jnot really",
        content_type="application/x-celery-pii",
        content_encoding="binary",
        headers={"task": "t.charge", "id": task_id},
        reason="undecodable",
        original={"exchange": back_to, "routing_key": back_to},
    )


class TestQuarantine:
    """Listing, replaying and purging parked messages."""

    def test_list_replay_purge(self, cli_app, queue_name):
        """Parked messages are listed by metadata, replayed to their queue, purged."""
        run(cli_app, "keys", "list")  # imports the app module
        app = sys.modules[cli_app].app
        quarantine = app.conf.pii_quarantine_queue
        for task_id in ("parked-1", "parked-2", "parked-3"):
            _park_undecodable(app, quarantine, task_id, back_to=queue_name)
        listed = json.loads(run(cli_app, "quarantine", "list", "--json").output)
        assert sorted(m["id"] for m in listed) == ["parked-1", "parked-2", "parked-3"]
        assert {m["reason"] for m in listed} == {"undecodable"}
        assert "not really" not in json.dumps(listed)
        replayed = run(cli_app, "quarantine", "replay", "--id", "parked-2", "--yes")
        assert replayed.exit_code == 0 and "replayed 1" in replayed.output
        (back,) = queued_messages(queue_name)
        assert back["headers"]["id"] == "parked-2"
        assert "x-celery-pii-quarantine" not in back["headers"]
        missing = run(cli_app, "quarantine", "replay", "--id", "parked-9", "--yes")
        assert missing.exit_code == 1 and "not parked: parked-9" in missing.output
        # One message purged by id (a plaintext copy), the other kept (the evidence of tampering).
        purged = run(cli_app, "quarantine", "purge", "--id", "parked-3", "--id", "parked-9", "--yes")
        assert purged.exit_code == 1 and "purged 1 message(s)" in purged.output
        assert "not parked: parked-9" in purged.output
        assert [m["id"] for m in json.loads(run(cli_app, "quarantine", "list", "--json").output)] == [
            "parked-1"
        ]
        assert "purged 1" in run(cli_app, "quarantine", "purge", "--yes").output
        assert json.loads(run(cli_app, "quarantine", "list", "--json").output) == []
        # Redis has no queue once its list is empty: replaying nothing is not a broker failure.
        nothing = run(cli_app, "quarantine", "replay", "--yes")
        assert nothing.exit_code == 0 and "replayed 0" in nothing.output

    @pytest.mark.parametrize("broker", ["redis", "amqp"])
    def test_replay_takes_each_parked_message_once_and_holds_one_at_a_time(
        self, broker, make_app, queue_name
    ):
        """Replaying all re-publishes as many as were parked, in order, one held at a time.

        Messages whose way back leads into the quarantine again (parked again
        as soon as they arrive) are not replayed twice.  Replay held every parked
        message at once: its memory grew with the quarantine (360 MB for 3,000
        messages of 30 KB), just when an outage had parked all traffic.
        """
        from celery_pii._quarantine import quarantine_queue, replay

        app = make_app(broker=f"{REDIS_URL}/{BROKER_DB}" if broker == "redis" else RABBITMQ_URL)
        quarantine = f"{queue_name}.quarantine"
        ids = [f"parked-{i}" for i in range(12)]
        for task_id in ids:
            # Back to the quarantine's own exchange and queue: parked again on arrival.
            _park_undecodable(app, quarantine, task_id, back_to=quarantine)
        held = []
        with app.connection_for_write() as connection:
            bound = quarantine_queue(quarantine)(connection.default_channel)
            real_get = type(bound).get

            def counting_get(queue, *args, **kwargs):
                message = real_get(queue, *args, **kwargs)
                held.append(bound.queue_declare(passive=True).message_count)
                return message

            type(bound).get = counting_get
            try:
                assert replay(app, quarantine).replayed == ids
            finally:
                type(bound).get = real_get
        # Each get took one message, and each replayed one came back at the end: the count stays 12.
        assert held == [11] * 12
        with app.connection_for_write() as connection:
            bound = quarantine_queue(quarantine)(connection.default_channel)
            assert bound.queue_declare(passive=True).message_count == 12
            bound.purge()
            bound.delete()

    @pytest.mark.parametrize("broker", ["redis", "amqp"])
    def test_a_message_with_nowhere_to_go_stays_parked(self, broker, make_app, queue_name):
        """Replay keeps a message the broker cannot route, reports it, and replays the others.

        On RabbitMQ, one whose queue had been deleted was dropped by the broker
        while replay printed "replayed 1" and took it out of the quarantine; one
        whose exchange was gone closed the channel (a false success for one
        message, a traceback and nothing replayed for several).
        """
        from kombu import Queue

        from celery_pii._quarantine import quarantine_queue, replay

        app = make_app(broker=f"{REDIS_URL}/{BROKER_DB}" if broker == "redis" else RABBITMQ_URL)
        quarantine = f"{queue_name}.quarantine"
        unbound = f"{queue_name}.unbound"  # an exchange whose queue was deleted
        with app.connection_for_write() as connection:
            Exchange(unbound, type="direct")(connection.default_channel).declare()
        _park_undecodable(app, quarantine, "nowhere-1", back_to=unbound)
        _park_undecodable(app, quarantine, "fine-1", back_to=queue_name)
        gone = [("no-exchange-1", f"{queue_name}.gone")] if broker == "amqp" else []
        for task_id, exchange in gone:  # Redis routes in the client: any exchange name is declared there
            _park_undecodable(app, quarantine, task_id, back_to=exchange)
        _park_undecodable(app, quarantine, "fine-2", back_to=queue_name)
        report = replay(app, quarantine)
        assert report.replayed == ["fine-1", "fine-2"]
        assert [task_id for task_id, _ in report.left_parked] == ["nowhere-1", *(t for t, _ in gone)]
        assert "nothing is bound to exchange" in report.left_parked[0][1]
        with app.connection_for_write() as connection:
            back = Queue(queue_name, no_declare=True)(connection.default_channel)
            assert [m.headers["id"] for m in iter(lambda: back.get(no_ack=True), None)] == [
                "fine-1",
                "fine-2",
            ]
            bound = quarantine_queue(quarantine)(connection.default_channel)
            assert bound.queue_declare(passive=True).message_count == 1 + len(gone)
            bound.purge()
            bound.delete()
            Exchange(unbound)(connection.default_channel).delete()
        if broker == "redis":  # nothing went to the transport's list of undeliverable messages
            with redis_client(BROKER_DB) as client:
                assert client.llen("ae.undeliver") == 0

    def test_a_connection_lost_mid_replay_runs_nothing_twice(self, make_app, queue_name, monkeypatch):
        """RabbitMQ drops the connection while the second of three is published.

        The publish was retried on a new connection, then acknowledged on the dead
        one: the message was both in its queue and still parked, and the next
        replay ran it again (a traceback said nothing of what had been replayed).
        """
        import socket

        from kombu import Queue

        from celery_pii import _quarantine
        from celery_pii._quarantine import quarantine_queue, replay

        app = make_app(broker=RABBITMQ_URL)
        quarantine = f"{queue_name}.quarantine"
        for task_id in ("drop-1", "drop-2", "drop-3"):
            _park_undecodable(app, quarantine, task_id, back_to=queue_name)
        republish = _quarantine._Publisher.republish
        calls = []

        def dropping(publisher, message):
            calls.append(message)
            if len(calls) == 2:  # the network goes, under the client's feet
                publisher.connection.connection.sock.shutdown(socket.SHUT_RDWR)
            return republish(publisher, message)

        monkeypatch.setattr(_quarantine._Publisher, "republish", dropping)
        report = replay(app, quarantine)
        monkeypatch.setattr(_quarantine._Publisher, "republish", republish)
        assert report.replayed == ["drop-1"]
        assert report.interrupted is not None and "drop-2" in report.interrupted
        with app.connection_for_write() as connection:
            back = Queue(queue_name, no_declare=True)(connection.default_channel)
            assert [m.headers["id"] for m in iter(lambda: back.get(no_ack=True), None)] == ["drop-1"]
            bound = quarantine_queue(quarantine)(connection.default_channel)
            assert bound.queue_declare(passive=True).message_count == 2
            assert replay(app, quarantine).replayed == ["drop-2", "drop-3"]  # once each, in all
            assert [m.headers["id"] for m in iter(lambda: back.get(no_ack=True), None)] == [
                "drop-2",
                "drop-3",
            ]
            bound.delete()

    def test_replay_says_which_messages_stay_parked(self, cli_app, queue_name):
        """The command names each message left parked and why, and exits 1 (it printed success)."""
        run(cli_app, "keys", "list")  # imports the app module
        app = sys.modules[cli_app].app
        quarantine = app.conf.pii_quarantine_queue
        unbound = f"{queue_name}.unbound"
        with app.connection_for_write() as connection:
            Exchange(unbound, type="direct")(connection.default_channel).declare()
        _park_undecodable(app, quarantine, "stays-1", back_to=unbound)
        _park_undecodable(app, quarantine, "goes-1", back_to=queue_name)
        replayed = run(cli_app, "quarantine", "replay", "--yes")
        assert replayed.exit_code == 1
        assert "replayed 1 message(s)" in replayed.output
        assert f"left parked: stays-1: nothing is bound to exchange {unbound!r}" in replayed.output
        listed = json.loads(run(cli_app, "quarantine", "list", "--json").output)
        assert [m["id"] for m in listed] == ["stays-1"]
        run(cli_app, "quarantine", "purge", "--yes")

    @pytest.mark.parametrize(
        ("broker", "why"),
        [
            ("redis://127.0.0.1:1/0", "refused"),
            ("amqp://guest:not-the-password@127.0.0.1:5672//", "ACCESS_REFUSED"),
            ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "NOT_ALLOWED"),
        ],
        ids=["down", "wrong-password", "no-such-vhost"],
    )
    def test_a_broker_that_cannot_be_used_is_named_with_why(
        self, tmp_path, monkeypatch, key_store_url, broker, why
    ):
        """quarantine list: one line naming broker_url and the broker's reason, exit code 1.

        A refused login or a missing vhost on RabbitMQ gave an 80-line traceback.
        """
        module = f"nobrokerapp_{abs(hash(broker))}"
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(
                f"""
                from pii_testapp import make_app
                app = make_app(broker={broker!r}, backend={f"{REDIS_URL}/{BACKEND_DB}"!r},
                               key_store={key_store_url!r}, queue="cli-no-broker",
                               broker_connection_retry=False, broker_connection_max_retries=0)
                """
            )
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.syspath_prepend(APP_DIR)
        listed = run(module, "quarantine", "list")
        assert listed.exit_code == 1
        assert "Traceback" not in listed.output
        assert "setting broker_url: the broker cannot be used" in listed.output
        assert why in listed.output
        assert "not-the-password" not in listed.output


def _celery_pii_process(tmp_path, module, key_store, *, master_key=True):
    """``run(*args)``: `celery -A module pii *args` in a new process, for a test app on ``key_store``.

    Without ``master_key``, the process has no ``CELERY_PII_MASTER_KEY``.
    """
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from pii_testapp import make_app
            app = make_app(broker={f"{REDIS_URL}/{BROKER_DB}"!r}, backend={f"{REDIS_URL}/{BACKEND_DB}"!r},
                           key_store={key_store!r}, queue={f"cli-{module}"!r})
            """
        )
    )
    env = {"PYTHONPATH": f"{tmp_path}:{APP_DIR}", "PATH": "/usr/bin:/bin"}
    if master_key:
        env["CELERY_PII_MASTER_KEY"] = os.environ["CELERY_PII_MASTER_KEY"]

    def run_pii(*args):
        command = [sys.executable, "-m", "celery", "-A", module, "pii", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)

    return run_pii


class TestRealProcess:
    """The installed `celery` command finds the `pii` subcommand."""

    def test_db_upgrade_on_an_unreachable_store_names_the_setting(self, tmp_path):
        """No traceback and no password: one line naming pii_key_store_url and why, exit code 1."""
        store = "postgresql+psycopg://someone:S3cretPw@127.0.0.1:1/nothing?connect_timeout=2"
        upgraded = _celery_pii_process(tmp_path, "downapp", store)("db", "upgrade")
        assert upgraded.returncode == 1
        assert "setting pii_key_store_url: the key store failed (OperationalError: " in upgraded.stderr
        assert "Connection refused" in upgraded.stderr  # the driver's reason, which says what to fix
        assert "Traceback" not in upgraded.stderr
        assert "S3cretPw" not in upgraded.stdout + upgraded.stderr

    @pytest.mark.parametrize("database", ["postgresql", "mariadb"])
    def test_db_upgrade_on_a_missing_database_says_so(self, tmp_path, database):
        """The first command a new user runs: a database not created yet is named as the reason."""
        store = {
            "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/no_such_pii_db",
            "mariadb": "mysql+pymysql://root@127.0.0.1:3306/no_such_pii_db",
        }[database]
        upgraded = _celery_pii_process(tmp_path, f"missing{database}", store)("db", "upgrade")
        assert upgraded.returncode == 1
        assert "no_such_pii_db" in upgraded.stderr
        assert re.search(r"does not exist|Unknown database", upgraded.stderr)

    def test_db_upgrade_then_keys_on_a_fresh_store(self, tmp_path):
        """On an empty PostgreSQL schema: `pii db upgrade` works although setup_pii runs at import."""
        url, drop = _fresh_postgres()
        try:
            pii_command = _celery_pii_process(tmp_path, "freshapp", url)
            for words in (("--help",), ("keys", "--help")):  # help before the tables exist
                shown = pii_command(*words)
                assert shown.returncode == 0, shown.stderr[-2000:]
                assert "Usage:" in shown.stdout
            unknown = pii_command("db", "upgrade", "--revision", "nope")
            assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
            assert "pii db: " in unknown.stderr and "'nope'" in unknown.stderr
            one_step = pii_command("db", "upgrade", "--revision", "+1")  # Alembic's relative form
            assert one_step.returncode == 0, one_step.stderr[-2000:]
            assert "key store at revision 0001_key_store" in one_step.stdout
            upgraded = pii_command("db", "upgrade")
            assert upgraded.returncode == 0, upgraded.stderr[-2000:]
            assert "0005_retired_at_index" in upgraded.stdout
            generated = pii_command("keys", "generate", "proc-key")
            assert generated.returncode == 0, generated.stderr[-2000:]
            listed = pii_command("keys", "list", "--json")
            assert json.loads(listed.stdout)[0]["key_id"] == "proc-key"
            # An older target is no downgrade, and says so (it printed the revision, exit 0).
            older = pii_command("db", "upgrade", "--revision", "0002_master_key_rotation")
            assert older.returncode == 1
            assert "already past revision 0002_master_key_rotation" in older.stderr
            assert "does not downgrade" in older.stderr
        finally:
            drop()

    def test_db_upgrade_on_a_store_a_newer_release_upgraded(self, tmp_path):
        """A revision this release does not know: say a newer release upgraded the store (Alembic's words)."""
        import sqlalchemy as sa

        from celery_pii._migrate import VERSION_TABLE, migrate

        url, drop = _fresh_postgres()
        try:
            migrate(url)
            engine = sa.create_engine(url)
            with engine.begin() as connection:
                connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0099_future'"))  # noqa: S608
            engine.dispose()
            upgraded = _celery_pii_process(tmp_path, "newerapp", url)("db", "upgrade")
            assert upgraded.returncode == 1
            assert "revision 0099_future, which this release of celery-pii does not know" in upgraded.stderr
            assert "Traceback" not in upgraded.stderr
        finally:
            drop()

    def test_commands_that_use_no_master_key_run_without_one(self, tmp_path):
        """A deploy step creating the tables, and making a first master key, need no master key; others do.

        `pii db upgrade` and `pii master-key generate` exited 2: setup_pii,
        run as the app loads, refused the missing key.
        """
        url, drop = _fresh_postgres()
        try:
            without_key = _celery_pii_process(tmp_path, "nokeyapp", url, master_key=False)
            upgraded = without_key("db", "upgrade")
            assert upgraded.returncode == 0, upgraded.stderr[-2000:]
            generated = without_key("master-key", "generate")
            assert generated.returncode == 0, generated.stderr[-2000:]
            assert len(base64.b64decode(generated.stdout.strip(), validate=True)) == 32
            listed = without_key("keys", "list")
            assert listed.returncode == 2
            assert (
                "setting pii_master_key: environment variable CELERY_PII_MASTER_KEY is not set"
                in listed.stderr
            )
            with_key = _celery_pii_process(tmp_path, "nokeyapp", url)
            assert with_key("keys", "generate", "after-upgrade").returncode == 0
        finally:
            drop()


def test_deferred_checks_only_for_db_commands():
    """Only `pii db ...` and the commands needing no store skip setup_pii's key-store checks."""
    from celery_pii.cli import _defers_store_checks

    assert _defers_store_checks(["celery", "-A", "proj", "pii", "db", "upgrade"])
    assert _defers_store_checks(["celery", "-A", "proj", "pii", "scan", "-"])
    assert _defers_store_checks(["celery", "-A", "proj", "pii", "master-key", "generate"])
    assert not _defers_store_checks(["celery", "-A", "proj", "pii", "keys", "list"])
    for help_words in (["--help"], ["keys", "--help"]):
        assert _defers_store_checks(["celery", "-A", "proj", "pii", *help_words])
    # A group alone prints its commands (it went to setup_pii's checks: a traceback with the store down).
    for group_words in ([], ["keys"], ["master-key"], ["quarantine"], ["db"]):
        assert _defers_store_checks(["celery", "-A", "proj", "pii", *group_words])
    assert not _defers_store_checks(["celery", "-A", "proj", "pii", "keys", "list", "db"])
    # A queue named pii, last on a worker's command line, is no pii command.
    assert not _defers_store_checks(["celery", "-A", "proj", "worker", "-n", "x", "-Q", "pii"])
    assert not _defers_store_checks(["celery", "-A", "db", "worker"])
    # The word "db" elsewhere is no db command: a key id, a queue name.
    assert not _defers_store_checks(["celery", "-A", "proj", "pii", "keys", "generate", "db"])
    assert not _defers_store_checks(["celery", "-A", "proj", "pii", "master-key", "rewrap", "--finish"])
    # An app named pii.
    assert _defers_store_checks(["celery", "-A", "pii", "pii", "db", "upgrade"])
    assert not _defers_store_checks(["celery", "-A", "pii", "worker", "-Q", "db"])
    assert _celery._store_checks_deferred is False


def test_table_cells_escape_control_characters(capsys):
    """A parked message's forged header cannot print a row of its own or reach the terminal raw."""
    from celery_pii.cli import _emit

    forged = {"id": "real-id\nFORGED-ID  t.charge  ok", "task": "t.charge\x1b[2J\x9b1m\u202egnp.exe"}
    _emit([forged], ("id", "task"), as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # the header and one row
    assert "\\x0aFORGED-ID" in lines[1] and "\\x1b[2J" in lines[1] and "\x1b" not in lines[1]
    assert "\\x9b1m" in lines[1] and "\\u202e" in lines[1]  # C1 controls and bidi overrides too
