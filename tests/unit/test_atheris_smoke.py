"""A bounded, seeded run of the coverage-guided fuzz target tests/fuzz/fuzz_loads.py.

The target feeds the serializer's ``loads``, ``_envelope.parse`` (and opening
of changed envelopes) and ``parse_path``, and lets only the allowed
exceptions pass; anything else is a libFuzzer crash, reported with the input.
atheris is not a dependency of the project: without it this module skips.
Long runs are for people (see the target's docstring), not for CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_loads.py"
RUNS = 20_000


@pytest.mark.timeout(300)
def test_fuzz_target_raises_only_allowed_exceptions(tmp_path):
    """20,000 fuzzed inputs from a fixed seed produce values or the allowed exceptions only."""
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    subprocess.run([sys.executable, str(TARGET), "--seeds", str(corpus)], check=True, timeout=120)
    result = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            str(corpus),
            f"-runs={RUNS}",
            "-seed=1",
            "-max_len=4096",
            "-max_total_time=120",
            "-timeout=10",  # seconds per input: a hang is a failure, not a stall
            "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}/",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    report = result.stderr[-6000:]
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert result.returncode == 0, f"fuzzing found {crashes}:\n{report}"
    assert not crashes, report
    assert f"Done {RUNS} runs" in result.stderr, report
