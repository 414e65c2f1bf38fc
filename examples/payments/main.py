"""PCI DSS: card data sealed end to end, kept one year, only the last four digits come back.

    python examples/payments/main.py

The card number, CVV, expiry and cardholder name of a payment task are sealed
before the message reaches the broker, under a retention-bucket key that is
destroyed 365 days after publishing (PCI DSS req. 3: keep cardholder data no
longer than needed).  The task returns only the last four digits.  The script
reads the raw message off the broker and checks that the card number, in any
form, is not in it, then runs the task on an in-process worker.

Everything lives in a temporary folder: kombu's filesystem:// broker, a file://
result backend and a SQLite key store; the master key is generated for this
run.  The card is a test number and the name is made up.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import RetentionPolicy, generate_master_key, get_pii, migrate, setup_pii

CARD = {"number": "4111 1111 1111 1111", "cvv": "737", "expiry": "12/30", "holder": "Ann Example"}


def make_app(folder: Path) -> Celery:
    (folder / "broker").mkdir()
    (folder / "results").mkdir()
    key_store = f"sqlite:///{folder / 'keys.db'}"
    migrate(key_store)  # creates the key-store tables
    app = Celery(
        "payments", broker="filesystem://", backend=f"file://{folder / 'results'}", set_as_current=False
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        task_default_queue=f"payments-{os.getpid()}",
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
        name="payments.authorize",
        pii_fields=["card.number", "card.cvv", "card.expiry", "card.holder"],
        pii_key="payments",
        pii_retention=RetentionPolicy.delete_after(timedelta(days=365)),
    )
    def authorize(order_id: str, amount: float, card: dict[str, str]) -> dict[str, object]:
        digits = card["number"].replace(" ", "")
        # ... call the payment gateway here with the full card data ...
        return {"order_id": order_id, "amount": amount, "approved": True, "card_last4": digits[-4:]}

    return app


def card_forms() -> list[str]:
    """The card number as it could appear: spaced, bare, and base64 of either."""
    bare = CARD["number"].replace(" ", "")
    forms = [CARD["number"], bare]
    return forms + [base64.b64encode(f.encode()).decode() for f in forms]


def leaks(data: bytes) -> list[str]:
    return [form for form in [*card_forms(), CARD["holder"]] if form.encode() in data]


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    with tempfile.TemporaryDirectory(prefix="celery-pii-payments-") as tmp:
        folder = Path(tmp)
        app = make_app(folder)
        pii = get_pii(app)
        result = app.tasks["payments.authorize"].delay("order-1001", 42.0, CARD)

        (path,) = (folder / "broker").glob("*.msg")
        raw = path.read_bytes()  # the message exactly as the broker stores it
        message = json.loads(raw)
        body = base64.b64decode(message["body"])
        sealed_card = json.loads(body[2:])[0][2]
        print("== the broker message")
        print(f"headers argsrepr: {message['headers']['argsrepr']}")
        print(f"body card fields: {json.dumps(sealed_card)}")
        found = leaks(raw) + leaks(body)
        print(f"card number or name in the raw message or its decoded body: {'FOUND' if found else 'none'}")

        bucket = next(r.key_id for r in pii.keys.audit_trail() if r.key_id.startswith("payments@"))
        print(f"sealed under retention-bucket key {bucket} (destroyed 365 days after publishing)")

        with start_worker(
            app, pool="solo", perform_ping_check=False, loglevel="WARNING", hostname="payments@localhost"
        ):
            outcome = result.get(timeout=30)
        print("\n== the result (get() opens it)")
        print(json.dumps(outcome))
        stored = next((folder / "results").iterdir()).read_bytes()
        print(f"card number or name in the stored result: {'FOUND' if leaks(stored) else 'none'}")
        pii.keys.flush_usage()  # usage counts reach the key store before the folder goes
        print(
            "\nOK: the card data exists in plaintext only inside the task function."
            if not found
            else "\nLEAK"
        )


if __name__ == "__main__":
    main()
