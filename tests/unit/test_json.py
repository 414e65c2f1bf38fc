"""Plain JSON reads and writes exactly as the standard library does, whichever library ran."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_pii import _json

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # any size: beyond 64 bits orjson would read a float
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
VALUES = st.recursive(
    SCALARS, lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=30
)


def _same(document):
    """``_json.loads`` and ``json.loads`` agree: the same value, or both refuse."""
    try:
        expected = json.loads(document)
    except (ValueError, RecursionError) as error:
        with pytest.raises(type(error)):
            _json.loads(document)
        return
    got = _json.loads(document)
    # Dumping both tells 1 from 1.0 and True from 1, and compares NaN with NaN.
    assert json.dumps(got) == json.dumps(expected)


@settings(max_examples=400)
@given(VALUES, st.booleans())
def test_every_value_reads_back_as_the_standard_library_reads_it(value, ascii_only):
    _same(json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":")).encode("utf-8", "surrogatepass"))


@settings(max_examples=400)
@given(
    st.binary(max_size=64)
    | st.text(alphabet='[]{}",:0123456789.eE-+ \\ntrufalsNI', max_size=64).map(str.encode)
)
def test_any_bytes_read_or_fail_as_the_standard_library_does(document):
    _same(document)


@pytest.mark.parametrize(
    "document",
    [
        b"[123456789012345678901234567890]",
        b"[-9223372036854775809]",
        b"[18446744073709551616]",
        b"[NaN, Infinity, -Infinity]",
        b"[1e400]",
        b'["\\ud800"]',
        b"\xef\xbb\xbf[1]",
        b'{"a": 1, "a": 2}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_what_orjson_reads_differently_or_refuses(document):
    """Big integers stay integers; NaN, lone surrogates, a BOM and deep nesting read as before."""
    _same(document)


def test_orjson_reads_plain_documents_when_installed(monkeypatch):
    """With the ``fast`` extra (installed for the tests), plain documents never reach json.loads."""
    pytest.importorskip("orjson")

    def standard_library(document):
        raise AssertionError("json.loads was used")

    monkeypatch.setattr(_json.json, "loads", standard_library)
    assert _json.loads(b'{"card_number":"4111 1111 1111 1111","amount":10.5,"items":[1,2]}') == {
        "card_number": "4111 1111 1111 1111",
        "amount": 10.5,
        "items": [1, 2],
    }


# -- writing ----------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    LARGE = 3


class Label(str):
    __slots__ = ()


class Renamed(dict):
    """A dict subclass the standard library writes through its overridden items()."""

    def items(self):
        return [("renamed", 1)]


@dataclasses.dataclass
class Point:
    x: int


# What orjson writes natively but the standard library refuses or writes otherwise.
ODD_SCALARS = st.sampled_from(
    [
        uuid.UUID(int=7),
        Colour.RED,
        Size.LARGE,
        Label("gold"),
        Renamed(a=1),
        collections.OrderedDict(b=2),
        Point(1),
        dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        dt.date(2026, 1, 2),
        decimal.Decimal("9.99"),
        b"bytes",
        float("nan"),
        float("inf"),
        -0.0,
        2**64,
        -(2**63) - 1,
        "\ud800",
    ]
)
WRITABLE = st.recursive(
    SCALARS | ODD_SCALARS,
    lambda children: (
        st.lists(children)
        | st.lists(children).map(tuple)
        | st.dictionaries(st.text(), children)
        | st.dictionaries(st.integers(), children)
    ),
    max_leaves=20,
)


def _written_alike(value, ensure_ascii):
    """``_json.dumps`` reads back as the standard library's encoding, or raises what it raises."""
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=ensure_ascii).encode
    try:
        expected = encode(value).encode()
    except UnicodeEncodeError:  # a lone surrogate UTF-8 cannot carry: written escaped, read back the same
        expected = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode(value).encode()
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error)):
            _json.dumps(value, ensure_ascii=ensure_ascii)
        return
    got = _json.dumps(value, ensure_ascii=ensure_ascii)
    assert json.dumps(json.loads(got)) == json.dumps(json.loads(expected))


@settings(max_examples=500)
@given(WRITABLE, st.booleans())
def test_every_value_is_written_as_the_standard_library_writes_it(value, ensure_ascii):
    _written_alike(value, ensure_ascii)


