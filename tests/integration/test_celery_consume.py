"""The worker side: opening where a failure stops the task, quarantine, outages, results, logs."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone

import pytest
from celery import chord
from celery.contrib.testing.worker import start_worker
from celery.exceptions import MaxRetriesExceededError
from kombu import Queue

from celery_pii import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    _envelope,
    get_pii,
)
from celery_pii._keys import KeySpec
from celery_pii._quarantine import QUARANTINE_HEADER, list_parked, replay
from celery_pii._sealer import EMBED_KEY, MARKER, derived_key_spec, opened_with

from .conftest import (
    BACKEND_DB,
    BROKER_DB,
    RABBITMQ_URL,
    REDIS_URL,
    EventCapture,
    TcpProxy,
    message_bytes,
    publish_raw,
    queued_messages,
    redis_client,
)
from .test_celery_roundtrip import CARD, EMAIL, SSN, assert_no_plaintext

pytestmark = pytest.mark.integration


def _republish_edited(app, edit):
    """Take the oldest queued message, change its decoded body with ``edit``, put it back; returns its id."""
    queue = app.conf.task_default_queue
    client = redis_client(BROKER_DB)
    message = json.loads(client.rpop(queue))
    body = base64.b64decode(message["body"])
    frame, inner = body[:2], json.loads(body[2:])
    edit(inner)
    message["body"] = base64.b64encode(frame + json.dumps(inner).encode()).decode()
    client.rpush(queue, json.dumps(message))
    return message["headers"]["id"]


def _assert_parked_not_run(app, task_id):
    with _start(app), pytest.raises(DecryptionFailed):
        app.AsyncResult(task_id).get(timeout=20)
    parked = queued_messages(app.conf.pii_quarantine_queue)
    assert [m["headers"]["id"] for m in parked] == [task_id]


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, **options)


def _run_until_parked(app, good):
    """Run a worker until the task ``good`` is done and a message is parked; the parked messages."""
    with _start(app):
        good.get(timeout=20)
        deadline = time.monotonic() + 10
        while not queued_messages(app.conf.pii_quarantine_queue) and time.monotonic() < deadline:
            time.sleep(0.1)
    return queued_messages(app.conf.pii_quarantine_queue)


def _stored_status(task_id):
    """The status of a stored result, read raw (the status is never sealed)."""
    raw = redis_client(BACKEND_DB).get(f"celery-task-meta-{task_id}")
    return json.loads(raw[2:])["status"] if raw else None


def _tamper(queue):
    """Flip one byte inside the sealed envelope of the first queued message."""
    client = redis_client(BROKER_DB)
    raw = client.rpop(queue)
    message = json.loads(raw)
    body = base64.b64decode(message["body"])
    frame, inner = body[:2], json.loads(body[2:])
    envelope = bytearray(base64.b64decode(inner[2][EMBED_KEY][0]))
    envelope[-5] ^= 0x01
    inner[2][EMBED_KEY][0] = base64.b64encode(bytes(envelope)).decode()
    message["body"] = base64.b64encode(frame + json.dumps(inner).encode()).decode()
    client.rpush(queue, json.dumps(message))
    return message["headers"]["id"]


class TestAuthenticationFailures:
    """Tampered or undecodable messages are parked, not run, and the worker carries on."""

    def test_tampered_message_is_quarantined(self, app, caplog):
        """The task does not run, the sealed message is parked with an audit record and an ERROR log.

        The parked copy keeps what decides how a replay runs (its ETA and expiry, here).
        """
        app.tasks["t.charge"].apply_async((CARD, 1), countdown=0.5, expires=600, reply_to="caller-replies")
        task_id = _tamper(app.conf.task_default_queue)
        good = app.tasks["t.charge"].delay(CARD, 2)
        with caplog.at_level(logging.INFO), _start(app):
            bad = app.AsyncResult(task_id)
            with pytest.raises(DecryptionFailed):
                bad.get(timeout=20)
            assert good.get(timeout=20)["amount"] == 2
        parked = queued_messages(app.conf.pii_quarantine_queue)
        assert len(parked) == 1
        assert parked[0]["headers"]["id"] == task_id
        assert parked[0]["headers"][QUARANTINE_HEADER]["reason"] == "authentication failed"
        assert parked[0]["headers"]["eta"] is not None
        assert parked[0]["headers"]["expires"] is not None
        # And where an rpc:// result goes back to (the replay carries them again).
        original = parked[0]["headers"][QUARANTINE_HEADER]["original"]
        assert (original["reply_to"], original["correlation_id"]) == ("caller-replies", task_id)
        assert_no_plaintext(json.dumps(parked[0]))
        errors = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and task_id in r.getMessage()
        ]
        assert any("failed authentication" in line and "default" in line for line in errors)
        audit = [r for r in get_pii(app).keys.audit_trail() if r.operation == "tamper_detected"]
        assert any(r.details.get("task_id") == task_id for r in audit)

    def test_body_that_lost_a_sealed_place_is_parked_sealed(self, app):
        """Deleting one sealed field on the broker opens nothing: no plaintext reaches quarantine or results.

        The envelope is intact, so without all-or-nothing opening the first
        value would be written back before the missing place failed, and the
        parked body (and the stored failure) would carry it.
        """
        queue = app.conf.task_default_queue
        app.tasks["t.charge"].delay(CARD, 1, {"email": EMAIL, "tier": "gold"})
        client = redis_client(BROKER_DB)
        message = json.loads(client.rpop(queue))
        body = base64.b64decode(message["body"])
        frame, inner = body[:2], json.loads(body[2:])
        del inner[0][2]["email"]  # the second sealed place is gone; the card's is still there
        message["body"] = base64.b64encode(frame + json.dumps(inner).encode()).decode()
        client.rpush(queue, json.dumps(message))
        task_id = message["headers"]["id"]
        with _start(app), pytest.raises(DecryptionFailed):
            app.AsyncResult(task_id).get(timeout=20)
        (parked,) = queued_messages(app.conf.pii_quarantine_queue)
        assert parked["headers"]["id"] == task_id
        parked_body = json.loads(base64.b64decode(parked["body"])[2:])
        assert parked_body[0][0] == MARKER
        assert_no_plaintext(json.dumps(parked) + json.dumps(parked_body))
        stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{task_id}")
        assert b"DecryptionFailed" in stored
        assert CARD.encode() not in stored

    def _publish_unticketed(self, app, args, embed_pii=None, *, embed_extra=None, headers=None):
        """A pii-framed task body that never went through the publish step (a forged or foreign message)."""
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **(embed_extra or {})}
        if embed_pii is not None:
            embed[EMBED_KEY] = embed_pii
        body = get_pii(app)._encode_trusted((args, {}, embed), "t.echo")
        task_id = f"forged-{uuid.uuid4()}"
        publish_raw(
            app, body, {"task": "t.echo", "id": task_id, "lang": "py", "retries": 0, **(headers or {})}
        )
        return task_id

    @pytest.mark.parametrize(
        "claim",
        [
            {"headers": {"_celery_pii_opened": True}},  # the name of the opening step's old request flag
            {"embed_extra": {"is_eager": True}},  # Celery applies the embed over the request's is_eager
        ],
        ids=["opened-header", "eager-embed"],
    )
    def test_a_message_cannot_claim_to_need_no_opening(self, app, claim):
        """Plaintext in a declared field is refused whatever the message says about itself.

        Request attributes come from the message's headers and embed: the
        opening step's own state, and whether a call is eager, are kept where
        no message reaches.
        """
        forged = self._publish_unticketed(app, [CARD], **claim)
        sealed = app.tasks["t.echo"].apply_async((CARD,), headers=claim.get("headers"))
        with _start(app):
            with pytest.raises(DecryptionFailed):
                app.AsyncResult(forged).get(timeout=20)
            assert sealed.get(timeout=20)["value"] == CARD  # the header changes nothing for a sealed call

    @pytest.mark.parametrize("header", ["yes", ["flag"], True])
    def test_an_application_header_named_pii_is_not_read_as_envelopes(self, app, header):
        """Celery merges headers into the request: the envelopes' key is namespaced (it was "pii")."""
        result = app.tasks["t.plain"].apply_async((1,), headers={"pii": header})
        with _start(app):
            assert result.get(timeout=20) == 1
        assert not queued_messages(app.conf.pii_quarantine_queue)

    @pytest.mark.parametrize("embed_pii", [None, 5, "not a list", ["not an envelope"]])
    def test_markers_without_an_envelope_never_run(self, app, embed_pii):
        """Sealed markers with no (or a malformed) envelope: parked with an audit record, not run."""
        task_id = self._publish_unticketed(app, [MARKER], embed_pii)
        good = app.tasks["t.echo"].delay(CARD)
        with _start(app):
            with pytest.raises(DecryptionFailed):
                app.AsyncResult(task_id).get(timeout=20)
            assert good.get(timeout=20)["value"] == CARD
        parked = queued_messages(app.conf.pii_quarantine_queue)
        assert [m["headers"]["id"] for m in parked] == [task_id]
        # No key id can be read: the record names the task instead.
        audit = [r for r in get_pii(app).keys.audit_trail() if r.operation == "tamper_detected"]
        assert [r.key_id for r in audit if r.details.get("task_id") == task_id] == ["task:t.echo"]

    def test_declared_fields_arriving_unsealed_are_refused(self, app, caplog):
        """A PII task's declared field in plaintext, not eager, no rollout setting: refused, stored sealed."""
        task_id = self._publish_unticketed(app, [CARD])
        with caplog.at_level(logging.ERROR), _start(app), pytest.raises(DecryptionFailed):
            app.AsyncResult(task_id).get(timeout=20)
        assert any("arrived unsealed" in r.getMessage() and task_id in r.getMessage() for r in caplog.records)
        stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{task_id}")
        assert CARD.encode() not in stored
        audit = [r for r in get_pii(app).keys.audit_trail() if r.operation == "tamper_detected"]
        assert [r.details["reason"] for r in audit if r.details.get("task_id") == task_id] == [
            "declared fields arrived unsealed"
        ]

    @pytest.mark.parametrize("part", ["chain", "link", "map"])
    def test_canvas_step_relabelled_to_another_task_is_parked(self, app, part):
        """A chain step, link or mapped task re-pointed on the broker at a task without PII does not open.

        The step's values are sealed into the parent's envelope; its task name
        is bound into the associated data, so they never reach ``t.plain``.
        """
        notify = app.tasks["t.notify"].s(email=EMAIL)
        first = app.tasks["t.echo"].s(CARD)
        if part == "chain":
            (first | notify).delay()
        elif part == "link":
            first.apply_async(link=notify)
        else:
            app.tasks["t.echo"].map([CARD, EMAIL]).delay()

        def relabel(inner):
            if part == "map":
                step = inner[1]["task"]
                assert step["task"] == "t.echo"
            else:
                step = inner[2]["chain" if part == "chain" else "callbacks"][0]
                assert step["task"] == "t.notify"
            step["task"] = "t.plain"  # the only edit

        _assert_parked_not_run(app, _republish_edited(app, relabel))

    @pytest.mark.parametrize("part", ["chain", "link"])
    def test_canvas_step_made_mutable_is_parked(self, app, part):
        """An immutable step flipped to mutable on the broker does not open.

        Celery would put the parent's result first, moving the sealed value
        into the next parameter, which declares no PII (``label``).
        """
        step = app.tasks["t.echo"].si(EMAIL)
        first = app.tasks["t.echo"].s(CARD)
        if part == "chain":
            (first | step).delay()
        else:
            first.apply_async(link=step)

        def make_mutable(inner):
            embedded = inner[2]["chain" if part == "chain" else "callbacks"][0]
            assert embedded["immutable"] is True
            embedded["immutable"] = False  # the only edit

        _assert_parked_not_run(app, _republish_edited(app, make_mutable))

    def test_canvas_step_nested_too_deep_to_bind_is_refused_and_audited(self, app):
        """A step's ``subtask_type`` nested 960 lists deep on the broker: refused as tampered, audited.

        Binding the step's name into the associated data (before anything is
        authenticated) raised RecursionError: the task failed as if it had run,
        and nothing was parked or audited.
        """
        app.tasks["t.echo"].s(CARD).apply_async(link=app.tasks["t.notify"].s(email=EMAIL))

        def nest(inner):
            deep: list = []
            for _ in range(960):  # orjson, which reads the body, refuses 1024 and deeper
                deep = [deep]
            inner[2]["callbacks"][0]["subtask_type"] = deep

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 2000)  # for this test's own json.dumps of the edited body
        try:
            task_id = _republish_edited(app, nest)
        finally:
            sys.setrecursionlimit(limit)
        with _start(app), pytest.raises(DecryptionFailed):
            app.AsyncResult(task_id).get(timeout=20)
        trail = get_pii(app).keys.audit_trail()
        audit = [r for r in trail if r.operation == "tamper_detected" and r.details.get("task_id") == task_id]
        assert len(audit) == 1
        # Parked if this Python can write the body again; otherwise the record says it was not.
        parked = [m["headers"]["id"] for m in queued_messages(app.conf.pii_quarantine_queue)]
        assert parked == [task_id] or audit[0].details["reason"] == "not parked: unencodable"

    def test_undecodable_message_is_quarantined(self, app):
        """A pii message so damaged it cannot be decoded is parked byte for byte, not dropped."""
        publish_raw(app, b"\x01jthis is not json", {"task": "t.charge", "id": "broken-1", "lang": "py"})
        good = app.tasks["t.charge"].delay(CARD, 3)
        (parked,) = _run_until_parked(app, good)
        assert good.result["amount"] == 3
        assert base64.b64decode(parked["body"]) == b"\x01jthis is not json"
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == "undecodable"

    @pytest.mark.parametrize("broker", ["redis", "amqp"])
    def test_a_parked_message_is_replayed_with_its_reply_address_and_priority(self, make_app, broker):
        """Parking kept the body and headers only: a replayed rpc:// call's result went nowhere.

        (And its priority was lost.)
        """
        app = make_app(broker=f"{REDIS_URL}/{BROKER_DB}" if broker == "redis" else RABBITMQ_URL)
        properties = {"reply_to": "caller-replies", "correlation_id": "broken-2", "priority": 6}
        publish_raw(
            app, b"\x01jthis is not json", {"task": "t.charge", "id": "broken-2", "lang": "py"}, **properties
        )
        good = app.tasks["t.charge"].delay(CARD, 3)
        quarantine = app.conf.pii_quarantine_queue
        with _start(app):
            good.get(timeout=20)
            deadline = time.monotonic() + 10
            while not list_parked(app, quarantine) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert replay(app, quarantine).replayed == ["broken-2"]
        with app.connection_for_write() as connection:
            back = Queue(app.conf.task_default_queue, no_declare=True)(connection.default_channel)
            replayed = back.get(no_ack=True)
        assert replayed.headers["id"] == "broken-2"
        assert {name: replayed.properties.get(name) for name in properties} == properties

    def test_message_renamed_to_an_unknown_task_is_parked(self, app):
        """A sealed message whose task header names a task no worker knows is parked, not rejected.

        Celery rejects a message for an unregistered task: on Redis it is gone.
        """
        app.tasks["t.charge"].delay(CARD, 1)
        client = redis_client(BROKER_DB)
        queue = app.conf.task_default_queue
        message = json.loads(client.rpop(queue))
        message["headers"]["task"] = "t.nobody_knows"
        client.rpush(queue, json.dumps(message))
        good = app.tasks["t.charge"].delay(CARD, 2)
        (parked,) = _run_until_parked(app, good)
        assert good.result["amount"] == 2
        assert parked["headers"]["id"] == message["headers"]["id"]
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == "unknown task"
        assert parked["body"] == message["body"]
        audit = [r for r in get_pii(app).keys.audit_trail() if r.operation == "tamper_detected"]
        assert any(r.details.get("task_id") == message["headers"]["id"] for r in audit)


