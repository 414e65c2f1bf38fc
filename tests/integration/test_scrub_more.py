"""Outcomes Celery records after a task ended, values in every text form, and eager retries.

On the solo and threads pools Celery keeps, after the task, the very argument
list the values were opened into, and records some outcomes from there when
nothing runs any more (``Reject(requeue=False)`` with ``result_extended``).
Exceptions show values in forms other than the value itself: escaped by
``repr`` (``MaxRetriesExceededError``), as the text of a date, or as an
``OSError`` file name.  A retry of an eager call re-applies ``Retry.sig``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import time

import pytest
from celery import chain
from celery.contrib.testing.worker import start_worker
from celery.exceptions import MaxRetriesExceededError, Reject

from celery_pii._redact import REDACTED
from celery_pii._sealer import MARKER

from .conftest import BACKEND_DB, EventCapture, RedisMonitor, redis_client
from .test_celery_roundtrip import CARD, EMAIL, SECRETS, SSN, assert_no_plaintext

pytestmark = pytest.mark.integration

ADDRESS = "Ann Example\n1 Fake Street\nSpringfield"
DOB = dt.date(1980, 1, 2)


@contextlib.contextmanager
def _root_log():
    """What the root logger's handlers get meanwhile, as text (a handler of the host's, outside a worker)."""
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    logging.getLogger().addHandler(handler)
    try:
        yield written
    finally:
        logging.getLogger().removeHandler(handler)


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, **options)


def _stored(result):
    """The raw result-backend value of a task (bytes)."""
    raw = redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}")
    assert raw is not None
    return raw


def _define_rejecting_tasks(app):
    @app.task(shared=False, name="t.reject_plain")
    def reject_plain(previous):
        """A step without PII after a PII task: it is given that task's return value."""
        raise Reject("refused", requeue=False)

    @app.task(shared=False, name="t.reject_changed", pii_fields=["customer.email"])
    def reject_changed(customer):
        """Changes a declared field in place before rejecting."""
        customer["email"] = customer["email"].upper()
        raise Reject("refused", requeue=False)

    return reject_plain, reject_changed


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_a_rejected_task_leaves_no_opened_value_in_the_result_backend(app, pool):
    """Reject(requeue=False) is recorded after the task ended, with the arguments Celery kept: markers only."""
    reject_plain, reject_changed = _define_rejecting_tasks(app)
    charge, reject_if = app.tasks["t.charge"], app.tasks["t.reject_if"]
    with _start(app, pool=pool):
        results = [
            reject_if.delay(EMAIL),
            chain(charge.s(CARD, 1, {"email": EMAIL}), reject_plain.s()).delay(),
            reject_changed.delay({"email": EMAIL, "tier": "gold"}),
        ]
        for result in results:
            with pytest.raises(Reject):
                result.get(timeout=20)
    for result in results:
        raw = _stored(result)
        assert_no_plaintext(raw, (*SECRETS, EMAIL.upper()))
        assert MARKER.encode() in raw
    # Stored in the task's process after its end: sealed, as the task's own outcome is; read
    # back, the declared field is a marker and undeclared values are as given.
    assert app.AsyncResult(results[2].id).args == [{"email": MARKER, "tier": "gold"}]


