"""The codec cases of ``benchmarks.codec`` under pyperf, for a second opinion.

    python -m benchmarks micro [pyperf options, e.g. --fast] [-o OUT.json]
    python -m pyperf compare_to OUT.json ...   # or: python -m pyperf stats OUT.json

pyperf runs every case in fresh worker processes, calibrates loops, drops
warm-ups and reports mean ± std dev; the table this prints adds each case's
ratio to ``json``.  Our own harness (``benchmarks/_harness.py``) interleaves the
cases round by round instead, which is what makes its ratios stable on a noisy
2-core machine; the two should agree within their noise.  By default the
results go to ``benchmarks/results/micro-pyperf.json``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import codec

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "micro-pyperf.json"


def cases(folder: Path) -> dict[str, Callable[[], object]]:
    """The codec micro-benchmark's cases, at 1 KB with 2 PII fields."""
    args, kwargs = codec.body_of_size(1024)
    aes = codec.make_pii_app(folder)
    chacha = codec.make_pii_app(folder, algorithm="chacha20-poly1305")
    return {
        "json": codec.json_codec(args, kwargs),
        "pii aes-256-gcm": codec.pii_codec(aes, args, kwargs),
        "pii chacha20-poly1305": codec.pii_codec(chacha, args, kwargs),
        "seal+open only": codec.seal_open_only(aes, args, kwargs),
        "fernet whole body": codec.whole_body(args, kwargs, "fernet"),
        "aes-gcm whole body": codec.whole_body(args, kwargs, "aesgcm"),
        "auth rsa-2048": codec.auth_serializer(args, kwargs, folder),
    }


def main(argv: list[str] | None = None) -> Any:
    import pyperf

    argv = list(sys.argv[1:] if argv is None else argv)
    is_worker = "--worker" in argv
    if not is_worker and not {"-o", "--output", "--append"} & set(argv):
        DEFAULT_OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_OUTPUT.unlink(missing_ok=True)  # pyperf refuses to overwrite
        argv += ["-o", str(DEFAULT_OUTPUT)]
    # Worker processes are started as ``python -m benchmarks micro ...``, so they
    # import this package the same way (running this file as a script would not).
    runner = pyperf.Runner(program_args=("-m", "benchmarks", "micro"))
    runner.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        suite = {name: runner.bench_func(name, fn) for name, fn in cases(Path(tmp)).items()}
    if not is_worker:
        _print_ratios(suite)
    return suite


def _print_ratios(suite: dict[str, Any]) -> None:
    if any(bench is None for bench in suite.values()):
        return
    base = suite["json"].mean()
    print("\nmean per message and ratio to json (pyperf)")
    for name, bench in suite.items():
        print(f"{name:<24} {bench.mean() * 1e6:>9.1f}us  {bench.mean() / base:>6.2f}x")


if __name__ == "__main__":
    main()
