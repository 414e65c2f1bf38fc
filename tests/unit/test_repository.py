"""The repository promises of the README and CI stay true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, re.DOTALL)]


def test_ci_runs_the_readme_test_command():
    """.ci/run ends by running exactly the README's test command."""
    test_command = _readme_commands()[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci


def test_layout_the_user_asked_for():
    """The top-level names of DESIGN exist."""
    for name in (
        "pyproject.toml",
        "setup.cfg",
        "tox.ini",
        "celery_pii/py.typed",
        "tests",
        "migrations",
        "examples",
        "README.md",
    ):
        assert (ROOT / name).exists(), name
