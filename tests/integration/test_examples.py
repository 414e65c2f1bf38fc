"""The examples run as documented and show what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLES_DB, REDIS_URL

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("broker", [None, f"{REDIS_URL}/{EXAMPLES_DB}"])
def test_quickstart_demo(broker):
    """The README's demo shows sealed broker contents, the plaintext the task got, and the result."""
    command = [sys.executable, str(ROOT / "examples" / "quickstart" / "demo.py")]
    if broker:
        command += ["--broker", broker]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    out = done.stdout
    broker_part, _, task_part = out.partition("== what the task function received")
    assert "[pii:sealed]" in broker_part
    assert "4111 1111 1111 1111" not in broker_part
    assert "ann@example.com" not in broker_part
    assert '"card_number": "4111 1111 1111 1111"' in task_part
    assert '"receipt_to": "ann@example.com"' in task_part
    assert "Traceback" not in done.stderr
