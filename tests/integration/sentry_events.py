"""Sentry in a test worker, sending nowhere: each event it would send is appended to a file.

``pii_testapp`` calls :func:`start_sentry` when ``PII_TESTAPP_SENTRY_EVENTS``
names that file, before it makes its app (as a deployment's app module
sets Sentry up), with Sentry's Celery integration, local variables at
Sentry's default, and tracing on.
"""

from __future__ import annotations

from pathlib import Path

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.transport import Transport


def start_sentry(path: str, *, send_default_pii: bool) -> None:
    class ToFile(Transport):
        def capture_envelope(self, envelope):
            with Path(path).open("a", encoding="utf-8") as written:
                written.writelines(item.get_bytes().decode() + "\n" for item in envelope.items)

        def flush(self, timeout, callback=None):
            return None

        def kill(self):
            return None

    sentry_sdk.init(
        dsn="https://public@example.invalid/1",
        transport=ToFile,
        integrations=[CeleryIntegration(monitor_beat_tasks=False)],
        traces_sample_rate=1.0,
        send_default_pii=send_default_pii,
    )
