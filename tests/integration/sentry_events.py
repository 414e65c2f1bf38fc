"""Sentry in a test worker, sending nowhere: each event it would send is appended to a file.

``pii_testapp`` calls :func:`start_sentry` when ``PII_TESTAPP_SENTRY_EVENTS``
names that file, before it makes its app (as a deployment's app module sets
Sentry up), with Sentry's Celery integration, local variables at Sentry's
default, and tracing on; or, with ``PII_TESTAPP_SENTRY_IN_CHILD``, in each
prefork child (``worker_process_init``), after Celery built the child's
tracers: Sentry then wraps none of them, and no run gets a scope of its own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import sentry_sdk
from celery import signals
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.transport import Transport


def start_sentry() -> None:
    path = os.environ["PII_TESTAPP_SENTRY_EVENTS"]

    class ToFile(Transport):
        def capture_envelope(self, envelope):
            with Path(path).open("a", encoding="utf-8") as written:
                written.writelines(item.get_bytes().decode() + "\n" for item in envelope.items)

        def flush(self, timeout, callback=None):
            return None

        def kill(self):
            return None

    def init(**_: Any) -> None:
        sentry_sdk.init(
            dsn="https://public@example.invalid/1",
            transport=ToFile,
            integrations=[CeleryIntegration(monitor_beat_tasks=False)],
            traces_sample_rate=1.0,
            send_default_pii=os.environ.get("PII_TESTAPP_SENTRY_DEFAULT_PII") == "1",
        )

    if os.environ.get("PII_TESTAPP_SENTRY_IN_CHILD"):
        signals.worker_process_init.connect(init, weak=False)
    else:
        init()


def define_sentry_tasks(app: Any) -> None:
    @app.task(shared=False, name="t.sentry_reports", pii_fields=["email"])
    def sentry_reports(email):
        # What a task sends Sentry itself: an error it logs, an exception it caught (its frame's
        # local variables hold the email).
        logging.getLogger("pii_testapp.sentry").error("mail server refused %s", email)
        try:
            _refuse(email)
        except ValueError as error:
            sentry_sdk.capture_exception(error)
        return "reported"

    @app.task(shared=False, name="t.sentry_processors")
    def sentry_processors():
        # How many event processors the scope a task run sees holds (they must not pile up);
        # and what Sentry holds is sent now (a prefork child ends without sending it).
        sentry_sdk.flush()
        return len(sentry_sdk.get_current_scope()._event_processors)


def _refuse(address: str) -> None:
    msg = f"refused {address}"
    raise ValueError(msg)
