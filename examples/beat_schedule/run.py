"""Run ``celery beat`` and a ``celery worker`` for a few seconds and show what the beat tasks did.

    python examples/beat_schedule/run.py

Starts ``celery -A proj worker`` and ``celery -A proj beat`` as subprocesses
in demo mode (both beat tasks every second, keys rotated after 2 s, receipts
kept 3 s; see ``proj.py``), publishes a receipt task (3-second retention) and a
subscribe task (the ``default`` key, kept), waits until beat has rotated keys
and shredded the receipt's retention bucket, stops both, and
prints the reports the beat tasks logged.  The stored result of the receipt is
unreadable afterwards (``KeyDestroyed``).

Everything lives in a temporary folder (filesystem:// broker, file:// results,
SQLite key store); the master key is generated for this run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from celery_pii import KeyDestroyed, generate_master_key

HERE = Path(__file__).resolve().parent
REPORT = re.compile(r"celery-pii: (rotate_keys|enforce_retention) .*")


def start(args: list[str], folder: Path, name: str) -> subprocess.Popen[bytes]:
    log = folder / f"{name}.log"
    command = [sys.executable, "-m", "celery", "-A", "proj", *args, "-l", "INFO", "--logfile", str(log)]
    return subprocess.Popen(command, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reports(folder: Path) -> list[str]:
    log = folder / "worker.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [match.group(0) for match in REPORT.finditer(text)]


def did_work(what: str, folder: Path) -> bool:
    """A report saying ``what N`` with N > 0 was logged."""
    return any(re.search(rf"{what} [1-9]", line) for line in reports(folder))


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def main() -> None:
    os.environ.setdefault("CELERY_PII_MASTER_KEY", generate_master_key())
    with tempfile.TemporaryDirectory(prefix="celery-pii-beat-") as tmp:
        folder = Path(tmp)
        os.environ.update(PROJ_DATA_DIR=str(folder), PROJ_DEMO_SECONDS="1")
        sys.path.insert(0, str(HERE))
        import proj  # noqa: PLC0415 - configured by the environment set just above

        name = f"proj-{os.getpid()}@{socket.gethostname()}"
        worker = start(["worker", "-P", "solo", "-n", name], folder, "worker")
        beat = start(["beat", "-s", str(folder / "beat-schedule")], folder, "beat")
        try:
            # The receipt's key lasts 3 seconds from when it is sealed: publish it once the
            # worker is up, or a slow start outlives it (the task then fails: KeyDestroyed).
            if not wait_for(lambda: bool(proj.app.control.ping([name], timeout=0.5))):
                sys.exit("TIMEOUT: the worker did not start")
            receipt = proj.send_receipt.delay("ann@example.com", "order-7")
            print(f"receipt task: {receipt.get(timeout=60)} (email sealed under a 3-second retention key)")
            subscribed = proj.subscribe.delay("ann@example.com", "weekly")
            print(f"subscribe task: {subscribed.get(timeout=60)} (email sealed under the 'default' key)")
            done = wait_for(
                lambda: did_work("enforce_retention destroyed", folder) and did_work("rotated", folder)
            )
        finally:
            for process in (beat, worker):
                process.terminate()
            for process in (beat, worker):
                process.wait(30)

        beat_log = folder / "beat.log"
        sent = beat_log.read_text(errors="replace").count("Sending due task") if beat_log.exists() else 0
        lines = reports(folder)
        print(f"\n== beat sent {sent} due task(s); the worker logged {len(lines)} report(s):")
        shown = [line for line in lines if " 0 key" not in line] or lines
        for line in shown:
            print(f"  {line}")
        print(f"  ... and {len(lines) - len(shown)} report(s) of runs with nothing to do")
        try:
            proj.app.AsyncResult(receipt.id).get(timeout=10)
            print("\nreceipt result: still readable")
        except KeyDestroyed:
            print("\nreceipt result after its retention deadline: KeyDestroyed (crypto-shredded)")
        print("OK" if done else "TIMEOUT: beat did not rotate and shred in time")
        sys.exit(0 if done else 1)


if __name__ == "__main__":
    main()