def test_a_rejected_chord_part_leaves_its_join_entry_sealed(app):
    """Redis' native join entry ``[1, id, state, result]`` stored after the part's end: sealed, as while it runs.

    Celery records a rejected part's outcome after the task ended; its meta
    was sealed, its join entry stored as given (the Reject's text holds a
    form of the value the scrubber does not know).
    """
    from celery import chord

    @app.task(shared=False, name="t.reject_part", pii_fields=["email"])
    def reject_part(email):
        msg = f"no account for {email.title()}"
        raise Reject(msg, requeue=False)

    @app.task(shared=False, name="t.gather_plain")
    def gather_plain(results):
        return len(results)

    with _start(app):
        body = chord([reject_part.s(EMAIL)])(gather_plain.s())
        deadline = time.monotonic() + 20
        entries: list[bytes] = []
        while not entries and time.monotonic() < deadline:
            time.sleep(0.1)
            entries = redis_client(BACKEND_DB).zrange(f"celery-taskset-meta-{body.parent.id}.j", 0, -1)
    assert entries
    for entry in entries:
        assert_no_plaintext(entry, (EMAIL.title(),))


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_an_errback_reading_the_request_after_reject_gets_markers(make_app, pool, caplog):
    """Without result_extended too: Celery calls a request-style errback from the request it kept.

    On solo and threads that request held the opened values (the markers went
    back only when Celery would store the arguments), and what the errback
    raised, naming them, was logged in plaintext.
    """
    app = make_app()  # no result_extended
    errback = app.tasks["t.errback_reads_request"].s()
    with caplog.at_level(logging.ERROR), _start(app, pool=pool):
        result = app.tasks["t.reject_if"].apply_async((EMAIL,), link_error=errback)
        with pytest.raises(Reject):
            result.get(timeout=20)
        deadline = time.monotonic() + 10
        while "no order for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert f"no order for [{MARKER!r}]" in caplog.text
    assert_no_plaintext(caplog.text)


def test_own_logging_and_a_late_postrun_receiver_log_no_value(app, start_worker_process):
    """Logging set up by the user's setup_logging receiver, and a task_postrun receiver connected later.

    Celery sends no after_setup_logger then, so the user's handlers had no
    filter; and celery-pii's postrun receiver ended the task's context before
    the user's ran, so what it raised was logged with the values.
    """
    worker = start_worker_process(pool="prefork", concurrency=1, env={"PII_TESTAPP_OWN_LOGGING": "1"})
    assert app.tasks["t.log_request"].delay(EMAIL).get(timeout=30) == {"logged": EMAIL}
    deadline = time.monotonic() + 10
    while "audit could not store" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = worker.log()
    assert "WARNING pii_testapp.tasks request" in log  # the user's own format: their handler wrote it
    assert "audit could not store" in log
    assert_no_plaintext(log)


def test_a_rejected_task_on_prefork_still_stores_markers(app, start_worker_process):
    """The worker process never had the opened values: its record holds the message's markers."""
    start_worker_process(pool="prefork", concurrency=1)
    result = app.tasks["t.reject_if"].delay(EMAIL)
    with pytest.raises(Reject):
        result.get(timeout=30)
    raw = _stored(result)
    assert_no_plaintext(raw)
    assert MARKER.encode() in raw


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_threads_a_task_starts_log_no_value(app, start_worker_process, pool):
    """A thread does not inherit the task's context: its records are scrubbed of running tasks' values."""
    worker = start_worker_process(pool=pool, concurrency=2, loglevel="INFO")
    assert app.tasks["t.log_in_threads"].delay(EMAIL).get(timeout=30) == "sent"
    log = worker.log()
    assert f"helper thread sends to {REDACTED}" in log
    assert f"executor sends to {REDACTED}" in log
    assert_no_plaintext(log)


