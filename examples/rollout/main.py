"""Turning encryption on in a live deployment, in three phases, without losing a message.

    python examples/rollout/main.py

Phase 1: workers get celery-pii in rollout mode (``pii_allow_plaintext=True``,
``accept_content=["pii", "json"]``) while old producers, without celery-pii,
still send plaintext ``json`` messages: the workers run both kinds.
Phase 2: producers get celery-pii: every new message is sealed.
Phase 3: rollout mode is switched off (``accept_content=["pii"]``): a plaintext
straggler from a producer that was missed is not run; it is parked in the
quarantine queue (``pii_quarantine_queue``) for someone to look at.

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.  The email is
made up.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import generate_master_key, migrate, setup_pii

EMAIL = "ann@example.com"
RAN: list[str] = []  # order ids the task function ran for


def broker_options(folder: Path) -> dict[str, object]:
    # control_folder: kombu's default is ./control
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.1,
    }


def old_producer(folder: Path, queue: str) -> Celery:
    """A producer that was not upgraded: plain json, no celery-pii."""
    app = Celery("orders", broker="filesystem://", set_as_current=False)
    app.conf.update(
        task_serializer="json", task_default_queue=queue, broker_transport_options=broker_options(folder)
    )
    return app


def pii_app(folder: Path, queue: str, *, rollout: bool) -> Celery:
    """The upgraded app (workers and producers); ``rollout`` admits legacy json messages."""
    app = Celery(
        "orders", broker="filesystem://", backend=f"file://{folder.parent / 'results'}", set_as_current=False
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii", "json"] if rollout else ["pii"],
        result_accept_content=["pii"],
        pii_allow_plaintext=rollout,
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=f"sqlite:///{folder.parent / 'keys.db'}",
        pii_quarantine_queue=f"{queue}.quarantine",
        task_default_queue=queue,
        broker_transport_options=broker_options(folder),
        worker_hijack_root_logger=False,
    )
    setup_pii(app)

    @app.task(shared=False, name="orders.send_receipt", pii_fields=["email"])
    def send_receipt(email: str, order_id: str) -> str:
        RAN.append(order_id)
        return f"receipt for {order_id} sent to an {email.partition('@')[2]} address"

    return app


def queued(folder: Path, queue: str) -> list[str]:
    """What each message in ``queue`` is, read from the broker's files."""
    kinds = []
    for path in sorted(folder.glob(f"*.{queue}.msg")):
        message = json.loads(path.read_bytes())
        body = base64.b64decode(message["body"])
        plaintext = EMAIL.encode() in body
        kinds.append(f"{message['content-type']} (email {'in plaintext' if plaintext else 'sealed'})")
    return kinds


def run(app: Celery, *results: object) -> None:
    with start_worker(
        app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="orders@localhost"
    ):
        for result in results:
            print(f"  worker: {app.AsyncResult(result.id).get(timeout=30)}")


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # filesystem:// has no host name
    with tempfile.TemporaryDirectory(prefix="celery-pii-rollout-") as tmp:
        folder, queue = Path(tmp, "broker"), f"orders-{os.getpid()}"
        folder.mkdir()
        Path(tmp, "results").mkdir()
        migrate(f"sqlite:///{Path(tmp, 'keys.db')}")
        legacy = old_producer(folder, queue)

        print("== phase 1: workers in rollout mode, an old producer still sends plaintext")
        rollout = pii_app(folder, queue, rollout=True)
        first = legacy.send_task("orders.send_receipt", args=(EMAIL, "order-1"))
        print(f"  queue holds: {queued(folder, queue)}")
        run(rollout, first)

        print("\n== phase 2: producers upgraded, every new message is sealed")
        second = rollout.tasks["orders.send_receipt"].delay(EMAIL, "order-2")
        print(f"  queue holds: {queued(folder, queue)}")
        run(rollout, second)

        print("\n== phase 3: plaintext off (accept_content=['pii']); a missed old producer sends one more")
        strict = pii_app(folder, queue, rollout=False)
        straggler = legacy.send_task("orders.send_receipt", args=(EMAIL, "order-3"))
        sealed = strict.tasks["orders.send_receipt"].delay(EMAIL, "order-4")
        print(f"  queue holds: {queued(folder, queue)}")
        quarantine = strict.conf.pii_quarantine_queue
        with start_worker(
            strict, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="orders@localhost"
        ):
            print(f"  worker: {sealed.get(timeout=30)}")
            deadline = time.monotonic() + 20
            while not list(folder.glob(f"*.{quarantine}.msg")) and time.monotonic() < deadline:
                time.sleep(0.1)
        print(f"  order-3 ran: {'order-3' in RAN}; its state: {strict.AsyncResult(straggler.id).state}")
        for path in folder.glob(f"*.{quarantine}.msg"):
            headers = json.loads(path.read_bytes())["headers"]
            reason = headers["x-celery-pii-quarantine"]["reason"]
            print(f"  parked in {quarantine}: task {headers['task']} [{headers['id'][:8]}], reason: {reason}")
        print(f"\norders the task function ran: {RAN}")


if __name__ == "__main__":
    main()
