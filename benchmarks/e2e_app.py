"""The app the end-to-end benchmark runs: one task, as json or as pii.

Each execution records, in one Redis round trip, the time of the first task,
a completion count and the time of the latest task, so the benchmark measures
the worker's throughput without the worker's start-up.  Worker processes
build it from BENCH_* environment variables; the publisher calls ``build``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

STATS_URL = "redis://127.0.0.1:6379/14"


def build(mode: str, *, queue: str, broker: str, key_store: str | None = None) -> Celery:
    """The benchmark app in ``mode`` ("json" or "pii") on its own queue."""
    app = Celery(f"bench_e2e_{mode}", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=16,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if mode == "pii":
        from celery_pii import setup_pii

        app.conf.update(task_serializer="pii", accept_content=["pii"], pii_key_store_url=key_store)
        setup_pii(app)
    stats = redis.Redis.from_url(STATS_URL)

    @app.task(name="bench.work", shared=False, pii_fields=["card_number", "customer.email"])
    def work(card_number: str, amount: float, customer: dict[str, str], items: object = ()) -> None:
        now = time.time()
        pipe = stats.pipeline(transaction=False)
        pipe.setnx(f"{queue}:first", now)
        pipe.incr(f"{queue}:count")
        pipe.set(f"{queue}:last", now)
        pipe.execute()

    return app


if os.environ.get("BENCH_MODE"):
    app = build(
        os.environ["BENCH_MODE"],
        queue=os.environ["BENCH_QUEUE"],
        broker=os.environ["BENCH_BROKER"],
        key_store=os.environ.get("BENCH_KEY_STORE"),
    )
