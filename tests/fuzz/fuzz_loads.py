"""Coverage-guided fuzz target (atheris) for the readers of hostile bytes.

Run it by hand for as long as you like::

    .venv/bin/python tests/fuzz/fuzz_loads.py --seeds /tmp/pii-corpus
    .venv/bin/python tests/fuzz/fuzz_loads.py /tmp/pii-corpus -max_total_time=600 \
        -artifact_prefix=/tmp/pii-fuzz-

or as the bounded smoke run of ``tests/unit/test_atheris_smoke.py``.  The
input's last byte picks a target (atheris consumes integers from the end):

0. ``PIISerializer.loads`` on raw bytes;
1. ``PIISerializer.loads`` on a frame with a valid version and codec byte;
2. ``_envelope.parse`` on arbitrary text;
3. ``_envelope.parse`` on the base64 of arbitrary bytes (reaches the header parser);
4. a valid envelope with bytes changed, parsed and opened with the right key;
5. ``_paths.parse_path`` on arbitrary text.

Allowed outcomes are a value or ``DecryptionFailed`` (0-4), a value or
``ConfigurationError`` (5).  Anything else propagates, and libFuzzer reports
it as a crash with the input that caused it.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["celery_pii"]):
    from celery_pii._crypto import Algorithm, DataKey
    from celery_pii._envelope import parse, seal
    from celery_pii._paths import parse_path
    from celery_pii._serializer import PIISerializer
    from celery_pii.exceptions import ConfigurationError, DecryptionFailed

SERIALIZER = PIISerializer("json")
KEY = DataKey("orders", 2, Algorithm.AES_256_GCM, bytes(range(32)))
TASK = "shop.charge"
VALID = base64.b64decode(
    seal(
        KEY,
        ["4111 1111 1111 1111", {"email": "ann@example.com"}],
        locations=[("kwargs", "card_number"), ("kwargs", "customer")],
        task_name=TASK,
        task_id="3f1c9d2e-0b7a-4c51-9e2d-6a8b1f0c7d44",
    )
)
CODECS = (b"o", b"j", b"k", b"m")
TARGETS = 6


def _mutated(fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(VALID)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        index = fdp.ConsumeIntInRange(0, len(data) - 1)
        data[index] ^= fdp.ConsumeIntInRange(1, 255)
    cut = fdp.ConsumeIntInRange(0, len(data))
    return bytes(data[:cut]) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))


def test_one_input(data: bytes) -> None:
    """Run one input through the target its first byte names."""
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, TARGETS - 1)
    try:
        if target == 0:
            SERIALIZER.loads(fdp.ConsumeBytes(atheris.ALL_REMAINING))
        elif target == 1:
            codec = CODECS[fdp.ConsumeIntInRange(0, len(CODECS) - 1)]
            SERIALIZER.loads(b"\x01" + codec + fdp.ConsumeBytes(atheris.ALL_REMAINING))
        elif target == 2:
            parse(fdp.ConsumeUnicode(4096))
        elif target == 3:
            parse(base64.b64encode(fdp.ConsumeBytes(atheris.ALL_REMAINING)).decode("ascii"))
        elif target == 4:
            raw = _mutated(fdp)
            envelope = parse(base64.b64encode(raw).decode("ascii"))
            envelope.open(KEY, task_name=TASK)
            msg = "a changed envelope opened"
            raise AssertionError(msg)
        else:
            try:
                parse_path(fdp.ConsumeUnicode(4096))
            except ConfigurationError:
                return
    except DecryptionFailed:
        return


def seeds() -> dict[str, bytes]:
    """A starting corpus: one well-formed input per target, so mutations start deep."""
    typed = b'{"__type__":"datetime","__value__":"2024-01-01T00:00:00"}'
    return {
        "json-frame": SERIALIZER.dumps([1, {"a": "b"}, None]) + b"\x00",
        "typed-json-frame": b"\x01k[" + typed + b"]\x00",
        "msgpack-frame": b"\x01m\x92\x01\x81\xa1a\xa1b\x00",
        "codec-json-body": json.dumps({"args": [1], "kwargs": {"x": "y"}}).encode() + b"\x00\x01",
        "text-token": b"\x00" + base64.b64encode(VALID) + b"\x02",
        "bytes-token": VALID + b"\x03",
        "mutation": b"\x01\x05\x40\x10\x20" + b"\x04",
        "field-path": b'\x00items[*].serial["x.y"][3]' + b"\x05",
    }


def main() -> None:
    """Write a seed corpus (``--seeds DIR``), or hand control to libFuzzer (-runs=, -seed=, corpus...)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--seeds":
        corpus = Path(sys.argv[2])
        corpus.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (corpus / name).write_bytes(data)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
