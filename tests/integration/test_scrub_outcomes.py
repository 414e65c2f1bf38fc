"""Outcomes derived from PII: return values, exceptions and tracebacks of every task that saw opened values.

A task that declares no PII still runs inside a PII context when it is a chain
step or callback of a PII task (it receives that task's return value); a task
declared with ``autoretry_for`` before ``setup_pii`` runs the ``run`` Celery set
on its instance; some exceptions build their message from state scrubbing
cannot reach.  None of them may put a value in events, logs or the result
backend (a database backend's traceback column is outside any serializer).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
import traceback
from unittest import mock

import pytest
import sqlalchemy as sa
from celery import Celery, chain, signals
from celery.contrib.testing.worker import start_worker

from celery_pii import setup_pii
from celery_pii._redact import REDACTED, RedactedError

from .conftest import BACKEND_DB, BROKER_DB, REDIS_URL, EventCapture, redis_client
from .test_celery_roundtrip import CARD, EMAIL, assert_no_plaintext
from .test_retention import _wait

pytestmark = pytest.mark.integration

# autoretry options of the test tasks: one retry, right away.
RETRY_ONCE_AT_ONCE = {"max_retries": 1, "retry_kwargs": {"countdown": 0}}


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, **options)


class _Held:
    """An object whose text is a value: scrubbing does not reach into it."""

    def __init__(self, value):
        self._value = value

    def __str__(self):
        return str(self._value)

    def __repr__(self):
        return "<held>"


class BuildsItsMessage(Exception):
    """Builds its message in __str__ (as pydantic's ValidationError does)."""

    def __init__(self, value):
        super().__init__(_Held(value))

    def __str__(self):
        return f"invalid input {self.args[0]}"


def _assert_nothing_shown(events, result, caplog):
    """No value in the events, the result's traceback (if a result is given) or the log records."""
    assert_no_plaintext(json.dumps(events.events, default=str))
    if result is not None:
        assert_no_plaintext(result.traceback or "")
    assert_no_plaintext(caplog.text + "".join(str(getattr(r, "data", "")) for r in caplog.records))


def _define_failing_tasks(app):
    @app.task(shared=False, name="t.plain_fail")
    def plain_fail(previous):
        msg = f"could not handle {previous}"
        raise ValueError(msg)

    @app.task(shared=False, name="t.opaque_fail", pii_fields=["email"])
    def opaque_fail(email):
        raise BuildsItsMessage(email)

    return plain_fail, opaque_fail


def test_steps_without_pii_after_a_pii_task_show_no_value(app, caplog):
    """A chain step or callback of a PII task: its return value and exception stay out of events and logs."""
    plain_fail, _ = _define_failing_tasks(app)
    charge, plain = app.tasks["t.charge"], app.tasks["t.plain"]
    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app, loglevel="DEBUG"):
        ok = chain(charge.s(CARD, 1, {"email": EMAIL}), plain.s()).delay()
        assert ok.get(timeout=20)["card_number"] == CARD
        bad = chain(charge.s(CARD, 2, {"email": EMAIL}), plain_fail.s()).delay()
        with pytest.raises(ValueError, match=r"could not handle .*\[pii:redacted\]") as info:
            bad.get(timeout=20)
        linked = charge.apply_async((CARD, 3, {"email": EMAIL}), link=plain.s())
        linked.get(timeout=20)
        assert linked.children[0].get(timeout=20)["customer"]["email"] == EMAIL
    assert_no_plaintext(str(info.value))
    steps = {ok.id, linked.children[0].id}
    succeeded = [e for e in events.of_type("task-succeeded") if e["uuid"] in steps]
    assert len(succeeded) == 2
    assert [e["uuid"] for e in events.of_type("task-failed")] == [bad.id]
    _assert_nothing_shown(events, None, caplog)
    assert any(r.getMessage().startswith(f"Task t.plain[{ok.id}] succeeded") for r in caplog.records)


