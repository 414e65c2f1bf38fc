"""A Celery app with celery-pii's beat schedule: key rotation nightly, retention every 5 minutes.

Start it the usual way (two processes, or ``worker -B`` for one)::

    celery -A proj worker -l INFO
    celery -A proj beat -l INFO

``run.py`` beside this file starts both for a few seconds with a demo
schedule.  The module reads its locations from the environment so the runner
can point it at a temporary folder: ``PROJ_DATA_DIR`` (broker folder, results,
SQLite key store; default ``./proj-data``).  ``PROJ_DEMO_SECONDS`` turns on the
demo mode: both beat tasks every second, keys due for rotation after 2 seconds
and receipts kept 3 seconds instead of 30 days.  ``subscribe`` keeps its data
(no retention), so its key, ``default``, is one that ``rotate_keys`` rotates.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from celery import Celery
from celery.schedules import crontab

from celery_pii import RetentionPolicy, migrate, setup_pii

DATA = Path(os.environ.get("PROJ_DATA_DIR", "proj-data")).resolve()
DEMO = os.environ.get("PROJ_DEMO_SECONDS")  # e.g. "1": the runner's short schedule
KEY_STORE = f"sqlite:///{DATA / 'keys.db'}"
for folder in (DATA / "broker", DATA / "results"):
    folder.mkdir(parents=True, exist_ok=True)
migrate(KEY_STORE)  # idempotent; a real project runs it once per deploy

app = Celery("proj", broker="filesystem://", backend=f"file://{DATA / 'results'}")
app.conf.update(
    task_serializer="pii",
    result_serializer="pii",
    accept_content=["pii"],
    result_accept_content=["pii"],
    pii_master_key="env:CELERY_PII_MASTER_KEY",
    pii_key_store_url=KEY_STORE,
    task_default_queue="proj",
    broker_transport_options={
        "data_folder_in": str(DATA / "broker"),
        "data_folder_out": str(DATA / "broker"),
        "control_folder": str(DATA / "control"),  # kombu's default is ./control
        "polling_interval": 0.1,
    },
)

# The schedule of DESIGN §1: rotate due keys at 03:00, shred expired retention buckets every 5 minutes.
app.conf.beat_schedule = {
    "pii-rotate-keys": {"task": "celery_pii.rotate_keys", "schedule": crontab(hour=3, minute=0)},
    "pii-enforce-retention": {"task": "celery_pii.enforce_retention", "schedule": 300.0},
}
RECEIPT_RETENTION = timedelta(days=30)

if DEMO:
    every = float(DEMO)
    for entry in app.conf.beat_schedule.values():
        entry["schedule"] = every
    app.conf.pii_rotation_interval = timedelta(seconds=2 * every)
    RECEIPT_RETENTION = timedelta(seconds=3 * every)

setup_pii(app)


@app.task(
    name="proj.send_receipt",
    pii_fields=["email"],
    pii_retention=RetentionPolicy.delete_after(RECEIPT_RETENTION),
)
def send_receipt(email: str, order_id: str) -> str:
    # ... send the receipt here ...
    return f"receipt for {order_id} sent to an {email.partition('@')[2]} address"


@app.task(name="proj.subscribe", pii_fields=["email"])  # no retention: the "default" key, rotated
def subscribe(email: str, newsletter: str) -> str:
    return f"{email.partition('@')[2]} address subscribed to {newsletter}"
