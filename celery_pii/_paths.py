"""Field paths: the grammar users write in ``pii_fields`` and where it points.

Grammar (DESIGN §1)::

    path     := first rest*
    first    := NAME | "[" INT "]" | "[*]" | "[" JSON-STRING "]"
    rest     := "." NAME | "[" INT "]" | "[*]" | "[" JSON-STRING "]"
    NAME     := letter or "_", then letters, digits, "_" or "-"

``customer.email``, ``items[*].serial``, ``rows[3][1]``, ``headers["x.y"]``.

A parsed path is a tuple of parts: ``str`` (dict key or parameter name),
``int`` (list index) or :data:`WILDCARD`.

A *location* is a concrete place in a message root: ``("args", i, ...)`` for
a positional argument, ``("kwargs", name, ...)`` for a keyword argument, or
``(part, ...)`` inside an embedded canvas part (``callbacks``, ``errbacks``,
``chain``, ``chord``: see ``_sealer``); the rest are dict keys (as JSON writes
them) and list indices.  The envelope records locations, so opening never
needs the task's signature.

This module does no I/O and imports no Celery.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeAlias

from .exceptions import ConfigurationError

__all__ = [
    "WILDCARD",
    "Binder",
    "Location",
    "Part",
    "format_path",
    "get_at",
    "json_key",
    "parse_path",
    "replace_in_copies",
    "set_all_in_place",
    "set_in_place",
    "writes_keys_alike",
]


class _Wildcard:
    """The ``[*]`` part: every element of a list."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WILDCARD"


WILDCARD: Final = _Wildcard()

Part: TypeAlias = "str | int | _Wildcard"
Location: TypeAlias = "tuple[str | int, ...]"

# A path longer than this is refused: no real payload nests this deep, and a
# bound keeps every walk over paths linear in the input.
MAX_PATH_PARTS: Final = 64
MAX_PATH_LENGTH: Final = 1024

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INDEX = re.compile(r"\[(?:(\*)|(0|[1-9][0-9]{0,8}))\]")
_NAME_ONLY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_json_decoder = json.JSONDecoder()
_NOT_POSITIONAL: Final = sys.maxsize


def parse_path(text: object, *, task: str | None = None) -> tuple[Part, ...]:
    """Parse a field path into its parts.

    Arguments:
        text: the path, e.g. ``"items[*].serial"`` (anything else is refused).
        task: the task name, used only in the error message.

    Raises:
        ConfigurationError: the path is malformed; the message names the
            path and the task.
    """
    if not isinstance(text, str):
        msg = f"{_where(task)}field paths must be strings"
        raise ConfigurationError(msg)
    if not text or len(text) > MAX_PATH_LENGTH:
        raise _malformed(text, task, "empty or longer than 1024 characters")
    parts: list[Part] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "[":
            pos = _parse_bracket(text, pos, parts, task)
        else:
            if parts:
                if text[pos] != ".":
                    raise _malformed(text, task, f"unexpected character at offset {pos}")
                pos += 1
            match = _NAME.match(text, pos)
            if match is None:
                raise _malformed(text, task, f"expected a name at offset {pos}")
            parts.append(match.group())
            pos = match.end()
        if len(parts) > MAX_PATH_PARTS:
            raise _malformed(text, task, f"more than {MAX_PATH_PARTS} parts")
    return tuple(parts)


def _parse_bracket(text: str, pos: int, parts: list[Part], task: str | None) -> int:
    match = _INDEX.match(text, pos)
    if match is not None:
        parts.append(WILDCARD if match.group(1) else int(match.group(2)))
        return match.end()
    if text.startswith('["', pos):
        try:
            key, end = _json_decoder.raw_decode(text, pos + 1)
        except ValueError:
            key, end = None, pos
        if isinstance(key, str) and text.startswith("]", end):
            parts.append(key)
            return end + 1
    raise _malformed(text, task, f"bad bracket at offset {pos}")


def _where(task: str | None) -> str:
    return f"task {task!r}: " if task else ""


def _malformed(text: object, task: str | None, why: str) -> ConfigurationError:
    # Paths are configuration written by the developer, not payload, so the
    # path itself may be quoted (shortened, in case a value was pasted in).
    shown = str(text)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ConfigurationError(f"{_where(task)}malformed field path {shown!r}: {why}")


