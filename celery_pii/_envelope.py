"""The sealed envelope: versioned, length-framed, bound to its place.

One envelope holds every sealed value of one task call (one AEAD operation
per message and key, not one per field).  Layout, all integers big-endian::

    offset  size  field
    0       1     envelope version (1)
    1       1     flags: bit 0 compressed, bit 1 result (not a task call),
                  bit 2 values use kombu's typed JSON
    2       1     algorithm code
    3       4     key version
    7       1+n   key id (length byte, UTF-8)
    .       1+n   task id the values are bound to (length byte)
    .       4+n   locations (length, compact JSON list of location lists)
    .       12    nonce
    .       rest  ciphertext || 16-byte tag

Everything before the nonce is the *header*; the associated data is the
header followed by the task name, so the envelope version, key id and
version, algorithm, task id, field locations and task name are all
authenticated: a value moved to another task or field, or a header edited
to an older version, fails to open.

The sealed plaintext is the JSON list of values, zlib-compressed above a
threshold.  Plain JSON types go through orjson or the standard library (``_json``);
only when a value needs kombu's typed JSON (datetime, Decimal, UUID, bytes)
is that used, and flagged, so the common case stays fast.

This module does no I/O and imports no Celery; keys are handed in.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from kombu.utils import json as kombu_json

from . import _json
from ._crypto import NONCE_SIZE, TAG_SIZE, Algorithm, DataKey, compress, decompress
from ._paths import Location
from .exceptions import DecryptionFailed, EncryptionFailed

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_BYTES",
    "MAX_LOCATIONS",
    "Envelope",
    "Kind",
    "parse",
    "seal",
]

ENVELOPE_VERSION: Final = 1
MAX_ENVELOPE_BYTES: Final = 64 * 1024 * 1024
MAX_PLAINTEXT_BYTES: Final = 64 * 1024 * 1024
MAX_LOCATIONS: Final = 1_000_000
# Checked before the locations are parsed, so a huge list costs nothing to refuse.
MAX_LOCATIONS_BYTES: Final = 16 * 1024 * 1024
MAX_LOCATION_DEPTH: Final = 64

_FLAG_COMPRESSED: Final = 0x01
_FLAG_RESULT: Final = 0x02
_FLAG_TYPED: Final = 0x04
_KNOWN_FLAGS: Final = _FLAG_COMPRESSED | _FLAG_RESULT | _FLAG_TYPED
_MAX_SHORT: Final = 255
_FIXED = struct.Struct(">BBBI")
_U32 = struct.Struct(">I")

# Tasks seal the same few location lists over and over: their encoded and
# parsed forms are cached (bounded) so neither side re-runs JSON on them.
_CACHE_LIMIT: Final = 4096
_CACHEABLE_LOCATIONS: Final = 64  # longer lists ([*] over big lists) vary per message
_encoded_locations: dict[tuple[Location, ...], bytes] = {}
_parsed_locations: dict[bytes, tuple[Location, ...]] = {}


class Kind(enum.Enum):
    """What the sealed values belong to."""

    TASK = 0  # arguments of a task call: opened where the task runs
    RESULT = 1  # a stored result: opened by whoever reads it with keys


class Envelope:
    """A parsed (not yet authenticated) envelope."""

    __slots__ = (
        "algorithm",
        "compressed",
        "header",
        "key_id",
        "key_version",
        "kind",
        "locations",
        "sealed",
        "task_id",
        "typed",
    )

    def __init__(
        self,
        key: _KeyPrefix,
        task_id: str,
        locations: tuple[Location, ...],
        header: bytes,
        sealed: memoryview,
    ) -> None:
        self.key_id = key.key_id
        self.key_version = key.key_version
        self.algorithm = key.algorithm
        self.kind = key.kind
        self.compressed = key.compressed
        self.typed = key.typed
        self.task_id = task_id
        self.locations = locations
        self.header = header
        self.sealed = sealed

    def __repr__(self) -> str:
        count = len(self.locations)
        return f"<Envelope {self.key_id!r} v{self.key_version} task {self.task_id!r} {count} value(s)>"

    def open(self, key: DataKey, *, task_name: str) -> list[Any]:
        """Authenticate and decrypt; returns the values in location order.

        Raises:
            DecryptionFailed: tampered, wrong key, wrong task, bad format.
        """
        if key.key_id != self.key_id or key.version != self.key_version:
            raise DecryptionFailed
        plaintext = key.open(self.sealed, self.header + task_name.encode())
        if self.compressed:
            plaintext = decompress(plaintext, max_size=MAX_PLAINTEXT_BYTES)
        try:
            values: object = kombu_json.loads(plaintext) if self.typed else _json.loads(plaintext)
        except (ValueError, TypeError, RecursionError):
            raise DecryptionFailed from None
        if type(values) is not list or len(values) != len(self.locations):
            raise DecryptionFailed
        return values


def seal(  # noqa: PLR0913 - every argument is part of what the envelope binds
    key: DataKey,
    values: Sequence[Any],
    *,
    locations: Sequence[Location],
    task_name: str,
    task_id: str,
    kind: Kind = Kind.TASK,
    compression_threshold: int | None = None,
    _nonce: bytes | None = None,
) -> str:
    """Seal ``values`` found at ``locations``; returns the envelope as ASCII text.

    Raises:
        TypeError: a value cannot be encoded as JSON.
        EncryptionFailed: the task id does not fit.
    """
    flags = _FLAG_RESULT if kind is Kind.RESULT else 0
    values = list(values)
    try:
        plaintext = _json.dumps(values, ensure_ascii=False)
    except (TypeError, ValueError):  # datetime, Decimal, UUID, bytes...: kombu's typed JSON
        text: str = kombu_json.dumps(values, separators=(",", ":"), ensure_ascii=False)
        plaintext = text.encode()
        flags |= _FLAG_TYPED
    if compression_threshold is not None and len(plaintext) > compression_threshold:
        plaintext = compress(plaintext)
        flags |= _FLAG_COMPRESSED
    header = _header(key, flags, task_id, locations)
    associated_data = header + task_name.encode()
    if _nonce is None:
        sealed = key.seal(plaintext, associated_data)
    else:  # known-answer tests only
        sealed = key._seal_with_nonce(_nonce, plaintext, associated_data)  # noqa: SLF001
    return binascii.b2a_base64(header + sealed, newline=False).decode("ascii")


def _header(key: DataKey, flags: int, task_id: str, locations: Sequence[Location]) -> bytes:
    bound_id = task_id.encode()
    if len(bound_id) > _MAX_SHORT:
        msg = "task id longer than 255 bytes"
        raise EncryptionFailed(msg)
    where = _encode_locations(tuple(locations))
    return b"".join(
        (_key_prefix(key, flags), bytes((len(bound_id),)), bound_id, _U32.pack(len(where)), where)
    )


_key_prefixes: dict[tuple[str, int, int, int], bytes] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Store in one of the bounded caches above, emptying it first when it is full."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _key_prefix(key: DataKey, flags: int) -> bytes:
    """Version, flags, algorithm, key version and key id: the same for every message of a key."""
    cache_key = (key.key_id, key.version, key.algorithm.code, flags)
    prefix = _key_prefixes.get(cache_key)
    if prefix is None:
        key_id = key.key_id.encode()
        prefix = (
            _FIXED.pack(ENVELOPE_VERSION, flags, key.algorithm.code, key.version)
            + bytes((len(key_id),))
            + key_id
        )
        _remember(_key_prefixes, cache_key, prefix)
    return prefix


def _encode_locations(locations: tuple[Location, ...]) -> bytes:
    where = _encoded_locations.get(locations)
    if where is None:
        where = _json.dumps([list(location) for location in locations], ensure_ascii=False)
        if len(locations) <= _CACHEABLE_LOCATIONS:
            _remember(_encoded_locations, locations, where)
    return where


def parse(token: object) -> Envelope:
    """Parse an envelope without authenticating it.

    Raises:
        DecryptionFailed: not an envelope of a version we read.
    """
    if not isinstance(token, str) or len(token) > MAX_ENVELOPE_BYTES * 4 // 3 + 4:
        raise DecryptionFailed
    try:
        data = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionFailed from None
    try:
        return _parse_bytes(data)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, RecursionError):
        raise DecryptionFailed from None


class _KeyPrefix(NamedTuple):
    """What an envelope's first bytes say: the same for every message sealed with one key."""

    key_id: str
    key_version: int
    algorithm: Algorithm
    kind: Kind
    compressed: bool
    typed: bool


