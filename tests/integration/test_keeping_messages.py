"""Invariant 4 when things go wrong around a message: it is kept, never dropped.

A key-store error that is not an outage retries the task as an outage does
(an operator must act; the message may be sound), with the same backoff, and
a message the quarantine cannot take is kept until it can.  (An outage's
retries not spending the task's own: test_celery_consume.py.)
"""

from __future__ import annotations

import logging
import time

import pytest
import sqlalchemy as sa
from amqp.exceptions import NotFound
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Queue

from celery_pii import get_pii, migrate
from celery_pii._sealer import MARKER

from .conftest import RABBITMQ_URL, _fresh_postgres, publish_raw
from .test_celery_roundtrip import CARD

pytestmark = pytest.mark.integration


def _start(app, **options):
    options.setdefault("pool", "solo")
    return start_worker(app, perform_ping_check=False, shutdown_timeout=20, **options)


def test_attempts_put_off_back_off(app):
    """Each task id's attempts put off by this process wait twice as long, up to ten times the setting."""
    pii = get_pii(app)
    delay = pii.settings.key_unavailable_retry_delay
    waits = [pii._retry_countdown("put-off-1") for _ in range(6)]
    assert waits == [delay, 2 * delay, 4 * delay, 8 * delay, 10 * delay, 10 * delay]
    assert pii._retry_countdown("put-off-2") == delay


def test_key_store_error_that_is_not_an_outage_keeps_the_message(make_app, caplog):
    """The key table is gone for a moment (ProgrammingError, not an outage): retried, then it runs."""
    url, drop = _fresh_postgres()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        migrate(url)
        publisher = make_app(key_store=url)
        worker_app = make_app(key_store=url, pii_key_unavailable_retry_delay=0.3)
        result = publisher.tasks["t.charge"].delay(CARD, 8)
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE celery_pii_keys RENAME TO celery_pii_keys_away")
        with caplog.at_level(logging.WARNING), _start(worker_app):
            time.sleep(1.5)
            assert result.state in ("PENDING", "RETRY")
            with engine.begin() as connection:
                connection.exec_driver_sql("ALTER TABLE celery_pii_keys_away RENAME TO celery_pii_keys")
            assert result.get(timeout=30)["card_number"] == CARD
        assert "key store error (ProgrammingError) while opening task t.charge" in caplog.text
        get_pii(publisher).keys.store.dispose()
        get_pii(worker_app).keys.store.dispose()
    finally:
        engine.dispose()
        drop()


def _message_count(connection, name):
    """Messages ready in a RabbitMQ queue (0 if it does not exist yet)."""
    with connection.channel() as channel:  # a failed passive declare closes its channel
        try:
            return Queue(name).bind(channel).queue_declare(passive=True).message_count
        except NotFound:
            return 0


def test_message_the_quarantine_cannot_take_is_kept(make_app, queue_name, caplog):
    """RabbitMQ refuses the quarantine queue's declaration (it exists with other arguments).

    The sealed message that cannot be opened is neither run nor dropped, and
    no log line claims it was parked; once the quarantine can take it, it is parked.
    """
    app = make_app(broker=RABBITMQ_URL, pii_key_unavailable_retry_delay=0.2)
    quarantine = app.conf.pii_quarantine_queue
    with Connection(RABBITMQ_URL) as connection:
        conflicting = Queue(quarantine, queue_arguments={"x-max-length": 5}, durable=True)
        conflicting.bind(connection.default_channel).declare()
        try:
            embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
            body = get_pii(app)._encode_trusted(([MARKER], {}, embed), "t.echo")  # markers, envelope gone
            publish_raw(app, body, {"task": "t.echo", "id": "kept-1", "lang": "py", "retries": 0})
            with caplog.at_level(logging.INFO), _start(app):
                deadline = time.monotonic() + 10
                while "could not park task t.echo[kept-1]" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
            assert "could not park task t.echo[kept-1]" in caplog.text
            assert "parked in" not in caplog.text
            assert _message_count(connection, app.conf.task_default_queue) == 1  # back, unacked, on stop
            conflicting.bind(connection.default_channel).delete()
            with caplog.at_level(logging.INFO), _start(app):  # at_level: the worker's logging setup is undone
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if _message_count(connection, quarantine) == 1:
                        break
                    time.sleep(0.2)
            assert _message_count(connection, quarantine) == 1
            assert _message_count(connection, app.conf.task_default_queue) == 0
        finally:
            channel = connection.default_channel
            for name in (quarantine, app.conf.task_default_queue):
                Queue(name).bind(channel).delete()


def test_undecodable_message_the_quarantine_cannot_take_is_requeued_without_spinning(make_app, caplog):
    """The consumer keeps an undecodable message it cannot park, trying about once a second."""
    app = make_app(broker=RABBITMQ_URL)
    quarantine = app.conf.pii_quarantine_queue
    with Connection(RABBITMQ_URL) as connection:
        Queue(quarantine, queue_arguments={"x-max-length": 5}, durable=True).bind(
            connection.default_channel
        ).declare()
        try:
            publish_raw(
                app, b"\x09 not a frame", {"task": "t.echo", "id": "spin-1", "lang": "py", "retries": 0}
            )
            with caplog.at_level(logging.INFO), _start(app):
                time.sleep(3.0)
            attempts = caplog.text.count("could not park message 't.echo'['spin-1']")
            assert 1 <= attempts <= 10  # without the pause: hundreds
            assert _message_count(connection, app.conf.task_default_queue) == 1
        finally:
            with connection.channel() as channel:
                for name in (quarantine, app.conf.task_default_queue):
                    Queue(name).bind(channel).delete()
