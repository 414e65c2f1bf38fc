"""Error trackers a deployment runs beside Celery: what they send of a PII task (Sentry).

Sentry patches Celery's tracer for the whole process, so the worker with
Sentry is a process of its own (``sentry_events.py``), whose events go to a file.
"""

from __future__ import annotations

import json
import time

import pytest

from .test_celery_roundtrip import CARD, EMAIL, assert_no_plaintext

pytest.importorskip("sentry_sdk")

pytestmark = pytest.mark.integration

#: An int card number four levels inside an argument (Luhn-valid test card).
DEEP_CARD = 4111111111111111


def _frames(event):
    for exception in event.get("exception", {}).get("values", []):
        yield from (exception.get("stacktrace") or {}).get("frames", [])


def _sentry_worker(start_worker_process, sent, *, send_default_pii, in_child=False):
    env = {
        "PII_TESTAPP_SENTRY_EVENTS": str(sent),
        "PII_TESTAPP_SENTRY_DEFAULT_PII": "1" if send_default_pii else "0",
    }
    if in_child:
        env["PII_TESTAPP_SENTRY_IN_CHILD"] = "1"
    pool = "prefork" if in_child else "solo"
    return start_worker_process(pool=pool, concurrency=1, loglevel="INFO", env=env)


def _sent_events(worker, sent):
    worker.stop()  # Sentry sends what it holds as the worker exits
    deadline = time.monotonic() + 10
    while not sent.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    raw = sent.read_text()
    return raw, [json.loads(line) for line in raw.splitlines()]


@pytest.mark.parametrize("send_default_pii", [False, True], ids=["defaults", "send_default_pii"])
def test_sentry_events_of_pii_tasks_hide_their_values(app, start_worker_process, tmp_path, send_default_pii):
    """What Sentry sends of failed and of succeeding PII tasks.

    With Sentry's defaults every failure sent the card: the local variables
    of Celery's ``__protected_call__`` frame hold the opened arguments.  With
    ``send_default_pii`` its integration also copied them into every event
    and transaction (``extra["celery-job"]``), an int deep inside an argument too.
    """
    sent = tmp_path / "sentry-events.jsonl"
    worker = _sentry_worker(start_worker_process, sent, send_default_pii=send_default_pii)
    failed = app.tasks["t.fail"].delay(CARD)
    assert isinstance(failed.get(timeout=30, propagate=False), ValueError)
    deep = {"customer": {"billing": {"card": {"number": DEEP_CARD, "brand": "visa"}}}}
    assert isinstance(app.tasks["t.fail_deep"].delay(deep).get(timeout=30, propagate=False), ValueError)
    customer = {"email": EMAIL, "tier": "gold"}
    assert app.tasks["t.charge"].delay(CARD, 10.5, customer).get(timeout=30)["customer"] == customer
    raw, events = _sent_events(worker, sent)
    failures = [event for event in events if event.get("exception")]
    assert len(failures) >= 2, raw[-2000:]
    # Sent with the failure: its frames' local variables (so the values were there to hide).
    assert any(frame.get("vars") for event in failures for frame in _frames(event))
    if send_default_pii:
        jobs = [event["extra"]["celery-job"] for event in events if "celery-job" in event.get("extra", {})]
        assert any(job.get("args") for job in jobs)
        assert "visa" in raw  # the deep argument was sent, its number hidden
        assert any(event.get("type") == "transaction" for event in events)
    assert "[pii:redacted]" in raw
    assert_no_plaintext(raw)
    assert CARD.replace(" ", "") not in raw


def test_sentry_set_up_in_each_prefork_child(app, start_worker_process, tmp_path):
    """``sentry_sdk.init`` in ``worker_process_init``: Sentry wraps no tracer, so no run has its own scope.

    A processor added per run to the process's scope piled up (and held each
    run's values); what the tasks send Sentry themselves must still hide them.
    """
    sent = tmp_path / "sentry-events.jsonl"
    worker = _sentry_worker(start_worker_process, sent, send_default_pii=True, in_child=True)
    processors = app.send_task("t.sentry_processors").get(timeout=30)
    for _ in range(5):
        assert app.send_task("t.sentry_reports", (EMAIL,)).get(timeout=30) == "reported"
        assert app.tasks["t.echo"].delay(EMAIL).get(timeout=30)["value"] == EMAIL
    assert app.send_task("t.sentry_processors").get(timeout=30) == processors
    raw, events = _sent_events(worker, sent)
    assert any(event.get("logentry") for event in events), raw[-2000:]  # the error it logged
    caught = [event for event in events if event.get("exception")]
    assert any(frame.get("vars") for event in caught for frame in _frames(event))
    assert "[pii:redacted]" in raw
    assert_no_plaintext(raw)
