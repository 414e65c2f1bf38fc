"""GDPR right to erasure: per-subject keys and ``pii.forget_subject``.

    python examples/gdpr_erasure/main.py

A task declared with ``pii_subject="user_id"`` seals each user's fields under
that user's own key.  The script queues a task for two users, erases the first
one with ``pii.forget_subject(user_id)`` (their key is destroyed), and only then
starts the worker: the erased user's queued task fails with ``KeyDestroyed``
without running, the other user's task runs.  A task published for the erased
user after the erasure gets a fresh key and runs normally.

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.  The users are
made up (example.com emails).
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

from celery_pii import KeyDestroyed, RetentionPolicy, generate_master_key, get_pii, migrate, setup_pii

USERS = {
    "user-1001": {"email": "ann@example.com", "address": {"street": "1 Test Lane", "city": "Springfield"}},
    "user-1002": {"email": "bob@example.com", "address": {"street": "2 Test Lane", "city": "Shelbyville"}},
}


def make_app(folder: Path) -> Celery:
    for part in ("broker", "results"):
        (folder / part).mkdir()
    key_store = f"sqlite:///{folder / 'keys.db'}"
    migrate(key_store)
    app = Celery(
        "accounts", broker="filesystem://", backend=f"file://{folder / 'results'}", set_as_current=False
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        task_default_queue=f"accounts-{os.getpid()}",
        broker_transport_options={
            "data_folder_in": str(folder / "broker"),
            "data_folder_out": str(folder / "broker"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control
            "polling_interval": 0.1,
        },
        worker_hijack_root_logger=False,
    )
    setup_pii(app)

    @app.task(
        name="accounts.send_order_update",
        pii_fields=["email", "address"],
        pii_subject="user_id",
        pii_retention=RetentionPolicy.delete_after(timedelta(days=30)),
    )
    def send_order_update(user_id: str, email: str, address: dict[str, str], order: str) -> str:  # noqa: ARG001
        # ... email `email` and print a label for `address` here ...
        return f"update for {order} sent to {user_id}"

    return app


def outcome(result: AsyncResult) -> str:
    try:
        return f"SUCCESS {result.get(timeout=30)!r}"
    except KeyDestroyed as error:
        return f"FAILURE KeyDestroyed ({error}); the task did not run"


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # filesystem:// has no host name
    with tempfile.TemporaryDirectory(prefix="celery-pii-gdpr-") as tmp:
        app = make_app(Path(tmp))
        pii = get_pii(app)
        task = app.tasks["accounts.send_order_update"]

        queued = [
            (user, task.delay(user, data["email"], data["address"], "order-1"))
            for user, data in USERS.items()
        ]
        print("queued: order-1 updates for user-1001 and user-1002 (worker not started yet)")
        destroyed = pii.forget_subject("user-1001")
        print(f"forget_subject('user-1001'): {destroyed} key version(s) destroyed")
        data = USERS["user-1001"]
        queued.append(("user-1001", task.delay("user-1001", data["email"], data["address"], "order-2")))
        print("queued after the erasure: order-2 update for user-1001 (sealed under a new key)")

        print("\n== worker started")
        with start_worker(
            app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="gdpr@localhost"
        ):
            for user, result in queued:
                print(f"{user} [{result.id[:8]}]: {outcome(result)}")

        print("\n== audit trail (key ids are keyed hashes: the user id is not in the key store)")
        for record in pii.keys.audit_trail():
            if record.operation == "destroy":
                print(f"destroy         {record.key_id} v{record.version} ({record.details.get('reason')})")
            elif record.operation == "decrypt_denied":
                print(f"decrypt_denied  {record.key_id} [{str(record.details.get('task_id'))[:8]}]")
        pii.keys.flush_usage()


if __name__ == "__main__":
    main()