def test_a_traceback_logged_by_celery_inside_a_pii_task_is_scrubbed(app, caplog):
    """Celery logs a failing on_success handler with its traceback: the traceback's text is scrubbed."""

    def on_success(self, retval, task_id, args, kwargs):
        msg = f"could not notify {args[0]}"
        raise ValueError(msg)

    @app.task(shared=False, name="t.notify_fails", pii_fields=["card_number"], on_success=on_success)
    def notify_fails(card_number):
        return "charged"

    with caplog.at_level(logging.INFO), _start(app):
        assert notify_fails.delay(CARD).get(timeout=20) == "charged"
    logged = [r for r in caplog.records if "on_success handler raised" in r.getMessage()]
    assert len(logged) == 1
    assert f"ValueError: could not notify {REDACTED}" in logged[0].exc_text
    assert_no_plaintext(caplog.text)


def test_an_exception_scrubbing_cannot_clean_is_replaced(app, caplog):
    """The task fails with a RedactedError naming the original type; no value reaches events, logs or results."""
    _, opaque_fail = _define_failing_tasks(app)
    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app):
        result = opaque_fail.delay(EMAIL)
        with pytest.raises(RedactedError, match=r"BuildsItsMessage raised") as info:
            result.get(timeout=20)
    assert_no_plaintext(str(info.value))
    assert_no_plaintext(result.traceback or "")
    assert "BuildsItsMessage" in result.traceback
    assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}"))
    (failed,) = events.of_type("task-failed")
    assert "RedactedError" in failed["exception"]
    _assert_nothing_shown(events, None, caplog)


def test_autoretry_retries_an_exception_scrubbing_cannot_clean(app, caplog):
    """autoretry_for still matches the exception's own type; what leaves the task is its RedactedError."""

    @app.task(
        shared=False,
        name="t.opaque_auto",
        pii_fields=["email"],
        autoretry_for=(BuildsItsMessage,),
        **RETRY_ONCE_AT_ONCE,
    )
    def opaque_auto(email):
        raise BuildsItsMessage(email)

    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app):
        result = opaque_auto.delay(EMAIL)
        with pytest.raises(RedactedError, match=r"BuildsItsMessage raised"):
            result.get(timeout=30)
    (retried,) = events.of_type("task-retried")
    assert "RedactedError" in retried["exception"]
    assert [e["uuid"] for e in events.of_type("task-failed")] == [result.id]
    _assert_nothing_shown(events, result, caplog)


@pytest.mark.parametrize("when", ["before finalizing", "after finalizing", "never finalized"])
def test_autoretry_retries_when_called_eagerly(make_app, when):
    """Celery sets autoretry's run after registering the task, whenever that is: it is wrapped too."""
    app = make_app(task_always_eager=True)
    if when == "after finalizing":
        app.finalize()
    attempts = []

    @app.task(
        shared=False,
        name="t.opaque_eager",
        pii_fields=["email"],
        autoretry_for=(BuildsItsMessage,),
        max_retries=1,
    )
    def opaque_eager(email):
        attempts.append(email)
        raise BuildsItsMessage(email)

    if when == "before finalizing":
        app.finalize()
    with pytest.raises(RedactedError, match=r"BuildsItsMessage raised") as info:
        opaque_eager.delay(EMAIL).get()
    assert attempts == [EMAIL, EMAIL]
    assert_no_plaintext("".join(traceback.format_exception(info.value)))


def test_a_task_run_eagerly_inside_an_autoretry_task_scrubs_its_own_exception(make_app):
    """The autoretry task's outer layer covers its own run only: the inner task's values are the inner's."""
    app = make_app()

    @app.task(shared=False, name="t.declines", pii_fields=["card_number"])
    def declines(card_number):
        msg = f"card {card_number} declined"
        raise ValueError(msg)

    @app.task(shared=False, name="t.pays_for", pii_fields=["email"], autoretry_for=(KeyError,), max_retries=0)
    def pays_for(email):
        return declines.apply(args=(CARD,), throw=True).get()

    outcome = pays_for.apply(args=(EMAIL,))
    assert isinstance(outcome.result, ValueError)
    assert str(outcome.result) == f"card {REDACTED} declined"
    assert_no_plaintext(repr(outcome.result) + str(outcome.traceback))