class TestKeyOutcomes:
    """Destroyed keys fail clearly; an unreachable key store delays, never drops."""

    def test_message_derived_from_a_subject_is_erased_with_it(self, app, queue_name):
        """A chain step carrying a subject task's return value is sealed under that subject's key.

        The step itself declares no PII; once the subject is forgotten, its
        queued message no longer opens, wherever copies of it lie.
        """
        later = f"{queue_name}.later"
        step = app.tasks["t.plain"].s().set(queue=later)
        result = (app.tasks["t.profile"].s("user-1", EMAIL) | step).delay()
        with _start(app):  # runs t.profile only: the step waits in the other queue
            deadline = time.monotonic() + 20
            while not queued_messages(later) and time.monotonic() < deadline:
                time.sleep(0.1)
        (derived,) = queued_messages(later)
        token = json.loads(base64.b64decode(derived["body"])[2:])[2][EMBED_KEY][0]
        assert _envelope.parse(token).key_id.startswith("subject.")
        assert get_pii(app).forget_subject("user-1") >= 1
        with _start(app, queues=[later]), pytest.raises(KeyDestroyed):
            result.get(timeout=20)

    @staticmethod
    def _canvas_with_a_subject_step(app, kind, subject):
        """A message of t.echo (no subject) carrying a step of t.profile for ``subject``; its final result."""
        from celery import chain, chord

        step = app.tasks["t.profile"].si(subject, EMAIL)
        first = app.tasks["t.echo"].si(CARD)
        if kind == "chain":
            return chain(first, step).delay()
        if kind == "link":
            first.link(step)
            return first.delay()
        return chord([first], step).delay()

    @pytest.mark.parametrize("kind", ["chain", "link", "chord-body"])
    def test_a_subjects_step_carried_in_another_message_is_erased_with_the_subject(self, app, kind):
        """A chain step, link or chord body of Alice's rides in t.echo's message: forgetting her reaches it.

        Its arguments were sealed under the carrying message's key: after
        forget_subject they still opened, the step ran, and was sealed again
        under a new version of Alice's key made after her erasure.
        """
        alice = f"alice-{uuid.uuid4()}"
        self._canvas_with_a_subject_step(app, kind, alice)
        (message,) = queued_messages(app.conf.task_default_queue)
        tokens = json.loads(base64.b64decode(message["body"])[2:])[2][EMBED_KEY]
        pii = get_pii(app)
        alice_key = pii.keys.subject_key_id(alice)[0]
        assert [_envelope.parse(token).key_id for token in tokens] == ["default", alice_key]
        assert pii.forget_subject(alice) == 1
        with _start(app):
            deadline = time.monotonic() + 20
            while queued_messages(app.conf.task_default_queue) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
        echo_id = message["headers"]["id"]
        with pytest.raises(KeyDestroyed):
            app.AsyncResult(echo_id).get(timeout=5)
        versions = [(k.version, k.status) for k in pii.keys.list_keys() if k.key_id.startswith(alice_key)]
        assert versions == [(1, "destroyed")]  # nothing sealed for her since

    @pytest.mark.parametrize("refused", ["erased", "envelope-dropped"])
    def test_errbacks_of_a_message_that_does_not_open_are_not_run_on_markers(
        self, app, testapp_module, refused, caplog
    ):
        """Celery calls a (request, exc, traceback) errback in the failed task's process, as the message has it.

        Alice erased (or her envelope dropped), her task failed and its errback
        ran with ``[pii:sealed]`` for the email it was given.
        """
        alice = f"alice-{uuid.uuid4()}"
        testapp_module.RECEIVED.clear()
        app.tasks["t.profile"].apply_async((alice, EMAIL), link_error=app.tasks["t.on_error"].s(email=EMAIL))
        if refused == "erased":
            assert get_pii(app).forget_subject(alice) == 1
            task_id = queued_messages(app.conf.task_default_queue)[0]["headers"]["id"]
            expected = KeyDestroyed
        else:
            task_id = _republish_edited(app, lambda inner: inner[2][EMBED_KEY].clear())
            expected = DecryptionFailed
        with caplog.at_level(logging.WARNING), _start(app, loglevel="WARNING"), pytest.raises(expected):
            app.AsyncResult(task_id).get(timeout=20)
        assert testapp_module.RECEIVED == []
        assert "errback 't.on_error' not called" in caplog.text

    def test_a_message_whose_step_envelope_was_dropped_is_parked_before_it_runs(self, app):
        """Drop the subject step's envelope on the broker: the carrying task must not run first.

        It ran, on its own opened values, and failed only when publishing the
        step (whose markers had no envelope): nothing parked, nothing recorded.
        """
        self._canvas_with_a_subject_step(app, "chain", f"alice-{uuid.uuid4()}")
        task_id = _republish_edited(app, lambda inner: inner[2][EMBED_KEY].pop())
        _assert_parked_not_run(app, task_id)

    @pytest.mark.parametrize("kind", ["chain", "link", "chord-body"])
    def test_a_subjects_step_carried_in_another_message_runs_while_the_subject_is_there(self, app, kind):
        alice = f"alice-{uuid.uuid4()}"
        result = self._canvas_with_a_subject_step(app, kind, alice)
        with _start(app):
            if kind == "link":
                result.get(timeout=20)
                deadline = time.monotonic() + 20
                while not result.children and time.monotonic() < deadline:
                    time.sleep(0.1)
                    result = app.AsyncResult(result.id)
                    result.get(timeout=5)
                (result,) = result.children
            assert result.get(timeout=20) == {"user_id": alice, "email": EMAIL}

    @pytest.mark.parametrize("step", ["by-keyword", "given-by-the-parent", "positional-shifted"])
    def test_a_subject_step_whose_subject_comes_later_is_sealed_with_the_message(self, app, step):
        """A mutable chain step gets its parent's result first: its subject is bound as it will be called.

        Bound to its own arguments, ``t.profile.s("welcome-template")`` keyed the
        step by a made-up subject, and a parent result bound there (a dict)
        refused the whole chain.
        """
        from celery import chain

        alice = f"alice-{uuid.uuid4()}"
        profile = app.tasks["t.profile"]
        steps = {
            "by-keyword": profile.s(user_id=alice),  # the parent's result becomes the email
            "given-by-the-parent": profile.s(email=EMAIL),  # the parent's result is the subject
            "positional-shifted": profile.s("welcome-template"),  # ... and this one the email
        }
        chain(app.tasks["t.echo"].si(CARD), steps[step]).delay()
        (message,) = queued_messages(app.conf.task_default_queue)
        tokens = json.loads(base64.b64decode(message["body"])[2:])[2][EMBED_KEY]
        pii = get_pii(app)
        expected = ["default", pii.keys.subject_key_id(alice)[0]] if step == "by-keyword" else ["default"]
        assert [_envelope.parse(token).key_id for token in tokens] == expected

    @pytest.mark.parametrize("given", ["by-keyword", "immutable"])
    def test_an_errbacks_subject_is_taken_as_it_will_be_called(self, app, given):
        """A mutable errback gets the failed task's id, or (request, exc, traceback): its own come after."""
        alice = f"alice-{uuid.uuid4()}"
        profile = app.tasks["t.profile"]
        errback = profile.s(user_id=alice, email=EMAIL) if given == "by-keyword" else profile.si(alice, EMAIL)
        app.tasks["t.echo"].apply_async((CARD,), link_error=errback)
        (message,) = queued_messages(app.conf.task_default_queue)
        tokens = json.loads(base64.b64decode(message["body"])[2:])[2][EMBED_KEY]
        alice_key = get_pii(app).keys.subject_key_id(alice)[0]
        assert [_envelope.parse(token).key_id for token in tokens] == ["default", alice_key]

    def test_a_mutable_errbacks_subject_given_by_position_is_refused(self, app):
        """Which positional argument is its subject cannot be told: sealed with the message, it outlived erasure."""
        errback = app.tasks["t.profile"].s(f"alice-{uuid.uuid4()}", EMAIL)
        with pytest.raises(
            EncryptionFailed, match=r"errback 't\.profile': give its pii_subject 'user_id' by keyword"
        ):
            app.tasks["t.echo"].apply_async((CARD,), link_error=errback)
        assert queued_messages(app.conf.task_default_queue) == []

    def test_a_carried_step_keeps_its_retention_bucket_when_the_carrier_publishes_it(self, app, queue_name):
        """A task with no PII of its own carries a step of a short-retention task: published later, same bucket.

        The step was sealed again under the bucket of the moment it was
        published (its deadline moved by however long the carrier waited).
        """
        from celery import chain

        later = f"{queue_name}.later"
        step = app.tasks["t.retention_short"].si(EMAIL).set(queue=later)
        chain(app.tasks["t.plain"].si(1), step).delay()
        (carrier,) = queued_messages(app.conf.task_default_queue)
        (carried_with,) = json.loads(base64.b64decode(carrier["body"])[2:])[2][EMBED_KEY]
        first_key = _envelope.parse(carried_with).key_id
        assert "@" in first_key  # a retention bucket's key
        time.sleep(1.5)  # past the bucket (a tenth of the 5 s policy, rounded down)
        with _start(app):
            deadline = time.monotonic() + 20
            while not queued_messages(later) and time.monotonic() < deadline:
                time.sleep(0.1)
        (published,) = queued_messages(later)
        tokens = json.loads(base64.b64decode(published["body"])[2:])[2][EMBED_KEY]
        assert [_envelope.parse(token).key_id for token in tokens] == [first_key]

    def test_a_task_carrying_a_subjects_step_keeps_its_own_result_readable(self, app):
        """Its own outcome derives from its own arguments: only the step is erased with its subject."""
        alice = f"alice-{uuid.uuid4()}"
        carrier = app.tasks["t.plain"].si(123)
        carrier.link(app.tasks["t.profile"].si(alice, EMAIL))
        result = carrier.delay()
        with _start(app):
            assert result.get(timeout=20) == 123
        assert get_pii(app).forget_subject(alice) == 1
        assert app.AsyncResult(result.id).get(timeout=5) == 123

    def test_a_chord_body_carried_by_chord_unlock_is_sealed_under_its_subjects_key(
        self, make_app, key_store_url
    ):
        """On the database backend celery.chord_unlock carries the body: under the body's subject's key."""
        from celery import chord

        app = make_app(backend="db+" + key_store_url)
        alice = f"alice-{uuid.uuid4()}"
        chord([app.tasks["t.echo"].si(CARD)], app.tasks["t.profile"].si(alice, EMAIL)).delay()
        (unlock,) = [
            m
            for m in queued_messages(app.conf.task_default_queue)
            if m["headers"]["task"] == "celery.chord_unlock"
        ]
        tokens = json.loads(base64.b64decode(unlock["body"])[2:])[2][EMBED_KEY]
        assert [_envelope.parse(token).key_id for token in tokens] == [
            get_pii(app).keys.subject_key_id(alice)[0]
        ]

    def test_derived_key_takes_the_source_subject_and_the_earlier_bucket(self):
        """The derived message's key: the source's subject, the earlier bucket; a plain source changes nothing."""
        own = KeySpec("orders@20270101T000000Z", expires_at=datetime(2027, 1, 1, tzinfo=timezone.utc))
        derived = derived_key_spec(own, KeySpec("subject.abc@20261201T000000Z"))
        assert derived.key_id == "subject.abc@20261201T000000Z"
        assert derived.subject_id == "abc"
        assert derived.expires_at == datetime(2026, 12, 1, tzinfo=timezone.utc)
        later = KeySpec("subject.abc@20280101T000000Z")
        assert derived_key_spec(own, later).key_id == "subject.abc@20270101T000000Z"
        assert derived_key_spec(own, KeySpec("default")) is own
        assert derived_key_spec(KeySpec("orders"), KeySpec("payments@20261201T000000Z")).key_id == (
            "orders@20261201T000000Z"
        )
        mine = KeySpec("subject.mine", subject_id="mine")
        assert derived_key_spec(mine, KeySpec("subject.abc")).key_id == "subject.mine"

    def test_derived_key_of_two_subjects_takes_the_other_as_a_co_key(self):
        """Derived from another subject's data, a subject's message is sealed under both subjects' keys.

        It kept only its own subject's key: erasing the other subject left the
        copy of that subject's data readable.
        """
        mine = KeySpec("subject.mine", subject_id="mine")
        derived = derived_key_spec(mine, KeySpec("subject.abc@20261201T000000Z"))
        assert (derived.key_id, derived.co_keys) == (
            "subject.mine@20261201T000000Z",
            ("subject.abc@20261201T000000Z",),
        )
        # A third subject joins; the same subject again (another bucket) and a plain key add nothing.
        derived = derived_key_spec(derived, KeySpec("subject.xyz"))
        derived = derived_key_spec(derived, KeySpec("subject.abc@20280101T000000Z"))
        derived = derived_key_spec(derived, KeySpec("default"))
        assert derived.co_keys == ("subject.abc@20261201T000000Z", "subject.xyz")
        # A key without a subject takes the first subject's key, and its co-keys come along.
        plain = derived_key_spec(KeySpec("orders"), derived)
        assert (plain.key_id, plain.co_keys) == ("subject.mine@20261201T000000Z", derived.co_keys)
        # The subject's own key is never its own co-key.
        back = derived_key_spec(KeySpec("subject.abc", subject_id="abc"), derived)
        assert back.key_id.startswith("subject.abc@")
        assert back.co_keys == ("subject.mine@20261201T000000Z", "subject.xyz")

    def test_opened_with_several_subjects_keys_names_the_others_as_co_keys(self):
        """What a message opened with several subjects' keys derives goes under all of them."""
        spec = opened_with(
            [("subject.mine@20261201T000000Z", 2), ("subject.abc", 1), ("default", 1), ("subject.mine", 3)]
        )
        assert (spec.key_id, spec.subject_id) == ("subject.mine@20261201T000000Z", "mine")
        assert spec.co_keys == ("subject.abc",)
        assert opened_with([("default", 1)]).co_keys == ()

    @pytest.mark.parametrize("source_id", ["default", "subject.abc", "payments@20261201T000000Z"])
    def test_derived_key_names_the_version_that_opened_the_source(self, source_id):
        """Whatever key a derived message takes, it carries the source's opening version along."""
        opened_with = ((source_id, 3),)
        derived = derived_key_spec(KeySpec("orders"), KeySpec(source_id, derived_from=opened_with))
        assert derived.derived_from == opened_with

    @pytest.mark.parametrize("source_id", ["default", "subject.abc", "payments@20261201T000000Z"])
    def test_derived_key_keeps_the_versions_that_opened_its_own_data(self, source_id):
        """A task's own data and a result it read: destroying either version stops what is derived."""
        own = KeySpec("subject.mine", subject_id="mine", derived_from=(("subject.mine", 2),))
        derived = derived_key_spec(own, KeySpec(source_id, derived_from=((source_id, 3),)))
        assert derived.derived_from == (("subject.mine", 2), (source_id, 3))
        assert derived.key_id.startswith("subject.mine")  # a subject's data stays under its own key

    @staticmethod
    def _erase_while_it_runs(app, eraser, testapp_module, *, retry, until):
        """Run t.profile_waits, erase its subject (from another app) while it runs; then let it end."""
        testapp_module.STARTED.clear()
        testapp_module.PROCEED.clear()
        subject = f"user-{uuid.uuid4()}"
        sent = app.tasks["t.profile_waits"].delay(subject, EMAIL, retry=retry)
        with _start(app):
            assert testapp_module.STARTED.wait(20)
            assert eraser.forget_subject(subject) == 1
            time.sleep(0.5)  # the worker's next key check sees the destruction
            testapp_module.PROCEED.set()
            deadline = time.monotonic() + 20
            while not until(sent) and time.monotonic() < deadline:
                time.sleep(0.1)
        subject_key = eraser.keys.subject_key_id(subject)[0]
        versions = [
            (k.version, k.status) for k in eraser.keys.list_keys() if k.key_id.startswith(subject_key)
        ]
        assert versions == [(1, "destroyed")]  # no version was created for what the task derived
        return sent

    @pytest.mark.parametrize("retry", [False, True], ids=["result", "retry"])
    def test_subject_erased_while_its_task_runs_keeps_nothing_readable(self, make_app, testapp_module, retry):
        """What a running task stores or re-publishes after its subject is erased is not sealed at all.

        Not under a version created for the subject after the erasure either:
        that one would open the erased subject's data for anyone with the key
        store.  The erasure is done by another app (another process's key
        cache); the worker has checked for destroyed keys before the task ends.
        """
        app = make_app(pii_key_recheck_interval=0.2)
        failed = lambda sent: _stored_status(sent.id) == "FAILURE"  # noqa: E731 - a one-line condition
        sent = self._erase_while_it_runs(app, get_pii(make_app()), testapp_module, retry=retry, until=failed)
        assert failed(sent)
        assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{sent.id}"))
        # A retry Celery could not publish ends the run with Reject, which Celery stores after the
        # task's end (on this solo pool, in the task's process): withheld, as a result is.
        with pytest.raises(KeyDestroyed, match=r"outcome of task .* was not stored"):
            app.AsyncResult(sent.id).get(timeout=5)

    def test_erased_while_running_with_the_database_backend(self, make_app, testapp_module, key_store_url):
        """The database backend stores the result alone (no meta to turn into a failure): a placeholder says why."""
        app = make_app(backend="db+" + key_store_url, pii_key_recheck_interval=0.2)

        sent = self._erase_while_it_runs(
            app, get_pii(make_app()), testapp_module, retry=False, until=lambda sent: sent.ready()
        )
        assert app.AsyncResult(sent.id).state == "FAILURE"
        with pytest.raises(KeyDestroyed, match=r"outcome of task .* was not stored"):
            app.AsyncResult(sent.id).get(timeout=5)

    def test_an_erased_result_on_the_database_backend_reads_as_a_failure(self, make_app, key_store_url):
        """As on Redis: its state is FAILURE and get() raises KeyDestroyed (kombu's DecodeError escaped).

        ``celery.chord_unlock`` reads header results this way: it retried
        forever on an erased one, and the chord never ended.
        """
        app = make_app(backend="db+" + key_store_url)
        with _start(app):
            profile = app.tasks["t.profile"].delay("user-db", EMAIL)
            assert profile.get(timeout=20)["email"] == EMAIL
        get_pii(app).forget_subject("user-db")
        erased = app.AsyncResult(profile.id)
        assert erased.state == "FAILURE"
        assert erased.date_done is not None  # the row's columns that hold no value are read still
        with pytest.raises(KeyDestroyed):
            erased.get(timeout=5)

    def test_an_erased_result_keeps_the_rows_other_columns(self, make_app, key_store_url):
        """With result_extended: which task ran, where and when stay readable, as on Redis (they were None)."""
        app = make_app(backend="db+" + key_store_url, result_extended=True)
        with _start(app):
            profile = app.tasks["t.profile"].delay("user-db-x", EMAIL)
            assert profile.get(timeout=20)["email"] == EMAIL
        before = app.AsyncResult(profile.id)
        facts = (before.name, before.date_done, before.worker, before.queue)
        assert None not in facts
        get_pii(app).forget_subject("user-db-x")
        erased = app.AsyncResult(profile.id)
        assert erased.state == "FAILURE"
        assert (erased.name, erased.date_done, erased.worker, erased.queue) == facts
        assert erased.args is None and erased.kwargs is None
        with pytest.raises(KeyDestroyed):
            erased.get(timeout=5)

    def test_a_task_run_eagerly_inside_a_subjects_task_publishes_under_the_subjects_key(self, app):
        """t.profile_applies runs t.echo_publishes with apply(); that one publishes t.plain with the email.

        The inner run had no key of the subject (only its own): what it published
        outlived forget_subject.  It now takes the outer task's subject and bucket.
        """
        subject = f"user-{uuid.uuid4()}"
        with _start(app):
            published = app.tasks["t.profile_applies"].delay(subject, EMAIL).get(timeout=20)
            assert app.AsyncResult(published).get(timeout=20) == EMAIL
        assert get_pii(app).forget_subject(subject) >= 1
        with pytest.raises(KeyDestroyed):
            app.AsyncResult(published).get(timeout=5)

    @pytest.mark.parametrize("erased", ["alice", "bob"])
    @pytest.mark.parametrize("backend", ["redis", "database"])
    def test_a_subjects_task_reading_anothers_result_is_erased_with_either_subject(
        self, make_app, key_store_url, backend, erased
    ):
        """Alice's task reads Bob's result: what it stores is erased with Alice, and with Bob.

        It was sealed under Bob's key (after forget_subject(alice) Alice's email
        stayed readable in its result and stored arguments), then under Alice's
        alone (after forget_subject(bob) Bob's email stayed readable in it).
        """
        app = make_app(backend="db+" + key_store_url) if backend == "database" else make_app()
        subjects = {"alice": f"alice-{uuid.uuid4()}", "bob": f"bob-{uuid.uuid4()}"}
        with _start(app):
            bobs = app.tasks["t.profile"].delay(subjects["bob"], "bob@example.com")
            bobs.get(timeout=20)
            alices = app.tasks["t.profile_reads_result"].delay(subjects["alice"], EMAIL, bobs.id)
            assert alices.get(timeout=20)["read"]["email"] == "bob@example.com"
        assert app.AsyncResult(alices.id).get(timeout=5)["read"]["email"] == "bob@example.com"
        assert get_pii(app).forget_subject(subjects[erased]) >= 1
        with pytest.raises(KeyDestroyed):
            app.AsyncResult(alices.id).get(timeout=5)
        if erased == "alice":  # Bob's own result is his alone
            assert app.AsyncResult(bobs.id).get(timeout=5)["email"] == "bob@example.com"

    @pytest.mark.parametrize("erased", [0, 1])
    @pytest.mark.parametrize("backend", ["redis", "database"])
    def test_a_chord_body_gathering_two_subjects_is_erased_with_either(
        self, make_app, key_store_url, backend, erased
    ):
        """A chord body given two subjects' results: forgetting either one shreds its copy.

        It was sealed under the key of one of them (the header task that ended
        last on Redis, the first result ``celery.chord_unlock`` read on the
        database backend): erasing the other left that subject's data readable
        in the body's result.
        """
        app = make_app(backend="db+" + key_store_url) if backend == "database" else make_app()
        subjects = [f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"]
        emails = ["alice@example.com", "bob@example.com"]
        header = [
            app.tasks["t.profile"].s(subject, email) for subject, email in zip(subjects, emails, strict=True)
        ]
        with _start(app):
            body = chord(header)(app.tasks["t.gather"].s())
            gathered = body.get(timeout=30)
        assert sorted(part["email"] for part in gathered["results"]) == emails
        assert get_pii(app).forget_subject(subjects[erased]) >= 1
        with pytest.raises(KeyDestroyed):
            app.AsyncResult(body.id).get(timeout=5)

    def test_a_task_that_read_anothers_result_stores_nothing_once_its_own_subject_is_erased(
        self, make_app, testapp_module
    ):
        """Derived from two keys, its own and Bob's: Alice erased while it runs, nothing of it is stored.

        Reading Bob's result replaced what it was derived from: its own key's
        destruction went unseen, and its result was sealed under a version of
        Alice's key made after her erasure.
        """
        app, eraser = make_app(pii_key_recheck_interval=0.2), get_pii(make_app())
        alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
        testapp_module.STARTED.clear()
        testapp_module.PROCEED.clear()
        with _start(app):
            bobs = app.tasks["t.profile"].delay(bob, "bob@example.com")
            bobs.get(timeout=20)
            alices = app.tasks["t.profile_reads_result"].delay(alice, EMAIL, bobs.id, wait=True)
            assert testapp_module.STARTED.wait(20)
            assert eraser.forget_subject(alice) == 1
            time.sleep(0.5)  # the worker's next key check sees the destruction
            testapp_module.PROCEED.set()
            with pytest.raises(KeyDestroyed, match=r"outcome of task .* was not stored"):
                alices.get(timeout=20)
        alice_key = eraser.keys.subject_key_id(alice)[0]
        versions = [(k.version, k.status) for k in eraser.keys.list_keys() if k.key_id.startswith(alice_key)]
        assert versions == [(1, "destroyed")]

    def test_forgotten_subject_fails_with_key_destroyed(self, app):
        """After forget_subject, a queued task of that subject fails with KeyDestroyed; others proceed."""
        forgotten = app.tasks["t.profile"].delay("user-1", EMAIL)
        kept = app.tasks["t.profile"].delay("user-2", "carol@example.com")
        pii = get_pii(app)
        assert pii.forget_subject("user-1") >= 1
        with _start(app):
            with pytest.raises(KeyDestroyed, match="was destroyed"):
                forgotten.get(timeout=20)
            assert kept.get(timeout=20)["email"] == "carol@example.com"
        # Filed under the subject's key: its own audit trail shows what was refused after the erasure.
        subject_key = pii.keys.subject_key_id("user-1")[0]
        denied = [r for r in pii.keys.audit_trail(subject_key) if r.operation == "decrypt_denied"]
        assert any(r.details.get("task_id") == forgotten.id for r in denied)

    def test_worker_that_cached_a_subject_key_refuses_it_after_forget(self, make_app, start_worker_process):
        """A prefork child holding a forgotten subject's key stops opening with it at its next check."""
        conf = {"pii_key_recheck_interval": 0.5}  # the TTL stays at an hour
        worker = start_worker_process(
            pool="prefork", concurrency=1, env={"PII_TESTAPP_CONF": json.dumps(conf)}
        )
        app = make_app()
        profile = app.tasks["t.profile"]
        assert profile.delay("user-9", EMAIL).get(timeout=30)["email"] == EMAIL  # the child caches the key
        held = profile.apply_async(("user-9", EMAIL), countdown=3)  # sealed now, opened by that child later
        assert get_pii(app).forget_subject("user-9") >= 1
        with pytest.raises(KeyDestroyed, match="was destroyed"):
            held.get(timeout=30)
        # The stored result is unreadable either way (it is sealed under the same key): the
        # worker's log tells whether the task ran.  It logs the outcome after storing it.
        outcome = re.compile(rf"Task t\.profile\[{held.id}\] (succeeded|raised .*KeyDestroyed)")
        deadline = time.monotonic() + 20
        while (logged := outcome.search(worker.log())) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logged is not None, "the worker never logged the held task's outcome"
        assert logged.group(1) != "succeeded"

    def test_unreachable_key_store_retries(self, make_app, key_store_url):
        """With the key store cut off and a cold cache, the task is retried and runs once it returns.

        Those retries are not the task's: t.retry_once still retries once on its
        own first attempt (request.retries == 0), and no limit is left on the task.
        """
        host, port = "127.0.0.1", 5432
        proxy = TcpProxy(host, port)
        try:
            worker_app = make_app(
                key_store=key_store_url.replace(f"{host}:{port}", f"{host}:{proxy.port}"),
                pii_key_unavailable_retry_delay=0.5,
                pii_key_store_connect_timeout=1,
            )
            publisher = make_app()
            result = publisher.tasks["t.charge"].delay(CARD, 7)
            own_retry = publisher.tasks["t.retry_once"].delay(SSN)
            proxy.cut()
            with _start(worker_app):
                time.sleep(2.5)
                assert result.state in ("PENDING", "RETRY")
                proxy.restore()
                assert result.get(timeout=30)["card_number"] == CARD
                assert own_retry.get(timeout=30) == {"ssn": SSN, "retries": 1}
            assert not hasattr(worker_app.tasks["t.retry_once"], "override_max_retries")
        finally:
            proxy.close()

    def test_errback_the_main_process_sends_is_not_refused(self, make_app, start_worker_process):
        """After Reject(requeue=False) on prefork, Celery publishes link_error from the main process.

        That process never opened the errback's sealed arguments: it sends the
        markers as they are (its worker parks them, docs/security.md), rather
        than refusing them as a client's marker text (which raised inside
        Celery's pool callback, and the errback was lost).
        """
        worker = start_worker_process(pool="prefork", concurrency=1)
        app = make_app()
        errback = app.tasks["t.errback_by_id"].s(card=CARD)
        rejected = app.tasks["t.reject_if"].apply_async((EMAIL,), link_error=errback)
        deadline = time.monotonic() + 30
        while not queued_messages(app.conf.pii_quarantine_queue) and time.monotonic() < deadline:
            time.sleep(0.2)
        (parked,) = queued_messages(app.conf.pii_quarantine_queue)
        assert parked["headers"]["task"] == "t.errback_by_id"
        assert parked["headers"]["parent_id"] == rejected.id
        assert "EncryptionFailed" not in worker.log()
        assert_no_plaintext(worker.log())

    def test_a_marker_beside_a_value_sealed_afresh_is_parked(self, app):
        """Sent on behalf of a task (its markers kept), with a declared value sealed afresh: not run.

        What a worker's main process sends for an errback whose declared field
        takes the failed task's id: the envelope opens, and the task ran on the
        marker left in ``label``.  It is parked as it came, sealed.
        """
        result = app.tasks["t.echo"].apply_async((CARD,), {"label": MARKER}, parent_id="the-failed-task")
        with _start(app), pytest.raises(DecryptionFailed):
            result.get(timeout=20)
        (parked,) = queued_messages(app.conf.pii_quarantine_queue)
        assert parked["headers"]["id"] == result.id
        assert_no_plaintext(message_bytes(parked))

    def test_a_master_key_that_cannot_be_used_keeps_the_task(self, make_app, caplog):
        """A KMS key disabled while workers run (ConfigurationError on unwrap): retried, not lost.

        The error escaped the opening step: the task failed and its message was
        acknowledged.  moto does not enforce a disabled key, so the key manager's
        refusal stands in for KMS's (the first two lookups fail, then it is re-enabled).
        """
        worker_app = make_app(pii_key_unavailable_retry_delay=0.2)
        result = make_app().tasks["t.charge"].delay(CARD, 9)
        keys = get_pii(worker_app).keys
        keys.cache.clear()
        real, refusals = keys.decryption_key, []

        def disabled_twice(key_id, version):
            if len(refusals) < 2:
                refusals.append(key_id)
                msg = "setting pii_master_key: AWS KMS key 'k-1' is missing, disabled or pending deletion"
                raise ConfigurationError(msg)
            return real(key_id, version)

        keys.decryption_key = disabled_twice
        with caplog.at_level(logging.ERROR), _start(worker_app):
            assert result.get(timeout=30)["card_number"] == CARD
        assert len(refusals) == 2
        assert any(
            "not opened, retried" in r.getMessage() and result.id in r.getMessage() for r in caplog.records
        )


class TestResultsAndLogs:
    """Results are sealed at rest; failures, retries and logs carry no plaintext."""

    def test_result_and_extended_args_sealed(self, app, worker):
        """The stored result and result_extended args are ciphertext; get() returns plaintext."""
        result = app.tasks["t.charge"].delay(CARD, 5, {"email": EMAIL})
        assert result.get(timeout=20)["customer"]["email"] == EMAIL
        stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}")
        assert_no_plaintext(stored)
        meta = json.loads(stored[2:])
        assert meta["status"] == "SUCCESS"
        assert meta["result"] == meta["args"] == MARKER

    def test_failure_text_and_traceback_scrubbed(self, app, worker, caplog):
        """The exception message, traceback and logs of a failed PII task hold no plaintext."""
        with caplog.at_level(logging.DEBUG):
            result = app.tasks["t.fail"].delay(CARD)
            with pytest.raises(ValueError, match=r"card \[pii:redacted\] declined") as info:
                result.get(timeout=20)
        assert_no_plaintext(str(info.value))
        assert_no_plaintext(result.traceback or "")
        assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}"))
        assert_no_plaintext("\n".join(caplog.text.splitlines()))

    def test_retry_and_max_retries(self, app, worker, caplog):
        """Retries are re-published sealed; MaxRetriesExceededError's text is scrubbed."""
        with caplog.at_level(logging.DEBUG), EventCapture(app) as events:
            assert app.tasks["t.retry_once"].delay(SSN).get(timeout=30) == {"ssn": SSN, "retries": 1}
            exhausted = app.tasks["t.always_retry"].delay(SSN)
            with pytest.raises(MaxRetriesExceededError) as info:
                exhausted.get(timeout=30)
        assert_no_plaintext(str(info.value))
        assert_no_plaintext(caplog.text)
        assert events.of_type("task-retried")
        assert_no_plaintext(json.dumps(events.events, default=str))

    def test_max_retries_naming_new_arguments_is_scrubbed(self, app, worker, caplog):
        """self.retry(args=...) with new values: the text naming them when no retry is left hides them.

        Celery writes the last retry's arguments into MaxRetriesExceededError
        (the ERROR log line, the task-failed event): they were never opened, so
        only the retry call itself can tell the scrubber.
        """
        with caplog.at_level(logging.DEBUG), EventCapture(app) as events:
            exhausted = app.tasks["t.retry_with_new"].delay(SSN)
            with pytest.raises(MaxRetriesExceededError) as info:
                exhausted.get(timeout=30)
        assert "args:" in str(info.value)
        shown = [
            str(info.value),
            caplog.text,
            json.dumps(events.events, default=str),
            exhausted.traceback or "",
        ]
        assert SSN[:-1] not in "\n".join(
            shown
        )  # neither 912-34-5678 nor the ...5679 / ...5670 it retried with

    def test_worker_logs_at_debug_have_no_plaintext(self, app, caplog):
        """Received, succeeded and failed log lines at DEBUG carry no sealed value."""
        with caplog.at_level(logging.DEBUG), _start(app, loglevel="DEBUG"):
            app.tasks["t.charge"].delay(CARD, 1, {"email": EMAIL}).get(timeout=20)
            app.tasks["t.echo"].delay(EMAIL).get(timeout=20)
        lines = [caplog.text] + [str(getattr(r, "data", "")) for r in caplog.records]
        assert_no_plaintext("\n".join(lines))
        assert any("succeeded" in r.getMessage() for r in caplog.records)

    def test_inspect_shows_ciphertext(self, app):
        """inspect active/reserved/scheduled replies hold markers, never plaintext."""
        slow = app.tasks["t.slow"]
        with _start(app, pool="threads", concurrency=1):
            running = slow.delay(EMAIL, 3.0)
            queued = slow.delay(EMAIL, 0.1)
            scheduled = slow.apply_async((EMAIL,), countdown=30)
            time.sleep(1.0)
            inspect = app.control.inspect(timeout=3, limit=1)  # one worker: its reply ends the wait
            replies = [inspect.active(), inspect.reserved(), inspect.scheduled()]
            assert running.get(timeout=20) == EMAIL
            queued.get(timeout=20)
            scheduled.revoke()
        text = json.dumps(replies, default=str)
        assert_no_plaintext(text)
        assert MARKER in text


