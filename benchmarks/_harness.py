"""Timing that compares like with like: paired, interleaved rounds on one machine in one run.

Each round times every case once (in a rotating order), so slow phases of a
noisy machine hit all cases alike; a case's ratio to the baseline is the
median of its per-round ratios.  Results are printed as a table and written
as JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def per_call(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def calibrate(fn: Callable[[], object], target: float = 0.05) -> int:
    """How many calls take about ``target`` seconds."""
    number = 1
    while True:
        elapsed = per_call(fn, number) * number
        if elapsed >= target / 4:
            return max(1, int(number * target / max(elapsed, 1e-9)))
        number *= 4


def compare(cases: Mapping[str, Callable[[], object]], *, baseline: str, rounds: int = 15) -> dict[str, Any]:
    """Time every case in interleaved rounds; return medians and paired ratios to ``baseline``."""
    for fn in cases.values():  # warm caches, keys, imports
        for _ in range(200):
            fn()
    numbers = {name: calibrate(fn) for name, fn in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            samples[name].append(per_call(cases[name], numbers[name]))
    base = samples[baseline]
    return {
        name: {
            "median_us": statistics.median(values) * 1e6,
            "min_us": min(values) * 1e6,
            "ratio_to_baseline": statistics.median(v / b for v, b in zip(values, base, strict=True)),
            "samples_us": [v * 1e6 for v in values],
        }
        for name, values in samples.items()
    }


def table(title: str, results: Mapping[str, Mapping[str, Any]], *, baseline: str) -> str:
    """A plain-text table of medians and ratios."""
    width = max(len(name) for name in results)
    lines = [title, f"{'case':<{width}}  {'median':>11}  {'vs ' + baseline:>12}"]
    for name, result in results.items():
        lines.append(f"{name:<{width}}  {result['median_us']:>9.1f}us  {result['ratio_to_baseline']:>11.2f}x")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    import celery
    import cryptography
    import kombu

    from celery_pii import _json

    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "cryptography": cryptography.__version__,
        # pii writes and reads plain JSON with orjson when the "fast" extra is installed.
        "orjson": _json.ORJSON,
    }


def write(name: str, data: Mapping[str, Any], path: str | None = None) -> Path:
    """Write results as JSON (default: benchmarks/results/<name>.json)."""
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"environment": environment(), **data}, indent=2, default=str))
    return target