def test_a_task_without_pii_run_eagerly_inside_an_autoretry_task_scrubs_its_exception(make_app):
    """It shares the autoretry task's context; its own failure (signal, result) shows no value either."""
    app = make_app()
    failures = []

    @app.task(shared=False, name="t.parses")
    def parses(value):
        msg = f"cannot parse {value}"
        raise ValueError(msg)

    @app.task(
        shared=False, name="t.parses_for", pii_fields=["email"], autoretry_for=(KeyError,), max_retries=0
    )
    def parses_for(email):
        return parses.apply(args=(email,)).state

    def failed(sender=None, exception=None, einfo=None, **_):
        failures.append((sender.name, str(exception), str(einfo.traceback)))

    signals.task_failure.connect(failed, weak=False)
    try:
        assert parses_for.apply(args=(EMAIL,)).result == "FAILURE"
    finally:
        signals.task_failure.disconnect(failed)
    assert [(name, text) for name, text, _ in failures] == [("t.parses", f"cannot parse {REDACTED}")]
    assert_no_plaintext(failures[0][2])


def test_a_mock_of_an_autoretry_tasks_run_stays_the_mock(make_app):
    """Only the run autoretry itself sets is wrapped; a test patching it afterwards gets its mock."""
    app = make_app()

    @app.task(shared=False, name="t.mocked", pii_fields=["email"], autoretry_for=(KeyError,))
    def mocked(email):
        return email

    with mock.patch.object(mocked, "run", return_value="patched") as patched:
        assert mocked.run is patched
        assert mocked.apply(args=(EMAIL,)).result == "patched"
    patched.assert_called_once_with(EMAIL)


def test_a_retry_of_an_exception_scrubbing_cannot_clean_shows_no_value(app, caplog):
    """``raise self.retry(exc=error)``: the retry's traceback prints the error it handled, replaced."""

    @app.task(shared=False, name="t.opaque_retry", bind=True, pii_fields=["email"], max_retries=1)
    def opaque_retry(self, email):
        try:
            raise BuildsItsMessage(email)  # noqa: TRY301 - the task's own failure
        except BuildsItsMessage as error:
            raise self.retry(exc=error, countdown=0)  # noqa: B904 - Celery's documented idiom

    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app):
        result = opaque_retry.delay(EMAIL)
        with pytest.raises(RedactedError, match=r"BuildsItsMessage raised"):
            result.get(timeout=30)
    (retried,) = events.of_type("task-retried")
    assert "BuildsItsMessage raised" in retried["traceback"]
    _assert_nothing_shown(events, result, caplog)


def test_database_backend_traceback_column_has_no_value(make_app, key_store_url):
    """The traceback column (written outside the serializer) of a chain step and of an unclean exception."""
    app = make_app(backend="db+" + key_store_url, result_extended=True)
    plain_fail, opaque_fail = _define_failing_tasks(app)
    with _start(app):
        step = chain(app.tasks["t.charge"].s(CARD, 1, {"email": EMAIL}), plain_fail.s()).delay()
        opaque = opaque_fail.delay(EMAIL)
        for result in (step, opaque):
            with pytest.raises(Exception):  # noqa: B017 - each fails its own way; no value may show
                result.get(timeout=20)
    engine = sa.create_engine(key_store_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT task_id, traceback FROM celery_taskmeta WHERE task_id IN (:a, :b)"),
                {"a": step.id, "b": opaque.id},
            ).all()
    finally:
        engine.dispose()
    assert {row.task_id for row in rows} == {step.id, opaque.id}
    for row in rows:
        assert row.traceback
        assert_no_plaintext(row.traceback)


