"""Run the benchmarks: ``python -m benchmarks [codec|e2e|keys|growth|memory|detection|micro|all] [options]``.

Each benchmark prints a table and writes JSON under ``benchmarks/results/``;
``docs/benchmarks.md`` explains them and shows the numbers of a run.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "codec": "benchmarks.codec",
    "keys": "benchmarks.keys",
    "growth": "benchmarks.growth",
    "e2e": "benchmarks.e2e",
    "memory": "benchmarks.memory",
    "detection": "benchmarks.detection_eval",
}
# Not part of ``all``: the codec cases again, under pyperf (a second opinion on ``codec``).
EXTRA = {"micro": "benchmarks.micro"}


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "all"
    if name in {"-h", "--help"}:
        print(__doc__)
        return
    names = list(BENCHMARKS) if name == "all" else [name]
    known = {**BENCHMARKS, **EXTRA}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(known)}, all")
    for each in names:
        if "--worker" not in argv:  # pyperf's worker processes must print only what pyperf expects
            print(f"\n### {each}\n", flush=True)
        module = importlib.import_module(known[each])
        module.main(argv[1:] if name != "all" else [])


if __name__ == "__main__":
    main(sys.argv[1:])
