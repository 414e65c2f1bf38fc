"""The sealed envelope: versioned, length-framed, bound to its place.

One envelope holds every sealed value of one task call (one AEAD operation
per message and key, not one per field).  Layout, all integers big-endian::

    offset  size  field
    0       1     envelope version (1)
    1       1     flags: bit 0 compressed, bit 1 result (not a task call),
                  bit 2 values use kombu's typed JSON, bit 3 orjson wrote
                  the values (and they read back equal: see ``_json.encode``),
                  bit 4 co-keys follow the key id
    2       1     algorithm code
    3       4     key version
    7       1+n   key id (length byte, UTF-8)
    .       2+..  co-keys, only with flag bit 4: their count, then for each
                  its algorithm code (1), version (4) and id (length byte)
    .       1+n   task id the values are bound to (length byte)
    .       4+n   locations (length, compact JSON list of location lists)
    .       12    nonce
    .       rest  ciphertext || 16-byte tag

Everything before the nonce is the *header*; the associated data is the
header followed by the task name, so the envelope version, key id and
version, algorithm, task id, field locations and task name are all
authenticated: a value moved to another task or field, or a header edited
to an older version, fails to open.  (The sealer's "task name" also names
the canvas steps that sealed values sit in: ``_sealer.bound_name``.)

Values derived from several data subjects are sealed under each one's key
(``KeySpec.co_keys``): the plaintext is sealed with each co-key in turn
(each layer ``nonce || ciphertext || tag``, with the same associated data),
and that with the envelope's key.  Opening needs every one of those keys,
so destroying any of them (erasing any of the subjects) shreds the values.

The sealed plaintext is the JSON list of values, zlib-compressed above a
threshold.  Plain JSON types go through orjson or the standard library (``_json``);
only when a value needs kombu's typed JSON (datetime, Decimal, UUID, bytes)
is that used, and flagged, so the common case stays fast.  Values orjson
wrote are flagged too: they read back with orjson without ``_json.loads``'s
checks (the flag is authenticated like the rest of the header).

This module does no I/O and imports no Celery; keys are handed in.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from kombu.utils import json as kombu_json

from . import _json
from ._config import KEY_ID_PATTERN
from ._crypto import NONCE_SIZE, TAG_SIZE, Algorithm, DataKey, compress, decompress
from ._paths import Location, writes_keys_alike
from .exceptions import DecryptionFailed, EncryptionFailed

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_BYTES",
    "MAX_LOCATIONS",
    "Envelope",
    "Kind",
    "open_task",
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

_TOO_LARGE: Final = f"the sealed values are larger than a worker opens ({MAX_PLAINTEXT_BYTES // 2**20} MiB)"
_TOO_MANY_PLACES: Final = (
    f"the sealed values sit in more places than a worker opens ({MAX_LOCATIONS:,}, "
    f"or {MAX_LOCATIONS_BYTES // 2**20} MiB of their paths)"
)
_TOO_DEEP: Final = f"a sealed value sits deeper than a worker opens ({MAX_LOCATION_DEPTH} levels)"
_FLAG_COMPRESSED: Final = 0x01
_FLAG_RESULT: Final = 0x02
_FLAG_TYPED: Final = 0x04
_FLAG_ORJSON: Final = 0x08
_FLAG_CO_KEYS: Final = 0x10
_KNOWN_FLAGS: Final = _FLAG_COMPRESSED | _FLAG_RESULT | _FLAG_TYPED | _FLAG_ORJSON | _FLAG_CO_KEYS
_MAX_SHORT: Final = 255
_MAX_KEY_VERSION: Final = 2**31 - 1  # the key store's version column
_FIXED = struct.Struct(">BBBI")
# Their sizes as constants (compiled, a Final int is inlined; ``_FIXED.size`` is an attribute
# lookup); test_envelope checks they agree.
_FIXED_SIZE: Final = 7
_U32_SIZE: Final = 4
_CO_KEY = struct.Struct(">BIB")  # algorithm code, version, id length
_U16 = struct.Struct(">H")
# A chord body gathering the results of as many subjects' tasks needs as many keys.
MAX_CO_KEYS: Final = 2**16 - 1
_LENGTH_BYTE: Final = tuple(bytes((length,)) for length in range(_MAX_SHORT + 1))
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


# Reading an enum member off its class costs ten times a global's lookup (3.11).
_TASK: Final = Kind.TASK
_RESULT: Final = Kind.RESULT


class Envelope:
    """A parsed (not yet authenticated) envelope."""

    __slots__ = ("_data", "_end", "_prefix", "co_keys", "locations", "task_id")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._prefix, self.task_id, self.locations, self._end, self.co_keys = _parse_bytes(data)

    @property
    def key_id(self) -> str:
        """The id of the key the values are sealed under."""
        return self._prefix.key_id

    @property
    def key_version(self) -> int:
        """The version of that key."""
        return self._prefix.key_version

    @property
    def algorithm(self) -> Algorithm:
        """The AEAD algorithm of that key."""
        return self._prefix.algorithm

    @property
    def kind(self) -> Kind:
        """A task call's arguments or a stored result."""
        return self._prefix.kind

    @property
    def compressed(self) -> bool:
        """True if the sealed plaintext is compressed."""
        return self._prefix.compressed

    @property
    def header(self) -> bytes:
        """Everything before the nonce (authenticated, with the task name)."""
        return self._data[: self._end]

    @property
    def sealed(self) -> memoryview:
        """Nonce, ciphertext and tag."""
        return memoryview(self._data)[self._end :]

    def __repr__(self) -> str:
        count = len(self.locations)
        return f"<Envelope {self.key_id!r} v{self.key_version} task {self.task_id!r} {count} value(s)>"

    @property
    def keys(self) -> tuple[tuple[str, int], ...]:
        """``(key id, version)`` of every key needed to open it: its own first, then its co-keys."""
        return ((self.key_id, self.key_version), *self.co_keys)

    def open(self, key: DataKey, *, task_name: str, co_keys: Sequence[DataKey] = ()) -> list[Any]:
        """Authenticate and decrypt; returns the values in location order.

        ``co_keys`` are the keys :attr:`co_keys` names, in that order.

        Raises:
            DecryptionFailed: tampered, wrong key, wrong task, bad format.
        """
        if (co_keys or self.co_keys) and [(k.key_id, k.version) for k in co_keys] != list(self.co_keys):
            raise DecryptionFailed
        return _open_values(self._prefix, key, self._data, self._end, task_name, len(self.locations), co_keys)


