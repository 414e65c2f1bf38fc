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


def _frames(event):
    for exception in event.get("exception", {}).get("values", []):
        yield from (exception.get("stacktrace") or {}).get("frames", [])


@pytest.mark.parametrize("send_default_pii", [False, True], ids=["defaults", "send_default_pii"])
def test_sentry_events_of_pii_tasks_hide_their_values(app, start_worker_process, tmp_path, send_default_pii):
    """What Sentry sends of a failed and of a succeeding PII task.

    With Sentry's defaults every failure sent the card: the local variables
    of Celery's ``__protected_call__`` frame hold the opened arguments.  With
    ``send_default_pii`` its integration also copied them into every event
    and transaction (``extra["celery-job"]``).
    """
    sent = tmp_path / "sentry-events.jsonl"
    worker = start_worker_process(
        pool="solo",
        concurrency=1,
        loglevel="INFO",
        env={
            "PII_TESTAPP_SENTRY_EVENTS": str(sent),
            "PII_TESTAPP_SENTRY_DEFAULT_PII": "1" if send_default_pii else "0",
        },
    )
    failed = app.tasks["t.fail"].delay(CARD)
    assert isinstance(failed.get(timeout=30, propagate=False), ValueError)
    customer = {"email": EMAIL, "tier": "gold"}
    assert app.tasks["t.charge"].delay(CARD, 10.5, customer).get(timeout=30)["customer"] == customer
    worker.stop()  # Sentry sends what it holds as the worker exits
    deadline = time.monotonic() + 10
    while not sent.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    raw = sent.read_text()
    events = [json.loads(line) for line in raw.splitlines()]
    failures = [event for event in events if event.get("exception")]
    assert failures, raw[-2000:]
    # Sent with the failure: its frames' local variables (so the values were there to hide).
    assert any(frame.get("vars") for event in failures for frame in _frames(event))
    if send_default_pii:
        jobs = [event["extra"]["celery-job"] for event in events if "celery-job" in event.get("extra", {})]
        assert any(job.get("args") for job in jobs)
        assert any(event.get("type") == "transaction" for event in events)
    assert "[pii:redacted]" in raw
    assert_no_plaintext(raw)
    assert CARD.replace(" ", "") not in raw
