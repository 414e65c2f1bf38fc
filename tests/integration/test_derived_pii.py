"""PII that reaches tasks declaring none: what they publish and store is sealed too.

A chord's body is published by whatever reads the header's results (the last
header task on Redis, ``celery.chord_unlock`` elsewhere), and a PII task may
hand its values to steps that declare no PII.  Either way the values are
derived from sealed data, so the messages and results that carry them are
sealed whole, and logs and events stay clean.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from celery import chord, group
from celery.contrib.testing.worker import start_worker
from celery.exceptions import ChordError

from celery_pii import get_pii
from celery_pii._sealer import EMBED_KEY
from celery_pii.exceptions import DecryptionFailed, KeyDestroyed

from .conftest import (
    BACKEND_DB,
    BROKER_DB,
    EventCapture,
    RedisMonitor,
    message_bytes,
    queued_messages,
    redis_client,
)
from .test_celery_roundtrip import CARD, EMAIL, EMAIL2, assert_no_plaintext

pytestmark = pytest.mark.integration


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, loglevel="DEBUG", **options)


def _assert_chord_leaves_nothing(app, caplog):
    """Header: a PII task returning CARD, then a task without PII (it ends last and reads the results).

    Body: a task declaring no PII.  It receives the card, and no byte sent to
    Redis, no event and no log line shows it.
    """
    header = group(app.tasks["t.echo"].s(CARD), app.tasks["t.plain"].s("no-pii-here"))
    with RedisMonitor() as monitor, EventCapture(app) as events, caplog.at_level(logging.DEBUG):
        result = chord(header)(app.tasks["t.gather"].s())
        with _start(app):
            final = result.get(timeout=60)
    assert [part["value"] if isinstance(part, dict) else part for part in final["results"]] == [
        CARD,
        "no-pii-here",
    ]
    assert_no_plaintext(monitor.captured())
    assert_no_plaintext(json.dumps(events.events, default=str))
    assert_no_plaintext(caplog.text)
    assert any(event["type"] == "task-succeeded" for event in events.events)


def test_chord_body_published_by_a_task_without_pii(app, caplog):
    """Redis' native join: the last header task (no PII) publishes the body with the opened results."""
    _assert_chord_leaves_nothing(app, caplog)


def test_chord_body_published_by_chord_unlock(make_app, key_store_url, caplog):
    """A database backend: celery.chord_unlock reads the results and publishes the body."""
    app = make_app(
        backend="db+" + key_store_url,
        result_extended=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
    )
    _assert_chord_leaves_nothing(app, caplog)


def test_steps_without_pii_published_by_a_pii_task_are_sealed(app, worker):
    """link, link_error and chain steps declaring no PII, given a PII task's value, are sealed too."""
    held = f"{app.conf.task_default_queue}.held"
    redis_client(BROKER_DB).delete(held)
    assert app.tasks["t.publish_steps"].delay(EMAIL, held).get(timeout=30) == "published"
    messages = queued_messages(held)
    assert len(messages) == 3
    for message in messages:
        assert_no_plaintext(message_bytes(message), secrets=(EMAIL,))
        assert json.loads(message_bytes(message).split(b"\n", 1)[1][2:])[2][EMBED_KEY]
    redis_client(BROKER_DB).delete(held)


def test_update_state_from_a_thread_the_task_started(app, worker):
    """A thread's update_state stores its meta sealed; the client reads it opened."""
    result = app.tasks["t.progress_from_thread"].delay(EMAIL)
    key = f"celery-task-meta-{result.id}"
    deadline = time.monotonic() + 20
    stored = None
    while time.monotonic() < deadline:
        stored = redis_client(BACKEND_DB).get(key)
        if stored is not None and b"PROGRESS" in stored:
            break
        time.sleep(0.05)
    assert stored is not None
    assert b"PROGRESS" in stored
    assert_no_plaintext(stored, secrets=(EMAIL,))
    assert result.info == {"email": EMAIL}
    assert result.get(timeout=20) == "done"


