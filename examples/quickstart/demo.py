"""celery-pii in one minute: publish a PII task, look at what the broker stores, run it.

    python examples/quickstart/demo.py                       # no server needed
    python examples/quickstart/demo.py --broker redis://127.0.0.1:6379/0

Everything lives in a temporary folder: kombu's filesystem:// broker, a
file:// result backend and a SQLite key store.  The master key is generated
for this run.  The data is fake (a test card number, an example.com email).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import generate_master_key, get_pii, migrate, setup_pii

RECEIVED: dict[str, object] = {}


def make_app(folder: Path, broker: str | None) -> Celery:
    queue_dir = folder / "broker"
    queue_dir.mkdir()
    (folder / "results").mkdir()
    key_store = f"sqlite:///{folder / 'keys.db'}"
    migrate(key_store)
    app = Celery(
        "quickstart",
        broker=broker or "filesystem://",
        backend=broker or f"file://{folder / 'results'}",
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        result_extended=True,
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        task_default_queue=f"quickstart-{os.getpid()}",
        broker_transport_options={
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(folder / "control"),  # kombu's default is ./control
        },
        worker_hijack_root_logger=False,
    )
    setup_pii(app)

    @app.task(name="shop.charge", pii_fields=["card_number", "customer.email"])
    def charge(card_number: str, amount: float, customer: dict[str, str]) -> dict[str, object]:
        RECEIVED.update(card_number=card_number, amount=amount, customer=customer)
        return {"charged": amount, "card_last4": card_number[-4:], "receipt_to": customer["email"]}

    return app


def raw_message(app: Celery, folder: Path) -> dict[str, object]:
    """The message exactly as the broker stores it (before the worker takes it)."""
    if app.conf.broker_url.startswith("filesystem"):
        (path,) = (folder / "broker").glob("*.msg")
        return json.loads(path.read_text())
    import redis  # noqa: PLC0415 - only needed with --broker redis://

    client = redis.Redis.from_url(app.conf.broker_url)
    return json.loads(client.lindex(app.conf.task_default_queue, -1))


def show(title: str, value: object) -> None:
    print(f"\n== {title}")
    print(value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", help="broker URL (default: kombu's filesystem:// in a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    with tempfile.TemporaryDirectory(prefix="celery-pii-demo-") as tmp:
        folder = Path(tmp)
        app = make_app(folder, args.broker)
        customer = {"email": "ann@example.com", "tier": "gold"}
        result = app.tasks["shop.charge"].delay("4111 1111 1111 1111", 99.5, customer)

        message = raw_message(app, folder)
        body = base64.b64decode(message["body"])
        show(
            "what the broker stores: headers",
            {k: message["headers"][k] for k in ("task", "argsrepr", "kwargsrepr")},
        )
        show(
            f"what the broker stores: body (frame {body[:2]!r}, then JSON with the PII sealed)",
            body[2:].decode("utf-8", "replace"),
        )

        with start_worker(
            app, pool="solo", perform_ping_check=False, loglevel="WARNING", hostname="demo@localhost"
        ):
            outcome = result.get(timeout=30)
        show("what the task function received", RECEIVED)
        show("the result (AsyncResult.get() opens it)", outcome)
        stored = next((folder / "results").iterdir(), None)
        if stored is not None:
            show("the result as stored by the backend", stored.read_bytes()[2:].decode("utf-8", "replace"))
        get_pii(app).keys.flush_usage()  # usage counts go to the key store before the folder goes
        print(
            "\nThe card number and email appear only inside the task and in get(); "
            "the broker and the backend hold ciphertext."
        )


if __name__ == "__main__":
    main()
