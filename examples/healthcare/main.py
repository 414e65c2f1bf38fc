"""HIPAA: a nested patient record sealed as one subtree, per-patient keys, six-year retention.

    python examples/healthcare/main.py

``pii_fields=["patient"]`` seals the whole patient record (a dict with nested
address and lists) as one value; the worker gets it back as the same dict.
``pii_subject="patient.mrn"`` seals each patient's messages under that
patient's own key, and the retention policy destroys those keys six years
after publishing (45 CFR 164.316 keeps records six years).  Forgetting one
patient makes their queued visits and stored results unreadable
(``KeyDestroyed``) while another patient's stay readable.

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.  Patients are
made up: example.com emails, SSNs in the never-issued 9xx area.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_pii import KeyDestroyed, RetentionPolicy, generate_master_key, get_pii, migrate, setup_pii

PATIENTS = {
    "A": {
        "mrn": "MRN-000101",
        "name": "Ann Example",
        "ssn": "900-12-3456",
        "email": "ann@example.com",
        "address": {"street": "1 Test Lane", "city": "Springfield"},
        "allergies": ["penicillin"],
    },
    "B": {
        "mrn": "MRN-000202",
        "name": "Bob Example",
        "ssn": "912-34-5678",
        "email": "bob@example.com",
        "address": {"street": "2 Test Lane", "city": "Springfield"},
        "allergies": [],
    },
}


def make_app(folder: Path) -> Celery:
    for part in ("broker", "results"):
        (folder / part).mkdir()
    key_store = f"sqlite:///{folder / 'keys.db'}"
    migrate(key_store)
    app = Celery(
        "clinic", broker="filesystem://", backend=f"file://{folder / 'results'}", set_as_current=False
    )
    app.conf.update(
        task_serializer="pii",
        result_serializer="pii",
        accept_content=["pii"],
        result_accept_content=["pii"],
        pii_master_key="env:CELERY_PII_MASTER_KEY",
        pii_key_store_url=key_store,
        task_default_queue=f"clinic-{os.getpid()}",
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
        name="clinic.record_visit",
        pii_fields=["patient"],
        pii_subject="patient.mrn",
        pii_retention=RetentionPolicy.delete_after(timedelta(days=6 * 365 + 2)),
    )
    def record_visit(patient: dict[str, object], visit: dict[str, str]) -> dict[str, object]:
        # The whole record arrives as the dict the caller passed, nested dict and list included.
        shape = {key: type(patient[key]).__name__ for key in ("address", "allergies")}
        return {"visit": visit["kind"], "fields": len(patient), **shape}

    return app


def run_worker(app: Celery) -> object:
    return start_worker(
        app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname="clinic@localhost"
    )


def broker_bytes(folder: Path) -> bytes:
    """Every queued message as stored, plus its base64-decoded body."""
    messages = [path.read_bytes() for path in (folder / "broker").glob("*.msg")]
    return b"".join(raw + base64.b64decode(json.loads(raw)["body"]) for raw in messages)


def outcome(app: Celery, task_id: str) -> str:
    """What reading a stored result gives now (a fresh AsyncResult: nothing cached)."""
    try:
        value = app.AsyncResult(task_id).get(timeout=30)
    except KeyDestroyed:
        return "KeyDestroyed"
    return f"ok {json.dumps(value)}"


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # filesystem:// has no host name
    with tempfile.TemporaryDirectory(prefix="celery-pii-clinic-") as tmp:
        folder = Path(tmp)
        app = make_app(folder)
        pii = get_pii(app)
        record_visit = app.tasks["clinic.record_visit"]

        checkups = {label: record_visit.delay(p, {"kind": "checkup"}) for label, p in PATIENTS.items()}
        raw = broker_bytes(folder)
        in_broker = [
            p[k] for p in PATIENTS.values() for k in ("mrn", "name", "ssn", "email") if p[k].encode() in raw
        ]
        keys = sorted({r.key_id for r in pii.keys.audit_trail() if r.key_id.startswith("subject.")})
        print("== published one checkup per patient")
        print(f"patient values found in the broker messages: {len(in_broker)}")
        print(f"per-patient keys (named by a keyed hash, not the MRN): {len(keys)}")
        for key_id in keys:
            print(f"  {key_id}")

        with run_worker(app):
            for label, result in checkups.items():
                print(f"patient {label} checkup: {json.dumps(result.get(timeout=30))}")

        followups = {label: record_visit.delay(p, {"kind": "follow-up"}) for label, p in PATIENTS.items()}
        destroyed = pii.forget_subject(PATIENTS["A"]["mrn"])
        print(f"\n== forget patient A while both follow-ups are queued: {destroyed} key version(s) destroyed")
        with run_worker(app):
            for label, result in followups.items():
                print(f"patient {label} queued follow-up: {outcome(app, result.id)}")
        for label, result in checkups.items():
            print(f"patient {label} checkup result, read again from the backend: {outcome(app, result.id)}")
        print("(a task whose key is destroyed fails with KeyDestroyed before its function runs)")
        pii.keys.flush_usage()


if __name__ == "__main__":
    main()