def test_update_state_from_a_thread_after_the_task_ended(app, worker):
    """A thread the task started stores progress after the task returned: sealed all the same.

    Stored in plaintext before (the task's context was gone), where erasing
    its subject could not reach it.
    """
    result = app.tasks["t.profile_reports_late"].delay("u-late-1", EMAIL)
    key = f"celery-task-meta-{result.id}"
    deadline = time.monotonic() + 20
    stored = None
    while time.monotonic() < deadline and (stored is None or b"PROGRESS" not in stored):
        stored = redis_client(BACKEND_DB).get(key)
        time.sleep(0.05)
    assert stored is not None and b"PROGRESS" in stored
    assert_no_plaintext(stored, secrets=(EMAIL,))
    assert app.AsyncResult(result.id).info == {"sent_to": EMAIL, "task_id": "not-this-task"}
    assert get_pii(app).forget_subject("u-late-1") >= 1
    erased = app.AsyncResult(result.id)
    assert erased.state == "FAILURE"
    assert isinstance(erased.info, KeyDestroyed)


@pytest.mark.parametrize(
    "task", ["t.progress_from_thread", "t.profile_reports_late"], ids=["running", "ended"]
)
def test_update_state_from_a_thread_on_the_database_backend(make_app, key_store_url, task):
    """Its column values name no task: the row they are stored in does (they were stored in plaintext)."""
    import sqlalchemy

    app = make_app(backend="db+" + key_store_url)
    args = ("u-late-db", EMAIL) if task == "t.profile_reports_late" else (EMAIL,)
    engine = sqlalchemy.create_engine(key_store_url)
    query = sqlalchemy.text("select status, result from celery_taskmeta where task_id = :id")
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        result = app.tasks[task].delay(*args)
        deadline, row = time.monotonic() + 20, None
        while time.monotonic() < deadline and (row is None or row[0] != "PROGRESS"):
            time.sleep(0.05)
            with engine.connect() as connection:
                row = connection.execute(query, {"id": result.id}).first()
        assert row is not None and row[0] == "PROGRESS"
        assert_no_plaintext(bytes(row[1]), secrets=(EMAIL,))
        assert EMAIL in json.dumps(app.AsyncResult(result.id).info)
    engine.dispose()


def test_a_result_read_after_the_task_ended_derives_nothing(app, worker):
    """A task_postrun handler connected after celery-pii's reads a sealed result: no context outlives the task.

    Before, the derived context stayed set in this thread, and later publishes
    of unrelated tasks were sealed whole under the result's key.
    """
    from celery.signals import task_postrun

    from celery_pii import _context

    sealed_id = app.tasks["t.echo"].delay(CARD).id
    assert app.AsyncResult(sealed_id).get(timeout=30)["value"] == CARD
    read = []

    def read_a_sealed_result(sender=None, **_):
        if sender is not None and sender.name == "t.plain":
            read.append(app.AsyncResult(sealed_id).result)

    task_postrun.connect(read_a_sealed_result, weak=False)
    try:
        assert app.tasks["t.plain"].apply(("eager",)).get() == "eager"
    finally:
        task_postrun.disconnect(read_a_sealed_result)
    assert read == [{"value": CARD, "type": "str", "label": "x"}]
    assert _context.running.get() is None
    assert not _context._with_values


def test_a_result_read_by_a_task_run_eagerly_is_held_by_the_outer_task(app, worker, caplog):
    """A task without PII runs another eagerly, which reads a sealed result: both store it sealed."""
    sealed_id = app.tasks["t.echo"].delay(CARD).id
    assert app.AsyncResult(sealed_id).get(timeout=30)["value"] == CARD
    with caplog.at_level(logging.INFO):
        direct = app.tasks["t.read_result"].delay(sealed_id)
        outer = app.tasks["t.read_result_eagerly"].delay(sealed_id)
        assert direct.get(timeout=30)["value"] == CARD
        assert outer.get(timeout=30)["read"]["value"] == CARD
    for result in (direct, outer):
        stored = redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}")
        assert stored is not None
        assert_no_plaintext(stored)
    assert_no_plaintext(caplog.text)