@pytest.mark.parametrize(
    ("task", "hook"),
    [
        *[("t.hooks", hook) for hook in ("before_start", "__call__", "on_failure", "on_retry")],
        # a static method, a class method, a callable object
        *[("t.odd_hooks", hook) for hook in ("before_start", "on_failure", "on_retry")],
    ],
)
def test_a_hook_of_the_task_class_that_raises_shows_no_value(app, start_worker_process, task, hook):
    """``before_start``, ``__call__``, ``on_failure`` and ``on_retry`` of a ``base=`` class run with the values open.

    What they raise is the task's failure: Celery logs it, sends it in the
    ``task-failed`` event and stores it (for ``on_failure`` and ``on_retry``,
    once more after the task ended, unsealed, as an error "outside body").
    Redis sees every write, the transient ones too.
    """
    worker = start_worker_process(pool="prefork", concurrency=1, loglevel="DEBUG")
    with RedisMonitor() as monitor, EventCapture(app) as events:
        result = app.tasks[task].delay(CARD, hook)
        # on_failure and on_retry: Celery handles the hook's error as one "outside body", last.
        last_words = "outside body" if hook in ("on_failure", "on_retry") else f"{hook} broke for"
        deadline = time.monotonic() + 30
        while not (result.ready() and last_words in worker.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # what is written after it
    assert f"{hook} broke for {REDACTED}" in worker.log()
    failures = [event["exception"] + event["traceback"] for event in events.of_type("task-failed")]
    assert any(f"broke for {REDACTED}" in failure for failure in failures), failures
    assert_no_plaintext(monitor.captured())
    assert_no_plaintext(json.dumps(events.events, default=str))
    assert_no_plaintext(worker.log())


def _define_failing_tasks(app):
    @app.task(shared=False, name="t.retry_forever", bind=True, max_retries=0, pii_fields=["address"])
    def retry_forever(self, address):
        raise self.retry(countdown=0.1)

    @app.task(shared=False, name="t.bad_dob", pii_fields=["dob"])
    def bad_dob(dob):
        msg = f"date of birth {dob} is in the future"
        raise ValueError(msg)

    @app.task(shared=False, name="t.open_record", pii_fields=["ssn"])
    def open_record(ssn):
        with open(f"/nonexistent/records/{ssn}.pdf") as record:  # noqa: PTH123 - the real C exception
            return record.read()

    return retry_forever, bad_dob, open_record


def test_values_in_escaped_date_and_file_name_forms_are_scrubbed(app, caplog):
    """repr-escaped text, a date's text and an OSError's file name: kept exceptions, no value anywhere."""
    retry_forever, bad_dob, open_record = _define_failing_tasks(app)
    shown = ("1 Fake Street", "1980-01-02", "1980, 1, 2", SSN)
    with caplog.at_level(logging.DEBUG), EventCapture(app) as events, _start(app, loglevel="DEBUG"):
        results = [retry_forever.delay(ADDRESS), bad_dob.delay(DOB), open_record.delay(SSN)]
        with pytest.raises(MaxRetriesExceededError, match=r"args:\('\[pii:redacted\]',\)"):
            results[0].get(timeout=20)
        with pytest.raises(ValueError, match=r"date of birth \[pii:redacted\] is in the future"):
            results[1].get(timeout=20)
        with pytest.raises(FileNotFoundError):  # kept: its file name was scrubbed, not the whole exception
            results[2].get(timeout=20)
    for result in results:
        assert_no_plaintext(_stored(result), shown)
        assert_no_plaintext(result.traceback or "", shown)
    assert f"/nonexistent/records/{REDACTED}.pdf" in results[2].traceback
    assert len(events.of_type("task-failed")) == 3
    assert_no_plaintext(json.dumps(events.events, default=str), shown)
    logged = caplog.text + "".join(str(getattr(r, "data", "")) for r in caplog.records)
    assert_no_plaintext(logged, shown)
    assert f"/nonexistent/records/{REDACTED}.pdf" in logged


def test_an_eager_pii_task_that_retries_succeeds_with_its_value(make_app):
    """task.apply() and task_always_eager re-apply Retry.sig: it stays a signature with the plaintext."""
    app = make_app()
    retry_once = app.tasks["t.retry_once"]
    assert retry_once.apply((SSN,)).get() == {"ssn": SSN, "retries": 1}
    app.conf.task_always_eager = True
    assert retry_once.delay(ssn=SSN).get() == {"ssn": SSN, "retries": 1}


@pytest.mark.parametrize("always_eager", [False, True], ids=["apply", "task_always_eager"])
def test_hooks_logging_arguments_outside_a_worker_are_scrubbed(app, always_eager, monkeypatch):
    """``task.apply()`` in a web process or a script, or any call in an eager app: hooks see the values.

    What they logged reached the host's handlers unfiltered (only Celery's
    loggers had the filter outside a worker).
    """
    from celery_pii import _logfilter

    monkeypatch.setattr(_logfilter, "_in_a_worker", False)  # this test process ran in-process workers

    audit = logging.getLogger("tests.hooks_audit")
    audit.setLevel(logging.INFO)

    class Audited(app.Task):
        def on_failure(self, exc, task_id, args, kwargs, einfo):
            audit.info("on_failure args=%r exc=%s", args, exc)

        def on_success(self, retval, task_id, args, kwargs):
            audit.info("on_success args=%r retval=%r", args, retval)

    @app.task(shared=False, name="t.audited_outside", base=Audited, pii_fields=["card_number"])
    def audited(card_number, fail=False):
        if fail:
            msg = f"card {card_number} declined"
            raise ValueError(msg)
        return {"card": card_number}

    app.conf.task_always_eager = always_eager
    with _root_log() as written:
        for fail in (False, True):
            if always_eager:
                audited.delay(CARD, fail=fail)
            else:
                audited.apply((CARD,), {"fail": fail})
    lines = written.getvalue()
    assert "on_success args=" in lines and "on_failure args=" in lines
    assert_no_plaintext(lines)


@pytest.mark.parametrize(
    "kind", ["chain", "chord", "group-then-task", "longer-chain", "chain-through-a-group"]
)
def test_a_step_run_eagerly_after_a_pii_task_keeps_its_output_sealed(app, kind, caplog):
    """``chain.apply()`` gives a PII task's return value to the next step outside the PII task's context.

    With ``task_store_eager_result`` that step's result (the card) was stored
    in plaintext, and Celery's success line logged it.
    """
    from celery import chord, group

    app.conf.task_always_eager = True
    app.conf.task_store_eager_result = True
    echo, gather = app.tasks["t.echo"], app.tasks["t.gather"]
    with caplog.at_level(logging.INFO):
        if kind == "chain":
            result = (echo.s(CARD) | app.tasks["t.plain"].s()).delay()
            assert result.get()["value"] == CARD
        elif kind == "chord":
            result = chord([echo.s(CARD), echo.s(EMAIL)], gather.s()).delay()
            assert [part["value"] for part in result.get()["results"]] == [CARD, EMAIL]
        elif kind == "group-then-task":
            result = (group(echo.s(CARD), echo.s(EMAIL)) | gather.s()).delay()
            assert [part["value"] for part in result.get()["results"]] == [CARD, EMAIL]
        elif kind == "longer-chain":  # each step wraps the one before's output in a new dict
            result = (echo.s(CARD) | gather.s() | gather.s() | gather.s()).delay()
            assert result.get()["results"]["results"]["results"]["value"] == CARD
        else:
            plain = app.tasks["t.plain"]
            result = (echo.s(CARD) | group(plain.s(), plain.s()) | gather.s()).delay()
            assert [part["value"] for part in result.get()["results"]] == [CARD, CARD]
    stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}")
    assert stored is not None
    assert_no_plaintext(stored)
    assert_no_plaintext(caplog.text)
    assert f"[{result.id}] succeeded" in caplog.text


