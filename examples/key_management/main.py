"""Key management in Python through ``pii.keys``: generate, rotate, retire, destroy, stats, audit.

    python examples/key_management/main.py

Data keys live in the key store, wrapped under the master key.  This script
walks one key id through its life while messages sealed under each version are
still queued, then runs the worker to show that rotation and retirement never
break in-flight work (retired versions still decrypt).  It then simulates the
90-day automatic rotation, shows ``pii_max_key_versions`` trimming the oldest
version, destroys another key id, and prints the stats and the audit trail.
Only key ids, versions and operations are printed, never key material.

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import generate_master_key, get_pii, migrate, setup_pii


def make_app(folder: Path) -> Celery:
    for part in ("broker", "results"):
        (folder / part).mkdir()
    key_store = f"sqlite:///{folder / 'keys.db'}"
    migrate(key_store)
    app = Celery(
        "billing", broker="filesystem://", backend=f"file://{folder / 'results'}", set_as_current=False
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        pii_rotation_interval=timedelta(days=90),
        pii_max_key_versions=3,  # one active + two retired versions stay decryptable
        pii_actor="key-admin-example",  # who the audit records name
        task_default_queue=f"billing-{os.getpid()}",
        broker_transport_options={
            "data_folder_in": str(folder / "broker"),
            "data_folder_out": str(folder / "broker"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control
            "polling_interval": 0.1,
        },
        worker_hijack_root_logger=False,
    )
    setup_pii(app)

    @app.task(name="billing.send_invoice", pii_fields=["email"], pii_key="billing")
    def send_invoice(invoice: int, email: str) -> str:
        return f"invoice {invoice} sent to an {email.partition('@')[2]} address"

    return app


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # filesystem:// has no host name
    with tempfile.TemporaryDirectory(prefix="celery-pii-keys-") as tmp:
        app = make_app(Path(tmp))
        pii = get_pii(app)
        keys = pii.keys
        send_invoice = app.tasks["billing.send_invoice"]
        queued = []

        print("== key lifecycle (messages queued under each version)")
        print(f"generate_key('billing') -> version {keys.generate_key('billing')}")
        version = keys.generate_key("exports", "chacha20-poly1305")
        print(f"generate_key('exports', 'chacha20-poly1305') -> version {version}")
        queued.append(send_invoice.delay(1, "ann@example.com"))
        print("  invoice 1 queued, sealed under billing v1")
        print(f"rotate_key('billing') -> version {keys.rotate_key('billing')} (v1 retired: decrypt-only)")
        queued.append(send_invoice.delay(2, "bob@example.com"))
        print("  invoice 2 queued, sealed under billing v2")
        keys.retire_key("billing", 2)
        print("retire_key('billing', 2) -> v2 decrypt-only; the next message creates v3")
        queued.append(send_invoice.delay(3, "cy@example.com"))
        print("  invoice 3 queued, sealed under billing v3")

        with start_worker(
            app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="keys@localhost"
        ):
            for result in queued:
                print(f"worker: {result.get(timeout=30)}")

        print("\n== 91 days later: automatic rotation (what the celery_pii.rotate_keys beat task does)")
        later = datetime.now(timezone.utc) + timedelta(days=91)
        print(f"perform_automatic_rotation() -> {sorted(keys.perform_automatic_rotation(now=later))}")
        print(f"destroy_key('exports') -> {keys.destroy_key('exports')} version(s) destroyed")

        stats = keys.get_stats()
        print("\n== get_stats() (counts are key versions)")
        print(
            f"total={stats.total_keys} active={stats.active_keys} retired={stats.retired_keys} "
            f"destroyed={stats.destroyed_keys} rotations={stats.rotations_performed} "
            f"cache hits/misses={stats.cache_hits}/{stats.cache_misses}"
        )

        print("\n== audit_trail()")
        for record in keys.audit_trail():
            details = ", ".join(f"{k}={v}" for k, v in sorted(record.details.items()))
            when, key = f"{record.timestamp:%H:%M:%S}", f"{record.key_id} v{record.version}"
            print(f"{when} {key:<11} {record.operation:<8} {record.actor} {details}")
        keys.flush_usage()


if __name__ == "__main__":
    main()