def test_a_pii_task_reading_another_subjects_result_holds_it(app, worker, caplog):
    """A PII task that reads a subject's sealed result hides it too, and its copy goes with the subject.

    It had its own context already, so the values it read were never added to
    it: what it raised naming them was logged, sent and stored in plaintext,
    and what it returned was sealed under its own key, readable after
    ``forget_subject``.
    """
    profile = app.tasks["t.profile"].delay("user-7", EMAIL2)
    assert profile.get(timeout=30)["email"] == EMAIL2
    reader = app.tasks["t.pii_read_result"]
    with caplog.at_level(logging.INFO):
        failed = reader.delay(EMAIL, profile.id, fail=True)
        with pytest.raises(ValueError, match="could not process") as raised:
            failed.get(timeout=30)
        copied = reader.delay(EMAIL, profile.id)
        assert copied.get(timeout=30)["read"]["email"] == EMAIL2
    assert_no_plaintext(str(raised.value), secrets=(EMAIL2,))
    assert_no_plaintext(caplog.text, secrets=(EMAIL, EMAIL2))
    for result in (failed, copied):
        assert_no_plaintext(redis_client(BACKEND_DB).get(f"celery-task-meta-{result.id}"), secrets=(EMAIL2,))
    get_pii(app).forget_subject("user-7")
    with pytest.raises(KeyDestroyed):
        app.AsyncResult(copied.id).get(timeout=10)


def _chord_missing_its_first_part(app, header):
    """A chord whose first header task never runs (its message is taken off the queue)."""
    result = chord(group(header))(app.tasks["t.gather"].s())
    redis_client(BROKER_DB).rpop(app.conf.task_default_queue)  # the oldest: the first header task's
    return result


def test_a_chord_part_copied_into_another_chord_does_not_open(app, caplog):
    """A join entry of one chord added to another's on the result backend: the body does not run.

    Copied from a chord of one subject into another's, it would run the body
    on the first subject's data and store what the body returns under the
    second's key, where forgetting the first subject does not reach it.  The
    chord's last part here declares no PII: the check is Celery's group, not
    celery-pii's context.
    """
    first = _chord_missing_its_first_part(app, [app.tasks["t.echo"].s(CARD), app.tasks["t.echo"].s(EMAIL2)])
    with _start(app):
        first.parent.results[1].get(timeout=30)
    join = app.backend.get_key_for_group(first.parent.id, ".j")
    (stolen,) = redis_client(BACKEND_DB).zrange(join, 0, -1)
    assert_no_plaintext(stolen, secrets=(EMAIL2,))
    second = _chord_missing_its_first_part(
        app, [app.tasks["t.echo"].s(CARD), app.tasks["t.plain"].s("no-pii-here")]
    )
    redis_client(BACKEND_DB).zadd(app.backend.get_key_for_group(second.parent.id, ".j"), {stolen: 0})
    with caplog.at_level(logging.ERROR), _start(app), pytest.raises(ChordError):
        second.get(timeout=30)
    assert "DecryptionFailed" in caplog.text
    assert_no_plaintext(caplog.text, secrets=(EMAIL2,))