def _app_declared_before_setup(key_store_url, queue):
    """A PII app whose tasks are declared (and the app finalized) before setup_pii is called."""
    app = Celery("pii_before_setup", broker=f"{REDIS_URL}/{BROKER_DB}", set_as_current=False)
    app.conf.update(
        result_backend=f"{REDIS_URL}/{BACKEND_DB}",
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_key_store_url=key_store_url,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        pii_quarantine_queue=f"{queue}.quarantine",
        control_exchange=f"{queue}.control",
        event_exchange=f"{queue}.events",
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(
        shared=False,
        name="t.pay_auto",
        pii_fields=["card_number"],
        autoretry_for=(ValueError,),
        **RETRY_ONCE_AT_ONCE,
    )
    def pay_auto(card_number):
        msg = f"card {card_number} declined"
        raise ValueError(msg)

    app.finalize()
    setup_pii(app)
    return app


def test_autoretry_task_declared_before_setup_is_scrubbed(key_store_url, queue_name, caplog):
    """Its retry and its final failure carry no value: the run autoretry set on the instance scrubs too."""
    app = _app_declared_before_setup(key_store_url, queue_name)
    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app):
        result = app.tasks["t.pay_auto"].delay(CARD)
        with pytest.raises(ValueError, match=r"card \[pii:redacted\] declined"):
            result.get(timeout=30)
    assert events.of_type("task-retried")
    assert events.of_type("task-failed")
    _assert_nothing_shown(events, result, caplog)


@pytest.mark.parametrize("bind", [False, True], ids=["plain", "bound"])
def test_autoretry_keeps_the_task_functions_signature(make_app, bind):
    """Autoretry's ``run`` (and celery-pii's own) pass every argument on: fields are bound by the function's names.

    Only a user's decorator is not looked through (its wrapper may change the
    call); these are, so a positional subject is found and only the declared
    field is sealed.
    """
    from celery_pii._sealer import MARKER
    from celery_pii._taskclass import call_target

    from .conftest import message_bytes, queued_messages

    app = make_app()

    def book(*args):
        card_number, user_id, nights = args[-3:]
        return {"card_number": card_number, "user_id": user_id, "nights": nights}

    def with_self(self, card_number, user_id, nights):
        return book(card_number, user_id, nights)

    def without_self(card_number, user_id, nights):
        return book(card_number, user_id, nights)

    task = app.task(
        shared=False,
        name="t.book",
        bind=bind,
        pii_fields=["card_number"],
        pii_subject="user_id",
        autoretry_for=(ConnectionError,),
        **RETRY_ONCE_AT_ONCE,
    )(with_self if bind else without_self)
    app.finalize()
    target = call_target(task.run)
    assert getattr(target, "__func__", target) is (with_self if bind else without_self)
    result = task.delay(CARD, "user-42", 3)
    (message,) = queued_messages(app.conf.task_default_queue)
    assert_no_plaintext(message_bytes(message))
    assert message["headers"]["argsrepr"] == f"('{MARKER}', '{MARKER}', 3)"
    with _start(app):
        assert result.get(timeout=20) == {"card_number": CARD, "user_id": "user-42", "nights": 3}


@pytest.mark.parametrize("how", ["sys.exit", "KeyboardInterrupt", "group"])
@pytest.mark.parametrize("pool", ["prefork", "eventlet"])
def test_a_task_exiting_with_a_value_in_its_message_shows_no_value(app, start_worker_process, pool, how):
    """``sys.exit(text)`` is no ``Exception``: it leaves Celery's trace, and the pool prints it.

    A ``BaseExceptionGroup`` goes to a prefork worker's main process pickled:
    one whose arguments scrubbing rewrote did not unpickle, and the worker stopped.
    """
    if pool == "eventlet" and importlib.util.find_spec(pool) is None:  # the worker's, not imported here
        pytest.skip(f"{pool} is not installed")
    if how == "group" and sys.version_info < (3, 11):
        pytest.skip("exception groups are new in Python 3.11")
    worker = start_worker_process(pool=pool, concurrency=1)
    result = app.tasks["t.exit_with"].delay(CARD, how)
    if pool == "eventlet":  # which never records such an ending (Celery's bug): wait until it is printed
        assert _wait(lambda: "Traceback" in worker.log(), timeout=10)
    else:
        with contextlib.suppress(Exception):  # whether, and how, the pool records it is Celery's
            result.get(timeout=10)
    # The exception has been printed, or the pool replaced the process, by now.
    if how == "group" and pool == "prefork":  # recorded as a failure, and the worker goes on
        assert result.state == "FAILURE"
        assert worker.process.poll() is None
    worker.stop()
    assert_no_plaintext(worker.log())
    assert_no_plaintext(worker.stderr)
    assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}") or b"")
