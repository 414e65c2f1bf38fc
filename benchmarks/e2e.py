"""End to end: a real worker on a real broker, pii against json, interleaved runs.

    python -m benchmarks.e2e [--tasks 5000] [--pairs 3] [--brokers redis,amqp] [--pools solo,prefork]

For each broker and pool, runs alternate json, pii, json, pii...: publish N
tasks (1 KB, 2 PII fields) into an idle queue (the publish rate), then start
a `celery worker` and time the first to the last task (the worker's
throughput, start-up excluded).  Reports medians and paired pii/json ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks import _harness
from benchmarks.codec import body_of_size
from benchmarks.e2e_app import STATS_URL, build

BROKERS = {"redis": "redis://127.0.0.1:6379/13", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
ROOT = Path(__file__).resolve().parents[1]


def run_once(mode: str, broker: str, pool: str, tasks: int, key_store: str) -> dict[str, float]:
    queue = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
    app = build(mode, queue=queue, broker=broker, key_store=key_store)
    args, kwargs = body_of_size(1024)
    work = app.tasks["bench.work"]
    work.delay(*args, **kwargs)  # declares the queue, warms keys
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(tasks - 1):
            work.apply_async(args, kwargs, producer=producer)
    publish_seconds = time.perf_counter() - started
    env = dict(os.environ, BENCH_MODE=mode, BENCH_QUEUE=queue, BENCH_BROKER=broker, BENCH_KEY_STORE=key_store)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "celery", "-A", "benchmarks.e2e_app", "worker", "-P", pool,
               "-c", "2", "-Q", queue, "-l", "WARNING", "--without-mingle", "--without-gossip",
               "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
    stats = redis.Redis.from_url(STATS_URL)
    worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while int(stats.get(f"{queue}:count") or 0) < tasks:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    worker.stderr.read().decode()[-2000:] if worker.stderr else "worker failed"
                )
            time.sleep(0.05)
        first, last = float(stats.get(f"{queue}:first")), float(stats.get(f"{queue}:last"))
    finally:
        worker.terminate()
        worker.wait(60)
        if worker.stderr:
            worker.stderr.close()
        stats.delete(f"{queue}:first", f"{queue}:count", f"{queue}:last")
        stats.close()
    return {
        "publish_per_second": tasks / publish_seconds,
        "worker_per_second": (tasks - 1) / max(last - first, 1e-9),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--pools", default="solo,prefork")
    parser.add_argument("--json", help="output file (default benchmarks/results/e2e.json)")
    options = parser.parse_args(argv)
    from celery_pii import migrate

    os.environ.setdefault("CELERY_PII_MASTER_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        key_store = f"sqlite:///{tmp}/keys.db"
        migrate(key_store)
        for broker in options.brokers.split(","):
            for pool in options.pools.split(","):
                runs: dict[str, list[dict[str, float]]] = {"json": [], "pii": []}
                for _ in range(options.pairs):
                    for mode in ("json", "pii"):
                        runs[mode].append(run_once(mode, BROKERS[broker], pool, options.tasks, key_store))
                results[f"{broker}/{pool}"] = summarize(runs)
                print_summary(f"{broker}/{pool}", results[f"{broker}/{pool}"], options.tasks)
    data = {"tasks_per_run": options.tasks, "pairs": options.pairs, "results": results}
    print("\nwritten to", _harness.write("e2e", data, options.json))
    return data


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for metric in ("publish_per_second", "worker_per_second"):
        out[metric] = {mode: statistics.median(r[metric] for r in runs[mode]) for mode in runs}
        ratios = [p[metric] / j[metric] for p, j in zip(runs["pii"], runs["json"], strict=True)]
        out[metric]["pii_over_json"] = statistics.median(ratios)
    return out


def print_summary(name: str, summary: dict[str, Any], tasks: int) -> None:
    for metric, label in (("publish_per_second", "publish rate"), ("worker_per_second", "worker throughput")):
        row = summary[metric]
        print(f"{name:<14} {label:<18} json {row['json']:>8.0f}/s   pii {row['pii']:>8.0f}/s   "
              f"pii/json {row['pii_over_json']:.3f}  ({tasks} tasks)")  # fmt: skip


if __name__ == "__main__":
    main()
