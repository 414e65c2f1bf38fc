"""Sealing task calls and results, and opening them again.

A *message root* names the parts of a task message that can hold PII::

    {"args": [...], "kwargs": {...},                      # the call itself
     "callbacks": [...], "errbacks": [...],                # link / link_error
     "chain": [...], "chord": {...}}                       # later canvas steps

Every sealed value of one message goes into **one** envelope (one AEAD
operation) whose locations are paths from that root.  The call's own fields
are the task's declared ``pii_fields``; embedded canvas steps of PII tasks
(or of tasks this process does not know) have every argument sealed, bound to
the *parent* message, because the worker opens them before Celery publishes
them as messages of their own, where they are sealed again under their own
task's fields, id and key.

This module knows no Celery objects beyond plain dicts and lists (it imports
Celery only through the scrubber of ``_redact``, for one exception type).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NamedTuple, cast

from . import _envelope
from ._config import Settings
from ._crypto import DataKey
from ._detect import locate_with_status, shown_path
from ._envelope import Kind
from ._keys import (
    BUCKET_FORMAT,
    SUBJECT_INT_BITS,
    SUBJECT_KEY_PREFIX,
    KeyManager,
    KeySpec,
    bucket_moment,
    is_subject_id,
)
from ._paths import (
    AmbiguousKey,
    Binder,
    Location,
    MarkedValue,
    get_at,
    replace_in_copies,
    set_all_in_place,
)
from ._redact import Scrubber
from ._specs import TaskSpec
from ._store import utcnow
from .exceptions import DecryptionFailed, EncryptionFailed, KeyDestroyed

# What the rest of the package uses.
__all__ = [
    "EMBED_KEY",
    "MARKER",
    "RESULT_KEY",
    "Opened",
    "OpenedResult",
    "Sealed",
    "Sealer",
    "derived_key_spec",
    "field_path",
    "has_canvas",
    "hide_in_step_shadows",
    "is_marker",
    "is_result_meta",
    "is_sealed_result",
    "opened_with",
    "step_holds_marker",
    "steps_hold_markers",
    "unreadable_result",
    "withheld_outcome",
    "withheld_reason",
]

#: What a sealed value looks like in the message body (and so in ``inspect``).
MARKER: Final = "[pii:sealed]"
#: The body's embed key (request attribute on the worker) that carries the envelopes.
#: Namespaced: Celery merges a message's headers into the same request, and an
#: application header named ``pii`` was read as envelopes (and parked as forged).
EMBED_KEY: Final = "__celery_pii__"
#: The key of a sealed result inside the stored result.
RESULT_KEY: Final = "__celery_pii__"
#: Fields of a stored result's meta that are sealed.
RESULT_FIELDS: Final = ("result", "traceback", "args", "kwargs")
# A stored meta's state: sealed beside those (bound), and left readable for Celery.
_STATUS_FIELD: Final = "status"
#: Canvas parts of a task message that embed later steps.
EMBED_PARTS: Final = ("callbacks", "errbacks", "chain", "chord")
# Associated-data "task name" of result envelopes: results are bound to their
# task id (checked against the stored meta), and never open as task arguments.
_RESULT_AD: Final = "celery-pii result"
# The one location of a result sealed as a whole value (not a result meta).
_VALUE_FIELD: Final = "value"
_WHOLE_VALUE: Final = ((_VALUE_FIELD,),)
# Between the task id and the group a whole value is bound to (never in a task id Celery makes).
_GROUP_SEPARATOR: Final = "\x00group:"
_CHORD_UNLOCK: Final = "celery.chord_unlock"
# Built-in tasks that call another task once per item (``task.map``,
# ``task.starmap``, ``task.chunks``): each item is that task's arguments.
_ITEM_TASKS: Final = frozenset(("celery.map", "celery.starmap", "celery.chunks"))
# Tasks whose own arguments hold canvas steps (their sealed values are bound to those steps' names).
_STEP_BOUND: Final = _ITEM_TASKS | {_CHORD_UNLOCK}
# Where a map/starmap/chunks call holds the signature it calls (keyword or positional).
_CALLED_SIGNATURE: Final = frozenset((("kwargs", "task"), ("args", 0)))
_EMBED_PARTS: Final = frozenset(EMBED_PARTS)

SpecLookup = Callable[[str], "tuple[bool, TaskSpec | None]"]


class Sealed:
    """A sealed message: copies of the root with markers, the envelopes, what detection found.

    A plain class with slots (a native class when compiled), made for every message published.
    """

    __slots__ = ("detected", "locations", "root", "step_tokens", "token", "truncated")

    def __init__(  # noqa: PLR0913, PLR0917 - the parts of a sealed message
        self,
        root: dict[str, Any],
        token: str | None,
        locations: tuple[Location, ...],
        detected: tuple[tuple[Location, str], ...] = (),
        truncated: bool = False,
        step_tokens: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        #: The envelope of the values sealed under the message's own key (``None``: there are none).
        self.token = token
        self.locations = locations
        #: Undeclared PII found by ``pii_detect`` (sealed in "encrypt" mode, only reported in "warn").
        self.detected = detected
        #: True when detection stopped at its caps (every argument was then sealed in "encrypt" mode).
        self.truncated = truncated
        #: Envelopes of embedded steps of other data subjects, one per subject's key.
        self.step_tokens = step_tokens

    def __repr__(self) -> str:
        return f"<Sealed {len(self.locations)} locations, {len(self.tokens)} envelopes>"

    @property
    def tokens(self) -> list[str]:
        """Every envelope, the message's own first."""
        return [*((self.token,) if self.token is not None else ()), *self.step_tokens]


class Opened:
    """What opening a message produced: the plaintext values (for scrubbing), the keys, the places.

    A plain class, not a dataclass: compiled (see ``setup.py``) it is a native
    class, built on every message opened without the dataclass machinery.
    """

    __slots__ = ("carried_keys", "keys", "locations", "own_keys", "values")

    def __init__(
        self,
        values: list[Any] | None = None,
        keys: list[tuple[str, int]] | None = None,
        locations: Sequence[Location] = (),
        own_keys: list[tuple[str, int]] | None = None,
        carried_keys: list[tuple[str, int]] | None = None,
    ) -> None:
        self.values: list[Any] = values if values is not None else []
        #: ``(key id, version)`` of each envelope opened, the message's own first.
        self.keys: list[tuple[str, int]] = keys if keys is not None else []
        #: Where the values were put, in their order.
        self.locations: Sequence[Location] = locations
        #: The keys of the envelopes holding the task's own arguments (not only those of steps it
        #: carries, such as a subject's chain step under its own key): what its outcome derives from.
        self.own_keys: list[tuple[str, int]] = own_keys if own_keys is not None else []
        #: The keys of the other envelopes: of steps the message carries.
        self.carried_keys: list[tuple[str, int]] = carried_keys if carried_keys is not None else []