def format_path(parts: Sequence[Part]) -> str:
    """Render parts (or a location) in the field-path grammar.

    ``format_path(("customer", "email")) == "customer.email"``,
    ``format_path((0, "email")) == "[0].email"``.
    """
    out: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            if _NAME_ONLY.match(part):
                out.append(part if i == 0 else "." + part)
            else:
                out.append("[" + json.dumps(part, ensure_ascii=False) + "]")
        elif isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append("[*]")
    return "".join(out)


class Binder:
    """Turns declared field paths into concrete locations in a task call.

    Built once per task from its function signature; positional arguments are
    matched to parameter names, so ``charge.delay("4111...")`` and
    ``charge.delay(card_number="4111...")`` seal the same field.  A name the
    signature lacks is accepted beside ``**kwargs``; if the function also takes
    ``*args``, such a field given by position cannot be told apart from the
    other extra positional arguments, so all of those are sealed whole.
    """

    __slots__ = (
        "_all_simple",
        "_fields",
        "_index",
        "_named",
        "_simple",
        "_unnamed_by_position",
        "_var_keyword",
        "_var_positional",
        "_whole_if_shape_differs",
        "paths",
    )

    def __init__(
        self,
        fun: Callable[..., Any],
        paths: Sequence[str],
        *,
        task: str,
        sealing: bool = True,
    ) -> None:
        """Validate ``paths`` against ``fun``'s parameters.

        Arguments:
            fun: the task function, as called with a message's arguments.
            paths: the declared field paths.
            task: the task's name, for error messages.
            sealing: whether the binder finds what to seal, and so, in doubt,
                finds more: a name the signature lacks, beside ``*args``, finds
                every extra positional argument; a path that meets a value of
                another shape (a text or a list where it goes into a dict) finds
                that value whole.  Off (a data subject's id: one value, never a
                guess), only the place the path names is found.

        Raises:
            ConfigurationError: a path is malformed or names no parameter.
        """
        try:
            # The call's own parameters, as Celery binds them: not through a decorator's
            # ``__wrapped__`` (see ``_taskclass.call_target``).
            signature = inspect.signature(fun, follow_wrapped=False)
        except (TypeError, ValueError):
            signature = None
        positional: list[str] = []
        named: set[str] = set()
        var_positional = var_keyword = None
        if signature is None:
            var_positional, var_keyword = "args", "kwargs"
        else:
            for param in signature.parameters.values():
                if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                    positional.append(param.name)
                    named.add(param.name)
                elif param.kind is param.KEYWORD_ONLY:
                    named.add(param.name)
                elif param.kind is param.VAR_POSITIONAL:
                    var_positional = param.name
                else:
                    var_keyword = param.name
        self._index = {name: i for i, name in enumerate(positional)}
        self._named = frozenset(named)
        self._var_positional = var_positional
        self._var_keyword = var_keyword
        self._unnamed_by_position = sealing and var_positional is not None
        self._whole_if_shape_differs = sealing
        self.paths = tuple(paths)
        declared: list[tuple[Part, ...]] = []
        for text in self.paths:
            parts = parse_path(text, task=task)
            head = parts[0]
            if not isinstance(head, str):
                raise _malformed(text, task, "must start with a parameter name")
            known = head in named or head in (var_positional, var_keyword)
            if not known and var_keyword is None:
                msg = f"task {task!r}: field path {text!r} names no parameter of the task function"
                raise ConfigurationError(msg)
            declared.append(parts)
        fields: list[tuple[str, tuple[Part, ...]]] = [
            (str(parts[0]), parts[1:])
            for i, parts in enumerate(declared)
            # A path inside another declared one (``customer.email`` beside ``customer``) is
            # sealed with it: locating both would put a value inside a sealed one.
            if not any(
                _covers(other, parts) and (other != parts or j < i)
                for j, other in enumerate(declared)
                if j != i
            )
        ]
        self._fields = tuple(fields)
        # The common shape, "a named parameter then dict keys", is resolved
        # without generators: it runs for every message published.
        # Each such field is kept with its two possible locations, built once
        # (a keyword-only parameter gets an index no call reaches).
        self._simple: tuple[tuple[str, int, tuple[str, ...], Location, Location], ...] = tuple(
            (head, index, keys, ("kwargs", head, *keys), ("args", index, *keys))
            for head, rest in fields
            if head not in (var_positional, var_keyword)
            and (head in named or not self._unnamed_by_position)  # else it may come by position (_roots)
            and all(isinstance(p, str) for p in rest)
            for index, keys in [(self._index.get(head, _NOT_POSITIONAL), tuple(str(p) for p in rest))]
        )
        self._all_simple = len(self._simple) == len(fields)

    @property
    def simple(self) -> bool:
        """True if every path is a parameter name followed by dict keys only."""
        return self._all_simple

    @property
    def heads(self) -> frozenset[str]:
        """The parameter names the declared paths start with (``customer`` of ``customer.email``)."""
        return frozenset(head for head, _ in self._fields)

    def names(self, parameter: str) -> bool:
        """True if the called function has a parameter of that name (else it can come by keyword only)."""
        return parameter in self._named

    def locate(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[Location, Any]]:
        """Every declared field present in the call, as ``(location, value)``.

        Arguments:
            args: positional arguments of the call, as it will be published.
            kwargs: keyword arguments of the call.
        """
        locations, values = self.locate_apart(args, kwargs)
        return list(zip(locations, values, strict=True))

    def locate_apart(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Location], list[Any]]:
        """:meth:`locate` as two lists: the locations, and the values found there."""
        locations: list[Location] = []
        values: list[Any] = []
        if not self._all_simple:
            located = dict(self._locate_any(args, kwargs))  # the same place found twice counts once
            for found_at, found in located.items():
                # A wildcard path and an indexed one can still meet (``items[2]``
                # and ``items[*].serial``): what lies inside a found value is sealed with it.
                if not any(found_at[:end] in located for end in range(2, len(found_at))):
                    locations.append(found_at)
                    values.append(found)
            return locations, values
        return self._walk_simple(args, kwargs, None)[:2]

    def mark_simple(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], marker: str, *, keep_marked: bool = True
    ) -> tuple[list[Location], list[Any], Sequence[Any], Mapping[str, Any]]:
        """For a :attr:`simple` binder: :meth:`locate_apart` and :func:`replace_in_copies` in one walk.

        Returns the locations, the values found there, and ``args`` and
        ``kwargs`` with ``marker`` in their place: copies where something was
        replaced (only the containers on the way), the caller's objects
        otherwise.  A value that already is ``marker`` (sealed, its envelope
        carried along) is neither located nor replaced, with ``keep_marked``;
        without, it raises :class:`MarkedValue`.

        Raises:
            ValueError: the binder is not simple (its other paths would be missed).
            MarkedValue: a value is ``marker`` and ``keep_marked`` is false.
            AmbiguousKey: a dict on the way to a value holds two keys JSON
                writes alike (``1`` and ``"1"``).
        """
        if not self._all_simple:
            msg = f"field paths {self.paths!r} are not all names and dict keys: use locate()"
            raise ValueError(msg)
        return self._walk_simple(args, kwargs, marker, keep_marked)

    def _walk_simple(  # noqa: C901, PLR0912 - one walk per message; split up, it costs a call per field
        self, args: Sequence[Any], kwargs: Mapping[str, Any], marker: str | None, keep_marked: bool = True
    ) -> tuple[list[Location], list[Any], Sequence[Any], Mapping[str, Any]]:
        """The simple fields of a call; with a ``marker``, also put in their place in copies."""
        locations: list[Location] = []
        values: list[Any] = []
        new_args, new_kwargs = args, kwargs
        made: set[int] = set()  # ids of the dicts copied here (all alive in the result)
        for head, index, rest, by_keyword, by_position in self._simple:
            location: Location
            if head in kwargs:
                value, location = kwargs[head], by_keyword
            elif index < len(args):
                value, location = args[index], by_position
            else:
                continue
            keys, argument = rest, value
            for part in rest:
                if not isinstance(value, dict):
                    if value is None or not self._whole_if_shape_differs:
                        value = _ABSENT
                    else:  # a text or list where the path goes into a dict: it may hold the field
                        depth = _dict_steps(argument, rest)
                        keys, location = rest[:depth], location[: 2 + depth]
                        if location in locations:  # another field's path stops there too
                            value = _ABSENT
                    break
                if part not in value:
                    part = find_key(value, part)  # noqa: PLW2901 - the caller's {1: ...} is JSON's {"1": ...}
                    if part is _ABSENT:
                        value = _ABSENT
                        break
                value = value[part]
            if value is _ABSENT:
                continue
            if marker is not None:
                if isinstance(value, str) and value == marker:
                    if keep_marked:
                        continue
                    raise MarkedValue(location)
                try:
                    if location[0] == "kwargs":
                        if new_kwargs is kwargs:
                            new_kwargs = dict(kwargs)
                        _mark_in_copies(new_kwargs, head, keys, marker, made)
                    else:
                        if new_args is args:
                            new_args = list(args)
                        _mark_in_copies(new_args, index, keys, marker, made)
                except AmbiguousKey:
                    raise AmbiguousKey(location) from None
            locations.append(location)
            values.append(value)
        return locations, values, new_args, new_kwargs

    def _locate_any(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[tuple[Location, Any]]:
        whole = self._whole_if_shape_differs
        for head, rest in self._fields:
            for root, tail in self._roots(head, rest, args, kwargs):
                if isinstance(root, int):
                    yield from _walk(args[root], ("args", root), tail, whole)
                else:
                    yield from _walk(kwargs[root], ("kwargs", root), tail, whole)

    def display(self, location: Location) -> str:
        """The parameter-name path of a call location, for messages and reprs."""
        return format_path(self.named(location))

    def named(self, location: Location) -> Location:
        """A call location (``("args", 1, "x")``) as parameter-name parts (``("other", "x")``)."""
        root, head, rest = location[0], location[1], location[2:]
        if root == "args" and isinstance(head, int):
            names = list(self._index)
            if head < len(names):
                return (names[head], *rest)
            return (self._var_positional or "args", head - len(names), *rest)
        return (head, *rest)

    def _roots(
        self,
        head: str,
        rest: tuple[Part, ...],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> Iterator[tuple[str | int, tuple[Part, ...]]]:
        if head in kwargs:
            yield head, rest
            return
        index = self._index.get(head)
        if index is not None:
            if index < len(args):
                yield index, rest
            return
        if head == self._var_positional:
            yield from _select_positional(len(self._index), len(args), rest)
        elif head == self._var_keyword:
            yield from _select_keywords(kwargs, self._named, rest)
        elif head not in self._named and self._unnamed_by_position:
            # A name the signature does not have, beside ``*args`` (a decorator without
            # ``functools.wraps``, a ``run(self, *args, **kwargs)``): given by position it is
            # one of the extra positional arguments, and which one cannot be told.  All of
            # them are sealed, whole, rather than none.
            yield from _select_positional(len(self._index), len(args), ())


def _covers(outer: tuple[Part, ...], inner: tuple[Part, ...]) -> bool:
    """True if every value the path ``inner`` finds is (or lies inside) one that ``outer`` finds."""
    if len(outer) > len(inner):
        return False
    return all(
        mine == theirs or (mine is WILDCARD and not isinstance(theirs, str))
        for mine, theirs in zip(outer, inner)  # noqa: B905 - outer is the shorter: compare its length
    )


def _select_positional(
    start: int, stop: int, rest: tuple[Part, ...]
) -> Iterator[tuple[str | int, tuple[Part, ...]]]:
    if not rest or rest[0] is WILDCARD:
        for i in range(start, stop):
            yield i, rest[1:]
    elif isinstance(rest[0], int) and start + rest[0] < stop:
        yield start + rest[0], rest[1:]


def _select_keywords(
    kwargs: Mapping[str, Any], named: frozenset[str], rest: tuple[Part, ...]
) -> Iterator[tuple[str | int, tuple[Part, ...]]]:
    if not rest:
        for key in kwargs:
            if key not in named:
                yield key, ()
    elif isinstance(rest[0], str) and rest[0] in kwargs:
        yield rest[0], rest[1:]


def _dict_steps(value: Any, keys: tuple[str, ...]) -> int:
    """How many of ``keys`` lead through dicts from ``value``: where a path meets another shape."""
    depth = 0
    for key in keys:
        if not isinstance(value, dict):
            break
        value = value[key if key in value else find_key(value, key)]
        depth += 1
    return depth


def _walk(
    value: Any, location: Location, rest: tuple[Part, ...], whole: bool
) -> Iterator[tuple[Location, Any]]:
    """The values ``rest`` finds in ``value``; with ``whole``, a value of another shape on the way, whole."""
    if not rest:
        yield location, value
        return
    part, tail = rest[0], rest[1:]
    if isinstance(part, str):
        if isinstance(value, dict):
            key = part if part in value else find_key(value, part)
            if key is not _ABSENT:
                yield from _walk(value[key], (*location, part), tail, whole)
            return
    elif isinstance(value, (list, tuple)):
        if part is WILDCARD:
            for i, item in enumerate(value):
                yield from _walk(item, (*location, i), tail, whole)
        elif isinstance(part, int) and part < len(value):
            yield from _walk(value[part], (*location, part), tail, whole)
        return
    if whole and value is not None:  # a text or another container where the path goes on: it may hold it
        yield location, value


def get_at(root: Mapping[str, Any], location: Location) -> Any:
    """The value at ``location``; ``KeyError``/``IndexError``/``TypeError`` when absent."""
    value: Any = root
    for part in location:
        if isinstance(value, dict) and part not in value:
            part = find_key(value, part)  # noqa: PLW2901 - the caller's non-str key, as JSON writes it
        value = value[part]
    return value


def replace_in_copies(
    root: Mapping[str, Any], locations: Iterable[Location], value: Any, *, sealing: bool = False
) -> dict[str, Any]:
    """Return a copy of ``root`` with ``value`` put at each of ``locations``.

    Only the containers on the way to a replaced value are copied (tuples
    become lists, as JSON would make them); the caller's objects are never
    changed: a reused signature must not be sealed twice, and the caller's
    data must stay theirs.

    A dict on the way holding two keys JSON writes alike (``1`` and ``"1"``)
    keeps only the replaced one; when ``sealing``, it raises
    :class:`AmbiguousKey` instead (see :func:`_own_json_keys`).
    """
    copy = dict(root)
    # The containers made here, by id: all stay alive in the result, so no
    # other object can share an id with one of them while this runs.
    made = {id(copy)}
    for location in locations:
        parent: Any = copy
        try:
            for part in location[:-1]:
                if type(part) is str and (part not in parent or _may_name_other_keys(part)):
                    _own_json_keys(parent, part, sealing)
                node = parent[part]
                if id(node) not in made:
                    node = list(node) if isinstance(node, (list, tuple)) else dict(node)
                    made.add(id(node))
                    parent[part] = node
                parent = node
            last = location[-1]
            if type(last) is str and (last not in parent or _may_name_other_keys(last)):
                _own_json_keys(parent, last, sealing)
        except AmbiguousKey:
            raise AmbiguousKey(location) from None
        parent[location[-1]] = value
    return copy


def _mark_in_copies(parent: Any, slot: str | int, keys: tuple[str, ...], marker: str, made: set[int]) -> None:
    """Put ``marker`` at ``parent[slot]`` then down ``keys``, copying each dict on the way once.

    ``parent`` is already a copy; ``made`` holds the ids of the copies made so
    far, so a dict on the way to two values is copied once.
    """
    for key in keys:
        node = parent[slot]
        if id(node) not in made:
            node = dict(node)
            made.add(id(node))
            parent[slot] = node
        parent, slot = node, key
        if slot not in parent or _may_name_other_keys(slot):
            _own_json_keys(parent, slot, True)
    parent[slot] = marker


class MarkedValue(Exception):
    """A declared place already holds the marker, with no envelope carried for it."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.location = location


class AmbiguousKey(Exception):
    """A dict on the way to a declared place holds two keys JSON writes alike (``1`` and ``"1"``).

    ``location`` is the declared place (empty where it is not known yet).
    """

    def __init__(self, location: Location = ()) -> None:
        super().__init__(location)
        self.location = location


#: What :func:`find_key` returns when no key of the dict is written so.
_ABSENT: Final = object()

#: How the text JSON writes for a non-str key starts (numbers, ``NaN``) or what it is.
_NUMBER_STARTS: Final = frozenset("-0123456789N")
_JSON_WORDS: Final = frozenset(("true", "false", "null", "Infinity"))


def json_key(key: object) -> str | None:
    """The text JSON writes for a dict key (``1`` -> ``"1"``, ``True`` -> ``"true"``); None if it cannot."""
    if isinstance(key, str):
        return str.__str__(key)  # a str subclass (a str Enum member) is written as its text, not its str()
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, int):
        return int.__repr__(key)  # an IntEnum member is written as its number
    if isinstance(key, float):
        return json.dumps(float(key))  # NaN and Infinity as JSON writes them
    return None


def writes_keys_alike(value: dict[Any, Any]) -> bool:
    """True if JSON writes two of the dict's keys as one text (``1`` and ``"1"``): one would be lost.

    Keys JSON cannot write at all are left out (its encoder refuses them itself).
    """
    if all(type(key) is str for key in value):
        return False
    written = [text for text in map(json_key, value) if text is not None]
    return len(set(written)) != len(written)


def find_key(value: dict[Any, Any], part: str | int) -> Any:
    """The non-str key of ``value`` that JSON writes as ``part`` (absent itself), or :data:`_ABSENT`.

    A caller's dict may have non-str keys (``{1: "4111..."}``): the message,
    once JSON, has ``{"1": ...}``, which is where a path ``codes["1"]`` points
    and where the worker looks.  The publisher must find it too, or the value
    would leave unsealed.  Callers look for ``part`` itself first (one lookup).
    """
    if isinstance(part, str):
        for key in value:
            if type(key) is not str and json_key(key) == part:
                return key
    return _ABSENT


def _may_name_other_keys(key: str) -> bool:
    """True if JSON writes some non-str key as ``key`` (a number, ``true``, ``null``, ``NaN``).

    Callers ask before calling :func:`_own_json_keys` (they run for every
    field sealed; almost no field name is such a text).
    """
    return key[:1] in _NUMBER_STARTS or key in _JSON_WORDS


def _own_json_keys(container: Any, key: str | int, sealing: bool) -> None:
    """Make a dict copied here hold ``key`` only as JSON writes it.

    The marker must replace the caller's ``{1: value}``, not sit beside it as
    ``{"1": marker}``: JSON would write both, and the plaintext would go too.
    A dict holding both ``1`` and ``"1"`` has two values JSON writes under one
    name: sealing refuses it (:class:`AmbiguousKey`: which one the path
    declares cannot be told, and the other would leave unsealed); a copy made
    to hide values keeps ``key`` alone.
    """
    if not isinstance(container, dict) or not isinstance(key, str):
        return
    present = key in container
    if present and not _may_name_other_keys(key):
        return  # the common case: no key other than a str one is written so
    others = [k for k in container if type(k) is not str and json_key(k) == key]
    if not others:
        return
    if sealing and present + len(others) > 1:
        raise AmbiguousKey
    renamed = _ABSENT if present else others.pop(0)
    dropped = {id(k) for k in others}  # by identity: NaN keys are not equal to themselves
    kept = {(key if k is renamed else k): v for k, v in container.items() if id(k) not in dropped}
    container.clear()
    container.update(kept)


def set_in_place(root: Mapping[str, Any], location: Location, value: Any) -> None:
    """Set the value at ``location`` in freshly decoded (worker-owned) data.

    Raises:
        KeyError, IndexError, TypeError: the location does not exist.
    """
    set_all_in_place(root, (location,), (value,))


def set_all_in_place(root: Mapping[str, Any], locations: Sequence[Location], values: Sequence[Any]) -> None:
    """:func:`set_in_place` for each location and its value (one call: this runs for every message).

    All or nothing: every place is found before any value is written, so a
    body that lost one of its places (edited on the broker) keeps none of the
    values, and what is parked in quarantine holds no plaintext.

    Raises:
        KeyError, IndexError, TypeError: a location does not exist (nothing
            has been set).
        ValueError: not as many values as locations.
    """
    if len(locations) != len(values):
        msg = "as many values as locations"
        raise ValueError(msg)
    containers: list[Any] = []  # where each value goes, found before any is written
    for location in locations:
        container: Any = root
        last_at = len(location) - 1
        for at in range(last_at):  # indexed, not location[:-1]: no tuple made per location
            container = container[location[at]]
        last = location[last_at]
        if isinstance(container, list) and isinstance(last, int):
            if not 0 <= last < len(container):  # never appends
                raise IndexError(last)
        elif not (isinstance(container, dict) and last in container):
            raise KeyError(last)
        containers.append(container)
    for at, container in enumerate(containers):
        container[locations[at][-1]] = values[at]