def test_a_short_string_an_eager_pii_task_returned_does_not_mark_later_calls(app):
    """Identity finds a chain's next step; "done" is one shared object: any later call with it matched.

    An unrelated eager call given "done" ran as derived from the PII task:
    its result went under that task's key (unreadable once its subject is erased).
    """
    app.conf.task_always_eager = True
    app.conf.task_store_eager_result = True

    @app.task(shared=False, name="t.says_done", pii_fields=["email"])
    def says_done(email):
        return "done"

    assert says_done.apply((EMAIL,)).get() == "done"
    later = app.tasks["t.plain"].apply(("done",))
    stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{later.id}")
    assert b'"result":"done"' in stored.replace(b" ", b"")  # stored as it is: nothing of the PII task's


@pytest.mark.parametrize("parent", ["pii", "plain"])
def test_an_eager_errback_taking_the_request_has_its_own_fields_hidden(app, monkeypatch, parent):
    """Celery calls an errback taking the request in the failed task's context, on the errback's own fields.

    On a worker those fields came sealed with the message and were hidden; run
    eagerly they were never sealed, and what the errback logged or raised
    showed its own declared email (of a failed task with PII fields or without).
    """
    from celery_pii import _logfilter

    monkeypatch.setattr(_logfilter, "_in_a_worker", False)  # this test process ran in-process workers

    @app.task(shared=False, name="t.eager_boom", pii_fields=["card_number"] if parent == "pii" else [])
    def boom(card_number):
        raise ValueError("declined")

    errback_log = logging.getLogger("tests.errback")
    errback_log.setLevel(logging.INFO)  # an in-process worker of an earlier test set the root's level

    @app.task(shared=False, name="t.eager_notify", pii_fields=["email"])
    def notify(request, exc, traceback, email=None):
        errback_log.warning("will email %s about %s", email, request.args[0])
        msg = f"mail server refused {email}"
        raise RuntimeError(msg)

    app.conf.task_always_eager = True
    with _root_log() as written:
        boom.apply_async((CARD if parent == "pii" else "order-17",), link_error=notify.s(email=EMAIL))
    lines = written.getvalue()
    assert "will email" in lines and "mail server refused" in lines
    assert_no_plaintext(lines)


