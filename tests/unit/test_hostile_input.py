"""Hostile input: whatever a broker, a result backend or a config file hands celery-pii.

Every reader of bytes an attacker may control is held to one contract: it
returns a value or raises the library's one exception for the case
(``DecryptionFailed`` for message bytes and envelopes, kombu's ``DecodeError``
around it, ``ConfigurationError`` for field paths), never anything else, and
never runs for long.  Property tests throw random and structured garbage at
each reader; deterministic cases pin the nastiest shapes (deep nesting, a
million locations, downgrades, envelopes moved to another task or field).

Timing checks compare growth ratios, never absolute durations, so a slow
machine cannot make them fail; a hang is caught by the timeout markers.

The decoder of the ``pii`` content type is registered with kombu only for the
duration of this module and kombu's registry is restored afterwards, so the
registration ``setup_pii()`` makes is left as it was.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import itertools
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import serialization
from kombu.exceptions import DecodeError

from celery_pii import _envelope
from celery_pii._crypto import NONCE_SIZE, TAG_SIZE, Algorithm, DataKey
from celery_pii._detect import (
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_LEAVES,
    detect_with_status,
)
from celery_pii._envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_LOCATION_DEPTH,
    MAX_LOCATIONS,
    Envelope,
    Kind,
    parse,
    seal,
)
from celery_pii._paths import MAX_PATH_LENGTH, MAX_PATH_PARTS, parse_path
from celery_pii._sealer import Sealer
from celery_pii._serializer import CONTENT_ENCODING, CONTENT_TYPE, FRAME_VERSION, PIISerializer
from celery_pii.exceptions import ConfigurationError, DecryptionFailed, KeyNotFound

ROOT = Path(__file__).resolve().parents[2]

MATERIAL = bytes(range(32))
KEY = DataKey("orders", 2, Algorithm.AES_256_GCM, MATERIAL)
TASK = "shop.charge"
TASK_ID = "3f1c9d2e-0b7a-4c51-9e2d-6a8b1f0c7d44"
LOCATIONS = (("kwargs", "card_number"), ("kwargs", "customer", "email"))
VALUES = ["4111 1111 1111 1111", "ann@example.com"]

SERIALIZER = PIISerializer("json")
FUZZ_NAME = "pii-hostile-input"  # a name of its own: setup_pii's "pii" entry is not touched

# Every example is small (explicit size bounds below) and takes microseconds;
# the deadline is generous so a loaded CI machine does not trip it, yet a
# pathological slowdown still does.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=1),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def _valid_token(**overrides: Any) -> str:
    options: dict[str, Any] = {"locations": LOCATIONS, "task_name": TASK, "task_id": TASK_ID}
    options.update(overrides)
    values = options.pop("values", VALUES)
    return seal(options.pop("key", KEY), values, **options)


def _raw(token: str) -> bytes:
    return base64.b64decode(token)


def _token(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _build(
    *,
    version: int = 1,
    flags: int = 0,
    algorithm: int = 1,
    key_version: int = 2,
    key_id: bytes = b"orders",
    task_id: bytes = TASK_ID.encode(),
    where: bytes = b'[["kwargs","card_number"]]',
    where_len: int | None = None,
    tail: bytes = bytes(NONCE_SIZE + TAG_SIZE),
) -> bytes:
    """Envelope bytes assembled field by field (no encryption), for parser tests."""
    return b"".join(
        (
            struct.pack(">BBBI", version, flags, algorithm, key_version),
            bytes((len(key_id),)),
            key_id,
            bytes((len(task_id),)),
            task_id,
            struct.pack(">I", len(where) if where_len is None else where_len),
            where,
            tail,
        )
    )


def _split(raw: bytes) -> dict[str, Any]:
    """The fields of a well-formed envelope's bytes (the inverse of :func:`_build`)."""
    version, flags, algorithm, key_version = struct.unpack_from(">BBBI", raw, 0)
    pos = 7
    key_id = raw[pos + 1 : pos + 1 + raw[pos]]
    pos += 1 + raw[pos]
    task_id = raw[pos + 1 : pos + 1 + raw[pos]]
    pos += 1 + raw[pos]
    (where_len,) = struct.unpack_from(">I", raw, pos)
    pos += 4
    return {
        "version": version,
        "flags": flags,
        "algorithm": algorithm,
        "key_version": key_version,
        "key_id": key_id,
        "task_id": task_id,
        "where": raw[pos : pos + where_len],
        "tail": raw[pos + where_len :],
    }


def _parse_or_refuse(token: object) -> Envelope | None:
    """Parse; ``None`` when refused.  Any exception but DecryptionFailed fails the test."""
    try:
        envelope = parse(token)
    except DecryptionFailed:
        return None
    # What the parser lets through keeps its documented bounds.
    assert envelope.key_id
    assert len(envelope.locations) <= MAX_LOCATIONS
    for location in envelope.locations:
        assert 0 < len(location) <= MAX_LOCATION_DEPTH
        assert all(isinstance(p, str) or (type(p) is int and p >= 0) for p in location)
    assert len(envelope.sealed) >= NONCE_SIZE + TAG_SIZE
    return envelope