# Parsed key prefixes by their bytes (bounded like the caches above): the
# prefix is the same for every message of a key, and parsing it is most of
# the work of parsing an envelope.
_parsed_prefixes: dict[bytes, _KeyPrefix] = {}


def _parse_bytes(data: bytes) -> Envelope:
    pos = _FIXED.size + 1
    end = pos + data[pos - 1]
    prefix = data[:end]
    key = _parsed_prefixes.get(prefix)
    if key is None:
        key = _parse_key_prefix(prefix, end)
        _remember(_parsed_prefixes, prefix, key)
    pos = end + 1
    end = pos + data[pos - 1]
    task_id = data[pos:end].decode()
    (where_len,) = _U32.unpack_from(data, end)
    if where_len > MAX_LOCATIONS_BYTES:
        raise DecryptionFailed
    pos = end + _U32.size
    where = data[pos : pos + where_len]
    pos += where_len
    if len(where) != where_len or len(data) < pos + NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailed
    return Envelope(key, task_id, _decode_locations(where), data[:pos], memoryview(data)[pos:])


def _parse_key_prefix(prefix: bytes, size: int) -> _KeyPrefix:
    version, flags, alg_code, key_version = _FIXED.unpack_from(prefix, 0)
    if version != ENVELOPE_VERSION or flags & ~_KNOWN_FLAGS or len(prefix) != size or size == _FIXED.size + 1:
        raise DecryptionFailed  # unknown version or flag, truncated, or an empty key id
    return _KeyPrefix(
        key_id=prefix[_FIXED.size + 1 :].decode(),
        key_version=key_version,
        algorithm=Algorithm.from_code(alg_code),
        kind=Kind.RESULT if flags & _FLAG_RESULT else Kind.TASK,
        compressed=bool(flags & _FLAG_COMPRESSED),
        typed=bool(flags & _FLAG_TYPED),
    )


def _decode_locations(raw: bytes) -> tuple[Location, ...]:
    cached = _parsed_locations.get(raw)
    if cached is not None:
        return cached
    parsed = _parse_locations(raw)
    if len(parsed) <= _CACHEABLE_LOCATIONS:
        _remember(_parsed_locations, raw, parsed)
    return parsed


def _parse_locations(raw: bytes) -> tuple[Location, ...]:
    parsed = json.loads(raw)
    if not isinstance(parsed, list) or len(parsed) > MAX_LOCATIONS:
        raise DecryptionFailed
    locations = []
    for item in parsed:
        if not isinstance(item, list) or not 0 < len(item) <= MAX_LOCATION_DEPTH:
            raise DecryptionFailed
        for part in item:
            # bool is an int subclass; JSON never produces it for an index.
            if not (isinstance(part, str) or (type(part) is int and part >= 0)):
                raise DecryptionFailed
        locations.append(tuple(item))
    return tuple(locations)
