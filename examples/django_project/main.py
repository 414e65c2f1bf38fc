"""celery-pii in a Django project: settings come from ``CELERY_*`` and ``CELERY_PII_*`` names.

    python examples/django_project/main.py

A Django project's ``proj/celery.py`` does
``app.config_from_object("django.conf:settings", namespace="CELERY")`` and
``setup_pii(app)``.  This example does the same with ``settings.py`` beside it
(a plain module, so Django need not be installed), runs one task on an
in-process worker, and prints which ``pii_*`` settings were read from which
``CELERY_PII_*`` names, and the audit record that proves they took effect (the
key id and the actor come from the settings).

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import generate_master_key, migrate, setup_pii


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # filesystem:// has no host name
    with tempfile.TemporaryDirectory(prefix="celery-pii-django-") as tmp:
        os.environ["EXAMPLE_DATA_DIR"] = tmp  # read by settings.py
        for part in ("broker", "results"):
            Path(tmp, part).mkdir()

        # proj/celery.py of a Django project, with "django.conf:settings" -> "settings":
        app = Celery("shop", set_as_current=False)
        app.config_from_object("settings", namespace="CELERY")
        migrate(app.conf.pii_key_store_url)  # in Django: `celery -A proj pii db upgrade`, a deploy step
        pii = setup_pii(app)

        @app.task(name="shop.send_receipt", pii_fields=["email"])
        def send_receipt(order_id: str, email: str) -> str:
            return f"receipt for {order_id} sent to an {email.partition('@')[2]} address"

        print("== read from settings.py with namespace='CELERY'")
        for name in ("task_serializer", "accept_content"):
            print(f"  CELERY_{name.upper():<27} -> {name} = {app.conf[name]!r}")
        for name in ("master_key", "key_store_url", "default_key", "default_retention", "actor"):
            value = repr(getattr(pii.settings, name)).replace(tmp, "<temp>")  # what celery-pii uses
            print(f"  CELERY_PII_{name.upper():<23} -> pii_{name} = {value}")

        with start_worker(
            app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="shop@localhost"
        ):
            print(f"\ntask: {send_receipt.delay('order-42', 'ann@example.com').get(timeout=30)}")
        (record,) = [r for r in pii.keys.audit_trail() if r.operation == "generate"]
        print(f"key created on first use: {record.key_id} (CELERY_PII_DEFAULT_KEY + 30-day retention bucket)")
        print(f"audit actor: {record.actor} (CELERY_PII_ACTOR)")
        pii.keys.flush_usage()


if __name__ == "__main__":
    main()