class OpenedResult(NamedTuple):
    """An opened stored result: the value as it was stored, its key, the values that were sealed."""

    value: Any
    #: ``(key id, version)`` of the keys it was sealed under: its own, then its co-keys.
    keys: tuple[tuple[str, int], ...]
    #: The plaintext values of the sealed fields (what logs and errors must hide from now on).
    values: list[Any]


class Sealer:
    """Seals and opens message roots and results with keys from a KeyManager."""

    def __init__(
        self,
        keys: KeyManager,
        settings: Settings,
        lookup: SpecLookup,
        parameters: Callable[[str], Binder | None] = lambda _name: None,
    ) -> None:
        """Create a sealer.

        Arguments:
            keys: where data keys come from.
            settings: the validated ``pii_*`` settings.
            lookup: ``name -> (registered here?, spec or None)`` for tasks by name.
            parameters: ``name -> the task function's parameters`` (a binder), to
                name places in messages as ``pii_fields`` does.
        """
        self.keys = keys
        self.settings = settings
        self.lookup = lookup
        self.parameters = parameters

    # -- publish --------------------------------------------------------------------------

    def seal_message(  # noqa: PLR0913 - keyword-only options
        self,
        name: str,
        task_id: str,
        root: Mapping[str, Any],
        *,
        seal_all: bool = False,
        derived_from: KeySpec | None = None,
        keep_markers: bool = False,
        now: datetime | None = None,
    ) -> Sealed | None:
        """Seal the PII of one task message; ``None`` when there is nothing to seal or report.

        With ``seal_all``, every argument of the call is sealed, not only the
        declared fields: a message published by a running PII task (a chain's
        next step gets the PII task's return value) may carry PII anywhere.
        ``derived_from`` is then the key that task's own data is sealed under:
        the message's key takes its subject and its retention bucket when the
        task's own allows longer (see :func:`derived_key_spec`), so erasure and
        retention reach what was derived from the data too.

        The task's ``pii_detect`` mode then scans what is left (declared fields
        are not scanned twice): "encrypt" seals what it finds, "refuse" raises,
        "warn" only reports it in :attr:`Sealed.detected`.

        A declared field that already holds :data:`MARKER` is left alone with
        ``keep_markers`` (its envelope travels with the message: the retry of a
        message that could not be opened); otherwise it is refused: the caller
        gave that text, and the worker would refuse a marker it has no
        envelope for, as it refuses a forged message.

        Raises:
            EncryptionFailed: a declared subject is absent, a value cannot be
                encoded, a declared field holds the marker, or "refuse" found
                undeclared PII.
            KeyStoreUnavailable: the key is not cached and the store is down.
        """
        registered, spec = self.lookup(name)
        if spec is not None and spec.simple_sealing and not seal_all and not has_canvas(root):
            return self._seal_declared(name, task_id, root, spec, keep_markers=keep_markers)
        # A task this process does not know (``send_task`` by name): which of its
        # arguments are PII is unknown, so all of them are sealed, as for canvas steps.
        seal_all = seal_all or not registered
        found, specs, subject_steps = self._fields(
            name, spec, root, seal_all=seal_all, keep_markers=keep_markers
        )
        mode = spec.detect if spec is not None else self.settings.detect
        detected: tuple[tuple[Location, str], ...] = ()
        truncated = False
        extra: list[tuple[Location, Any]] = []
        if mode != "off":
            detected, truncated, extra = self._detect(name, mode, root, found)
            found.extend(extra)
            if truncated and extra:  # whole arguments sealed: drop the declared places inside them
                found = _outermost(found)
        if not found:
            return Sealed(dict(root), None, (), detected, truncated) if detected or truncated else None
        locations = tuple(location for location, _ in found)
        try:
            sealed_root = replace_in_copies(root, locations, MARKER, sealing=True)
        except AmbiguousKey as error:
            raise _ambiguous_key(name, field_path(spec.binder if spec else None, error.location)) from None
        key_spec = self.key_spec(name, spec, root, specs, now=now)
        if derived_from is not None:
            key_spec = derived_key_spec(key_spec, derived_from)
        own, apart = self._apart_by_subject(
            root, found, subject_steps, own_key_id=key_spec.key_id, derived_from=derived_from, now=now
        )
        # Compressed only when it holds the task's declared fields alone: beside its other
        # arguments (every argument, what detection found, a canvas step's), a value the
        # caller controls would make the length tell the others (CRIME).
        compress = not (seal_all or extra or name in _STEP_BOUND or has_canvas(root))
        token = self._seal_group(name, task_id, root, key_spec, own, compress=compress) if own else None
        step_tokens = tuple(
            self._seal_group(name, task_id, root, *group, compress=compress) for group in apart.values()
        )
        return Sealed(sealed_root, token, locations, detected, truncated, step_tokens)

    def _seal_group(  # noqa: PLR0913 - one envelope's parts, and whether it may be compressed
        self,
        name: str,
        task_id: str,
        root: Mapping[str, Any],
        key_spec: KeySpec,
        found: list[tuple[Location, Any]],
        *,
        compress: bool,
    ) -> str:
        """One envelope: the values ``found`` under ``key_spec``'s key(s), bound to their places."""
        try:
            key, co_keys = self._sealing_keys(key_spec)
        except EncryptionFailed as error:
            raise _naming_the_task(name, error) from None
        locations = tuple(location for location, _ in found)
        values = [value for _, value in found]
        return self._seal_values(
            bound_name(name, root, locations), task_id, key, values, locations, co_keys, compress
        )

    def _sealing_keys(self, key_spec: KeySpec) -> tuple[DataKey, Sequence[DataKey]]:
        """The key ``key_spec`` names, and its co-keys (other subjects' keys the data is sealed under too)."""
        key = self.keys.encryption_key(key_spec)
        if not key_spec.co_keys:  # nearly every seal: no list built
            return key, ()
        return key, [self.keys.encryption_key(_co_key_spec(key_id)) for key_id in key_spec.co_keys]

    def _apart_by_subject(  # noqa: PLR0913 - the message, its values and how its own key was chosen
        self,
        root: Mapping[str, Any],
        found: list[tuple[Location, Any]],
        subject_steps: Mapping[Location, TaskSpec],
        *,
        own_key_id: str,
        derived_from: KeySpec | None,
        now: datetime | None,
    ) -> tuple[list[tuple[Location, Any]], dict[str, tuple[KeySpec, list[tuple[Location, Any]]]]]:
        """The values sealed under the message's key, and those of embedded steps of other data subjects.

        A chain step, link or chord body of a task with a ``pii_subject`` rides
        in another task's message: under that message's key, forgetting the
        step's subject left it readable (and its worker re-sealed it under a
        new key of the erased subject).  Its arguments go in an envelope under
        its own subject's key, so the message opens only while every subject
        in it is still there.
        """
        if not subject_steps:
            return found, {}
        own: list[tuple[Location, Any]] = []
        apart: dict[str, tuple[KeySpec, list[tuple[Location, Any]]]] = {}
        step_keys: dict[Location, KeySpec | None] = {}
        for location, value in found:
            step_path = location[:-2]
            step_spec = subject_steps.get(step_path)
            key_spec = None
            if step_spec is not None:
                if step_path not in step_keys:
                    step_keys[step_path] = self._step_key(root, step_path, step_spec, derived_from, now)
                key_spec = step_keys[step_path]
            if key_spec is None or key_spec.key_id == own_key_id:
                own.append((location, value))
            else:
                apart.setdefault(key_spec.key_id, (key_spec, []))[1].append((location, value))
        return own, apart

    def _step_key(
        self,
        root: Mapping[str, Any],
        step_path: Location,
        spec: TaskSpec,
        derived_from: KeySpec | None,
        now: datetime | None,
    ) -> KeySpec | None:
        """The key of an embedded step's own subject; ``None`` if its call does not hold the subject yet.

        Unless the step is immutable, Celery puts what it is given first (its
        parent's result, a chord's header results): the subject is bound as the
        step will be called.  A mutable errback gets one argument or three, as
        its function takes them: its subject is taken by keyword, and refused
        by position.  A subject given by the parent, or not a subject id
        (:func:`is_subject_id`; the step is refused when it is published on its own), leaves
        the step sealed with the message; its worker seals it under its
        subject's key when it publishes it.

        Raises:
            EncryptionFailed: a mutable errback's subject given by position.
        """
        step = get_at(root, step_path)
        args, kwargs = step.get("args") or (), step.get("kwargs") or {}
        name = str(step.get("task"))
        if not step.get("immutable"):
            if step_path[0] == "errbacks" or "link_error" in step_path:
                _refuse_positional_errback_subject(name, spec, args, kwargs)
                args = ()
            else:
                args = (_GIVEN_LATER, *args)
        subject = next(iter(spec.subject.locate(args, kwargs)), None) if spec.subject is not None else None
        if subject is None or not is_subject_id(subject[1]):
            return None
        key_spec = self.key_spec(name, spec, {"args": args, "kwargs": kwargs}, [spec], now=now)
        return derived_key_spec(key_spec, derived_from) if derived_from is not None else key_spec

    def _seal_declared(
        self, name: str, task_id: str, root: Mapping[str, Any], spec: TaskSpec, *, keep_markers: bool
    ) -> Sealed | None:
        """The common case (``spec.simple_sealing``, no canvas): the declared fields, the task's key.

        What :meth:`seal_message` does for such a call, without its general
        steps: most messages of most apps take this path.
        """
        binder = cast("Binder", spec.binder)  # simple_sealing implies one
        args, kwargs = root.get("args") or (), root.get("kwargs") or {}
        try:
            marked = binder.mark_simple(args, kwargs, MARKER, keep_marked=keep_markers)
        except MarkedValue as error:
            raise _holds_marker(name, binder.display(error.location)) from None
        except AmbiguousKey as error:
            raise _ambiguous_key(name, field_path(binder, error.location)) from None
        found_at, values, sealed_args, sealed_kwargs = marked
        if not values:
            return None
        try:
            key = self.keys.encryption_key(spec.key_spec)
        except EncryptionFailed as error:  # a deadline passed: name the task (the key id is ours)
            raise _naming_the_task(name, error) from None
        locations = tuple(found_at)
        token = self._seal_values(name, task_id, key, values, locations)
        sealed_root = dict(root)
        if sealed_args is not args:
            sealed_root["args"] = sealed_args
        if sealed_kwargs is not kwargs:
            sealed_root["kwargs"] = sealed_kwargs
        return Sealed(sealed_root, token, locations)

    def _seal_values(  # noqa: PLR0913, PLR0917 - one envelope's parts
        self,
        name: str,
        task_id: str,
        key: DataKey,
        values: list[Any],
        locations: tuple[Location, ...],
        co_keys: Sequence[DataKey] = (),
        compress: bool = True,
    ) -> str:
        try:
            return _envelope.seal(
                key,
                values,
                locations=locations,
                task_name=name,
                task_id=task_id,
                compression_threshold=self.settings.compression_threshold if compress else None,
                co_keys=co_keys,
            )
        except _envelope.TypedLookalike as error:  # refused only beside another value: no one place
            msg = f"task {name!r}: the PII values hold {error}; nothing was published"
            raise EncryptionFailed(msg) from None
        except (TypeError, ValueError) as error:
            # Which value it is, named as pii_fields names it (its value is never shown).
            where = _unencodable(key, values, locations, self.parameters(name))
            kind = type(error).__name__
            why = f": {error}" if isinstance(error, _envelope.TwinKeys) else f" cannot be encoded ({kind})"
            msg = f"task {name!r}: the PII value at {where}{why}; nothing was published"
            raise EncryptionFailed(msg) from None
        except EncryptionFailed as error:  # too large, a task id or key id too long
            msg = f"task {name!r}: {error}; nothing was published"
            raise EncryptionFailed(msg) from None

    def _fields(
        self, name: str, spec: TaskSpec | None, root: Mapping[str, Any], *, seal_all: bool, keep_markers: bool
    ) -> tuple[list[tuple[Location, Any]], list[TaskSpec], dict[Location, TaskSpec]]:
        """Every value of a message to seal, the specs whose retention applies to them.

        And the embedded steps of tasks with a ``pii_subject``, by where they
        sit (their arguments are at ``step + ("args", i)`` or ``("kwargs", k)``).
        """
        found = self._call_fields(name, spec, root, seal_all=seal_all, keep_markers=keep_markers)
        specs = [spec] if spec is not None else []
        items: list[tuple[Location, Any, TaskSpec | None]] = []
        if name in _ITEM_TASKS and not seal_all:
            items.extend(_items_of(root, self.lookup))
        steps = list(_carried_steps(root, self.lookup, every_step=seal_all))
        args: Sequence[Any] = root.get("args") or ()
        if name == _CHORD_UNLOCK and len(args) > 1 and not seal_all:
            # chord_unlock carries the chord body as its second argument
            # (with ``seal_all`` it is already sealed whole, with the other arguments).
            steps.extend(_embedded(args[1], ("args", 1), self.lookup))
        for location, value, step_spec in [*items, *steps]:
            found.append((location, value))
            if step_spec is not None:  # the step's own retention applies to its values
                specs.append(step_spec)
        subject_steps = {
            location[:-2]: step_spec
            for location, _, step_spec in steps
            if step_spec is not None and step_spec.subject is not None
        }
        return found, specs, subject_steps

    def _detect(
        self, name: str, mode: str, root: Mapping[str, Any], found: list[tuple[Location, Any]]
    ) -> tuple[tuple[tuple[Location, str], ...], bool, list[tuple[Location, Any]]]:
        """Scan what declared sealing leaves visible; returns (findings, truncated, values to seal)."""
        view = replace_in_copies(root, [loc for loc, _ in found], MARKER) if found else root
        scanned = {part: view[part] for part in ("args", "kwargs", *EMBED_PARTS) if view.get(part)}
        located, truncated = locate_with_status(scanned)
        detected = tuple(located)
        if mode == "refuse" and (detected or truncated):
            binder = self.parameters(name)
            shown = {f"{field_path(binder, loc)} ({category})" for loc, category in detected}
            where = ", ".join(sorted(shown))
            why = f"undeclared PII at {where}" if where else "a payload too large to scan for PII"
            msg = f"task {name!r}: {why}; declare it in pii_fields (pii_detect='refuse'); nothing published"
            raise EncryptionFailed(msg)
        extra: list[tuple[Location, Any]] = []
        if mode == "encrypt":
            if truncated:  # could not look everywhere: seal every argument, as it came
                sealed_locations = {loc for loc, _ in found}
                args, kwargs = root.get("args") or (), root.get("kwargs") or {}
                extra = [
                    (loc, value)
                    for loc, value, _ in _arguments(args, kwargs, ())
                    if loc not in sealed_locations
                ]
            else:
                seen: set[Location] = set()
                for location, _ in detected:
                    if location not in seen:
                        seen.add(location)
                        extra.append((location, self._detected_value(name, view, location)))
        return detected, truncated, extra

    def _detected_value(self, name: str, view: Mapping[str, Any], location: Location) -> Any:
        """The value detection found at ``location``, which a field path can name (or a clear error)."""
        try:
            return get_at(view, location)
        except (KeyError, IndexError, TypeError):
            # Under a key JSON cannot write ({b"email": ...}, which msgpack carries): its
            # place has no field path, so it could not be sealed and opened there.
            where = field_path(self.parameters(name), location)
            msg = (
                f"task {name!r}: undeclared PII at {where} sits under a dict key JSON cannot write "
                "(bytes, say); give its keys as text; nothing was published"
            )
            raise EncryptionFailed(msg) from None

    def _call_fields(
        self, name: str, spec: TaskSpec | None, root: Mapping[str, Any], *, seal_all: bool, keep_markers: bool
    ) -> list[tuple[Location, Any]]:
        args: Sequence[Any] = root.get("args") or ()
        kwargs: Mapping[str, Any] = root.get("kwargs") or {}
        found: list[tuple[Location, Any]] = []
        if seal_all:
            found = [(location, value) for location, value, _ in _arguments(args, kwargs, ())]
            if not keep_markers:  # as for declared fields: the caller's text, or a lost envelope
                marked_arguments: list[Location] = [
                    *(("args", i) for i, item in enumerate(args) if is_marker(item)),
                    *(("kwargs", key) for key, item in kwargs.items() if is_marker(item)),
                ]
                if marked_arguments:
                    raise _holds_marker(name, shown_path(marked_arguments[0]))
        elif spec is not None and spec.binder is not None:
            # A value that is already a marker (its envelope carried along) is left alone.
            located = spec.binder.locate(args, kwargs)
            found = [item for item in located if not is_marker(item[1])]
            if len(found) != len(located) and not keep_markers:
                marked = next(location for location, value in located if is_marker(value))
                raise _holds_marker(name, spec.binder.display(marked))
        return found

    def key_spec(
        self,
        name: str,
        spec: TaskSpec | None,
        root: Mapping[str, Any],
        specs: Sequence[TaskSpec],
        *,
        now: datetime | None = None,
    ) -> KeySpec:
        """The key a message is sealed under: the task's key or its subject's, per retention bucket.

        The earliest retention bucket among the task and the embedded steps wins,
        so embedded data is never kept longer than its own task allows.
        """
        if (
            spec is not None
            and spec.subject is None
            and spec.retention.is_indefinite
            and (len(specs) == 1 or all(s.retention.is_indefinite for s in specs))  # specs[0] is spec
        ):
            return spec.key_spec  # the common case: one fixed key, built once
        now = now or utcnow()
        base, digest = (spec.key_id if spec is not None else self.settings.default_key), None
        if spec is not None and spec.subject is not None:
            args, kwargs = root.get("args") or (), root.get("kwargs") or {}
            subject = next(iter(spec.subject.locate(args, kwargs)), None)
            if subject is None or subject[1] is None or is_marker(subject[1]):
                msg = f"task {name!r}: pii_subject {spec.subject_path!r} is absent from this call"
                if not all(spec.subject.names(head) for head in spec.subject.heads):
                    # A decorator's ``(*args, **kwargs)``: by position it could be any argument.
                    msg += " (the function Celery calls does not name it: pass it by keyword)"
                raise EncryptionFailed(msg)
            if not is_subject_id(subject[1]):
                msg = (
                    f"task {name!r}: pii_subject {spec.subject_path!r} is not a data subject's id here "
                    f"(a string, not blank, an integer of at most {SUBJECT_INT_BITS} bits or a UUID)"
                )
                raise EncryptionFailed(msg)
            base, digest = self.keys.subject_key_id(subject[1])
        policies = [s.retention for s in specs] or [self.settings.default_retention]
        buckets = [b for b in (p.bucket(now) for p in policies) if b is not None]
        if not buckets:
            return KeySpec(base, subject_id=digest)
        return _bucket_key(base, digest, min(buckets))

    # -- consume --------------------------------------------------------------------------

    def values_in_steps(self, root: Mapping[str, Any]) -> list[Any]:
        """The declared values of the canvas steps a message root carries (callbacks, errbacks, chain, chord).

        For an eager call, whose steps were never sealed: what a worker learns
        from the envelopes it opens.
        """
        return [value for _, value, _ in _carried_steps(root, self.lookup)]

    def items_called(self, name: str, root: Mapping[str, Any]) -> tuple[list[Any], KeySpec] | None:
        """A map/starmap/chunks call of a PII task: its item values, and the key its message is sealed under.

        For an eager call, whose items were never sealed: a worker knows them
        from the envelope it opens, and seals the call's result under the
        message's key.  ``None``: not such a call.
        """
        if name not in _ITEM_TASKS:
            return None
        found = list(_items_of(root, self.lookup))
        if not found:
            return None
        specs = [spec for _, _, spec in found if spec is not None]
        return [value for _, value, _ in found], self.key_spec(name, None, root, specs)

    def open_message(
        self, name: str, task_id: str, root: Mapping[str, Any], tokens: Sequence[object]
    ) -> Opened:
        """Open every envelope of a message into ``root``, in place.

        Nothing is written unless every envelope opens: a failure leaves the
        message sealed (so it can be parked in quarantine as it came).

        Raises:
            DecryptionFailed: tampered, moved to another task, or malformed.
            KeyDestroyed, KeyNotFound, KeyStoreUnavailable: from the key store.
        """
        key_for = self.keys.decryption_key
        task_name: str | Callable[[tuple[Location, ...]], str] = name
        if name in _STEP_BOUND or has_canvas(root):
            task_name = functools.partial(_bound_name_or_refuse, name, root)
        opened = []
        for token in tokens:  # a loop: a comprehension's frame costs more on Python 3.10 and 3.11
            opened.append(_envelope.open_task(token, task_id=task_id, task_name=task_name, key_for=key_for))  # noqa: PERF401
        if len(opened) == 1:  # nearly every message: its own call's envelope, nothing embedded
            keys, locations, values = opened[0]
            if _holds_own_arguments(locations):
                result = Opened(values, [*keys], locations, [*keys])
            else:
                result = Opened(values, [*keys], locations, [], [*keys])
        else:
            own = [key for keys, locations, _ in opened if _holds_own_arguments(locations) for key in keys]
            every_key = [key for keys, _, _ in opened for key in keys]
            result = Opened(
                [value for _, _, values in opened for value in values],
                every_key,
                [location for _, locations, _ in opened for location in locations],
                own,
                [key for key in every_key if key not in own],
            )
            # Two envelopes for one place: never a message celery-pii published
            # (an attacker's pick of envelopes bound to this task id: a retry's and its original's).
            if len(set(result.locations)) != len(result.locations):
                raise DecryptionFailed
        try:
            # Every envelope's places at once: all or nothing, so a failure leaves no
            # plaintext in the body that is parked in quarantine.
            set_all_in_place(root, result.locations, result.values)
        except (KeyError, IndexError, TypeError):  # the body no longer has that place
            raise DecryptionFailed from None
        return result

    # -- results --------------------------------------------------------------------------

    def seal_result(self, obj: Any, *, task_id: str, key_spec: KeySpec, group: str | None = None) -> Any:
        """Seal a stored result: the sensitive fields of a result meta, or a whole value.

        A whole value stored by a task of a ``group`` (a chord part, which the
        group's last task reads back to call the chord's body) is bound to that
        group: copied into another chord on the result backend, it does not open.
        """
        key, co_keys = self._sealing_keys(key_spec)
        if is_result_meta(obj):
            fields = [name for name in RESULT_FIELDS if obj.get(name) is not None]
            if not fields:
                return obj
            # The state stays readable, and is sealed too: opening checks the two agree, so
            # a FAILURE edited into SUCCESS does not hand its exception back as a value.
            values = [*(obj[name] for name in fields), obj["status"]]
            token = self._seal_result_values(key, co_keys, values, [*fields, _STATUS_FIELD], task_id)
            sealed = dict(obj, **dict.fromkeys(fields, MARKER))
            sealed[RESULT_KEY] = token
            return sealed
        bound = task_id if group is None else f"{task_id}{_GROUP_SEPARATOR}{_group_digest(group)}"
        return {RESULT_KEY: self._seal_result_values(key, co_keys, [obj], [_VALUE_FIELD], bound)}

    def _seal_result_values(
        self, key: DataKey, co_keys: Sequence[DataKey], values: list[Any], fields: list[str], task_id: str
    ) -> str:
        try:
            return _envelope.seal(
                key,
                values,
                locations=[(name,) for name in fields],
                task_name=_RESULT_AD,
                task_id=task_id,
                kind=Kind.RESULT,
                # Never compressed: a result is sealed beside its traceback and, with
                # result_extended, every argument of the call (see seal_message).
                compression_threshold=None,
                co_keys=co_keys,
            )
        except _UNFAITHFUL as error:
            msg = f"task result of {task_id}: {error}"
            raise EncryptionFailed(msg) from None
        except (TypeError, ValueError) as error:
            msg = f"task result of {task_id}: cannot be encoded ({type(error).__name__})"
            raise EncryptionFailed(msg) from None
        except EncryptionFailed as error:
            msg = f"task result of {task_id}: {error}"
            raise EncryptionFailed(msg) from None

    def open_result(
        self, obj: dict[str, Any], *, group: str | None = None, task_id: str | None = None
    ) -> OpenedResult:
        """Open what :meth:`seal_result` made.

        ``task_id`` is the task whose result is read, where the backend says (a
        database row): a whole value must be that task's.  Otherwise ``group``
        is that of the task reading it, if any: a whole value it reads must be
        of its group (what Redis' chord joins read).

        Raises:
            DecryptionFailed: tampered, bound to another task id, or another group's.
            KeyDestroyed: retention or erasure shredded it.
            KeyNotFound: this key store does not know its key.
            KeyStoreUnavailable: the key store is down (a retry may succeed).
        """
        envelope = _envelope.parse(obj[RESULT_KEY])
        if envelope.kind is not Kind.RESULT:
            raise DecryptionFailed
        # A sealed meta names its task in the clear, next to the envelope bound to it:
        # the two must agree, so a meta is not opened as another task's (nor with
        # its task id taken out).  A whole value sealed alone has no meta around it.
        whole = envelope.locations == _WHOLE_VALUE
        if whole:
            bound_id, _, bound_group = envelope.task_id.partition(_GROUP_SEPARATOR)
            if task_id is not None:
                if bound_id != task_id:
                    raise DecryptionFailed
            elif group is not None and bound_group != _group_digest(group):
                raise DecryptionFailed
        else:
            bound = obj.get("task_id")  # a UUID when the caller gave one and the backend kept its type
            if bound is None or str(bound) != envelope.task_id:
                raise DecryptionFailed
        key_for = self.keys.decryption_key
        key = key_for(envelope.key_id, envelope.key_version)
        co_keys = [key_for(*co) for co in envelope.co_keys] if envelope.co_keys else ()
        values = envelope.open(key, task_name=_RESULT_AD, co_keys=co_keys)
        if whole:
            return OpenedResult(values[0], envelope.keys, values)
        names = [str(location[0]) for location in envelope.locations]
        opened = {name: value for name, value in obj.items() if name != RESULT_KEY}
        opened.update(zip(names, values, strict=True))
        if names[-1] == _STATUS_FIELD:  # sealed by builds since it was bound (older ones: not checked)
            if opened[_STATUS_FIELD] != obj.get(_STATUS_FIELD):
                raise DecryptionFailed
            values = values[:-1]  # Celery's state, not a value the reader must keep out of its logs
        return OpenedResult(opened, envelope.keys, values)


