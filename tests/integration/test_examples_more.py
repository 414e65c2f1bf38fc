"""Every example beyond the quickstart runs with its one documented command and shows what it promises."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from celery_pii import generate_master_key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MASTER_KEY = generate_master_key()

pytestmark = pytest.mark.integration


@functools.cache
def example_run(script: Path) -> subprocess.CompletedProcess[str]:
    """One run of an example as its README says (from the repository root), logging at DEBUG.

    The tests here read its output; the leak hunt reads its log.  Running each
    example once for both saves a minute of the suite.
    """
    env = dict(os.environ, CELERY_PII_MASTER_KEY=MASTER_KEY, CELERY_PII_LOG_LEVEL="DEBUG")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def run_example(*parts: str) -> str:
    """Run an example (once: see example_run); return its stdout."""
    done = example_run(EXAMPLES.joinpath(*parts))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # Key material never leaves the process, not even the master key the example was given.
    assert MASTER_KEY not in done.stdout + done.stderr
    return done.stdout


def days_ahead(key_id_date: str) -> int:
    """Days from today to a bucket key's date (``YYYYMMDD``)."""
    moment = datetime.strptime(key_id_date, "%Y%m%d").replace(tzinfo=timezone.utc)
    return (moment - datetime.now(timezone.utc)).days + 1


def test_payments():
    """Card fields are sealed on the broker and in the result; a one-year bucket; only last4 comes back."""
    out = run_example("payments", "main.py")
    assert "card number or name in the raw message or its decoded body: none" in out
    assert "card number or name in the stored result: none" in out
    assert re.search(r"body card fields: .*\"number\": \"\[pii:sealed\]\", \"cvv\": \"\[pii:sealed\]\"", out)
    assert '"card_last4": "1111"' in out
    for value in ("4111 1111 1111 1111", "4111111111111111", "Ann Example", "737"):
        assert value not in out
    (bucket,) = re.findall(r"retention-bucket key payments@(\d{8})T", out)
    assert 364 <= days_ahead(bucket) <= 366
    assert "OK: the card data exists in plaintext only inside the task function." in out


def test_healthcare():
    """Subtree sealed per patient; forgetting A leaves A unreadable and B readable."""
    out = run_example("healthcare", "main.py")
    assert "patient values found in the broker messages: 0" in out
    buckets = re.findall(r"^  subject\.[0-9a-f]{32}@(\d{8})T", out, re.MULTILINE)
    assert len(buckets) == 2
    assert all(6 * 365 <= days_ahead(b) <= 6 * 365 + 3 for b in buckets)
    assert out.count('"address": "dict", "allergies": "list"') == 4  # the subtree's types came back
    assert re.search(r"forget patient A .*: [1-9]\d* key version\(s\) destroyed", out)
    assert "patient A queued follow-up: KeyDestroyed" in out
    assert 'patient B queued follow-up: ok {"visit": "follow-up"' in out
    assert "patient A checkup result, read again from the backend: KeyDestroyed" in out
    assert 'patient B checkup result, read again from the backend: ok {"visit": "checkup"' in out
    for value in ("MRN-000101", "MRN-000202", "Ann Example", "900-12-3456", "bob@example.com"):
        assert value not in out


def test_gdpr_erasure():
    """The forgotten user's queued task fails with KeyDestroyed; the others succeed."""
    out = run_example("gdpr_erasure", "main.py")
    outcomes = re.findall(
        r"^(user-\d+) \[[0-9a-f]{8}\]: (SUCCESS|FAILURE)(?: (KeyDestroyed))?", out, re.MULTILINE
    )
    assert outcomes == [
        ("user-1001", "FAILURE", "KeyDestroyed"),
        ("user-1002", "SUCCESS", ""),
        ("user-1001", "SUCCESS", ""),
    ]
    assert "the task did not run" in out
    assert re.search(r"^destroy +subject\.[0-9a-f]{32}@\S+ v1 \(forget_subject\)$", out, re.MULTILINE)
    # Filed under the erased subject's key, beside its destruction.
    assert re.search(r"^decrypt_denied +subject\.[0-9a-f]{32}@\S+ \[[0-9a-f]{8}\]$", out, re.MULTILINE)
    assert "ann@example.com" not in out and "Test Lane" not in out


def test_key_management():
    """Queued messages survive rotation and retirement; rotation, trimming, destruction and audit show."""
    out = run_example("key_management", "main.py")
    assert "rotate_key('billing') -> version 2" in out
    assert [f"worker: invoice {i} sent" in out for i in (1, 2, 3)] == [True] * 3
    assert "perform_automatic_rotation() -> ['billing', 'exports']" in out
    assert "destroy_key('exports') -> 2 version(s) destroyed" in out
    assert "total=6 active=1 retired=2 destroyed=3 rotations=3" in out
    audit = re.findall(r"^\d\d:\d\d:\d\d (\w+) v(\d) +(\w+) +key-admin-example", out, re.MULTILINE)
    assert ("billing", "2", "retire") in audit
    assert ("billing", "3", "generate") in audit
    assert ("billing", "4", "rotate") in audit
    assert ("billing", "1", "destroy") in audit
    assert "reason=max_key_versions" in out


def test_beat_schedule():
    """Real beat and worker processes rotate keys and shred the expired retention bucket."""
    out = run_example("beat_schedule", "run.py")
    assert "receipt task: receipt for order-7 sent" in out
    assert "subscribe task: example.com address subscribed to weekly" in out
    assert re.search(r"beat sent [1-9]\d* due task", out)
    assert re.search(r"celery-pii: rotate_keys rotated [1-9]\d* key\(s\)", out)
    assert re.search(r"celery-pii: enforce_retention destroyed [1-9]\d* key version\(s\)", out)
    assert "receipt result after its retention deadline: KeyDestroyed" in out
    assert out.rstrip().endswith("OK")
    assert "ann@example.com" not in out


def test_django_project():
    """CELERY_PII_* names from a Django-style settings module configure celery-pii."""
    out = run_example("django_project", "main.py")
    assert "CELERY_TASK_SERIALIZER" in out and "-> task_serializer = 'pii'" in out
    assert re.search(r"CELERY_PII_DEFAULT_KEY +-> pii_default_key = 'shop-orders'", out)
    assert re.search(r"CELERY_PII_ACTOR +-> pii_actor = 'django-shop'", out)
    assert "task: receipt for order-42 sent" in out
    assert re.search(r"key created on first use: shop-orders@\d{8}T000000Z", out)
    assert "audit actor: django-shop" in out
    assert "ann@example.com" not in out


def test_rollout():
    """Rollout mode runs plaintext, producers then seal, and plaintext is parked once rollout is off."""
    out = run_example("rollout", "main.py")
    phase1, _, rest = out.partition("== phase 2")
    phase2, _, phase3 = rest.partition("== phase 3")
    assert "['application/json (email in plaintext)']" in phase1
    assert "worker: receipt for order-1 sent" in phase1
    assert "['application/x-celery-pii (email sealed)']" in phase2
    assert "worker: receipt for order-2 sent" in phase2
    assert "worker: receipt for order-4 sent" in phase3
    assert "order-3 ran: False; its state: PENDING" in phase3
    assert re.search(
        r"parked in orders-\d+\.quarantine: task orders\.send_receipt .*content type not accepted", phase3
    )
    assert "orders the task function ran: ['order-1', 'order-2', 'order-4']" in out
    assert "ann@example.com" not in out
