"""The kombu serializer ``pii`` (content type ``application/x-celery-pii``).

It wraps an inner serializer (``json`` or ``msgpack``) in a two-byte frame::

    byte 0   frame version (1)
    byte 1   inner codec: b"o" plain JSON written by orjson, b"j" plain JSON
             written by the standard library, b"k" kombu's typed JSON, b"m" msgpack
    rest     the inner serializer's bytes

Plain JSON bodies are written and read by orjson where installed (the ``fast``
extra; ``_json`` makes sure it gives what the standard library would) or by
the standard library.  A body orjson wrote was read back equal when written,
so it is read with orjson directly (``b"o"``); the others get ``_json.loads``'s
checks.  A forged codec byte changes nothing an attacker who can write
messages could not change anyway.  Only a body holding a datetime, Decimal, UUID or bytes
falls back to kombu's typed JSON (whose per-dict decoding hook costs several
microseconds on a 1 KB body), and the frame says which was used.

Task bodies are sealed *before* they get here, by ``setup_pii``'s publish
step (which sees the task name and id).  This serializer is the guard: a task
body that did not pass that step is refused (``EncryptionFailed``), so
nothing reaches a broker in plaintext through the ``pii`` content type.
Control and inspect messages pass through; eager-mode bodies (a 2-tuple that
never leaves the process) too.

``loads`` never opens task arguments: the consumer process decodes every
message once for ``inspect``/Flower, and those must keep ciphertext.  Stored
results, which only processes with keys read, are opened here.

The serializer knows nothing of Celery's app; ``setup_pii`` hands it the
callables it needs.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

from kombu.utils import json as kombu_json

from . import _json
from ._detect import shown_path
from ._paths import Location, json_key, writes_keys_alike
from ._redact import REDACTED
from .exceptions import ConfigurationError, DecryptionFailed, EncryptionFailed

__all__ = ["CONTENT_TYPE", "NAME", "PIISerializer", "PublishTicket", "publish_ticket"]

logger = logging.getLogger("celery_pii")

NAME: Final = "pii"
CONTENT_TYPE: Final = "application/x-celery-pii"
CONTENT_ENCODING: Final = "binary"
FRAME_VERSION: Final = 1
_CODECS: Final = {"json": b"j", "msgpack": b"m"}
_TYPED_JSON: Final = b"k"
_ORJSON: Final = b"o"  # plain JSON that orjson wrote (and read back equal)
_JSON_STARTS: Final = frozenset((b"{", b"[", b'"'))
_EMBED_KEYS: Final = frozenset(("callbacks", "errbacks", "chain", "chord"))


class PublishTicket(NamedTuple):
    """What the publish step says of the task body it passed."""

    body: object
    task: str
    #: Field paths or detection look into its arguments (a ``bytes`` key there is refused).
    paths_matter: bool = True


#: The last task body that passed the publish step in this thread/context.
#: ``dumps`` accepts a task body only if it *is* that object (identity):
#: the body tuple is built by ``as_task_v2`` and handed to ``dumps`` unchanged.
publish_ticket: contextvars.ContextVar[PublishTicket | None] = contextvars.ContextVar(
    "celery_pii_publish_ticket", default=None
)

ResultHook = Callable[[Any], Any]


def _msgpack_plain(value: Any) -> Any:
    """What msgpack (with ``strict_types``) writes for a subclass or a tuple: its plain value.

    Celery's ``group`` signature is a dict whose ``len()`` counts its tasks:
    msgpack wrote a dict subclass's map header from ``len()``, and a chain
    holding a group did not decode.  A str Enum is written as its value, as
    before.

    Raises:
        TypeError: not something msgpack writes (as msgpack itself says).
    """
    if isinstance(value, dict):
        return dict(dict.items(value))
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return str.__str__(value)  # the text itself, not a str Enum's name
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    msg = f"can not serialize {type(value).__name__!r} object"
    raise TypeError(msg)


def _msgpack_packed(obj: Any, *, task_body: bool, refuse_bytes_keys: bool = False) -> bytes:
    """``obj`` as msgpack, its dict keys written as JSON writes them if any is not text.

    msgpack writes a key ``1`` as a number, and refuses to read it back
    (``strict_map_key``: a number key could flood a dict's hash table), so a
    message with one was parked at the worker as undecodable, and a result
    with one stored unreadable.  Such keys travel as text, as with ``json``;
    two written alike are refused, as with ``json``.  A ``bytes`` key, which
    JSON cannot write, travels as it is, unless ``refuse_bytes_keys`` (see
    :func:`_refuse_bytes_keys`).

    Raises:
        KeyRefused: a dict holds a key neither JSON nor msgpack writes, or two
            keys JSON writes alike; with ``refuse_bytes_keys``, a ``bytes`` key.
    """
    msgpack = _msgpack()
    packed: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_msgpack_plain)
    if refuse_bytes_keys:  # after packb, which refuses a value that holds itself (the walk would not end)
        _refuse_bytes_keys(obj)
    try:
        msgpack.unpackb(packed, raw=False)  # what every reader does
    except ValueError as error:
        if "map key" not in str(error):  # refused for another reason: so is it by the reader
            return packed
        keyed = (
            [_text_keys(part, (name,)) for name, part in zip(_BODY_PARTS, obj, strict=True)]
            if task_body
            else _text_keys(obj, ())
        )
        packed = msgpack.packb(keyed, use_bin_type=True, strict_types=True, default=_msgpack_plain)
    return packed


#: What a task body's three parts are called in error messages' paths.
_BODY_PARTS: Final = ("args", "kwargs", "embed")


def _refuse_unwritable(body: Any, task: str) -> None:
    """A task body msgpack refused: say which task and where (msgpack's own error names neither).

    Raises:
        EncryptionFailed: naming the place and the kind of value, never the value.
    """
    found = _unwritable_value(list(body), ()) if isinstance(body, (list, tuple)) else None
    if found is None:
        return
    location, kind = found
    location = (_BODY_PARTS[int(location[0])], *location[1:]) if location else location
    msg = (
        f"task {task!r}: the value at {shown_path(location)} is {kind}, which msgpack does not write "
        "(pii_inner_serializer='msgpack'); pass it as text, declare it in pii_fields (sealed values "
        "travel as typed JSON), or use the json inner serializer; nothing was published"
    )
    raise EncryptionFailed(msg)


class KeyRefused(ValueError):
    """A dict of a body or result holds keys that cannot travel as they are; names where, not what."""

    def __init__(self, location: Location, why: str) -> None:
        super().__init__(why)
        self.location = location
        self.why = why


def _unwritable_value(value: Any, location: Location, depth: int = 0) -> tuple[Location, str] | None:
    """Where the first value msgpack does not write sits, and what it is (``None``: none found).

    What :func:`_msgpack_plain` writes passes: text, bytes, numbers (integers
    within 64 bits), ``None``, lists, tuples, dicts and their subclasses.
    """
    if value is None or isinstance(value, (str, bytes, float)):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else (location, "an integer beyond 64 bits")
    if depth >= _MSGPACK_NESTING:
        return None
    if isinstance(value, dict):
        places: Iterator[tuple[Any, Any]] = ((_shown_key(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        places = enumerate(value)
    else:
        return location, f"a {type(value).__name__}"
    for place, item in places:
        found = _unwritable_value(item, (*location, place), depth + 1)
        if found is not None:
            return found
    return None


#: msgpack's own limit on nesting (deeper, it refuses the whole value).
_MSGPACK_NESTING: Final = 512


_NOT_WRITABLE: Final = "holds a key JSON cannot write (only text, numbers, true, false and null can be)"
_WRITTEN_ALIKE: Final = 'holds two keys JSON writes alike (1 and "1", say), and one would be lost'


def _shown_key(key: Any) -> str:
    """A dict key as error messages' paths show it: one that is not text may be an account number."""
    return key if type(key) is str else REDACTED


def _text_keys(value: Any, location: Location) -> Any:
    """``value`` with every dict key as the text JSON writes for it (``bytes`` keys kept).

    Raises:
        KeyRefused: a dict holds two keys written alike (``1`` and ``"1"``),
            or a key that neither JSON nor msgpack writes.
    """
    if isinstance(value, dict):
        copy: dict[str | bytes, Any] = {}
        for key, item in dict.items(value):
            text = json_key(key)
            if text is None and isinstance(key, bytes):
                copy[key] = _text_keys(item, (*location, REDACTED))  # msgpack writes it as it is
                continue
            if text is None or text in copy:
                raise KeyRefused(location, _NOT_WRITABLE if text is None else _WRITTEN_ALIKE)
            copy[text] = _text_keys(item, (*location, _shown_key(key)))
        return copy
    if isinstance(value, (list, tuple)):
        return [_text_keys(item, (*location, i)) for i, item in enumerate(value)]
    return value


def _refuse_keys_written_alike(obj: Any, *, task_body: bool) -> None:
    """Refuse a body or result holding a dict with two keys JSON writes alike (one would be lost).

    Only the standard library and kombu's typed JSON write such a dict
    (orjson refuses non-str keys); what they wrote read back with one of the
    two values, silently.  msgpack refuses them too (:func:`_text_keys`).

    Raises:
        KeyRefused: where the first such dict sits.
    """
    for location, value in _dicts_in(obj, task_body=task_body):
        if writes_keys_alike(value):
            raise KeyRefused(location, _WRITTEN_ALIKE)


def _refuse_bytes_keys(body: tuple[Any, Any, Any]) -> None:
    """Refuse a task body with a ``bytes`` dict key (msgpack writes them; JSON cannot).

    Field paths name keys as JSON writes them: a declared field under
    ``{b"email": ...}`` was never found, so it left unsealed, and the worker,
    looking the same way, ran the task (redis-py's ``hgetall`` gives such
    dicts).  ``json`` refuses these keys; with ``msgpack``, so does the
    publish step of a task whose arguments field paths or detection look
    into (a task without PII is published as plain Celery would).

    Raises:
        KeyRefused: where the first such dict sits.
    """
    if not _holds_bytes_key(body):  # the common case, without building a place for every value
        return
    for location, value in _dicts_in(body, task_body=True):
        if any(isinstance(key, bytes) for key in value):
            raise KeyRefused(location, _NOT_WRITABLE)


def _dicts_in(obj: Any, *, task_body: bool) -> Iterator[tuple[Location, dict[Any, Any]]]:
    """Every dict in a body (its parts named) or a result, with where it sits; each container once."""
    parts: list[Location] = [(part,) for part in _BODY_PARTS] if task_body else [()]
    pending: list[tuple[Location, Any]] = list(zip(parts, obj if task_body else [obj], strict=True))
    seen: set[int] = set()
    while pending:
        location, value = pending.pop()
        if isinstance(value, dict):
            yield location, value
            children = [((*location, _shown_key(key)), item) for key, item in dict.items(value)]
        elif isinstance(value, (list, tuple)):
            children = [((*location, i), item) for i, item in enumerate(value)]
        else:
            continue
        if id(value) not in seen:  # a value may be reached twice (or hold itself)
            seen.add(id(value))
            pending.extend(children)


def _holds_bytes_key(value: Any) -> bool:
    """True if a dict in ``value`` has a ``bytes`` key (``value`` holds no cycle: msgpack wrote it)."""
    pending = [value]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            if any(isinstance(key, bytes) for key in current):
                return True
            pending.extend(current.values())
        elif isinstance(current, (list, tuple)):
            pending.extend(current)
    return False


def _msgpack() -> Any:
    try:
        import msgpack  # noqa: PLC0415 - optional extra, imported on use
    except ImportError:
        msg = "setting pii_inner_serializer: 'msgpack' needs the extra: pip install 'celery-pii[msgpack]'"
        raise ConfigurationError(msg) from None
    return msgpack


_KNOWN_CODECS: Final = frozenset((_ORJSON, b"j", _TYPED_JSON, b"m"))


def _decode(codec: bytes, body: bytes) -> Any:
    if codec not in _KNOWN_CODECS:
        raise DecryptionFailed
    try:
        if codec == _ORJSON:
            return _json.read_own(body)
        if codec == b"j":
            return _json.loads(body)
        if codec == b"k":
            return kombu_json.loads(body)
        return _msgpack().unpackb(body, raw=False)
    except (ValueError, TypeError, RecursionError):
        raise DecryptionFailed from None
    except Exception as error:
        # kombu's typed-JSON hooks raise what their value types raise
        # (AttributeError, decimal.InvalidOperation, ...) and msgpack's errors
        # share no base class: for an untrusted body, any of them means "not ours".
        if codec == b"k" or type(error).__module__.startswith("msgpack"):
            raise DecryptionFailed from None
        raise


def is_task_body(obj: object) -> bool:
    """True for a protocol-2 task body ``(args, kwargs, embed)``."""
    return type(obj) is tuple and len(obj) == 3 and isinstance(obj[2], dict) and obj[2].keys() >= _EMBED_KEYS


class PIISerializer:
    """Encoder and decoder registered with kombu as ``pii``."""

    def __init__(
        self,
        inner: str = "json",
        *,
        seal_result: ResultHook | None = None,
        open_result: ResultHook | None = None,
        legacy_json: bool | Callable[[], bool] = False,
        eager_call: ResultHook | None = None,
    ) -> None:
        """Create the serializer.

        Arguments:
            inner: ``json`` or ``msgpack``: how bodies are encoded inside the frame.
            seal_result: called on anything that is not a task body; returns what
                to encode (it seals results while a PII task runs).
            open_result: called on decoded values; opens sealed results.
            legacy_json: also read unframed JSON (results stored as ``json``
                before a rollout; see ``pii_allow_plaintext``); a callable is
                asked each time such a value comes.
            eager_call: given what msgpack cannot write and that is not a task
                body, returns it as a worker's message would carry it (declared
                values marked) if it is an eager call's ``(args, kwargs)``, else
                ``None``: then it is written as kombu's typed JSON (it never
                leaves the process) when msgpack writes the rest.
        """
        if inner not in _CODECS:
            msg = "setting pii_inner_serializer: must be 'json' or 'msgpack'"
            raise ConfigurationError(msg)
        if inner == "msgpack":
            _msgpack()
        self.inner = inner
        self._header = bytes((FRAME_VERSION,)) + _CODECS[inner]
        self._orjson_header = bytes((FRAME_VERSION,)) + _ORJSON
        self._seal_result = seal_result
        self._open_result = open_result
        self._legacy_json = legacy_json
        self._eager_call = eager_call

    @property
    def legacy_json(self) -> bool:
        """Unframed JSON is read too (see ``legacy_json`` of :meth:`__init__`)."""
        legacy = self._legacy_json
        return legacy() if callable(legacy) else legacy

    def dumps(self, obj: Any) -> bytes:
        """Encode; task bodies must have passed the publish step.

        Raises:
            EncryptionFailed: a task body that was not sealed by ``setup_pii``.
        """
        task_body = is_task_body(obj)
        ticket = publish_ticket.get() if task_body else None
        if task_body:
            if ticket is None or ticket.body is not obj:
                msg = (
                    "a task body reached the 'pii' serializer without passing celery-pii's publish "
                    "step; call setup_pii(app) on the app that publishes it (nothing was published)"
                )
                raise EncryptionFailed(msg)
        elif self._seal_result is not None:
            obj = self._seal_result(obj)
        try:
            return self._encoded(obj, task_body=task_body, ticket=ticket)
        except KeyRefused as error:
            where = f"the dict at {shown_path(error.location)}" if error.location else "a dict"
            if ticket is None:  # a result (the task is not known here)
                msg = f"{where} {error.why}; nothing was encoded"
            else:
                msg = (
                    f"task {ticket.task!r}: {where} {error.why}; give its keys as text; nothing was published"
                )
            raise EncryptionFailed(msg) from None

    def _encoded(self, obj: Any, *, task_body: bool, ticket: PublishTicket | None) -> bytes:
        """``obj`` framed, by the inner serializer.

        Raises:
            KeyRefused: a dict whose keys would not read back as given (see :func:`_msgpack_packed`).
        """
        if self.inner == "msgpack":
            # The publish step says whether field paths or detection look into the task's arguments.
            refuse = task_body and ticket is not None and ticket.paths_matter
            try:
                return self._header + _msgpack_packed(obj, task_body=task_body, refuse_bytes_keys=refuse)
            except (TypeError, OverflowError):  # a datetime, Decimal, UUID, an int beyond 64 bits...
                as_sent = None if task_body or self._eager_call is None else self._eager_call(obj)
                if as_sent is None:
                    if task_body and ticket is not None:
                        _refuse_unwritable(obj, ticket.task)
                    raise
                # An eager call's (args, kwargs): a worker's message carries its declared values
                # sealed (as typed JSON), so only the others must be what msgpack writes.
                _msgpack_packed(as_sent, task_body=False)
                typed: str = kombu_json.dumps(obj)
                return bytes((FRAME_VERSION,)) + _TYPED_JSON + typed.encode()
        # JSON writes tuples as lists; given as lists, orjson's output reads back equal (see _json).
        document = [list(obj[0]), obj[1], obj[2]] if task_body else obj
        try:
            data, by_orjson = _json.encode(document)
        except (TypeError, ValueError):  # a datetime, Decimal, UUID, bytes...
            if _json.keys_may_collide(document):
                _refuse_keys_written_alike(obj, task_body=task_body)
            text: str = kombu_json.dumps(obj)
            return bytes((FRAME_VERSION,)) + _TYPED_JSON + text.encode()
        # The standard library wrote it (orjson refused, or wrote it otherwise): 1 and "1" alike.
        if not by_orjson and _json.keys_may_collide(document):
            _refuse_keys_written_alike(obj, task_body=task_body)
        return (self._orjson_header if by_orjson else self._header) + data

    def loads(self, data: bytes | str) -> Any:
        """Decode a frame; stored results are opened, task arguments never.

        Raises:
            DecryptionFailed: not a frame of a known version (kombu wraps it in DecodeError).
        """
        try:
            raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
        except (UnicodeEncodeError, TypeError):
            raise DecryptionFailed from None
        if len(raw) >= 2 and raw[0] == FRAME_VERSION:
            value = _decode(raw[1:2], raw[2:])
        elif raw[:1] in _JSON_STARTS and self.legacy_json:
            # Rollout mode: a result Celery stored as plain json before the switch
            # (the backend decodes every stored result with the current serializer).
            value = _decode(b"j", raw)
        else:
            if raw[:1] in _JSON_STARTS:  # refused all the same; the fixed message would read as tampering
                logger.warning(
                    "celery-pii: refused a stored value celery-pii did not write (plain JSON: a result "
                    "stored before the switch to pii?); pii_allow_plaintext=True reads them during a rollout"
                )
            raise DecryptionFailed
        if self._open_result is not None:
            value = self._open_result(value)
        return value