def _group_digest(group: str) -> str:
    # Short (a task id and this fit the envelope's 255 bytes), and never the group id itself.
    return hashlib.blake2b(group.encode(errors="surrogatepass"), digest_size=8).hexdigest()


def opened_with(keys: Sequence[tuple[str, int]]) -> KeySpec:
    """The key of data derived from a message opened with ``keys`` (its envelopes' keys, first its own).

    The first envelope's key (its subject's, with the subject named, so that a
    result it then reads cannot take the task to another subject's key), the
    other subjects' keys among ``keys`` beside it (see ``KeySpec.co_keys``),
    and never once one of those versions is destroyed.
    """
    key_id = keys[0][0]
    subject = _key_id_parts(key_id)[2]
    return KeySpec(
        key_id,
        subject_id=subject,
        derived_from=tuple(dict.fromkeys(keys)),
        co_keys=_co_keys(subject, [other for other, _ in keys[1:]]),
    )


def _key_id_parts(key_id: str) -> tuple[str, str, str | None]:
    """``(base, bucket, subject)`` of a key id: ``subject.<digest>@<bucket>`` has all three."""
    base, _, bucket = key_id.partition("@")
    subject = base[len(SUBJECT_KEY_PREFIX) :] if base.startswith(SUBJECT_KEY_PREFIX) else None
    return base, bucket, subject


