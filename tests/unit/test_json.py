"""Plain-JSON decoding reads every document exactly as ``json.loads`` does, whichever decoder ran."""

from __future__ import annotations

import json

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
