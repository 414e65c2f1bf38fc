"""pii messages that decode but are not protocol-2 task messages are parked, and the worker carries on.

Celery's consumer unpacks the body as ``(args, kwargs, embed)`` without a
check: a body of another shape kills the worker ("Unrecoverable error"), the
message is restored, and every restart dies on it again; some shapes are
acked as a failed task instead.  Either way the message is lost or blocks the
queue, so the quarantine step parks it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid

import pytest
from celery.contrib.testing.worker import start_worker

from celery_pii import get_pii
from celery_pii._quarantine import QUARANTINE_HEADER

from .conftest import BROKER_DB, publish_raw, queued_messages, redis_client
from .test_celery_roundtrip import CARD, assert_no_plaintext

pytestmark = pytest.mark.integration

REASON = "not a protocol-2 task message"


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, **options)


def _headers(task_id):
    """The protocol-2 headers Celery would send for t.charge."""
    return {
        "lang": "py",
        "task": "t.charge",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "argsrepr": "()",
        "kwargsrepr": "{}",
    }


def _wait_parked(app, count, timeout=10):
    deadline = time.monotonic() + timeout
    while len(queued_messages(app.conf.pii_quarantine_queue)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return queued_messages(app.conf.pii_quarantine_queue)


class TestMalformedTaskBodies:
    """Well-framed pii bodies of the wrong shape go to the quarantine; the next task still runs."""

    @pytest.mark.parametrize(
        "inner",
        [
            pytest.param(b"[1]", id="one-element"),
            pytest.param(json.dumps([CARD, {}, {}]).encode(), id="args-not-a-list"),
            pytest.param(b"[[], [], {}]", id="kwargs-not-a-mapping"),
            pytest.param(b"[[], {}, 5]", id="embed-not-a-mapping"),
            # Celery's tracer sends a chain's next step and link callbacks after the task: junk there
            # killed the worker after the task ran, outside anything that catches.
            pytest.param(b'[[], {}, {"chain": {"a": 1}}]', id="chain-a-mapping"),
            pytest.param(b'[[], {}, {"chain": [1]}]', id="chain-of-numbers"),
            pytest.param(b'[[], {}, {"callbacks": "t.charge"}]', id="callbacks-a-string"),
            pytest.param(b'[[], {}, {"errbacks": [{"args": []}]}]', id="errback-without-task"),
            pytest.param(b'[[], {}, {"chord": 5}]', id="chord-a-number"),
        ],
    )
    def test_wrong_shape_is_parked_and_worker_carries_on(self, app, caplog, inner):
        """The message is parked byte for byte with an audit record, never logged, and the worker goes on."""
        task_id = str(uuid.uuid4())
        body = b"\x01j" + inner
        publish_raw(app, body, _headers(task_id))
        good = app.tasks["t.charge"].delay(CARD, 3)
        with caplog.at_level(logging.DEBUG), _start(app):
            assert good.get(timeout=20)["amount"] == 3
            parked = _wait_parked(app, 1)
        assert len(parked) == 1
        assert base64.b64decode(parked[0]["body"]) == body
        assert parked[0]["headers"]["id"] == task_id
        assert parked[0]["headers"][QUARANTINE_HEADER]["reason"] == REASON
        assert queued_messages(app.conf.task_default_queue) == []
        audit = [r for r in get_pii(app).keys.audit_trail() if r.operation == "tamper_detected"]
        # Named as the headers name it (it was "?"), as the log line and `quarantine list` do.
        named = [(r.key_id, r.details.get("task")) for r in audit if r.details.get("task_id") == task_id]
        assert named == [("task:t.charge", "t.charge")]
        assert f"{task_id!r}] parked in {app.conf.pii_quarantine_queue}: {REASON}" in caplog.text
        assert_no_plaintext(caplog.text)

    def test_scalar_and_mapping_bodies_are_parked(self, app):
        """Bodies that are a number, a string, a mapping (hybrid or empty) or null are all parked, in order."""
        inners = [b"5", b'"x"', b"{}", b"null", b'{"args": [], "kwargs": {}}']
        sent = []
        for inner in inners:
            task_id = str(uuid.uuid4())
            publish_raw(app, b"\x01j" + inner, _headers(task_id))
            sent.append(task_id)
        good = app.tasks["t.charge"].delay(CARD, 4)
        with _start(app):
            assert good.get(timeout=20)["amount"] == 4
            parked = _wait_parked(app, len(inners))
        assert [m["headers"]["id"] for m in parked] == sent
        assert [base64.b64decode(m["body"]) for m in parked] == [b"\x01j" + inner for inner in inners]
        assert {m["headers"][QUARANTINE_HEADER]["reason"] for m in parked} == {REASON}

    def test_message_without_task_header_is_parked(self, app):
        """A pii message with no ``task`` header (not protocol 2) is parked, not rejected and lost."""
        publish_raw(app, b"\x01j[[], {}, {}]", {"id": "no-task-header"})
        good = app.tasks["t.charge"].delay(CARD, 5)
        with _start(app):
            assert good.get(timeout=20)["amount"] == 5
            (parked,) = _wait_parked(app, 1)
        assert parked["headers"]["id"] == "no-task-header"
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == REASON

    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({"task": ["t.charge"]}, id="task-a-list"),
            pytest.param({"task": {"name": "t.charge"}}, id="task-a-mapping"),
            pytest.param({"task": ""}, id="task-empty"),
            pytest.param({"id": ["x"]}, id="id-a-list"),
            pytest.param({"id": None}, id="id-null"),
        ],
    )
    def test_task_and_id_headers_of_the_wrong_type_are_parked(self, app, headers):
        """Celery looks the task header up in a dict and stores results under the id: no other type runs."""
        marker = str(uuid.uuid4())
        publish_raw(app, b"\x01j[[], {}, {}]", {**_headers("x"), "root_id": marker, **headers})
        good = app.tasks["t.charge"].delay(CARD, 7)
        with _start(app):
            assert good.get(timeout=20)["amount"] == 7
            (parked,) = _wait_parked(app, 1)
        assert parked["headers"]["root_id"] == marker
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == REASON

    def test_a_task_id_given_as_a_uuid_runs(self, app):
        """``apply_async(task_id=uuid.uuid4())`` works in Celery: on Redis the id header comes back a UUID."""
        task_id = uuid.uuid4()
        with _start(app):
            assert app.tasks["t.plain"].apply_async((3,), task_id=task_id).get(timeout=20) == 3
            assert (
                app.tasks["t.echo"].apply_async((CARD,), task_id=uuid.uuid4()).get(timeout=20)["value"]
                == CARD
            )
        assert queued_messages(app.conf.pii_quarantine_queue) == []

    @pytest.mark.parametrize("header", ["eta", "expires"])
    def test_a_task_message_celery_finds_invalid_is_parked(self, app, header):
        """An ``eta`` or ``expires`` that is no date: Celery logs "invalid task" and drops the message."""
        app.tasks["t.charge"].apply_async((CARD, 8), **{"countdown" if header == "eta" else header: 3600})
        (message,) = queued_messages(app.conf.task_default_queue)
        redis_client(BROKER_DB).delete(app.conf.task_default_queue)
        publish_raw(app, base64.b64decode(message["body"]), {**message["headers"], header: "not a date"})
        good = app.tasks["t.charge"].delay(CARD, 9)
        with _start(app):
            assert good.get(timeout=20)["amount"] == 9
            (parked,) = _wait_parked(app, 1)
        assert parked["headers"]["id"] == message["headers"]["id"]
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == "invalid task message"
        assert base64.b64decode(parked["body"]) == base64.b64decode(message["body"])

    def test_worker_process_survives_malformed_body(self, app, start_worker_process):
        """A real prefork worker started with such a message queued keeps running and serves the next task."""
        task_id = str(uuid.uuid4())
        publish_raw(app, b"\x01j[1]", _headers(task_id))
        good = app.tasks["t.charge"].delay(CARD, 6)
        worker = start_worker_process(pool="prefork", concurrency=1)
        assert good.get(timeout=30)["amount"] == 6
        (parked,) = _wait_parked(app, 1)
        assert parked["headers"]["id"] == task_id
        assert worker.process.poll() is None, "the worker died"
        log = worker.log()
        assert "Unrecoverable error" not in log
        assert REASON in log
