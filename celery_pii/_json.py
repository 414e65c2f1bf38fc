"""Plain JSON through orjson when it is installed, the standard library otherwise.

orjson (the ``fast`` extra) writes a 1 KB task body about ten times faster
than the standard library's encoder (2.5 times with the check below), and
reads it about three times faster.
Both directions must give exactly what the standard library gives, so the
result never depends on which library ran:

Reading: orjson refuses a few things ``json.loads`` accepts (NaN and Infinity,
lone surrogate escapes, a byte-order mark), and it reads an integer beyond 64
bits as a float.  A document with 19 or more digits in a row is given to
``json.loads`` without trying orjson, and so is anything orjson refuses.

Writing: orjson writes some values the standard library refuses or writes
otherwise: UUIDs and enums as their values, NaN and Infinity as ``null``,
datetimes and dataclasses natively, subclasses of ``str``/``int``/``dict``/``list``
from their built-in storage (ignoring an overridden ``items()``).  Callers rely
on the standard library refusing UUIDs, datetimes and the like, because that is
when they switch to kombu's typed JSON.  So datetimes, dataclasses and
subclasses are passed to a ``default`` that refuses them, and every document
orjson writes is read back and compared with the value it came from (except a
list of plain scalars, which orjson either writes exactly or refuses): a UUID
(read back as a str), an enum (read back as its value), NaN (read back as None)
or a tuple (read back as a list) does not compare equal, and the standard
library encodes the value instead.  The check costs about a third of what
orjson saves.  One difference is left: an enum whose own ``__eq__`` says it
equals its value passes the check, and is written as that value where the
standard library (and so kombu's json) would refuse it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

__all__ = ["ORJSON", "dumps", "encode", "keys_may_collide", "loads", "read_own"]

try:
    import orjson
except ImportError:  # the optional "fast" extra is not installed
    orjson = None  # type: ignore[assignment]

ORJSON = orjson is not None
# Any integer orjson could read as a float has at least 19 digits (2**63 has
# 19).  Digits inside strings count too; those documents just take the slow
# path.  Mapping every digit to "0" and looking for 19 zeros is ten times
# faster than a regular expression over a 1 KB body.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS: Final = b"0" * 19
_ORJSON_REFUSES: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
    if orjson is not None
    else 0
)
_ascii_dumps = json.JSONEncoder(separators=(",", ":")).encode
_unicode_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def loads(data: bytes) -> Any:
    """``json.loads``, through orjson where it reads the document the same way."""
    if orjson is not None and _LONG_DIGITS not in data.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # what only the standard library reads (or nothing does: it raises below)
    return json.loads(data)


def dumps(obj: Any, *, ensure_ascii: bool = True) -> bytes:
    """Compact JSON as UTF-8, reading back as the standard library's encoding would.

    ``ensure_ascii`` applies when the standard library writes; orjson always
    writes UTF-8 (both read back the same).  A lone surrogate, which UTF-8
    cannot carry, is written as a JSON escape either way.

    Raises:
        TypeError, ValueError: what the standard library's encoder raises for
            ``obj`` (a UUID, datetime, Decimal, bytes, a circular reference...).
    """
    return encode(obj, ensure_ascii=ensure_ascii)[0]


def encode(obj: Any, *, ensure_ascii: bool = True) -> tuple[bytes, bool]:
    """:func:`dumps`, also saying whether orjson wrote the document (so :data:`read_own` may read it).

    Raises:
        TypeError, ValueError: as :func:`dumps`.
    """
    if orjson is not None:
        try:
            data = orjson.dumps(obj, default=_refuse, option=_ORJSON_REFUSES)
            if _plain_scalars(obj) or orjson.loads(data) == obj:
                return data, True
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            pass  # the standard library decides below
    text: str = (_ascii_dumps if ensure_ascii else _unicode_dumps)(obj)
    try:
        return text.encode(), False
    except UnicodeEncodeError:  # a lone surrogate: JSON's \u escape carries it, UTF-8 cannot
        return _ascii_dumps(obj).encode(), False


#: Reads a document that :func:`encode` wrote with orjson, without :func:`loads`'s
#: checks.  Only for documents whose origin is authenticated: ``encode`` read
#: each one back with orjson and got the value it came from (or it is a list of
#: plain scalars, which orjson writes exactly), so orjson reads it as the
#: standard library would (and the standard library, where orjson is not
#: installed, reads anything orjson writes the same way).
read_own: Callable[[bytes], Any] = orjson.loads if orjson is not None else json.loads


_INFINITY: Final = float("inf")


def _plain_scalars(obj: Any) -> bool:
    """True for a list of values orjson writes exactly as the standard library does.

    ``str``, ``int``, ``bool``, ``None`` and finite ``float`` of exactly those
    types (not subclasses): orjson refuses what it cannot write of them (a
    lone surrogate, an integer beyond 64 bits), so what it did write needs no
    reading back.  Two short strings are most PII values; the check costs a
    tenth of the read-back.
    """
    if obj.__class__ is not list:
        return False
    for value in obj:
        kind = value.__class__
        if not (
            kind is str
            or kind is int
            or value is None
            or kind is bool
            or (kind is float and -_INFINITY < value < _INFINITY)  # NaN compares false
        ):
            return False
    return True


def keys_may_collide(obj: Any) -> bool:
    """False when no two dict keys in ``obj`` can be written alike (every key is a ``str``).

    Two keys collide (``1`` and ``"1"``: the reader keeps one) only where a
    dict has a key that is not a ``str``.  orjson refuses those: asked to
    write everything else it does not know as ``null``, it refuses only such a
    key, an integer beyond 64 bits, a lone surrogate or nesting too deep, so
    when it does not, nothing can collide; when it does, the caller looks.
    Without orjson it cannot be told cheaply (a walk in Python costs twice the
    encoding): False, not checked, as in plain Celery (the last key wins).
    """
    if orjson is not None:
        try:
            orjson.dumps(obj, default=_null)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return True
    return False


def _null(_value: object) -> None:
    return None


def _refuse(_value: object) -> Any:
    """The ``default`` of orjson: types it does not write natively go to the standard library."""
    raise TypeError