def _co_keys(subject: str | None, key_ids: Iterable[str]) -> tuple[str, ...]:
    """The ids among ``key_ids`` of keys of data subjects other than ``subject``, one per subject."""
    by_subject: dict[str, str] = {}
    for key_id in key_ids:
        other = _key_id_parts(key_id)[2]
        if other is not None and other != subject:
            by_subject.setdefault(other, key_id)
    return tuple(by_subject.values())


def _co_key_spec(key_id: str) -> KeySpec:
    """The spec of a key named in ``KeySpec.co_keys``: its subject and retention bucket, from its id."""
    base, bucket, subject = _key_id_parts(key_id)
    if not bucket:
        return KeySpec(base, subject_id=subject)
    return _bucket_key(base, subject, bucket_moment(bucket))


def derived_key_spec(own: KeySpec, source: KeySpec) -> KeySpec:
    """The key of a message derived from data sealed under ``source``.

    The message keeps its own key unless the source's data is a subject's or
    has a retention bucket: then the message is sealed under that subject's
    key (its own subject's, if it declares one: it cannot be both) and the
    earlier of the two buckets, so forgetting the subject or reaching the
    deadline makes the derived copy unreadable with the source.  When the
    message and the source are of different subjects, it is sealed under the
    other subject's key too (``KeySpec.co_keys``): it is erased with either.
    Either way it is not sealed once a key version that opened the source,
    or its own data, is destroyed.
    """
    derived_from = tuple(dict.fromkeys((*own.derived_from, *source.derived_from)))
    source_base, source_bucket, source_subject = _key_id_parts(source.key_id)
    if source_subject is None and not source_bucket:
        # The source's key is kept indefinitely and names no subject.
        co_keys = _co_keys(own.subject_id, (*own.co_keys, *source.co_keys))
        if derived_from == own.derived_from and co_keys == own.co_keys:
            return own
        return dataclasses.replace(own, derived_from=derived_from, co_keys=co_keys)
    own_base = own.key_id.partition("@")[0]
    base: str
    subject_id: str | None
    if own.subject_id is None and source_subject is not None:
        base, subject_id = source_base, source_subject
    else:
        base, subject_id = own_base, own.subject_id
    co_keys = _co_keys(subject_id, (*own.co_keys, source.key_id, *source.co_keys))
    buckets = [own.expires_at] if own.expires_at is not None else []
    if source_bucket:
        buckets.append(bucket_moment(source_bucket))
    if not buckets:
        return KeySpec(base, subject_id=subject_id, derived_from=derived_from, co_keys=co_keys)
    return _bucket_key(base, subject_id, min(buckets), derived_from=derived_from, co_keys=co_keys)


