"""A redelivered task that already succeeded: Celery sends its callbacks with the stored result.

With ``task_acks_late`` and ``worker_deduplicate_successful_tasks`` a worker
given a redelivered message whose task already succeeded does not run it
again: it reads the stored result and, when no child was recorded, publishes
the task's link callbacks and next chain step with it
(``celery.app.trace``'s ``_dispatch_callbacks_and_chain``), outside any task run.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from celery.contrib.testing.worker import start_worker
from celery.worker.state import successful_requests

from celery_pii import get_pii

from .conftest import BROKER_DB, RedisMonitor, message_bytes, queued_messages, redis_client
from .test_celery_roundtrip import CARD, EMAIL, assert_no_plaintext

pytestmark = pytest.mark.integration


def _dedup_app(make_app, **conf):
    return make_app(
        task_acks_late=True, worker_deduplicate_successful_tasks=True, result_extended=True, **conf
    )


def _redeliver(app, message):
    """Put a message back on the app's queue as Redis restores an unacknowledged one."""
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True
    redis_client(BROKER_DB).lpush(app.conf.task_default_queue, json.dumps(message))


def _wait_for(queue, count, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = queued_messages(queue)
        if len(messages) >= count:
            return messages
        time.sleep(0.05)
    return queued_messages(queue)


def _succeeded_then_redelivered(app, signature, held):
    """Run ``signature``'s task once without its steps, then redeliver its message that has them.

    As when the worker of the first delivery stored the result and was lost
    before it sent the steps (so no child is recorded) and acknowledged the
    message: the worker given it again sends the steps, with the stored result.
    Call with a worker running.
    """
    first = signature.apply_async(queue=held)
    (message,) = _wait_for(held, 1)
    redis_client(BROKER_DB).delete(held)
    stripped = signature.clone(task_id=first.id)
    stripped.options.pop("link", None)
    stripped.options.pop("chain", None)
    stripped.apply_async().get(timeout=30)
    successful_requests.clear()  # as on another worker, or this one restarted
    _redeliver(app, message)
    return first


@pytest.mark.parametrize("backend", ["redis", "database"])
def test_callbacks_sent_for_a_redelivered_task_are_sealed(make_app, key_store_url, backend):
    """The callback is given the stored result: it was published in plaintext (body and argsrepr).

    The database backend opens its columns apart from the meta that names the
    task (the row read does).
    """
    conf = {"backend": "db+" + key_store_url} if backend == "database" else {}
    app = _dedup_app(make_app, **conf)
    held, callbacks = f"{app.conf.task_default_queue}.held", f"{app.conf.task_default_queue}.callbacks"
    echo, plain = app.tasks["t.echo"], app.tasks["t.plain"]
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        _succeeded_then_redelivered(app, echo.s(CARD).set(link=plain.s().set(queue=callbacks)), held)
        sent = _wait_for(callbacks, 1)
    redis_client(BROKER_DB).delete(callbacks)
    assert len(sent) == 1
    assert_no_plaintext(message_bytes(sent[0]), secrets=(CARD,))


def test_steps_of_a_redelivered_task_run_with_their_values(make_app):
    """A callback with a sealed value of its own, and a chain step, run as they would have the first time.

    Nothing of them goes over the wire in plaintext.
    """
    app = _dedup_app(make_app)
    held = f"{app.conf.task_default_queue}.held"
    echo, notify, plain = app.tasks["t.echo"], app.tasks["t.notify"], app.tasks["t.plain"]
    linked = notify.s(EMAIL).set(task_id=f"notify-{time.monotonic_ns()}")
    following = plain.s().set(task_id=f"plain-{time.monotonic_ns()}")
    signature = echo.s(CARD).set(link=linked, chain=[following])
    with (
        RedisMonitor() as monitor,
        start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20),
    ):
        _succeeded_then_redelivered(app, signature, held)
        notified = app.AsyncResult(linked.id).get(timeout=30)
        chained = app.AsyncResult(following.id).get(timeout=30)
    stored = {"value": CARD, "type": "str", "label": "x"}
    assert notified == {"previous": stored, "email": EMAIL}
    assert chained == stored
    assert_no_plaintext(monitor.captured(), secrets=(CARD, EMAIL))