def test_a_failed_chord_part_is_named_by_its_exception_class(app, caplog):
    """The last part reads the parts' stored outcomes: a failure's class and module are code, not values.

    They were learnt as values read: "ValueError" was hidden in that task's
    logs, as in ``Chord ... raised: ChordError("... raised [pii:redacted](...)")``.
    """
    result = chord(group([app.tasks["t.echo"].s(EMAIL2), app.tasks["t.fail"].s(CARD)]))(
        app.tasks["t.gather"].s()
    )
    with caplog.at_level(logging.ERROR), _start(app):
        result.get(timeout=30, propagate=False)
    assert isinstance(result.result, ChordError)
    chord_lines = [line for line in caplog.text.splitlines() if "ChordError" in line]
    assert chord_lines
    assert all("raised ValueError(" in line for line in chord_lines), chord_lines
    assert_no_plaintext(caplog.text, secrets=(EMAIL2,))


@pytest.mark.parametrize("backend", ["redis", "database"])
def test_a_task_reading_a_stored_failure_still_names_exception_classes(
    make_app, key_store_url, backend, caplog
):
    """The same for a failure a task reads (``AsyncResult(...).result``), on either kind of backend."""
    app = make_app(backend="db+" + key_store_url) if backend == "database" else make_app()

    @app.task(shared=False, name="t.raise_read")
    def raise_read(result_id):
        raise app.AsyncResult(result_id).result

    with caplog.at_level(logging.INFO), _start(app):
        failed = app.tasks["t.fail"].delay(CARD)
        failed.get(timeout=30, propagate=False)
        read = raise_read.delay(failed.id)
        read.get(timeout=30, propagate=False)
    (raised,) = [line for line in caplog.text.splitlines() if f"t.raise_read[{read.id}] raised" in line]
    assert "ValueError(" in raised
    assert_no_plaintext(caplog.text)


def test_a_chord_part_copied_on_the_database_backend_does_not_open(make_app, key_store_url, caplog):
    """The same copy on the database backend (celery.chord_unlock reads the header rows): refused.

    A row's columns are bound to the row's task id: one chord's header result
    written into another chord's header row does not open there.
    """
    from celery.backends.database.models import Task as TaskMeta

    app = make_app(backend="db+" + key_store_url)
    first = chord(group([app.tasks["t.echo"].s(EMAIL2)]))(app.tasks["t.gather"].s())
    with _start(app):
        assert first.get(timeout=30)["results"][0]["value"] == EMAIL2
    second = chord(group([app.tasks["t.echo"].s(CARD), app.tasks["t.plain"].s("no-pii-here")]))(
        app.tasks["t.gather"].s()
    )
    stolen_id, missing_id = first.parent.results[0].id, second.parent.results[0].id
    client, queue = redis_client(BROKER_DB), app.conf.task_default_queue
    kept = [raw for raw in client.lrange(queue, 0, -1) if missing_id.encode() not in raw]
    client.delete(queue)
    client.rpush(queue, *reversed(kept))  # as they were, less the first header task's message
    session = app.backend.ResultSession()
    try:
        stolen = session.query(TaskMeta).filter(TaskMeta.task_id == stolen_id).one()
        copy = TaskMeta(missing_id)
        copy.status, copy.result, copy.date_done = stolen.status, stolen.result, stolen.date_done
        session.add(copy)
        session.commit()
    finally:
        session.close()
    # The body fails (chord_unlock names the header result that does not open), never runs on it.
    with caplog.at_level(logging.ERROR), _start(app), pytest.raises((ChordError, DecryptionFailed)):
        second.get(timeout=30)
    assert_no_plaintext(caplog.text, secrets=(EMAIL2,))


def test_a_task_in_a_group_reads_another_tasks_result_on_the_database_backend(make_app, key_store_url):
    """Every database row is a whole value: bound to its row, not refused for the reader's group."""
    app = make_app(backend="db+" + key_store_url)
    with _start(app):
        profile = app.tasks["t.profile"].delay("user-g", EMAIL2)
        assert profile.get(timeout=30)["email"] == EMAIL2
        readers = group(app.tasks["t.read_result"].s(profile.id) for _ in range(2)).delay()
        assert [read["email"] for read in readers.get(timeout=30)] == [EMAIL2, EMAIL2]