def _bucket_key(
    base: str,
    subject_id: str | None,
    bucket: datetime,
    *,
    derived_from: tuple[tuple[str, int], ...] = (),
    co_keys: tuple[str, ...] = (),
) -> KeySpec:
    """The key of one retention bucket: destroyed at the bucket's moment."""
    return KeySpec(
        f"{base}@{bucket:{BUCKET_FORMAT}}",
        subject_id=subject_id,
        expires_at=bucket,
        retention_deadline=bucket,
        derived_from=derived_from,
        co_keys=co_keys,
    )


def bound_name(name: str, root: Mapping[str, Any], locations: Sequence[Location]) -> str:
    """The task name the associated data binds: the task's, and the canvas steps its values sit in.

    A value sealed inside an embedded step (a chain's next task, a link, a
    chord body, the task a map calls) is opened by the parent's worker and
    then given to that step's task, so that task's name is bound as well: a
    step relabelled on the broker to another task fails to open.  So are its
    ``immutable`` flag (unset, Celery puts the parent's result first, moving
    every positional value to the next parameter) and its kind.

    Raises:
        KeyError, IndexError, TypeError: a location's containers are not in ``root``.
    """
    steps: list[object] = []
    every_location = name in _STEP_BOUND
    for location in locations:
        if every_location or location[0] in _EMBED_PARTS:
            container: Any = root
            for part in location[:-1]:
                container = container[part]
                # A signature names its task with a string (a map's kwargs hold a whole signature
                # there, which an embedded map has sealed: the marker in its place is no name).
                step = container.get("task") if isinstance(container, Mapping) else None
                if isinstance(step, str) and not is_marker(step):
                    steps.append([step, bool(container.get("immutable")), container.get("subtask_type")])
    if name in _ITEM_TASKS and not _CALLED_SIGNATURE.intersection(locations):
        # (A called signature sealed whole, as everything a PII task's step publishes
        # is, is bound with its name by the seal itself.)
        steps.append(str(_called_task(root)))
    if not steps:
        return name
    return name + "\x00" + json.dumps(steps)