def open_task(
    token: object,
    *,
    task_id: str,
    task_name: str | Callable[[tuple[Location, ...]], str],
    key_for: Callable[[str, int], DataKey],
) -> tuple[tuple[tuple[str, int], ...], tuple[Location, ...], list[Any]]:
    """Open the envelope of a task call: the ``(key id, version)`` of its keys, locations and values.

    The worker's path, in one step: :func:`parse` and :meth:`Envelope.open`
    without building an :class:`Envelope`.  ``key_for(key_id, version)`` is
    asked for the key only once the envelope is known to be a task call's,
    bound to ``task_id``.  ``task_name`` may be a function of the envelope's
    locations (the sealer binds the canvas steps the values sit in).

    Raises:
        DecryptionFailed: not a task envelope of ``task_id``, tampered, malformed.
        Whatever ``key_for`` raises (a destroyed or unknown key, a store outage).
    """
    data = _decode(token)
    try:
        prefix, bound_id, locations, end, co_keys = _parse_bytes(data)
    except _MALFORMED:
        raise DecryptionFailed from None
    if prefix.kind is not _TASK or bound_id != task_id:
        raise DecryptionFailed
    if not isinstance(task_name, str):
        task_name = task_name(locations)
    own = (prefix.key_id, prefix.key_version)
    key = key_for(prefix.key_id, prefix.key_version)  # not key_for(*own): compiled, a call without a tuple
    if not co_keys:  # nearly every message
        return (own,), locations, _open_values(prefix, key, data, end, task_name, len(locations))
    co = [key_for(*co_key) for co_key in co_keys]
    return (own, *co_keys), locations, _open_values(prefix, key, data, end, task_name, len(locations), co)


def _open_values(  # noqa: PLR0913, PLR0917 - the parsed parts of one envelope
    prefix: _KeyPrefix,
    key: DataKey,
    data: bytes,
    end: int,
    task_name: str,
    count: int,
    co_keys: Sequence[DataKey] = (),
) -> list[Any]:
    if key.key_id != prefix.key_id or key.version != prefix.key_version:
        raise DecryptionFailed
    associated_data = data[:end] + task_name.encode()
    plaintext = key.open(data, associated_data, end)
    for co_key in reversed(co_keys):  # sealed with each in turn: the last one's layer is outermost
        plaintext = co_key.open(plaintext, associated_data)
    if prefix.compressed:
        plaintext = decompress(plaintext, max_size=MAX_PLAINTEXT_BYTES)
    try:
        values: object = prefix.read(plaintext)
    except (ValueError, TypeError, RecursionError):
        raise DecryptionFailed from None
    if type(values) is not list or len(values) != count:
        raise DecryptionFailed
    return values