def _assert_never_opens(envelope: Envelope, task_name: str = TASK) -> None:
    """Neither our key nor a key with the id, version and algorithm the header claims opens it."""
    with pytest.raises(DecryptionFailed):
        envelope.open(KEY, task_name=task_name)
    claimed = DataKey(envelope.key_id, envelope.key_version, envelope.algorithm, MATERIAL)
    with pytest.raises(DecryptionFailed):
        envelope.open(claimed, task_name=task_name)


def _loads_or_refuse(data: bytes | str) -> None:
    try:
        SERIALIZER.loads(data)
    except DecryptionFailed as error:
        message = str(error)
    else:
        return
    assert message == DecryptionFailed.MESSAGE  # one fixed message, never the input


def _per_call(fun: Callable[[Any], object], arg: object) -> float:
    """Best-of-three seconds per call of ``fun(arg)``, each batch long enough to time."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fun(arg)
        if time.perf_counter() - start >= 0.005:
            break
        calls *= 2
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fun(arg)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


# -- the serializer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kombu_pii() -> Iterator[Callable[[Any], Any]]:
    """Decode through kombu's registry exactly as a consumer does, then restore the registry."""
    registry = serialization.registry
    saved = (
        dict(registry._encoders),
        dict(registry._decoders),
        dict(registry.type_to_name),
        dict(registry.name_to_type),
    )
    serialization.register(
        FUZZ_NAME, SERIALIZER.dumps, SERIALIZER.loads, content_type=CONTENT_TYPE, content_encoding="binary"
    )

    def loads(data: Any) -> Any:
        return serialization.loads(data, CONTENT_TYPE, CONTENT_ENCODING, accept={CONTENT_TYPE})

    try:
        yield loads
    finally:
        for live, copy in zip(
            (registry._encoders, registry._decoders, registry.type_to_name, registry.name_to_type),
            saved,
            strict=True,
        ):
            live.clear()
            live.update(copy)


def _frame(codec: bytes, body: bytes) -> bytes:
    return bytes((FRAME_VERSION,)) + codec + body


def _truncations(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, max(len(data) - 1, 0)).map(lambda n: data[:n])


_codecs = st.sampled_from([b"o", b"j", b"k", b"m"])
_prefixed = st.builds(_frame, _codecs, st.binary(max_size=2048))
_json_frames = st.builds(
    _frame, st.sampled_from([b"o", b"j"]), json_values.map(lambda v: json.dumps(v).encode())
)
_msgpack_frames = json_values.map(lambda v: _frame(b"m", msgpack.packb(v, use_bin_type=True)))
_truncated = st.one_of(_json_frames, _msgpack_frames).flatmap(_truncations)


@st.composite
def _mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.one_of(_json_frames, _msgpack_frames)))
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(frame) - 1))
        frame[index] = draw(st.integers(0, 255))
    return bytes(frame)


hostile_frames = st.one_of(st.binary(max_size=2048), _prefixed, _truncated, _mutated_frames())

