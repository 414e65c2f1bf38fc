"""Score and time PII detection on the labeled corpus.

Usage::

    python -m benchmarks.detection_eval [--split dev|holdout|all] [--json OUT]
                                        [--repeats N] [--no-phonenumbers] [--errors]

Prints per-category precision, recall, F1 and support (gold findings), the
micro average, and the median / p95 time ``detect`` takes per payload (in
microseconds, and per KB of the payload's JSON).  Each payload is timed
``--repeats`` times with ``time.perf_counter_ns`` and its median is kept, so
one scheduler hiccup does not move the numbers.

``--errors`` lists the misses and false alarms by payload id and path (never
the values); use it on the dev split only, the holdout split is for
measuring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from celery_pii import _detect
from celery_pii._detect import CATEGORIES, detect

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "detection"
SPLITS = ("dev", "holdout")


def load(split: str) -> list[dict[str, Any]]:
    """Records of one split (``dev``/``holdout``) or of both (``all``)."""
    names = SPLITS if split == "all" else (split,)
    records: list[dict[str, Any]] = []
    for name in names:
        with (CORPUS / f"{name}.jsonl").open(encoding="utf-8") as lines:
            records.extend(json.loads(line) for line in lines if line.strip())
    return records


def score(
    records: Iterable[dict[str, Any]],
) -> tuple[dict[str, dict[str, float]], list[tuple[str, str, str, str]]]:
    """Per-category and micro precision/recall/F1/support, and the errors.

    Errors are ``(kind, id, path, category)`` with kind ``FN`` or ``FP``.
    """
    tp = dict.fromkeys(CATEGORIES, 0)
    fp = dict.fromkeys(CATEGORIES, 0)
    fn = dict.fromkeys(CATEGORIES, 0)
    errors: list[tuple[str, str, str, str]] = []
    for rec in records:
        gold = {(f["path"], f["category"]) for f in rec["findings"]}
        got = {(f.path, f.category) for f in detect(rec["payload"])}
        for _path, cat in got & gold:
            tp[cat] += 1
        for path, cat in sorted(got - gold):
            fp[cat] += 1
            errors.append(("FP", rec["id"], path, cat))
        for path, cat in sorted(gold - got):
            fn[cat] += 1
            errors.append(("FN", rec["id"], path, cat))
    table = {cat: _prf(tp[cat], fp[cat], fn[cat]) for cat in CATEGORIES}
    table["micro"] = _prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return table, errors


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": tp + fn,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def timing(records: Sequence[dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median and p95 over payloads of each payload's median detection time."""
    per_payload_us: list[float] = []
    per_kb_us: list[float] = []
    sizes: list[int] = []
    for rec in records:
        payload = rec["payload"]
        size = len(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            detect(payload)
            runs.append(time.perf_counter_ns() - start)
        us = statistics.median(runs) / 1000
        per_payload_us.append(us)
        per_kb_us.append(us / (size / 1024))
        sizes.append(size)
    big = [us for us, size in zip(per_payload_us, sizes, strict=True) if 1024 <= size <= 2048]
    return {
        "payloads": len(records),
        "median_bytes": statistics.median(sizes),
        "median_us": statistics.median(per_payload_us),
        "p95_us": _p95(per_payload_us),
        "median_us_per_kb": statistics.median(per_kb_us),
        "p95_us_per_kb": _p95(per_kb_us),
        "payloads_1_2kb": len(big),
        "median_us_1_2kb": statistics.median(big) if big else float("nan"),
        "p95_us_1_2kb": _p95(big) if big else float("nan"),
    }


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def report(split: str, table: dict[str, dict[str, float]], times: dict[str, float]) -> str:
    """The human-readable table."""
    lines = [
        (
            f"split: {split}   payloads: {times['payloads']:.0f}   "
            f"phonenumbers: {'yes' if _detect.PHONENUMBERS is not None else 'no (fallback)'}"
        ),
        f"{'category':<12} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8} {'FP':>4} {'FN':>4}",
    ]
    for cat in (*CATEGORIES, "micro"):
        row = table[cat]
        lines.append(
            f"{cat:<12} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>6.4f} "
            f"{row['support']:>8.0f} {row['fp']:>4.0f} {row['fn']:>4.0f}"
        )
    lines.append(
        f"time per payload: median {times['median_us']:.1f} us, p95 {times['p95_us']:.1f} us "
        f"(median payload {times['median_bytes']:.0f} bytes)"
    )
    lines.append(
        f"time per KB:      median {times['median_us_per_kb']:.1f} us, p95 {times['p95_us_per_kb']:.1f} us"
    )
    lines.append(
        f"1-2 KB payloads ({times['payloads_1_2kb']:.0f}): median {times['median_us_1_2kb']:.1f} us, "
        f"p95 {times['p95_us_1_2kb']:.1f} us"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.detection_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers as JSON to OUT")
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per payload (default 25)")
    parser.add_argument("--no-phonenumbers", action="store_true", help="score the fallback phone validator")
    parser.add_argument("--errors", action="store_true", help="list misses and false alarms (dev only)")
    args = parser.parse_args(argv)
    if args.no_phonenumbers:
        _detect.PHONENUMBERS = None
    records = load(args.split)
    for rec in records[:50]:  # warm caches and lazily loaded phone metadata
        detect(rec["payload"])
    table, errors = score(records)
    times = timing(records, args.repeats)
    print(report(args.split, table, times))
    if args.errors:
        for kind, rid, path, cat in errors:
            print(f"{kind} {rid} {path or '<root>'} {cat}")
    if args.json:
        out = {
            "split": args.split,
            "phonenumbers": _detect.PHONENUMBERS is not None,
            "scores": table,
            "timing": times,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
