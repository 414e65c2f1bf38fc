"""Memory of a worker running many PII tasks: resident size after 1,000 and after 100,000.

    python -m benchmarks.memory [--tasks 100000] [--pool solo]

Publishes the tasks (1 KB, 2 PII fields) into an idle Redis queue, starts a
``celery worker`` (pii mode of benchmarks/e2e_app.py), and reads the resident
set size (``VmRSS``) of the worker's processes from /proc as the completed
count passes 1,000, 10,000 and the total.  Flat memory means the last
reading is within noise of the first.
"""

from __future__ import annotations

import argparse
import os
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

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker_rss(pid: int) -> dict[str, float]:
    """The worker's main process and its pool children."""
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    readings = {"main": rss_mb(pid)}
    for index, child in enumerate(sorted(int(c) for c in children)):
        readings[f"child-{index}"] = rss_mb(child)
    return readings


def run(tasks: int, pool: str, broker: str) -> dict[str, Any]:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    from celery_pii import migrate

    with tempfile.TemporaryDirectory() as tmp:
        key_store = f"sqlite:///{tmp}/keys.db"
        migrate(key_store)
        queue = f"bench-mem-{uuid.uuid4().hex[:8]}"
        app = build("pii", queue=queue, broker=broker, key_store=key_store)
        args, kwargs = body_of_size(1024)
        work = app.tasks["bench.work"]
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                work.apply_async(args, kwargs, producer=producer)
        env = dict(
            os.environ, BENCH_MODE="pii", BENCH_QUEUE=queue, BENCH_BROKER=broker, BENCH_KEY_STORE=key_store
        )
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.e2e_app", "worker", "-P", pool, "-c", "2",
            "-Q", queue, "-l", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        stats = redis.Redis.from_url(STATS_URL)
        worker = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        readings: dict[int, dict[str, float]] = {}
        marks = [m for m in (1_000, 10_000, tasks) if m <= tasks]
        try:
            deadline = time.monotonic() + 3600
            while marks and time.monotonic() < deadline:
                done = int(stats.get(f"{queue}:count") or 0)
                if done >= marks[0]:
                    mark = marks.pop(0)
                    readings[mark] = worker_rss(worker.pid)
                    shown = ", ".join(f"{name} {mb:.1f} MB" for name, mb in readings[mark].items())
                    print(f"after {mark:>7} tasks: {shown}", flush=True)
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(60)
            stats.delete(f"{queue}:first", f"{queue}:count", f"{queue}:last")
    first, last = readings[min(readings)], readings[max(readings)]
    growth = {name: last.get(name, 0.0) - first.get(name, 0.0) for name in first}
    return {"tasks": tasks, "pool": pool, "rss_mb": readings, "growth_mb": growth}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="worker memory after many PII tasks")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json", help="output file (default benchmarks/results/memory.json)")
    options = parser.parse_args(argv)
    result = run(options.tasks, options.pool, options.broker)
    print(
        "growth from the first reading to the last:",
        {k: f"{v:+.1f} MB" for k, v in result["growth_mb"].items()},
    )
    print("written to", _harness.write("memory", result, options.json))
    return result


if __name__ == "__main__":
    main()
