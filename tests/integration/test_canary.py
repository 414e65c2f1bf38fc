"""The canary: known PII through every path, then a search of everything Celery wrote.

Real worker processes (prefork and solo), real Redis and RabbitMQ.  Every
byte the broker saw (Redis MONITOR / RabbitMQ's firehose tracer), every key
of the result backend, every event, every line the worker logged at DEBUG and
every inspect reply is searched for the known values, while the tasks must
have received them exactly.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from celery import chain, chord, group
from celery.exceptions import MaxRetriesExceededError

from .conftest import (
    BACKEND_DB,
    BROKER_DB,
    RABBITMQ_URL,
    REDIS_URL,
    EventCapture,
    RabbitFirehose,
    RedisMonitor,
    redis_client,
)
from .test_celery_roundtrip import CARD, CARD2, EMAIL, EMAIL2, SSN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERIAL = "SN-CANARY-0042-XYZ"
SECRETS = (CARD, CARD2, EMAIL, EMAIL2, SSN, SERIAL, "4111111111111111")


def _find(text, where):
    found = [secret for secret in SECRETS if secret in text]
    # The context helps find the leak; the values are fake test data.
    context = repr(text[max(0, text.find(found[0]) - 400) : text.find(found[0]) + 60]) if found else ""
    assert not found, f"plaintext PII found in {where}: {context}"


def backend_keys():
    """The keys the result backend holds now."""
    with redis_client(BACKEND_DB) as client:
        return set(client.scan_iter(count=1000))


def _backend_dump(before):
    """Every result-backend key written since ``before`` was taken.

    Keys that were there already belong to other runs sharing this Redis (they
    expire after a day), not to the test.
    """
    with redis_client(BACKEND_DB) as client:
        return "\n".join(
            repr(client.dump(key)) + repr(client.get(key) if client.type(key) == b"string" else b"")
            for key in client.scan_iter(count=1000)
            if key not in before
        )


def _exercise(app):
    """Publish known PII through every path; return what the tasks got back and inspect replies."""
    tasks = app.tasks
    results = {
        "positional": tasks["t.charge"].delay(
            CARD, 10.5, {"email": EMAIL, "tier": "gold"}, [{"serial": SERIAL}]
        ),
        "keyword": tasks["t.charge"].apply_async(kwargs={"card_number": CARD2, "amount": 1}),
        "chain": chain(tasks["t.charge"].s(CARD, 2), tasks["t.notify"].s(EMAIL2)).delay(),
        "chord": chord(group(tasks["t.echo"].s(SSN), tasks["t.echo"].s(EMAIL)))(tasks["t.collect"].s(EMAIL2)),
        "retry": tasks["t.retry_once"].delay(SSN),
    }
    failing = tasks["t.fail"].apply_async((CARD2,), link_error=tasks["t.on_error"].s(EMAIL))
    exhausted = tasks["t.always_retry"].delay(SSN)
    running = tasks["t.slow"].delay(EMAIL, 3.0)
    scheduled = tasks["t.slow"].apply_async((EMAIL,), countdown=120)
    time.sleep(1.5)
    inspect = app.control.inspect(timeout=3, limit=1)  # one worker: its reply ends the wait
    replies = [inspect.active(), inspect.reserved(), inspect.scheduled()]
    got = {name: result.get(timeout=60) for name, result in results.items()}
    with pytest.raises(ValueError, match=r"\[pii:redacted\]"):
        failing.get(timeout=60)
    with pytest.raises(MaxRetriesExceededError):
        exhausted.get(timeout=60)
    assert running.get(timeout=60) == EMAIL
    scheduled.revoke()
    return got, replies


def _check_plaintext_arrived(got):
    assert got["positional"] == {
        "card_number": CARD,
        "amount": 10.5,
        "customer": {"email": EMAIL, "tier": "gold"},
        "items": [{"serial": SERIAL}],
    }
    assert got["keyword"]["card_number"] == CARD2
    assert got["chain"] == {"previous": got["chain"]["previous"], "email": EMAIL2}
    assert got["chain"]["previous"]["card_number"] == CARD
    assert got["chord"]["email"] == EMAIL2
    assert sorted(r["value"] for r in got["chord"]["results"]) == sorted([SSN, EMAIL])
    assert got["retry"] == {"ssn": SSN, "retries": 1}


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_canary(broker, make_app, start_worker_process, caplog):
    """Known PII through every path appears nowhere Celery writes, and arrives exact."""
    broker_url = f"{REDIS_URL}/{BROKER_DB}" if broker == "redis" else RABBITMQ_URL
    app = make_app(broker=broker_url, result_extended=True, task_send_sent_event=True)
    before = backend_keys()
    capture = RedisMonitor() if broker == "redis" else RabbitFirehose(RABBITMQ_URL)
    with caplog.at_level(logging.DEBUG), capture, EventCapture(app) as events:
        worker = start_worker_process(broker=broker_url, pool="prefork", concurrency=2)
        got, replies = _exercise(app)
        time.sleep(1.0)
        worker.stop()
    _check_plaintext_arrived(got)
    _find(capture.captured(), "the broker traffic")
    _find(_backend_dump(before), "the result backend")
    assert {"task-sent", "task-received", "task-succeeded", "task-failed", "task-retried"} <= {
        event["type"] for event in events.events
    }
    _find(json.dumps(events.events, default=str), "events")
    log = worker.log()
    assert "succeeded" in log
    _find(log, "the worker log")
    _find(json.dumps(replies, default=str), "inspect replies")
    assert "[pii:sealed]" in json.dumps(replies, default=str)
    _find(caplog.text, "the publisher's log")


@pytest.mark.parametrize(
    ("broker", "pool"), [("redis", "solo"), ("redis", "prefork"), ("amqp", "solo"), ("amqp", "prefork")]
)
def test_brokers_and_pools(broker, pool, make_app, start_worker_process):
    """Round trips, canvas and failures work on both brokers with both pools."""
    broker_url = f"{REDIS_URL}/{BROKER_DB}" if broker == "redis" else RABBITMQ_URL
    app = make_app(broker=broker_url, result_extended=True)
    worker = start_worker_process(broker=broker_url, pool=pool, concurrency=2)
    tasks = app.tasks
    assert tasks["t.charge"].delay(CARD, 3, {"email": EMAIL}).get(timeout=60)["customer"]["email"] == EMAIL
    final = chain(tasks["t.charge"].s(CARD2, 1), tasks["t.notify"].s(EMAIL2)).delay().get(timeout=60)
    assert final["email"] == EMAIL2
    with pytest.raises(ValueError, match=r"\[pii:redacted\]"):
        tasks["t.fail"].delay(CARD).get(timeout=60)
    worker.stop()
    _find(worker.log(), "the worker log")
