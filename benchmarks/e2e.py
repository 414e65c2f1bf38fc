"""End to end: a real worker on a real broker, pii against json, interleaved runs.

    python -m benchmarks.e2e [--tasks 5000] [--pairs 3] [--brokers redis,amqp] [--pools solo,prefork]
                             [--side-by-side]

For each broker and pool, runs come in pairs, json then pii, then pii then
json (the order alternates, so whatever the second run of a pair suffers,
a broker still tidying up after the first, falls on both alike): publish N
tasks (1 KB, 2 PII fields) into an idle queue (the publish rate), then start
a `celery worker` and time the first to the last task (the worker's
throughput, start-up excluded).  Each run's queue is deleted after it.
Reports medians and paired pii/json ratios.

With ``--side-by-side``, each pair's two workers run at the same time instead,
each draining its own full queue, and the ratio is of the tasks each completed
while both were busy: a slow moment of a shared machine then slows both alike,
which separate runs minutes apart cannot promise.
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


class Run:
    """One queue filled with ``tasks`` messages of ``mode``, and the worker that drains it."""

    def __init__(self, mode: str, broker: str, tasks: int, key_store: str) -> None:
        self.mode, self.broker, self.tasks, self.key_store = mode, broker, tasks, key_store
        self.queue = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
        self.app = build(mode, queue=self.queue, broker=broker, key_store=key_store)
        self.stats = redis.Redis.from_url(STATS_URL)
        self.worker: subprocess.Popen[bytes] | None = None

    def publish(self) -> float:
        """Fill the queue; returns tasks published per second."""
        args, kwargs = body_of_size(1024)
        work = self.app.tasks["bench.work"]
        work.delay(*args, **kwargs)  # declares the queue, warms keys
        started = time.perf_counter()
        with self.app.producer_or_acquire() as producer:
            for _ in range(self.tasks - 1):
                work.apply_async(args, kwargs, producer=producer)
        return self.tasks / (time.perf_counter() - started)

    def start_worker(self, pool: str) -> None:
        env = dict(os.environ, BENCH_MODE=self.mode, BENCH_QUEUE=self.queue, BENCH_BROKER=self.broker)
        env["BENCH_KEY_STORE"] = self.key_store
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "celery", "-A", "benchmarks.e2e_app", "worker", "-P", pool,
                   "-c", "2", "-Q", self.queue, "-l", "WARNING", "--without-mingle", "--without-gossip",
                   "--without-heartbeat", "-n", f"{self.queue}@%h"]  # fmt: skip
        self.worker = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def done(self) -> int:
        """Tasks run so far (raises if the worker died)."""
        assert self.worker is not None
        if self.worker.poll() is not None:
            raise RuntimeError(self.worker.stderr.read().decode()[-2000:] if self.worker.stderr else "died")
        return int(self.stats.get(f"{self.queue}:count") or 0)

    def wait_until(self, count: int, deadline: float) -> None:
        while self.done() < count:
            if time.monotonic() > deadline:
                msg = f"{self.mode} worker: {self.done()} of {count} tasks by the deadline"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def worker_per_second(self) -> float:
        """Tasks per second from the first task's start to the last task's end."""
        first, last = (float(self.stats.get(f"{self.queue}:{end}") or 0) for end in ("first", "last"))
        return (self.tasks - 1) / max(last - first, 1e-9)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(60)
            if self.worker.stderr:
                self.worker.stderr.close()
        self.stats.delete(f"{self.queue}:first", f"{self.queue}:count", f"{self.queue}:last")
        self.stats.close()
        _delete_queue(self.app, self.queue)


def run_once(mode: str, broker: str, pool: str, tasks: int, key_store: str) -> dict[str, float]:
    """Publish ``tasks`` into an idle queue, then time a worker draining it alone."""
    run = Run(mode, broker, tasks, key_store)
    try:
        publish_per_second = run.publish()
        run.start_worker(pool)
        run.wait_until(tasks, time.monotonic() + 600)
        return {"publish_per_second": publish_per_second, "worker_per_second": run.worker_per_second()}
    finally:
        run.close()


def side_by_side(index: int, broker: str, pool: str, tasks: int, key_store: str) -> float:
    """Both workers at once, each on its own full queue: pii's share of the work done.

    The two compete for the same cores, so whatever slows the machine at a
    given moment slows both; over the window in which both are busy (from a
    tenth of the tasks to nine tenths of the faster one's), the ratio of the
    tasks each completed is the ratio of their throughputs.
    """
    runs = {mode: Run(mode, broker, tasks, key_store) for mode in pair_order(index)}
    try:
        for run in runs.values():
            run.publish()
        for run in runs.values():
            run.start_worker(pool)
        deadline = time.monotonic() + 900
        for run in runs.values():
            run.wait_until(tasks // 10, deadline)
        start = {mode: run.done() for mode, run in runs.items()}
        while max(run.done() for run in runs.values()) < tasks * 9 // 10:
            if time.monotonic() > deadline:
                raise RuntimeError("side-by-side run did not finish")
            time.sleep(0.02)
        end = {mode: run.done() for mode, run in runs.items()}
    finally:
        for run in runs.values():
            run.close()
    return (end["pii"] - start["pii"]) / (end["json"] - start["json"])


def _delete_queue(app: Any, queue: str) -> None:
    """Leave the broker as the run found it: no queue or exchange piling up across runs."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


def pair_order(index: int) -> tuple[str, str]:
    """The order of the two runs of pair ``index``: json first, then pii first, and so on."""
    return ("json", "pii") if index % 2 == 0 else ("pii", "json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--pools", default="solo,prefork")
    parser.add_argument("--json", help="output file (default benchmarks/results/e2e.json)")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the json and pii workers at the same time instead (pii's share of the work done)",
    )
    options = parser.parse_args(argv)
    from celery_pii import migrate

    os.environ.setdefault("CELERY_PII_MASTER_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        key_store = f"sqlite:///{tmp}/keys.db"
        migrate(key_store)
        for broker in options.brokers.split(","):
            for pool in options.pools.split(","):
                if options.side_by_side:
                    results[f"{broker}/{pool}"] = run_side_by_side(broker, pool, options, key_store)
                    continue
                runs: dict[str, list[dict[str, float]]] = {"json": [], "pii": []}
                for index in range(options.pairs):
                    for mode in pair_order(index):
                        runs[mode].append(run_once(mode, BROKERS[broker], pool, options.tasks, key_store))
                results[f"{broker}/{pool}"] = summarize(runs)
                print_summary(f"{broker}/{pool}", results[f"{broker}/{pool}"], options.tasks)
    data = {
        "tasks_per_run": options.tasks,
        "pairs": options.pairs,
        "pair_order": "json first in even pairs, pii first in odd ones",
        "side_by_side": options.side_by_side,
        "results": results,
    }
    print("\nwritten to", _harness.write("e2e", data, options.json))
    return data


def run_side_by_side(broker: str, pool: str, options: argparse.Namespace, key_store: str) -> dict[str, Any]:
    ratios = [side_by_side(i, BROKERS[broker], pool, options.tasks, key_store) for i in range(options.pairs)]
    median = statistics.median(ratios)
    shown = ", ".join(f"{ratio:.3f}" for ratio in ratios)
    print(f"{broker}/{pool:<8} side by side: pii/json {median:.3f} ({shown}; {options.tasks} tasks each)")
    return {"ratios": ratios, "pii_over_json": median}


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
