"""The repository promises of the README and CI stay true."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
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


def test_migrations_are_found_from_a_source_checkout():
    """Imported from the repository (PYTHONPATH=., `python -m celery` in the checkout), where no
    celery_pii.migrations package exists, the revisions are found in migrations/ beside it."""
    # A subprocess, so the package comes from the checkout even where the
    # tests run against an installed wheel; an editable install would map the
    # package in, so its lookup is made to fail as it does without one.
    code = textwrap.dedent(
        """
        from importlib import resources
        def not_installed(package):
            raise ModuleNotFoundError(package)
        resources.files = not_installed
        from celery_pii import _migrate
        print(_migrate.__file__)
        print(_migrate._script_location())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    module, location = done.stdout.split()
    assert Path(module).parent == ROOT / "celery_pii"
    assert Path(location) == ROOT / "migrations"


def test_the_source_distribution_carries_the_license_docs_and_examples(tmp_path):
    """The README (the package's long description) links to docs/ and examples/; the license is BSD-3-Clause."""
    import tarfile

    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    built = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    with tarfile.open(tmp_path / built.stdout.strip().splitlines()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for expected in (
        "LICENSE",
        "docs/security.md",
        "examples/quickstart/demo.py",
        "migrations/env.py",
        "celery_pii/py.typed",
    ):
        assert expected in names, expected
