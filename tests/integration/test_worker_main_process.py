"""What a worker records after a task from outside its run: the values it opened stay hidden.

Celery handles some outcomes outside the task's run: the worker's main process
after a pool process was lost, a ``task_revoked`` receiver after a task was
terminated.  Neither runs inside the task's context, so neither is scrubbed:
what they are handed must hold no opened value.
"""

from __future__ import annotations

import json
import time

import pytest
from celery import chain

from .conftest import BACKEND_DB, EventCapture, redis_client
from .test_celery_roundtrip import CARD, EMAIL, assert_no_plaintext
from .test_retention import _wait

pytestmark = pytest.mark.integration


def test_a_success_read_back_after_the_pool_process_was_lost(app, start_worker_process):
    """A chain step declaring no PII, given a PII task's return value; its pool process dies after the store.

    The worker's main process reads the stored result back (opened: it holds
    the keys) and sends it in a ``task-succeeded`` event: the card and email
    were in it, whole.
    """
    env = {"PII_TESTAPP_LOSE_AFTER": "t.plain"}
    with EventCapture(app) as events:
        worker = start_worker_process(concurrency=1, env=env)
        result = chain(app.tasks["t.charge"].s(CARD, 77, {"email": EMAIL}), app.tasks["t.plain"].s()).delay()
        assert result.get(timeout=30)["card_number"] == CARD
        assert _wait(lambda: f"t.plain[{result.id}] succeeded before the worker was lost" in worker.log())
        assert _wait(
            lambda: any(e.get("uuid") == result.id and e["type"] == "task-succeeded" for e in events.events)
        )
    succeeded = [e for e in events.events if e.get("uuid") == result.id and e["type"] == "task-succeeded"]
    assert succeeded[0]["result"] == "'[pii:sealed]'"
    assert_no_plaintext(json.dumps(events.events, default=str))
    assert_no_plaintext(worker.log())
    assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}"))


@pytest.mark.parametrize("pool", ["eventlet", "prefork"])
def test_a_terminated_tasks_request_holds_markers(app, start_worker_process, pool):
    """``revoke(terminate=True)``: a ``task_revoked`` receiver logs the request's arguments.

    On eventlet the task ran in the worker's own process, in the very lists
    Celery hands the receiver: without ``result_extended`` they were left
    opened, and the email reached the worker's log.
    """
    env = {"PII_TESTAPP_LOG_REVOKED": "1", "PII_TESTAPP_CONF": json.dumps({"result_extended": False})}
    worker = start_worker_process(pool=pool, concurrency=1, env=env)
    running = app.tasks["t.slow"].apply_async((EMAIL, 20))
    assert _wait(lambda: f"t.slow[{running.id}] received" in worker.log())
    time.sleep(1)  # it runs
    app.control.revoke(running.id, terminate=True)
    assert _wait(lambda: f"revoked {running.id} terminated=True" in worker.log()), worker.log()[-2000:]
    worker.stop()
    assert "args=['[pii:sealed]', 20]" in worker.log()
    assert_no_plaintext(worker.log())


def test_a_late_task_postrun_receiver_on_the_threads_pool_sees_the_values(make_app):
    """Connected after the worker started, it runs after celery-pii's receiver: given the task's values.

    (Unscrubbed, as docs/security.md says.)  Putting the markers back in the
    request's arguments after every task handed it the markers instead.
    """
    from celery import signals
    from celery.contrib.testing.worker import start_worker

    app = make_app()  # without result_extended, nothing stores the arguments after the task
    seen = []

    def audit(sender=None, args=None, **_):
        if sender is not None and sender.name == "t.charge":
            seen.append(list(args))

    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=20):
        signals.task_postrun.connect(audit, weak=False)
        try:
            assert app.tasks["t.charge"].delay(CARD, 5).get(timeout=30)["card_number"] == CARD
        finally:
            signals.task_postrun.disconnect(audit)
    assert seen == [[CARD, 5]]