def _holds_own_arguments(locations: Sequence[Location]) -> bool:
    """True if an envelope holds one of the task's own arguments (not only a carried step's)."""
    for location in locations:  # noqa: SIM110 - a loop, not any(): this runs for every message opened
        if location[0] in _OWN_PARTS:
            return True
    return False


_OWN_PARTS: Final = frozenset(("args", "kwargs"))


def _bound_name_or_refuse(name: str, root: Mapping[str, Any], locations: Sequence[Location]) -> str:
    try:
        return bound_name(name, root, locations)
    # The body no longer has that place, or a step's fields were edited past what JSON
    # writes (nested too deep): the message is refused before anything is authenticated.
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        raise DecryptionFailed from None


def _called_task(root: Mapping[str, Any]) -> object:
    """The name of the task a map/starmap/chunks call calls (``None`` if the call has none).

    Its signature is where :func:`_items_of` finds it.
    """
    args: Sequence[Any] = root.get("args") or ()
    kwargs = root.get("kwargs") or {}
    task = None
    if isinstance(kwargs, Mapping) and "it" in kwargs:
        task = kwargs.get("task")
    elif len(args) > 1:
        task = args[0]
    return task.get("task") if isinstance(task, Mapping) else None


def unreadable_result(obj: dict[str, Any], error: Exception) -> Any:
    """What a sealed result that cannot be opened reads as.

    A stored result meta reads as a failure carrying the reason:
    ``AsyncResult.get()`` raises it, and Celery's backends, which read the
    current meta before every write, keep working.  Anything else re-raises.
    """
    if not is_result_meta(obj):
        raise error
    return _failure_meta(obj, error)


