"""How cost and size grow: with the payload size, and with the number of PII fields.

    python -m benchmarks.growth [--json OUT] [--plots docs/]

Series (encode + decode per message, and bytes on the wire):

* payload 256 B ... 1 MB with 2 PII fields: ``json``, ``pii`` (compression above
  1 KB, the default), ``pii`` without compression, whole-body Fernet;
* 1 ... 100 PII fields in a ~4 KB body, declared one by one, and the same
  number of values under one ``items[*].serial`` wildcard path.

Each point times its cases side by side (interleaved rounds, medians).  With
matplotlib installed (``pip install 'celery-pii[bench]'``) the series are
drawn to PNG files.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from kombu import serialization

from benchmarks import _harness
from benchmarks.codec import EMBED, body_of_size, make_pii_app, pii_codec, whole_body

SIZES = (256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576)
FIELD_COUNTS = (1, 2, 5, 10, 20, 50, 100)


def wire_bytes(app: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    """Size of the encoded message body as it goes to the broker."""
    from celery_pii import get_pii
    from celery_pii._serializer import PublishTicket, publish_ticket

    root = {"args": args, "kwargs": kwargs, **EMBED}
    sealed = get_pii(app).sealer.seal_message("bench.charge", "0" * 36, root)
    body = (sealed.root["args"], sealed.root["kwargs"], {**EMBED, "pii": [sealed.token]})
    publish_ticket.set(PublishTicket(body, "bench.charge"))
    return len(serialization.dumps(body, "pii")[2])


def json_case(args: list[Any], kwargs: dict[str, Any]) -> Any:
    body = (args, kwargs, EMBED)

    def run() -> None:
        content_type, encoding, data = serialization.dumps(body, "json")
        serialization.loads(data, content_type, encoding)

    return run


def size_series(folder: Path, rounds: int) -> list[dict[str, Any]]:
    compressed = make_pii_app(folder)
    plain = _uncompressed_app(folder)
    points = []
    for size in SIZES:
        args, kwargs = body_of_size(size)
        results = _harness.compare(
            {
                "json": json_case(args, kwargs),
                "pii": pii_codec(compressed, args, kwargs),
                "pii, no compression": pii_codec(plain, args, kwargs),
                "fernet whole body": whole_body(args, kwargs, "fernet"),
            },
            baseline="json",
            rounds=rounds,
        )
        points.append(
            {
                "size": size,
                "us": {name: r["median_us"] for name, r in results.items()},
                "ratio": {name: r["ratio_to_baseline"] for name, r in results.items()},
                "bytes": {
                    "json": len(serialization.dumps((args, kwargs, EMBED), "json")[2]),
                    "pii": wire_bytes(compressed, args, kwargs),
                    "pii, no compression": wire_bytes(plain, args, kwargs),
                },
            }
        )
        timings = "  ".join(f"{n} {v['median_us']:9.1f}us" for n, v in results.items())
        print(f"{size:>9} B  {timings}", flush=True)
    return points


def _uncompressed_app(folder: Path) -> Any:
    sub = folder / "nocompress"
    sub.mkdir(exist_ok=True)
    return make_pii_app(sub, pii_compression_threshold=None)


def field_series(folder: Path, rounds: int) -> list[dict[str, Any]]:
    points = []
    for count in FIELD_COUNTS:
        paths = [f"customer.f{i}" for i in range(count)]
        sub = folder / f"fields-{count}"
        sub.mkdir()
        declared = make_pii_app(sub, fields=paths)
        wildcard_folder = sub / "wildcard"
        wildcard_folder.mkdir()
        wildcard = make_pii_app(wildcard_folder, fields=["items[*].serial"])
        args, kwargs = body_of_size(4096)
        customer = {f"f{i}": f"person-{i}@example.com" for i in range(count)}
        items = [{"serial": f"SN-{i:06d}", "qty": 1} for i in range(count)]
        declared_args = [args[0], args[1], customer, args[3]]
        wildcard_args = [args[0], args[1], args[2], items]
        results = _harness.compare(
            {
                "json": json_case(declared_args, kwargs),
                "pii, N declared paths": pii_codec(declared, declared_args, kwargs),
                # The [*] case has a body of its own (N small items): its own json baseline.
                "json, [*] body": json_case(wildcard_args, kwargs),
                "pii, one [*] path over N items": pii_codec(wildcard, wildcard_args, kwargs),
            },
            baseline="json",
            rounds=rounds,
        )
        points.append(
            {
                "fields": count,
                "us": {name: r["median_us"] for name, r in results.items()},
                "ratio": {name: r["ratio_to_baseline"] for name, r in results.items()},
                "wildcard_ratio_to_its_json": statistics.median(
                    w / j
                    for w, j in zip(
                        results["pii, one [*] path over N items"]["samples_us"],
                        results["json, [*] body"]["samples_us"],
                        strict=True,
                    )
                ),
                "bytes": {
                    "json": len(serialization.dumps((declared_args, kwargs, EMBED), "json")[2]),
                    "pii, N declared paths": wire_bytes(declared, declared_args, kwargs),
                    "json, [*] body": len(serialization.dumps((wildcard_args, kwargs, EMBED), "json")[2]),
                    "pii, one [*] path over N items": wire_bytes(wildcard, wildcard_args, kwargs),
                },
            }
        )
        print(f"{count:>4} fields  " + "  ".join(f"{n} {v['median_us']:8.1f}us" for n, v in results.items()))
    return points


def plot(data: dict[str, Any], folder: Path) -> list[Path]:
    """PNG plots of both series (skipped without matplotlib)."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'celery-pii[bench]')")
        return []
    written = []
    for series, x_key, name, title in (
        ("sizes", "size", "benchmark-size.png", "encode + decode vs payload size (2 PII fields)"),
        ("fields", "fields", "benchmark-fields.png", "encode + decode vs number of PII fields"),
    ):
        points = data[series]
        figure, (cost, size) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [p[x_key] for p in points]
        for case in points[0]["us"]:
            cost.plot(xs, [p["us"][case] for p in points], marker="o", label=case)
        for case in points[0]["bytes"]:
            size.plot(xs, [p["bytes"][case] for p in points], marker="o", label=case)
        for axis, label in ((cost, "µs per message"), (size, "bytes on the wire")):
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(x_key)
            axis.set_ylabel(label)
            axis.grid(visible=True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle(title)
        figure.tight_layout()
        target = folder / name
        figure.savefig(target, dpi=110)
        plt.close(figure)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="cost and size growth curves")
    parser.add_argument("--json", help="output file (default benchmarks/results/growth.json)")
    parser.add_argument("--plots", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = {"sizes": size_series(folder, options.rounds), "fields": field_series(folder, options.rounds)}
    print("written to", _harness.write("growth", data, options.json))
    for path in plot(data, Path(options.plots)):
        print("plot:", path)
    return data


if __name__ == "__main__":
    main()