# Frames that must be refused, whatever the codec: malformed, or built to
# exhaust the decoder (recursion, claimed sizes far beyond the input).
REFUSED_FRAMES = [
    pytest.param(b"\x01", id="no-codec"),
    pytest.param(b"\x01j", id="empty-json"),
    pytest.param(b"\x00j[]", id="frame-version-0"),
    pytest.param(b"\x02j[]", id="frame-version-2"),
    pytest.param(b"\xffj[]", id="frame-version-255"),
    pytest.param(b"\x01x[]", id="unknown-codec"),
    pytest.param(b"\x01J[]", id="codec-case"),
    pytest.param(b"\x01j" + b"[" * 100_000, id="json-deep-open-brackets"),
    pytest.param(b"\x01j" + b"[" * 100_000 + b"]" * 100_000, id="json-deep-balanced"),
    pytest.param(b"\x01j" + b'{"a":' * 100_000, id="json-deep-objects"),
    pytest.param(b"\x01o", id="empty-orjson"),
    pytest.param(b"\x01o" + b"[" * 100_000 + b"]" * 100_000, id="orjson-deep-balanced"),
    pytest.param(b"\x01o" + b'{"a":' * 100_000, id="orjson-deep-objects"),
    pytest.param(b"\x01o\xff\xfe[]", id="orjson-bad-utf8"),
    pytest.param(b"\x01o[1,]", id="orjson-trailing-comma"),
    pytest.param(b"\x01k" + b"[" * 100_000 + b"]" * 100_000, id="typed-json-deep"),
    pytest.param(b"\x01k" + b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="typed-json-deep-objects"),
    pytest.param(b"\x01m" + b"\x91" * 100_000 + b"\xc0", id="msgpack-deep-arrays"),
    pytest.param(b"\x01m" + b"\x81\xa1a" * 100_000 + b"\xc0", id="msgpack-deep-maps"),
    pytest.param(b"\x01m\xdd\xff\xff\xff\xff", id="msgpack-array-claims-4g"),
    pytest.param(b"\x01m\xdf\xff\xff\xff\xff", id="msgpack-map-claims-4g"),
    pytest.param(b"\x01m\xdb\xff\xff\xff\xff", id="msgpack-str-claims-4g"),
    pytest.param(b"\x01m\xc6\xff\xff\xff\xff", id="msgpack-bin-claims-4g"),
    pytest.param(b"\x01m\xc9\xff\xff\xff\xff\x01", id="msgpack-ext-claims-4g"),
    pytest.param(b"\x01m\xc1", id="msgpack-reserved-byte"),
    pytest.param(b"\x01m\x81\x90\xc0", id="msgpack-list-as-map-key"),
    pytest.param(b"\x01m\xc7\x05\xff" + bytes(5), id="msgpack-bad-timestamp"),
    pytest.param(b"\x01m\x90\x90", id="msgpack-trailing-data"),
    pytest.param(b"\x01j\xff\xfe[]", id="json-bad-utf8"),
    pytest.param(b"\x01j" + b"1" * 5000, id="json-int-too-many-digits"),
    pytest.param(b"\x01j[1,]", id="json-trailing-comma"),
    pytest.param(b'\x01k{"__type__":"nope","__value__":1}', id="typed-unknown-type"),
    pytest.param(b'\x01k{"__type__":"datetime","__value__":"x"}', id="typed-bad-datetime"),
    pytest.param(b'\x01k{"__type__":"datetime","__value__":5}', id="typed-datetime-int"),
    pytest.param(b'\x01k{"__type__":"time","__value__":"25:00"}', id="typed-bad-time"),
    pytest.param(b'\x01k{"__type__":"uuid","__value__":{"hex":"zz"}}', id="typed-bad-uuid"),
    pytest.param(b'\x01k{"__type__":"uuid","__value__":5}', id="typed-uuid-not-a-mapping"),
    pytest.param(b'\x01k{"__type__":"base64","__value__":"A"}', id="typed-bad-base64"),
    pytest.param(b'\x01k{"__type__":"decimal","__value__":{}}', id="typed-decimal-dict"),
]

# Found by this module (and fixed): kombu's typed-JSON decoders raise
# AttributeError or decimal.InvalidOperation on well-formed JSON carrying a
# wrong value type; loads() must turn those into DecryptionFailed.
TYPED_JSON_ESCAPES = [
    pytest.param(b'\x01k{"__type__":"bytes","__value__":5}', id="typed-bytes-int"),
    pytest.param(b'\x01k{"__type__":"base64","__value__":[]}', id="typed-base64-list"),
    pytest.param(b'\x01k{"__type__":"uuid","__value__":{"hex":5}}', id="typed-uuid-hex-int"),
    pytest.param(b'\x01k{"__type__":"decimal","__value__":"x"}', id="typed-decimal-garbage"),
    pytest.param(b'\x01k[{"__type__":"bytes","__value__":null}]', id="typed-bytes-null-nested"),
]