def _failure_meta(obj: dict[str, Any], error: Exception) -> dict[str, Any]:
    """A result meta that says the stored result is gone, and why (no values)."""
    meta = {name: value for name, value in obj.items() if name != RESULT_KEY and name not in RESULT_FIELDS}
    meta.update(
        status="FAILURE",
        result={
            "exc_type": type(error).__name__,
            "exc_message": [str(error)],
            "exc_module": type(error).__module__,
        },
        traceback=None,
    )
    return meta


def is_sealed_result(obj: object) -> bool:
    """True for a result sealed by :meth:`Sealer.seal_result`."""
    return isinstance(obj, dict) and RESULT_KEY in obj


def withheld_outcome(obj: object, reason: str) -> dict[str, Any]:
    """What is stored in place of a result whose key is gone: readers get ``KeyDestroyed(reason)``.

    Nothing of the task's outcome is kept.  A result meta becomes a failure,
    as an unreadable one reads (:func:`unreadable_result`).  Anything else
    (the database backend stores the result alone, a chord part is a list)
    becomes a placeholder that :func:`withheld_reason` recognises when read.
    """
    if not is_result_meta(obj):
        return {_WITHHELD_KEY: reason}
    return _failure_meta(cast("dict[str, Any]", obj), KeyDestroyed(reason))


def withheld_reason(obj: object) -> str | None:
    """The reason a :func:`withheld_outcome` placeholder gives, or ``None`` for anything else."""
    if isinstance(obj, dict) and len(obj) == 1 and _WITHHELD_KEY in obj:
        return str(obj[_WITHHELD_KEY])
    return None


_WITHHELD_KEY: Final = "__celery_pii_withheld__"


def is_result_meta(obj: object) -> bool:
    return isinstance(obj, dict) and "status" in obj and "task_id" in obj


def steps_hold_markers(root: Mapping[str, Any]) -> bool:
    """True if an embedded step's argument is the marker (after opening: a value whose envelope is gone)."""
    return has_canvas(root) and any(step_holds_marker(root.get(part)) for part in EMBED_PARTS)


def step_holds_marker(value: Any) -> bool:
    """True if a step (or a list of them, or one nested in it) has the marker as an argument."""
    for _, step in _signatures(value, ()):
        args, kwargs = step.get("args"), step.get("kwargs")
        if isinstance(args, (list, tuple)) and MARKER in args:
            return True
        if isinstance(kwargs, Mapping) and MARKER in kwargs.values():
            return True
    return False


def has_canvas(root: Mapping[str, Any]) -> bool:
    """True if a message root embeds later canvas steps (callbacks, errbacks, chain, chord)."""
    if isinstance(root, dict):  # nearly always: compiled, a dict's own lookups are the fast ones
        return bool(root.get("callbacks") or root.get("errbacks") or root.get("chain") or root.get("chord"))
    return bool(root.get("callbacks") or root.get("errbacks") or root.get("chain") or root.get("chord"))


#: Values that encode, but would not read back as given (the error says why, naming no value).
_UNFAITHFUL: Final = (_envelope.TypedLookalike, _envelope.TwinKeys)


def _unencodable(
    key: DataKey, values: list[Any], locations: tuple[Location, ...], binder: Binder | None
) -> str:
    """Which of the values does not encode, as a path for people (its value is never shown)."""
    for value, location in zip(values, locations, strict=True):
        try:
            _envelope.seal(key, [value], locations=[location], task_name="", task_id="")
        except (TypeError, ValueError):  # noqa: PERF203 - only on the way to an error message
            return field_path(binder, location)
    return "?"  # only together (none alone): say so without guessing


def _naming_the_task(name: str, error: EncryptionFailed) -> EncryptionFailed:
    return EncryptionFailed(f"task {name!r}: {error}")


def _holds_marker(name: str, where: str) -> EncryptionFailed:
    return EncryptionFailed(
        f"task {name!r}: {where} holds {MARKER!r}, which stands for a sealed value, "
        "with no envelope for it; nothing was published"
    )


def _ambiguous_key(name: str, where: str) -> EncryptionFailed:
    return EncryptionFailed(
        f"task {name!r}: {where} is reached through a dict holding two keys JSON writes alike "
        '(such as 1 and "1"): which one is declared cannot be told; nothing was published'
    )


def field_path(binder: Binder | None, location: Location) -> str:
    """Where a value of a call sits, as ``pii_fields`` names it (``other``, not ``args[1]``).

    ``binder`` knows the task function's parameters.  Dict keys that look
    like PII show as redacted (:func:`shown_path`).  Places outside the
    task's own arguments (canvas steps) keep their message path.
    """
    if binder is not None and len(location) > 1 and location[0] in ("args", "kwargs"):
        location = binder.named(location)
    return shown_path(location)


def is_marker(value: object) -> bool:
    """True for the marker a sealed value leaves in the message body."""
    return isinstance(value, str) and value == MARKER


def _carried_steps(
    root: Mapping[str, Any], lookup: SpecLookup, *, every_step: bool = False
) -> Iterator[tuple[Location, Any, TaskSpec | None]]:
    """:func:`_embedded` over every part of a message root that carries canvas (callbacks, errbacks...)."""
    for part in EMBED_PARTS:
        embedded = root.get(part)
        if embedded is not None:
            yield from _embedded(embedded, (part,), lookup, every_step=every_step)