@pytest.mark.parametrize("kind", ["chain", "chord"])
def test_an_eager_canvas_step_hides_what_a_later_step_declares(app, monkeypatch, kind):
    """Celery applies an eager chain's or chord's steps one by one, each request carrying no canvas.

    On a worker a plain first step's message carries the later step sealed,
    so its logs and errors hide that step's declared email; run eagerly the
    step logged it and raised it in plaintext.
    """
    from celery import chord

    from celery_pii import _logfilter

    monkeypatch.setattr(_logfilter, "_in_a_worker", False)  # this test process ran in-process workers
    step_log = logging.getLogger("tests.eager_canvas")
    step_log.setLevel(logging.INFO)  # an in-process worker of an earlier test set the root's level

    @app.task(shared=False, name=f"t.eager_first_{kind}")
    def first(value):
        step_log.warning("first step got %s", value)
        return {"got": "ok"}

    @app.task(shared=False, name=f"t.eager_failing_{kind}")
    def failing(value):
        msg = f"no such order {value}"
        raise ValueError(msg)

    @app.task(shared=False, name=f"t.eager_later_{kind}", pii_fields=["email"])
    def later(previous, email):
        return {"email": email}

    app.conf.task_always_eager = True
    with _root_log() as written:
        if kind == "chain":
            (first.s(EMAIL) | later.s(email=EMAIL)).delay().get()
            with pytest.raises(ValueError, match="no such order") as raised:
                (failing.s(EMAIL) | later.s(email=EMAIL)).delay().get()
            assert EMAIL not in str(raised.value)
        else:
            chord([first.s(EMAIL), first.s("order-17")], later.s(email=EMAIL)).delay().get()
    lines = written.getvalue()
    assert "first step got" in lines
    assert_no_plaintext(lines)


def test_an_eager_chain_stores_sealed_what_a_plain_step_gets_from_a_step_holding_later_values(app):
    """A plain step after a plain first step that holds a later step's declared email (eager chain).

    On a worker the first step's message to the second is sealed whole (it
    carries the later step), so the second step's outcome is stored sealed;
    run eagerly, with ``task_store_eager_result``, it was stored in plaintext.
    """

    @app.task(shared=False, name="t.eager_hands_on")
    def hands_on(value):
        return {"got": value}

    @app.task(shared=False, name="t.eager_wraps")
    def wraps(previous):
        return {"again": previous}

    @app.task(shared=False, name="t.eager_declares_later", pii_fields=["email"])
    def declares(previous, email):
        return "sent"

    app.conf.task_always_eager = True
    app.conf.task_store_eager_result = True
    app.conf.result_extended = True
    result = (hands_on.s(EMAIL) | wraps.s() | declares.s(email=EMAIL)).delay()
    assert result.get() == "sent"
    second = result.parent
    assert second.get() == {"again": {"got": EMAIL}}  # opened when read back
    assert_no_plaintext(_stored(second))
    assert app.AsyncResult(second.id).args == [{"got": EMAIL}]  # result_extended: opened too