class TestSerializerLoads:
    """The ``pii`` serializer's ``loads`` on bytes from the broker or the result backend."""

    @FUZZ
    @given(hostile_frames)
    def test_arbitrary_frames_raise_only_decryption_failed(self, data):
        """Random, truncated and mutated frames decode or raise DecryptionFailed, nothing else."""
        _loads_or_refuse(data)

    @FUZZ
    @given(hostile_frames)
    def test_through_kombu_only_decode_error(self, kombu_pii, data):
        """Through kombu's registry, the same frames decode or raise DecodeError."""
        with contextlib.suppress(DecodeError):
            kombu_pii(data)

    @FUZZ
    @given(st.integers(0, 255).filter(lambda v: v != FRAME_VERSION), _codecs, json_values)
    def test_other_frame_versions_are_refused(self, version, codec, value):
        """A frame version other than 1 (a downgrade or a future format) is refused."""
        body = json.dumps(value).encode() if codec != b"m" else msgpack.packb(value)
        with pytest.raises(DecryptionFailed):
            SERIALIZER.loads(bytes((version,)) + codec + body)

    @FUZZ
    @given(st.binary(max_size=256))
    def test_str_input_with_escaped_bytes(self, data):
        """Text bodies (some transports hand over str) are read as their surrogate-escaped bytes."""
        _loads_or_refuse(data.decode("utf-8", "surrogateescape"))

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("data", REFUSED_FRAMES)
    def test_adversarial_frames_are_refused(self, kombu_pii, data):
        """Deep nesting, oversized claims and malformed codecs raise DecryptionFailed / DecodeError."""
        with pytest.raises(DecryptionFailed) as caught:
            SERIALIZER.loads(data)
        assert str(caught.value) == DecryptionFailed.MESSAGE
        with pytest.raises(DecodeError) as wrapped:
            kombu_pii(data)
        assert isinstance(wrapped.value.__context__, DecryptionFailed)

    def test_deep_nesting_is_refused_in_linear_time(self):
        """Refusing nesting 10x deeper takes far less than 100x longer (no quadratic blow-up)."""

        def refuse(data: bytes) -> None:
            with pytest.raises(DecryptionFailed):
                SERIALIZER.loads(data)

        small = _per_call(refuse, b"\x01j" + b"[" * 10_000)
        large = _per_call(refuse, b"\x01j" + b"[" * 100_000)
        assert large < 50 * small

    def test_non_ascii_json_and_special_floats_decode(self):
        """Legal oddities are not errors: lone-surrogate escapes, NaN and Infinity decode."""
        assert SERIALIZER.loads(b'\x01j"\\ud800"') == "\ud800"
        assert math.isnan(SERIALIZER.loads(b"\x01jNaN"))
        assert SERIALIZER.loads(b"\x01j-Infinity") == -math.inf

    def test_empty_body_never_reaches_the_decoder(self, kombu_pii):
        """kombu hands an empty body back unchanged (it never calls our decoder): pinned here."""
        assert kombu_pii(b"") == b""
        with pytest.raises(DecryptionFailed):
            SERIALIZER.loads(b"")

    @pytest.mark.parametrize("data", TYPED_JSON_ESCAPES)
    def test_typed_json_with_wrong_value_types_is_refused(self, data):
        """Typed-JSON wrappers carrying a value of the wrong type raise DecryptionFailed."""
        with pytest.raises(DecryptionFailed):
            SERIALIZER.loads(data)

    @pytest.mark.parametrize("data", TYPED_JSON_ESCAPES)
    def test_typed_json_with_wrong_value_types_through_kombu(self, kombu_pii, data):
        """Through kombu those same frames still arrive as DecodeError (the consumer's contract)."""
        with pytest.raises(DecodeError):
            kombu_pii(data)

    @settings(FUZZ, max_examples=200, derandomize=True, report_multiple_bugs=False)
    @given(
        st.builds(
            lambda kind, value: {"__type__": kind, "__value__": value},
            st.sampled_from(["bytes", "base64", "datetime", "date", "time", "decimal", "uuid", "nope"]),
            json_values | st.dictionaries(st.sampled_from(["hex", "int", "bytes"]), json_values),
        )
    )
    def test_typed_json_wrappers_raise_only_decryption_failed(self, wrapper):
        """Any typed-JSON wrapper decodes or raises DecryptionFailed."""
        _loads_or_refuse(_frame(b"k", json.dumps([wrapper]).encode()))

    def test_str_input_with_lone_surrogate_is_refused(self):
        """A str body holding a lone surrogate raises DecryptionFailed."""
        with pytest.raises(DecryptionFailed):
            SERIALIZER.loads("\x01j\ud800")

    def test_str_input_with_lone_surrogate_through_kombu(self, kombu_pii):
        """Through kombu that str body arrives as DecodeError."""
        with pytest.raises(DecodeError):
            kombu_pii("\x01j\ud800")


# -- the envelope parser -------------------------------------------------------------------------


@st.composite
def _structured_envelopes(draw: st.DrawFn) -> bytes:
    """Header fields that are each plausible, and often mutually inconsistent."""
    where = draw(
        st.one_of(
            json_values.map(lambda v: json.dumps(v).encode()),
            st.lists(
                st.lists(st.one_of(st.text(max_size=5), st.integers(-2, 9)), max_size=4), max_size=6
            ).map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=64),
        )
    )
    raw = _build(
        version=draw(st.sampled_from([0, 1, 1, 1, 2, 255])),
        flags=draw(st.integers(0, 255)),
        algorithm=draw(st.integers(0, 4)),
        key_version=draw(st.integers(0, 2**32 - 1)),
        key_id=draw(st.binary(max_size=12) | st.just(b"orders")),
        task_id=draw(st.binary(max_size=40) | st.just(TASK_ID.encode())),
        where=where,
        where_len=draw(st.none() | st.integers(0, 2**32 - 1)),
        tail=draw(st.binary(max_size=64)),
    )
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


@st.composite
def _mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with bytes flipped, inserted, deleted, or cut off: always different from ``raw``."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate", "extend"]))
        if op == "flip" and data:
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data.insert(draw(st.integers(0, len(data))), draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[draw(st.integers(0, len(data) - 1))]
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    if bytes(data) == raw:  # the operations cancelled out: change one byte for sure
        data = bytearray(raw)
        data[0] ^= 0xFF
    return bytes(data)


VALID = _valid_token()
VALID_RAW = _raw(VALID)

arbitrary_objects = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=256),
    st.binary(max_size=256).map(bytearray),
    st.lists(st.text(max_size=8), max_size=4),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    st.just(VALID_RAW),
    st.just(VALID.encode()),
    st.just(memoryview(VALID_RAW)),
)