def _embedded(
    value: Any, path: Location, lookup: SpecLookup, *, every_step: bool = False
) -> Iterator[tuple[Location, Any, TaskSpec | None]]:
    """Values to seal in embedded canvas: one signature, a list of them, or nested canvas.

    With ``every_step`` (a message published by a running PII task, whose
    every argument may be derived from its PII), the arguments of steps that
    declare no PII are sealed too.
    """
    for step_path, step in _signatures(value, path):
        kwargs = step.get("kwargs") or {}
        kind = step.get("subtask_type")
        if not (kind in _CONTAINERS and isinstance(kwargs, Mapping)):  # a container's steps come next
            yield from _step_arguments(step, kind, kwargs, step_path, lookup, every_step=every_step)


def _signatures(value: Any, path: Location) -> Iterator[tuple[Location, Mapping[str, Any]]]:
    """Every signature in embedded canvas, with where it sits: one, a list of them, nested ones.

    Depth first: a signature, then the steps of a container (group, chain,
    chord), then its ``link``, ``link_error``, ``chord`` and ``chain``: a step
    inside a chord's header (a chain, a nested chord, a group a header task
    replaced itself with) carries the chord's body in its options, and the
    body the steps chained after the chord.
    """
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _signatures(item, (*path, i))
        return
    if not isinstance(value, Mapping) or "task" not in value:
        return
    yield path, value
    kwargs = value.get("kwargs") or {}
    kind = value.get("subtask_type")
    if kind in _CONTAINERS and isinstance(kwargs, Mapping):
        for part in _CONTAINERS[kind]:
            yield from _signatures(kwargs.get(part), (*path, "kwargs", part))
    options = value.get("options") or {}
    if isinstance(options, Mapping):
        for option in _STEP_OPTIONS:
            yield from _signatures(options.get(option), (*path, "options", option))


# A signature's options that hold more signatures (see ``_signatures``): a chord's body
# carries the steps chained after the chord in its ``chain``.
_STEP_OPTIONS: Final = ("link", "link_error", "chord", "chain")


def hide_in_step_shadows(root: dict[str, Any], scrubbing: Callable[[], Scrubber]) -> dict[str, Any]:
    """``root`` with the sealed values hidden in its embedded steps' ``shadow`` names (copies where changed).

    A step's shadow (``sig.set(shadow=...)``) travels in plaintext in the
    message that carries the step, and names the step in logs and events once
    it runs.  ``scrubbing`` builds the scrubber of the sealed values (only if
    a shadow is found).
    """
    hidden = []
    for part in EMBED_PARTS:
        for path, step in _signatures(root.get(part), (part,)):
            options = step.get("options")
            shadow = options.get("shadow") if isinstance(options, Mapping) else None
            if isinstance(shadow, str) and shadow and (text := scrubbing().text(shadow)) is not shadow:
                hidden.append(((*path, "options", "shadow"), text))
    for location, text in hidden:  # rare: a step's own shadow holding a sealed value
        root = replace_in_copies(root, [location], text)
    return root


def _refuse_positional_errback_subject(name: str, spec: TaskSpec, args: Any, kwargs: Any) -> None:
    """A mutable errback's ``pii_subject`` must come by keyword.

    Celery gives it the failed task's id, or ``(request, exc, traceback)``, as
    its function takes them, before its own arguments: which positional
    argument is the subject cannot be told here, and sealed with the message
    it would outlive its subject's erasure.
    """
    if spec.subject is None or not args or next(iter(spec.subject.locate((), kwargs)), None) is not None:
        return
    msg = (
        f"errback {name!r}: give its pii_subject {spec.subject_path!r} by keyword "
        f"({name.rsplit('.', 1)[-1]}.s({spec.subject_path}=...)) or make it immutable (.si(...)): "
        "Celery puts the failed task's id or its request first; nothing was published"
    )
    raise EncryptionFailed(msg)


#: Stands for what Celery puts first in a mutable step's arguments when it calls it.
_GIVEN_LATER: Final = object()

# Canvas containers and where their steps sit inside their kwargs.
_CONTAINERS: Final = {"group": ("tasks",), "chain": ("tasks",), "chord": ("header", "body")}


def _step_arguments(  # noqa: PLR0913 - one step and how to read it
    value: Mapping[str, Any],
    kind: object,
    kwargs: Any,
    path: Location,
    lookup: SpecLookup,
    *,
    every_step: bool,
) -> Iterator[tuple[Location, Any, TaskSpec | None]]:
    name = str(value["task"])
    registered, spec = lookup(name)
    # A step of a PII task, of a task this process cannot see, or of some other
    # canvas primitive (map, starmap, chunks: its items are a task's arguments)
    # has all of its arguments sealed: we cannot tell which of them are PII.
    # The parent's worker opens them again.
    without_pii = registered and (spec is None or not spec.is_pii) and name not in _ITEM_TASKS
    if kind is None and without_pii and not every_step:
        return
    for location, item, _ in _arguments(value.get("args") or (), kwargs, path):
        yield location, item, spec


def _items_of(root: Mapping[str, Any], lookup: SpecLookup) -> Iterator[tuple[Location, Any, TaskSpec | None]]:
    """The item list of a map/starmap/chunks call, unless the task it calls has no PII.

    Sealed whole: the items are the called task's arguments, one call each, and
    its field paths do not apply to the list.  The built-in task's own
    ``before_start`` opens the list before it calls the task on each item.
    """
    args: Sequence[Any] = root.get("args") or ()
    kwargs = root.get("kwargs") or {}
    location: Location
    if isinstance(kwargs, Mapping) and "it" in kwargs:
        task, location, items = kwargs.get("task"), ("kwargs", "it"), kwargs["it"]
    elif len(args) > 1:
        task, location, items = args[0], ("args", 1), args[1]
    else:
        return
    if items is None or is_marker(items):
        return
    called = task.get("task") if isinstance(task, Mapping) else None
    registered, spec = lookup(str(called)) if called else (False, None)
    if registered and (spec is None or not spec.is_pii):
        return
    yield location, items, spec
    # The called signature's own arguments travel with it (Celery does not use them).
    yield from _embedded(task, ("kwargs", "task") if location[0] == "kwargs" else ("args", 0), lookup)


def _outermost(found: list[tuple[Location, Any]]) -> list[tuple[Location, Any]]:
    """``found`` without the places inside another of its places (sealed with the outer value)."""
    places = {location for location, _ in found}
    return [
        (location, value)
        for location, value in found
        if not any(location[:depth] in places for depth in range(1, len(location)))
    ]


def _arguments(args: Any, kwargs: Any, path: Location) -> Iterator[tuple[Location, Any, None]]:
    """Every positional and keyword argument that is not already sealed."""
    for i, item in enumerate(args):
        if not is_marker(item):
            yield (*path, "args", i), item, None
    if isinstance(kwargs, Mapping):
        for key, item in kwargs.items():
            if not is_marker(item):
                yield (*path, "kwargs", key), item, None