def seal(  # noqa: C901, PLR0912, PLR0913 - every argument is part of what the envelope binds; inlined (hot path)
    key: DataKey,
    values: Sequence[Any],
    *,
    locations: Sequence[Location],
    task_name: str,
    task_id: str,
    kind: Kind = Kind.TASK,
    compression_threshold: int | None = None,
    co_keys: Sequence[DataKey] = (),
    _nonce: bytes | None = None,
) -> str:
    """Seal ``values`` found at ``locations``; returns the envelope as ASCII text.

    With ``co_keys`` (other data subjects' keys), every one of them is needed
    to open it too.

    Raises:
        TypeError: a value cannot be encoded as JSON.
        EncryptionFailed: the task id or a key id does not fit, too many co-keys, or the
            values are larger than a worker opens (``MAX_PLAINTEXT_BYTES``, ``MAX_ENVELOPE_BYTES``).
    """
    # This runs for every message published: lookups are inlined, not called.
    flags = _FLAG_RESULT if kind is _RESULT else 0
    if type(values) is not list:
        values = list(values)
    try:
        plaintext, by_orjson = _json.encode(values, ensure_ascii=False)
    except (TypeError, ValueError):  # datetime, Decimal, UUID, bytes...: kombu's typed JSON
        plaintext = _typed_json(values)
        flags |= _FLAG_TYPED
    else:
        if by_orjson:
            flags |= _FLAG_ORJSON
        else:  # orjson refuses non-str keys; the standard library writes 1 and "1" both as "1"
            _refuse_unfaithful_dicts(values, typed=False)
    if len(plaintext) > MAX_PLAINTEXT_BYTES:  # what opening would refuse: not published at all
        raise EncryptionFailed(_TOO_LARGE)
    if compression_threshold is not None and len(plaintext) > compression_threshold:
        plaintext = compress(plaintext)
        flags |= _FLAG_COMPRESSED
    bound_id = task_id.encode()
    if len(bound_id) > _MAX_SHORT:
        msg = "task id longer than 255 bytes"
        raise EncryptionFailed(msg)
    if type(locations) is not tuple:
        locations = tuple(locations)
    if co_keys:
        flags |= _FLAG_CO_KEYS
    header = b"".join(
        (
            (_key_prefixes.get(key.identity) or _new_key_prefixes(key))[flags],
            _frame_co_keys(co_keys) if co_keys else b"",
            _LENGTH_BYTE[len(bound_id)],
            bound_id,
            _encoded_locations.get(locations) or _frame_locations(locations),
        )
    )
    associated_data = header + task_name.encode()
    for co_key in co_keys:
        plaintext = co_key.seal(plaintext, associated_data)
    if _nonce is None:
        sealed = key.seal(plaintext, associated_data)
    else:  # known-answer tests only
        sealed = key._seal_with_nonce(_nonce, plaintext, associated_data)  # noqa: SLF001
    if len(header) + len(sealed) > MAX_ENVELOPE_BYTES:
        raise EncryptionFailed(_TOO_LARGE)
    return binascii.b2a_base64(header + sealed, newline=False).decode("ascii")