class TestEnvelopeParse:
    """``_envelope.parse`` on tokens from message bodies and stored results."""

    @FUZZ
    @given(arbitrary_objects)
    def test_non_text_is_refused(self, token):
        """Anything but a str (bytes of a valid envelope included) is refused."""
        with pytest.raises(DecryptionFailed):
            parse(token)

    @FUZZ
    @given(st.text(max_size=512))
    def test_arbitrary_text_raises_only_decryption_failed(self, token):
        """Arbitrary text (unicode, NULs, whitespace) parses or raises DecryptionFailed."""
        _parse_or_refuse(token)

    @FUZZ
    @given(st.one_of(st.binary(max_size=512), _structured_envelopes()))
    def test_arbitrary_bytes_raise_only_decryption_failed(self, raw):
        """Base64 of random bytes or of inconsistent header fields parses or raises DecryptionFailed."""
        envelope = _parse_or_refuse(_token(raw))
        if envelope is not None:
            _assert_never_opens(envelope)

    @FUZZ
    @given(_mutations(VALID_RAW))
    def test_mutated_envelopes_never_open(self, raw):
        """Any change to a valid envelope's bytes is refused by parse or by open, with DecryptionFailed."""
        envelope = _parse_or_refuse(_token(raw))
        if envelope is not None:
            _assert_never_opens(envelope)

    @FUZZ
    @given(st.integers(0, len(VALID) - 1), st.sampled_from("AQgw/+=Z9a \n\x00é"))
    def test_mutated_text_never_opens_other_bytes(self, index, char):
        """A changed character is refused unless it decodes to the very same bytes.

        Base64 decoding ignores the unused low bits of the last character, so
        ``...Ig=`` and ``...Ih=`` can both decode to the same envelope: only
        then may the token still open, to the same values.
        """
        token = VALID[:index] + char + VALID[index + 1 :]
        envelope = _parse_or_refuse(token)
        if envelope is None:
            return
        if bytes(envelope.header) + bytes(envelope.sealed) == VALID_RAW:
            assert envelope.open(KEY, task_name=TASK) == VALUES
        else:
            _assert_never_opens(envelope)

    @pytest.mark.timeout(60)
    def test_oversized_token_is_refused_before_decoding(self):
        """A token longer than the base64 of MAX_ENVELOPE_BYTES is refused without decoding it."""
        limit = MAX_ENVELOPE_BYTES * 4 // 3 + 4
        oversized = "A" * (limit + 4)
        started = time.perf_counter()
        with pytest.raises(DecryptionFailed):
            parse(oversized)
        refused_in = time.perf_counter() - started
        decoded_in = _per_call(base64.b64decode, "A" * 4096) * (limit // 4096)
        assert refused_in < decoded_in  # it did not even look at the bytes
        with pytest.raises(DecryptionFailed):  # at the limit: decoded, and refused (version 0)
            parse("A" * (limit - limit % 4))

    @pytest.mark.parametrize(
        ("version", "flags"),
        [(0, 0), (2, 0), (255, 0), (1, 0x10), (1, 0x80)],
        ids=["version-0", "version-2", "version-255", "unknown-flag-16", "unknown-flag-128"],
    )
    def test_other_versions_and_flags_are_refused(self, version, flags):
        """A valid envelope relabelled with another version or an unknown flag is refused (no downgrade)."""
        fields = _split(VALID_RAW)
        fields.update(version=version, flags=flags)
        with pytest.raises(DecryptionFailed):
            parse(_token(_build(**fields)))

    @pytest.mark.parametrize(
        ("key_id", "key_version"),
        [
            (b"orders\x00", 2),
            (b"or ders", 2),
            (b"-orders", 2),
            (b"o" * 161, 2),
            (b"orders", 2**31),
            (b"orders", 2**32 - 1),
        ],
        ids=["nul", "space", "leading-dash", "too-long", "version-2**31", "version-2**32-1"],
    )
    def test_key_ids_and_versions_no_store_holds_are_refused(self, key_id, key_version):
        """A key id or version that cannot name a stored key is refused before any key is asked for.

        On PostgreSQL a NUL byte or a version beyond the column would fail in
        the database with a raw error (and escape quarantine).
        """
        asked = []
        token = _token(_build(key_id=key_id, key_version=key_version))
        with pytest.raises(DecryptionFailed):
            parse(token)
        with pytest.raises(DecryptionFailed):
            _envelope.open_task(token, task_id=TASK_ID, task_name="t", key_for=lambda *key: asked.append(key))
        assert asked == []

    @pytest.mark.parametrize(
        "where",
        [
            pytest.param(b"[" * 100_000, id="open-brackets"),
            pytest.param(b"[" * 100_000 + b"]" * 100_000, id="balanced-100k"),
            pytest.param(b"[[" + b'"a",' * MAX_LOCATION_DEPTH + b'"a"]]', id="one-too-deep"),
            pytest.param(b"[[[0]]]", id="nested-list-part"),
            pytest.param(b"[[]]", id="empty-location"),
            pytest.param(b"[[-1]]", id="negative-index"),
            pytest.param(b"[[true]]", id="bool-part"),
            pytest.param(b"[[1.0]]", id="float-part"),
            pytest.param(b"[[null]]", id="null-part"),
            pytest.param(b'[[{"a":1}]]', id="dict-part"),
            pytest.param(b'[["a"],"b"]', id="bare-string-location"),
            pytest.param(b'{"a":1}', id="not-a-list"),
            pytest.param(b"[[" + b"9" * 5000 + b"]]", id="int-too-many-digits"),
            pytest.param(b"[[0]", id="unterminated"),
            pytest.param(b"\xff\xfe[[0]]", id="bad-encoding"),
            pytest.param(b"", id="empty"),
        ],
    )
    @pytest.mark.timeout(60)
    def test_malformed_locations_are_refused(self, where):
        """Location lists that are not lists of 1..64 str / non-negative int parts are refused."""
        with pytest.raises(DecryptionFailed):
            parse(_token(_build(where=where)))

    def test_location_depth_limit_is_inclusive(self):
        """A location of exactly MAX_LOCATION_DEPTH parts parses."""
        where = json.dumps([["a"] * MAX_LOCATION_DEPTH]).encode()
        assert len(parse(_token(_build(where=where))).locations[0]) == MAX_LOCATION_DEPTH

    @pytest.mark.parametrize("where_len", [0, 1, 2**31, 2**32 - 1])
    def test_lying_locations_length_is_refused(self, where_len):
        """A locations length that does not match the bytes that follow is refused."""
        with pytest.raises(DecryptionFailed):
            parse(_token(_build(where=b"[[0]]", where_len=where_len, tail=b"")))

    @pytest.mark.timeout(120)
    def test_a_million_locations_linear_and_one_more_refused(self):
        """MAX_LOCATIONS locations parse in linear time; one more is refused."""

        def token(count: int) -> str:
            return _token(_build(where=b"[" + b",".join([b"[0]"] * count) + b"]"))

        small, large, over = token(MAX_LOCATIONS // 10), token(MAX_LOCATIONS), token(MAX_LOCATIONS + 1)
        started = time.perf_counter()
        assert len(parse(small).locations) == MAX_LOCATIONS // 10
        small_time = time.perf_counter() - started
        started = time.perf_counter()
        assert len(parse(large).locations) == MAX_LOCATIONS
        large_time = time.perf_counter() - started
        assert large_time < 50 * small_time  # linear is ~10x; quadratic would be ~100x
        with pytest.raises(DecryptionFailed):
            parse(over)


# -- moving, replaying and downgrading sealed values ---------------------------------------------


class _Keys:
    """The one method of KeyManager that opening a message needs."""

    def decryption_key(self, key_id: str, version: int) -> DataKey:
        if (key_id, version) != (KEY.key_id, KEY.version):
            raise KeyNotFound(key_id)
        return KEY


def _sealer() -> Sealer:
    return Sealer(_Keys(), None, lambda _name: (False, None))


def _root() -> dict[str, Any]:
    return {"args": [], "kwargs": {"card_number": "[pii:sealed]", "customer": {"email": "[pii:sealed]"}}}


def _rebuilt(token: str, **fields: Any) -> Envelope:
    """The envelope of ``token`` with some header fields replaced (ciphertext kept)."""
    parts = _split(_raw(token))
    parts.update(fields)
    return parse(_token(_build(**parts)))


class TestReplayAndMove:
    """A sealed value opens only for the task, id, fields, key and format it was sealed for."""

    def test_valid_envelope_opens(self):
        """The control: unmodified, it opens, also through the sealer."""
        assert parse(VALID).open(KEY, task_name=TASK) == VALUES
        root = _root()
        _sealer().open_message(TASK, TASK_ID, root, [VALID])
        assert root["kwargs"] == {"card_number": VALUES[0], "customer": {"email": VALUES[1]}}

    @pytest.mark.parametrize(
        "task_name", ["shop.refund", "shop.charge ", "Shop.charge", "", "celery-pii result"]
    )
    def test_other_task_name(self, task_name):
        """An envelope replayed into another task fails to open."""
        with pytest.raises(DecryptionFailed):
            parse(VALID).open(KEY, task_name=task_name)

    @pytest.mark.parametrize("task_id", [TASK_ID[:-1] + "5", TASK_ID + "x", "", "x" * 255])
    def test_other_task_id_in_header(self, task_id):
        """Rewriting the bound task id in the header breaks authentication."""
        with pytest.raises(DecryptionFailed):
            _rebuilt(VALID, task_id=task_id.encode()).open(KEY, task_name=TASK)

    def test_other_task_id_of_message(self):
        """An intact envelope copied into a message with another task id is refused by the sealer."""
        root = _root()
        with pytest.raises(DecryptionFailed):
            _sealer().open_message(TASK, "another-id", root, [VALID])
        assert root == _root()  # nothing written

    def test_locations_swapped_with_another_envelope(self):
        """Another envelope's locations header on this ciphertext fails to open."""
        other = _valid_token(locations=(("kwargs", "ssn"), ("kwargs", "customer", "phone")))
        with pytest.raises(DecryptionFailed):
            _rebuilt(VALID, where=_split(_raw(other))["where"]).open(KEY, task_name=TASK)
        with pytest.raises(DecryptionFailed):
            _rebuilt(other, where=_split(VALID_RAW)["where"]).open(KEY, task_name=TASK)

    def test_locations_reordered(self):
        """Swapping which field gets which value fails to open."""
        where = json.dumps([list(LOCATIONS[1]), list(LOCATIONS[0])], separators=(",", ":")).encode()
        with pytest.raises(DecryptionFailed):
            _rebuilt(VALID, where=where).open(KEY, task_name=TASK)

    def test_ciphertext_spliced_into_another_header(self):
        """Another envelope's nonce, ciphertext and tag under this header fail to open."""
        other = _valid_token(values=["5500 0000 0000 0004", "bob@example.com"], task_id="other-id")
        with pytest.raises(DecryptionFailed):
            _rebuilt(VALID, tail=_split(_raw(other))["tail"]).open(KEY, task_name=TASK)

    @pytest.mark.parametrize(
        "fields",
        [
            {"flags": 0x01},  # claims compressed
            {"flags": 0x02},  # claims a result
            {"flags": 0x04},  # claims typed JSON
            {"algorithm": 2},  # claims chacha20-poly1305
            {"key_version": 3},
            {"key_version": 2 + 2**30},  # (2**31 and beyond: refused when parsed)
            {"key_id": b"orders2"},
            {"key_id": b"Orders"},
        ],
        ids=repr,
    )
    def test_relabelled_header(self, fields):
        """Changing the flags, algorithm or key named in the header fails to open, with any key."""
        _assert_never_opens(_rebuilt(VALID, **fields))

    def test_other_key_material(self):
        """The same key id and version with other material (another deployment) fails to open."""
        impostor = DataKey(KEY.key_id, KEY.version, KEY.algorithm, bytes(32))
        with pytest.raises(DecryptionFailed):
            parse(VALID).open(impostor, task_name=TASK)

    def test_envelopes_are_written_all_or_nothing(self):
        """A second envelope of this task id whose place the body lacks: not even the first is written.

        Such a pair comes from a retry and its original (both bound to one id);
        a body left half-opened would be parked in quarantine with plaintext.
        """
        elsewhere = _valid_token(locations=(("kwargs", "ssn"),), values=["900-12-3456"])
        root = _root()
        with pytest.raises(DecryptionFailed):
            _sealer().open_message(TASK, TASK_ID, root, [VALID, elsewhere])
        assert root == _root()

    def test_two_envelopes_for_one_place(self):
        """Two envelopes of this task id sealing the same places: refused (celery-pii never makes one)."""
        retried = _valid_token(values=["4242 4242 4242 4242", "bob@example.com"])
        root = _root()
        with pytest.raises(DecryptionFailed):
            _sealer().open_message(TASK, TASK_ID, root, [VALID, retried])
        assert root == _root()

    def test_result_envelope_is_not_a_task_call(self):
        """A result envelope (same key, task id) placed in a task message is refused by the sealer."""
        result = _valid_token(task_name="celery-pii result", kind=Kind.RESULT)
        with pytest.raises(DecryptionFailed):
            _sealer().open_message(TASK, TASK_ID, _root(), [result])

    @FUZZ
    @given(st.lists(st.sampled_from([VALID, _valid_token(task_id="id-2"), "", "x", None, 5]), min_size=1))
    def test_open_message_raises_only_decryption_failed(self, tokens):
        """The sealer opens a message only when every envelope belongs to it."""
        root = _root()
        try:
            _sealer().open_message(TASK, TASK_ID, root, tokens)
        except DecryptionFailed:
            assert root == _root()
        else:
            assert all(token == VALID for token in tokens)


# -- field paths ---------------------------------------------------------------------------------

GRAMMAR = st.text(alphabet='ab_-Z09.[]*"\\u\x00 é\U0001f600', max_size=80)


def _path_or_refuse(text: object) -> None:
    try:
        parts = parse_path(text)
    except ConfigurationError:
        return
    assert 0 < len(parts) <= MAX_PATH_PARTS


# Inputs that make the parser work as hard as it can, at a given length.
ADVERSARIAL_PATHS: dict[str, Callable[[int], str]] = {
    "long-name": lambda n: "a" * n,
    "unterminated-quoted-key": lambda n: '["' + "a" * n,
    "escaped-quotes": lambda n: '["' + '\\"' * (n // 2),
    "unicode-escapes": lambda n: '["' + "\\u0041" * (n // 6) + '"]',
    "open-brackets": lambda n: "a" + "[" * n,
    "dots": lambda n: "a." * (n // 2),
    "indices": lambda n: "a" + "[0]" * (n // 3),
    "name-then-nul": lambda n: "a" * n + "\x00",
    "non-ascii": lambda n: "é" * n,
}


class TestFieldPaths:
    """``parse_path`` on whatever a developer (or a pasted value) puts in ``pii_fields``."""

    @FUZZ
    @given(st.one_of(st.text(max_size=MAX_PATH_LENGTH + 64), GRAMMAR))
    def test_arbitrary_text_raises_only_configuration_error(self, text):
        """Arbitrary text, and text from the grammar's own alphabet, parses or raises ConfigurationError."""
        _path_or_refuse(text)

    @FUZZ
    @given(st.one_of(st.none(), st.integers(), st.binary(max_size=16), st.lists(st.text(max_size=4))))
    def test_non_text_is_refused(self, value):
        """Anything but a str is refused with ConfigurationError."""
        with pytest.raises(ConfigurationError):
            parse_path(value)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "a" * (MAX_PATH_LENGTH + 1),
            "a" * 1_000_000,
            "[" * 100_000,
            "a" + "[0]" * MAX_PATH_PARTS,
            "a" + "." + ".".join(["b"] * MAX_PATH_PARTS),
            "\x00",
            "a\x00",
            "a[9999999999]",
            "a[01]",
            "a[-1]",
            "a[ 0 ]",
            "a['x']",
            'a["x"',
            'a["x"]]',
            'a["x\\"]',
            "a.",
            ".a",
            "a..b",
            "a[*",
            "é",
            "a.\U0001f600",
        ],
        ids=repr,
    )
    def test_adversarial_paths_are_refused(self, text):
        """Empty, oversized, too deep, malformed and non-ASCII-name paths raise ConfigurationError."""
        with pytest.raises(ConfigurationError) as caught:
            parse_path(text, task="shop.charge")
        assert len(str(caught.value)) < 300  # the message quotes a shortened path

    def test_limits_are_inclusive(self):
        """A path of exactly MAX_PATH_PARTS parts, or of MAX_PATH_LENGTH characters, parses."""
        assert len(parse_path("a" + "[0]" * (MAX_PATH_PARTS - 1))) == MAX_PATH_PARTS
        assert parse_path("a" * MAX_PATH_LENGTH) == ("a" * MAX_PATH_LENGTH,)

    @pytest.mark.parametrize("shape", list(ADVERSARIAL_PATHS))
    def test_parse_time_grows_linearly(self, shape):
        """10x longer adversarial input takes far less than 100x longer: 100, 1k, 10k, 100k chars."""
        make = ADVERSARIAL_PATHS[shape]
        times = [_per_call(_path_or_refuse, make(n)) for n in (100, 1_000, 10_000, 100_000)]
        for shorter, longer in itertools.pairwise(times):
            assert longer < 50 * shorter, times
        assert times[-1] < 1.0, times


# -- detection ----------------------------------------------------------------------------------


def _nested(depth: int, leaf: object) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth - 1):
        child: list[Any] = []
        node.append(child)
        node = child
    node.append(leaf)
    return root


class TestDetectionCaps:
    """``pii_detect`` scans every published payload: hostile payloads hit its caps, not its limits."""

    @FUZZ
    @given(json_values)
    def test_arbitrary_values_never_raise(self, value):
        """Any JSON-like value is scanned without an exception."""
        result = detect_with_status(value)
        assert all(isinstance(f.path, str) for f in result.findings)

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(lambda: _nested(100_000, "ann@example.com"), id="nested-100k"),
            pytest.param(lambda: _nested(DEFAULT_MAX_DEPTH + 1, "ann@example.com"), id="one-too-deep"),
            pytest.param(lambda: [[]] * (DEFAULT_MAX_LEAVES + 1), id="wide"),
            pytest.param(lambda: ["x" * 1000] * (DEFAULT_MAX_CHARS // 1000 + 1), id="long-text"),
            pytest.param(lambda: "ann@example.com " * (DEFAULT_MAX_CHARS // 16 + 1), id="one-long-string"),
        ],
    )
    def test_caps_stop_the_walk_and_say_so(self, payload):
        """Depth, value count and character count are capped, and the result is marked truncated."""
        assert detect_with_status(payload()).truncated

    def test_self_reference_ends_at_the_depth_cap(self):
        """A list that contains itself ends at the depth cap instead of looping."""
        loop: list[Any] = []
        loop.append(loop)
        assert detect_with_status(loop).truncated


# -- static checks -------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("bandit") is None, reason="bandit is in the dev extra")
def test_bandit_is_clean():
    """bandit (configured in .bandit.yml) finds nothing in the package."""
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "celery_pii", "-c", ".bandit.yml", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envelope_module_bounds_are_what_the_docs_say():
    """docs/reliability.md quotes these bounds."""
    assert (MAX_ENVELOPE_BYTES, MAX_LOCATIONS, MAX_LOCATION_DEPTH) == (64 * 1024 * 1024, 1_000_000, 64)
    assert (MAX_PATH_LENGTH, MAX_PATH_PARTS) == (1024, 64)
    assert (DEFAULT_MAX_LEAVES, DEFAULT_MAX_CHARS, DEFAULT_MAX_DEPTH) == (100_000, 1_000_000, 64)
    assert _envelope.MAX_PLAINTEXT_BYTES == 64 * 1024 * 1024