class TestRollout:
    """pii_allow_plaintext lets workers run legacy json messages during a rollout."""

    def _legacy_publish(self, app, name="t.charge"):
        from celery import Celery

        legacy = Celery("legacy", broker=app.conf.broker_url, set_as_current=False)
        legacy.conf.update(task_serializer="json", task_default_queue=app.conf.task_default_queue)
        return legacy.send_task(name, args=(CARD, 4))

    def test_legacy_json_runs_in_rollout_mode(self, make_app):
        """A worker with accept_content=['pii','json'] and pii_allow_plaintext runs plaintext messages."""
        app = make_app(accept_content=["pii", "json"], pii_allow_plaintext=True)
        sent = self._legacy_publish(app)
        with _start(app):
            assert app.AsyncResult(sent.id).get(timeout=20)["card_number"] == CARD

    def test_legacy_json_results_read_in_rollout_mode(self, make_app):
        """A result stored as plain json before the switch still reads in rollout mode."""
        from uuid import uuid4

        from celery import Celery

        app = make_app(
            accept_content=["pii", "json"], result_accept_content=["pii", "json"], pii_allow_plaintext=True
        )
        legacy = Celery("legacy", backend=app.conf.result_backend, set_as_current=False)
        legacy.conf.update(result_serializer="json")
        task_id = str(uuid4())
        legacy.backend.store_result(task_id, {"total": 3}, "SUCCESS")
        assert app.AsyncResult(task_id).get(timeout=10) == {"total": 3}

    def test_rollout_mode_ends_with_the_app_in_it(self, key_store_url, queue_name, tmp_path):
        """The serializer is one per process: an app in rollout mode, once gone, left it reading plain json.

        A strict app made after it then read a result celery-pii never wrote.
        (In a process of its own: this one's earlier tests keep apps alive.)
        """
        import subprocess
        import textwrap

        from .conftest import APP_DIR, BACKEND_DB, REDIS_URL

        script = tmp_path / "rollout_ends.py"
        script.write_text(
            textwrap.dedent(
                f"""
                import gc
                from uuid import uuid4
                from celery import Celery
                from kombu.exceptions import DecodeError
                from pii_testapp import make_app

                backend = {f"{REDIS_URL}/{BACKEND_DB}"!r}
                def app(**conf):
                    return make_app(broker=backend, backend=backend, key_store={key_store_url!r},
                                    queue={queue_name!r}, **conf)

                rollout = app(accept_content=["pii", "json"], result_accept_content=["pii", "json"],
                              pii_allow_plaintext=True)
                legacy = Celery("legacy", backend=backend, set_as_current=False)
                legacy.conf.update(result_serializer="json")
                task_id = str(uuid4())
                legacy.backend.store_result(task_id, {{"total": 3}}, "SUCCESS")
                print("rollout reads", rollout.AsyncResult(task_id).get(timeout=10))
                del rollout
                strict = app()
                gc.collect()
                try:
                    print("strict reads", strict.AsyncResult(task_id).get(timeout=10))
                except DecodeError:
                    print("strict refuses")
                """
            )
        )
        env = {**os.environ, "PYTHONPATH": APP_DIR}
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines()[-2:] == ["rollout reads {'total': 3}", "strict refuses"]

    @pytest.mark.parametrize("name", ["t.charge", "t.renamed_since"], ids=["known", "unknown-task"])
    def test_legacy_json_is_parked_without_rollout(self, app, caplog, name):
        """Without rollout mode, a plaintext message is parked (not lost) and its body never logged.

        For a task the worker does not know too: Celery dropped it and logged its body.
        """
        sent = self._legacy_publish(app, name)
        with caplog.at_level(logging.DEBUG), _start(app):
            deadline = time.monotonic() + 10
            while not queued_messages(app.conf.pii_quarantine_queue) and time.monotonic() < deadline:
                time.sleep(0.1)
        (parked,) = queued_messages(app.conf.pii_quarantine_queue)
        assert parked["headers"]["id"] == sent.id
        assert parked["headers"][QUARANTINE_HEADER]["reason"] == "content type not accepted"
        assert_no_plaintext(caplog.text)


def test_redis_urls_are_the_test_ones():
    """The tests use their own Redis databases."""
    assert REDIS_URL.startswith("redis://")