def test_steps_that_do_not_open_go_out_as_they_came(make_app, caplog):
    """A step whose subject was forgotten meanwhile: sent with its marker, and the message is not put back.

    Refused as markers without envelopes, the steps made Celery put the
    message back on the queue, to fail the same way forever.
    """
    app = _dedup_app(make_app)
    held, callbacks = f"{app.conf.task_default_queue}.held", f"{app.conf.task_default_queue}.callbacks"
    echo, plain, profile = app.tasks["t.echo"], app.tasks["t.plain"], app.tasks["t.profile"]
    subject = f"u-dedup-{time.monotonic_ns()}"
    steps = [plain.s().set(queue=callbacks), profile.si(subject, EMAIL).set(queue=callbacks)]
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        first = echo.apply_async((CARD,), queue=held, link=steps)
        (message,) = _wait_for(held, 1)
        redis_client(BROKER_DB).delete(held)
        echo.apply_async((CARD,), task_id=first.id).get(timeout=30)
        assert get_pii(app).forget_subject(subject) >= 1
        successful_requests.clear()
        with caplog.at_level(logging.WARNING, logger="celery_pii"):
            _redeliver(app, message)
            sent = _wait_for(callbacks, 2)
            time.sleep(1)  # time enough to be put back on the queue, were it
        assert queued_messages(app.conf.task_default_queue) == []
    redis_client(BROKER_DB).delete(callbacks)
    assert sorted(json.loads(message_bytes(m).split(b"\n", 1)[0])["headers"]["task"] for m in sent) == [
        "t.plain",
        "t.profile",
    ]
    for step in sent:
        assert_no_plaintext(message_bytes(step), secrets=(CARD, EMAIL))
    assert f"the steps of redelivered task t.echo[{first.id}] did not open (KeyDestroyed)" in caplog.text


def _stored_success(app):
    """The id of a ``t.echo`` run that succeeded, which this process has not seen succeed."""
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        task_id = app.tasks["t.echo"].delay(CARD).id
        app.AsyncResult(task_id).get(timeout=30)
    successful_requests.clear()
    return task_id


def _trace_redelivered(app, task_id, callbacks_queue):
    """Run Celery's tracer here, in this thread, on a redelivered ``t.echo`` message with a callback."""
    from celery.app.trace import trace_task

    echo = app.tasks["t.echo"]
    request = {
        "id": task_id,
        "task": echo.name,
        "delivery_info": {"redelivered": True, "priority": None},
        "callbacks": [dict(app.tasks["t.plain"].s().set(queue=callbacks_queue))],
    }
    previous, echo.__trace__ = echo.__trace__, None  # built again, as a worker does
    try:
        trace_task(echo, task_id, [], {}, request, app=app)
    finally:
        echo.__trace__ = previous


def test_no_context_outlives_the_trace(make_app):
    """Celery's tracer in this thread: the context derived from the result ends with it."""
    from celery_pii import _context

    app = _dedup_app(make_app)
    callbacks = f"{app.conf.task_default_queue}.callbacks"
    _trace_redelivered(app, _stored_success(app), callbacks)
    (sent,) = _wait_for(callbacks, 1)
    redis_client(BROKER_DB).delete(callbacks)
    assert_no_plaintext(message_bytes(sent), secrets=(CARD,))
    assert _context.running.get() is None
    assert not _context._with_values


def test_a_result_celery_read_from_its_cache(make_app):
    """``result_cache_max``: Celery's second attempt (its first send failed) reads the result from its cache.

    The result serializer never sees that read: the callback went out in plaintext.
    """
    from celery.exceptions import Reject

    app = _dedup_app(make_app, result_cache_max=100)
    callbacks = f"{app.conf.task_default_queue}.callbacks"
    task_id = _stored_success(app)
    app.backend._cache.clear()  # as in a worker that has read nothing yet
    publish, attempts = app.amqp._retry_publish, []

    def fails_first(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("the broker went away")
        return publish(*args, **kwargs)

    app.amqp._retry_publish = fails_first
    try:
        with pytest.raises(Reject):
            _trace_redelivered(app, task_id, callbacks)
        assert task_id in app.backend._cache
        _trace_redelivered(app, task_id, callbacks)
    finally:
        app.amqp._retry_publish = publish
    (sent,) = _wait_for(callbacks, 1)
    redis_client(BROKER_DB).delete(callbacks)
    assert_no_plaintext(message_bytes(sent), secrets=(CARD,))


def test_the_sealed_step_of_a_task_without_pii(make_app):
    """A task with no PII of its own (its result is stored unsealed) whose chain step has a sealed value.

    The step went out with its marker and was parked, never run.
    """
    app = _dedup_app(make_app)
    held = f"{app.conf.task_default_queue}.held"
    plain, notify = app.tasks["t.plain"], app.tasks["t.notify"]
    following = notify.s(EMAIL).set(task_id=f"notify-{time.monotonic_ns()}")
    with (
        RedisMonitor() as monitor,
        start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20),
    ):
        _succeeded_then_redelivered(app, plain.s(7).set(chain=[following]), held)
        assert app.AsyncResult(following.id).get(timeout=30) == {"previous": 7, "email": EMAIL}
    assert_no_plaintext(monitor.captured(), secrets=(EMAIL,))