@pytest.mark.parametrize(
    "value",
    [
        [uuid.UUID(int=7)],  # orjson: a plain string
        {"colour": Colour.RED},  # orjson: the enum's value
        [float("nan"), float("inf")],  # orjson: null
        [Renamed(a=1)],  # orjson: the dict's storage, not its items()
        [Size.LARGE, Label("x")],
        [dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)],
        [Point(1)],
        [2**64],
        {1: "integer key"},
        [-0.0],
        ("a", ("tuple",)),
    ],
)
def test_what_orjson_writes_differently_or_refuses(value):
    """UUIDs, enums, NaN, subclasses, datetimes and the like get the standard library's treatment."""
    _written_alike(value, ensure_ascii=True)
    _written_alike(value, ensure_ascii=False)


@pytest.mark.parametrize(
    "value",
    [
        [2**63, 2**64 - 1, -(2**63)],  # orjson's integer limits, written exactly
        [2**64, 1],  # beyond them: orjson refuses, the standard library writes
        [-(2**63) - 1],
        ["\ud800", "ok"],  # a lone surrogate: orjson refuses
        [1e308, -1e308, 5e-324, -0.0, 0.1],
        [float("nan"), 1],
        [float("-inf")],
        [True, False, None, 0, ""],
        [Label("gold"), "plain"],  # a str subclass: not written without the read-back
        [Size.LARGE, 1],
    ],
)
def test_flat_values_at_the_limits_of_orjson(value):
    """Lists of scalars (most PII values) skip orjson's read-back: what it writes must still be right."""
    _written_alike(value, ensure_ascii=True)
    _written_alike(value, ensure_ascii=False)
    data, by_orjson = _json.encode(value)
    if by_orjson:  # what the envelope then reads with orjson directly
        assert json.dumps(_json.read_own(data)) == json.dumps(json.loads(data))


@settings(max_examples=500)
@given(st.lists(SCALARS, max_size=6))
def test_flat_values_read_back_exactly_as_written(values):
    """Property: a list of scalars that orjson wrote (unchecked) reads back as the very same values.

    The envelope reads such documents with orjson directly, so this is what
    skipping the read-back relies on.
    """
    data, by_orjson = _json.encode(values)
    read = _json.read_own(data) if by_orjson else json.loads(data)
    # Dumping tells 1 from 1.0 and True from 1; NaN and infinities dump as themselves.
    assert json.dumps(read) == json.dumps(values)
    assert [type(value) for value in read] == [type(value) for value in values]


def test_orjson_writes_plain_documents_when_installed(monkeypatch):
    """With the ``fast`` extra, a plain document never reaches the standard library's encoder."""
    pytest.importorskip("orjson")

    def standard_library(value):
        raise AssertionError("the standard library's encoder was used")

    monkeypatch.setattr(_json, "_ascii_dumps", standard_library)
    document = [["4111 1111 1111 1111", 10.5, {"email": "ann@example.com"}], {}, {"chain": None}]
    assert json.loads(_json.dumps(document)) == document


@settings(max_examples=200)
@given(WRITABLE)
def test_without_orjson_the_standard_library_writes_and_reads(value):
    """Without the ``fast`` extra, both directions are exactly the standard library's."""
    encode = json.JSONEncoder(separators=(",", ":")).encode
    original = _json.orjson
    _json.orjson = None  # as if the extra were not installed (hypothesis cannot take monkeypatch)
    try:
        try:
            expected = encode(value).encode()
        except (TypeError, ValueError) as error:
            with pytest.raises(type(error)):
                _json.dumps(value)
            return
        assert _json.dumps(value) == expected
        assert json.dumps(_json.loads(expected)) == json.dumps(json.loads(expected))
    finally:
        _json.orjson = original


@pytest.mark.parametrize(
    ("value", "may_collide"),
    [
        (
            {"a": [1, (2, 3)], "b": {"c": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}},
            False,
        ),  # every key a str
        ({"a": collections.OrderedDict(b=1)}, False),
        ({"a": [{1: "x"}]}, True),  # a key that is not a str, deep inside
        ({"a": {None: "x"}}, True),
        ({"big": 2**70}, True),  # orjson refuses it too: the caller looks, and finds nothing
    ],
)
def test_keys_may_collide_only_where_a_key_is_not_a_str(value, may_collide):
    """Told by orjson in C, where the standard library wrote: a walk in Python cost twice the encoding."""
    pytest.importorskip("orjson")
    assert _json.keys_may_collide(value) is may_collide


def test_without_orjson_keys_are_not_looked_at(monkeypatch):
    """Without the ``fast`` extra: not told cheaply, not checked (as plain Celery: the last key wins)."""
    monkeypatch.setattr(_json, "orjson", None)
    assert _json.keys_may_collide({1: "x", "1": "y"}) is False
