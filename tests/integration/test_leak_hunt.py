"""Leak hunting beyond the canary: detection on "warn", DEBUG everywhere, every failure path.

One worker process runs every path the library has — success, failure,
retries, canvas, a tampered message, an undecodable one, a forgotten subject,
a shredded retention bucket, key-store retries, a database result backend
(whose traceback column is outside any serializer), detection — with
``pii_detect="warn"`` and DEBUG logging, while Redis MONITOR records every
byte sent to Redis.  Then every log line, event, broker byte, result-backend
value and database row is searched for the known values, and so are the logs
of every example.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_pii import get_pii
from celery_pii._store import utcnow

from .conftest import EventCapture, RedisMonitor, queued_messages
from .test_canary import SECRETS, SERIAL, _backend_dump, _check_plaintext_arrived, _exercise, backend_keys
from .test_celery_consume import _tamper
from .test_celery_roundtrip import CARD, EMAIL, EMAIL2
from .test_examples_more import example_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [
    *sorted(ROOT.glob("examples/*/main.py")),
    ROOT / "examples" / "beat_schedule" / "run.py",
    ROOT / "examples" / "quickstart" / "demo.py",
]
# Values the examples use (fake data); their stdout shows what tasks received on purpose, their
# logs must not.
EXAMPLE_SECRETS = (
    "4111 1111 1111 1111",
    "900-12-3456",
    "912-34-5678",
    "ann@example.com",
    "bob@example.com",
    "cy@example.com",
)


def _find(text, where, secrets=SECRETS):
    found = [secret for secret in secrets if secret in text]
    context = repr(text[max(0, text.find(found[0]) - 300) : text.find(found[0]) + 60]) if found else ""
    assert not found, f"plaintext PII found in {where}: {context}"


def _database_dump(url):
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            tables = [t for t in sa.inspect(connection).get_table_names() if t.startswith("celery_")]
            return "\n".join(
                repr(row)
                for table in tables
                for row in connection.execute(
                    sa.select(sa.Table(table, sa.MetaData(), autoload_with=connection))
                )
            )
    finally:
        engine.dispose()


def test_every_path_with_warn_and_debug(make_app, start_worker_process, key_store_url, caplog):
    """No known value appears in any log line, event, broker byte, backend value or table."""
    app = make_app(result_extended=True, task_send_sent_event=True, pii_detect="warn")
    db_app = make_app(backend="db+" + key_store_url, result_extended=True, pii_detect="warn")
    pii = get_pii(app)
    before = backend_keys()
    with caplog.at_level(logging.DEBUG), RedisMonitor() as monitor, EventCapture(app) as events:
        # A tampered message and an undecodable one wait in the queue before the worker starts.
        app.tasks["t.charge"].delay(CARD, 1, {"email": EMAIL})
        tampered = _tamper(app.conf.task_default_queue)
        forgotten = app.tasks["t.profile"].delay("user-forgotten", EMAIL2)
        pii.forget_subject("user-forgotten")
        shredded = app.tasks["t.retention_short"].delay(EMAIL)
        pii.enforce_retention(now=utcnow() + timedelta(minutes=10))
        worker = start_worker_process(
            pool="prefork", concurrency=2, env={"PII_TESTAPP_CONF": '{"pii_detect": "warn"}'}
        )
        got, replies = _exercise(app)
        _check_plaintext_arrived(got)
        for result in (forgotten, shredded, app.AsyncResult(tampered)):
            with pytest.raises(Exception):  # noqa: B017 - each fails its own way; no value may show
                result.get(timeout=60)
        # Detection: undeclared PII in a warn-mode task.
        assert app.tasks["t.detect_encrypt"].delay(f"mail {EMAIL2}", extra={"card": CARD}).get(timeout=60)
        time.sleep(1.0)
        worker.stop()
        # A database result backend: its traceback column is written outside any serializer.
        db_worker = start_worker_process(
            backend="db+" + key_store_url, pool="prefork", env={"PII_TESTAPP_CONF": '{"pii_detect": "warn"}'}
        )
        with pytest.raises(ValueError, match=r"\[pii:redacted\]"):
            db_app.tasks["t.fail"].delay(CARD).get(timeout=60)
        assert (
            db_app.tasks["t.charge"].delay(CARD, 2, {"email": EMAIL}).get(timeout=60)["card_number"] == CARD
        )
        db_worker.stop()
    parked = queued_messages(app.conf.pii_quarantine_queue)
    assert [m["headers"]["id"] for m in parked] == [tampered]
    _find(monitor.captured(), "broker and backend traffic")
    _find(_backend_dump(before), "the Redis result backend")
    _find(_database_dump(key_store_url), "the database result backend and key store")
    _find(json.dumps(events.events, default=str), "events")
    _find(json.dumps(replies, default=str), "inspect replies")
    _find(worker.log() + db_worker.log(), "the workers' DEBUG logs")
    _find(caplog.text + "".join(str(getattr(r, "data", "")) for r in caplog.records), "the publisher's log")
    assert SERIAL not in worker.log()


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.parent.name)
def test_examples_log_nothing(script):
    """Every example's log output (stderr) holds none of its PII."""
    done = example_run(script)
    assert done.returncode == 0, done.stderr[-2000:]
    _find(done.stderr, f"the log of {script.parent.name}", EXAMPLE_SECRETS)