def _typed_json(values: list[Any]) -> bytes:
    _refuse_unfaithful_dicts(values, typed=True)
    text: str = kombu_json.dumps(values, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate beside them: escaped, as plain Celery sends it
        escaped: str = kombu_json.dumps(values, separators=(",", ":"))
        return escaped.encode()


class TypedLookalike(ValueError):
    """Values that need kombu's typed JSON hold a dict that reads as a typed value."""

    def __init__(self) -> None:
        super().__init__(
            "a dict of exactly '__type__' and '__value__' (kombu's typed JSON) beside a date, Decimal, "
            "UUID or bytes value would not read back as given"
        )


class TwinKeys(ValueError):
    """A dict among the values holds two keys JSON writes alike: only one would read back."""

    def __init__(self) -> None:
        super().__init__('a dict holding two keys JSON writes alike (1 and "1", say) would read back as one')


def _refuse_unfaithful_dicts(values: list[Any], *, typed: bool) -> None:
    """Raise if a dict among ``values`` would not read back as given.

    Two keys JSON writes alike (``1`` and ``"1"``, ``True`` and ``"true"``)
    read back as one: the value of the other was silently lost.  Only the
    standard library and kombu's typed JSON write such a dict (orjson refuses
    non-str keys), so only their documents are walked.  With ``typed``, a dict
    of exactly kombu's marker keys would read back made into a typed value (a
    dict become a datetime), or be refused and an authentic envelope read as
    tampered.

    Raises:
        TwinKeys, TypedLookalike: as above (neither names a value).
    """
    pending: list[Any] = [values]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            if typed and current.keys() == _TYPED_KEYS:
                raise TypedLookalike
            if writes_keys_alike(current):
                raise TwinKeys
            children: Any = current.values()
        elif isinstance(current, (list, tuple)):
            children = current
        else:
            continue
        if id(current) not in seen:  # encoding refuses a value that holds itself
            seen.add(id(current))
            pending.extend(children)


_TYPED_KEYS: Final = frozenset(("__type__", "__value__"))


# Every flag combination's key prefix, by key (its id, version and algorithm).
_key_prefixes: dict[tuple[str, int, str], tuple[bytes, ...]] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Store in one of the bounded caches above, emptying it first when it is full."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _new_key_prefixes(key: DataKey) -> tuple[bytes, ...]:
    """Version, flags, algorithm, key version and key id: the same for every message of a key.

    One prefix for each value of the flags byte, indexed by it.
    """
    key_id = _key_id_bytes(key)
    prefixes = tuple(
        _FIXED.pack(ENVELOPE_VERSION, flags, key.algorithm.code, key.version)
        + _LENGTH_BYTE[len(key_id)]
        + key_id
        for flags in range(_KNOWN_FLAGS + 1)
    )
    _remember(_key_prefixes, key.identity, prefixes)
    return prefixes


def _key_id_bytes(key: DataKey) -> bytes:
    key_id = key.key_id.encode()
    if len(key_id) > _MAX_SHORT:
        msg = "key id longer than 255 bytes"
        raise EncryptionFailed(msg)
    return key_id


def _frame_co_keys(co_keys: Sequence[DataKey]) -> bytes:
    """The co-keys' count, then each one's algorithm, version and id."""
    if len(co_keys) > MAX_CO_KEYS:
        msg = f"data derived from more than {MAX_CO_KEYS} data subjects"
        raise EncryptionFailed(msg)
    parts = [_U16.pack(len(co_keys))]
    for co_key in co_keys:
        key_id = _key_id_bytes(co_key)
        parts.append(_CO_KEY.pack(co_key.algorithm.code, co_key.version, len(key_id)) + key_id)
    return b"".join(parts)


def _frame_locations(locations: tuple[Location, ...]) -> bytes:
    """The locations as JSON, after their length.

    Raises:
        EncryptionFailed: more locations, or deeper ones, than opening reads
            (it would refuse the envelope as damaged: a worker parks such a
            message as tampered with).  Checked here, once per set of places.
    """
    if len(locations) > MAX_LOCATIONS:
        raise EncryptionFailed(_TOO_MANY_PLACES)
    if any(len(location) > MAX_LOCATION_DEPTH for location in locations):
        raise EncryptionFailed(_TOO_DEEP)
    where = _json.dumps([list(location) for location in locations], ensure_ascii=False)
    if len(where) > MAX_LOCATIONS_BYTES:
        raise EncryptionFailed(_TOO_MANY_PLACES)
    framed = _U32.pack(len(where)) + where
    if len(locations) <= _CACHEABLE_LOCATIONS:
        _remember(_encoded_locations, locations, framed)
    return framed


def parse(token: object) -> Envelope:
    """Parse an envelope without authenticating it.

    Raises:
        DecryptionFailed: not an envelope of a version we read.
    """
    data = _decode(token)
    try:
        return Envelope(data)
    except _MALFORMED:
        raise DecryptionFailed from None


# The longest base64 text of an envelope.
_MAX_TOKEN: Final = MAX_ENVELOPE_BYTES * 4 // 3 + 4
# What parsing a malformed envelope can raise, all read as DecryptionFailed.
_MALFORMED: Final = (struct.error, IndexError, UnicodeDecodeError, ValueError, RecursionError)

if sys.version_info >= (3, 11):

    def _b64decode(token: str) -> bytes:
        return binascii.a2b_base64(token, strict_mode=True)

else:  # pragma: no cover - Python 3.10: the same check, a little slower

    def _b64decode(token: str) -> bytes:
        return base64.b64decode(token, validate=True)


def _decode(token: object) -> bytes:
    """An envelope's bytes from its base64 text (strict: nothing but the alphabet and padding)."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise DecryptionFailed
    try:
        return _b64decode(token)
    except (binascii.Error, ValueError):
        raise DecryptionFailed from None


class _KeyPrefix:
    """What an envelope's first bytes say: the same for every message sealed with one key.

    A class with slots, not a NamedTuple: compiled, its fields are read as a
    native class's (a NamedTuple's go through a descriptor), several per message.
    """

    __slots__ = ("algorithm", "co_keys", "compressed", "key_id", "key_version", "kind", "read")

    def __init__(  # noqa: PLR0913 - the fields of the prefix
        self,
        *,
        key_id: str,
        key_version: int,
        algorithm: Algorithm,
        kind: Kind,
        compressed: bool,
        co_keys: bool,
        read: Callable[[bytes], Any],
    ) -> None:
        self.key_id = key_id
        self.key_version = key_version
        self.algorithm = algorithm
        self.kind = kind
        self.compressed = compressed
        #: Co-keys follow the key id.
        self.co_keys = co_keys
        #: How the values' JSON is read: kombu's typed JSON, orjson directly, or with every check.
        self.read = read


# Parsed key prefixes by their bytes (bounded like the caches above): the
# prefix is the same for every message of a key, and parsing it is most of
# the work of parsing an envelope.
_parsed_prefixes: dict[bytes, _KeyPrefix] = {}


def _parse_bytes(
    data: bytes,
) -> tuple[_KeyPrefix, str, tuple[Location, ...], int, tuple[tuple[str, int], ...]]:
    """Key prefix, bound task id, locations, where the nonce starts and co-keys (unauthenticated)."""
    pos = _FIXED_SIZE + 1
    end = pos + data[pos - 1]
    prefix = data[:end]
    key = _parsed_prefixes.get(prefix)
    if key is None:
        key = _parse_key_prefix(prefix, end)
        _remember(_parsed_prefixes, prefix, key)
    co_keys: tuple[tuple[str, int], ...] = ()
    if key.co_keys:
        co_keys, end = _parse_co_keys(data, end)
    pos = end + 1
    end = pos + data[pos - 1]
    task_id = data[pos:end].decode()
    (where_len,) = _U32.unpack_from(data, end)
    if where_len > MAX_LOCATIONS_BYTES:
        raise DecryptionFailed
    pos = end + _U32_SIZE
    where = data[pos : pos + where_len]
    pos += where_len
    if len(where) != where_len or len(data) < pos + NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailed
    return key, task_id, _decode_locations(where), pos, co_keys


def _parse_co_keys(data: bytes, pos: int) -> tuple[tuple[tuple[str, int], ...], int]:
    """``(key id, version)`` of each co-key, and where the task id starts."""
    (count,) = _U16.unpack_from(data, pos)
    if not count:
        raise DecryptionFailed
    pos += _U16.size
    co_keys = []
    for _ in range(count):
        alg_code, version, size = _CO_KEY.unpack_from(data, pos)
        pos += _CO_KEY.size
        raw_id = data[pos : pos + size]
        pos += size
        Algorithm.from_code(alg_code)  # one we know, or DecryptionFailed
        key_id = raw_id.decode()
        if len(raw_id) != size or not KEY_ID_PATTERN.match(key_id) or version > _MAX_KEY_VERSION:
            raise DecryptionFailed
        co_keys.append((key_id, version))
    return tuple(co_keys), pos


def _parse_key_prefix(prefix: bytes, size: int) -> _KeyPrefix:
    version, flags, alg_code, key_version = _FIXED.unpack_from(prefix, 0)
    if version != ENVELOPE_VERSION or flags & ~_KNOWN_FLAGS or len(prefix) != size or size == _FIXED.size + 1:
        raise DecryptionFailed  # unknown version or flag, truncated, or an empty key id
    key_id = prefix[_FIXED.size + 1 :].decode()
    # A key id or version no key store holds (a NUL byte, a version beyond the
    # column) is refused here, not sent to the database to fail there.
    if not KEY_ID_PATTERN.match(key_id) or key_version > _MAX_KEY_VERSION:
        raise DecryptionFailed
    return _KeyPrefix(
        key_id=key_id,
        key_version=key_version,
        algorithm=Algorithm.from_code(alg_code),
        kind=Kind.RESULT if flags & _FLAG_RESULT else Kind.TASK,
        compressed=bool(flags & _FLAG_COMPRESSED),
        co_keys=bool(flags & _FLAG_CO_KEYS),
        read=_reader(flags),
    )


def _reader(flags: int) -> Callable[[bytes], Any]:
    if flags & _FLAG_TYPED:
        return kombu_json.loads
    return _json.read_own if flags & _FLAG_ORJSON else _json.loads


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
