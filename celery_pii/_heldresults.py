"""Opened results that Celery holds in memory are checked again each time they are served.

Celery keeps a result it has read in two places a later, new
``AsyncResult(id)`` (or ``GroupResult``) reads from without asking the backend:
the backend's ``result_cache_max`` cache (which also keeps restored groups,
with their results), and the Redis backend's
buffer of results that arrived over pub/sub while nobody waited for them
(a task ``get()`` had already read by polling); the ``rpc://`` backend keeps
a cache and a buffer of its own.  They hold the result as the
``pii`` serializer opened it: after its retention deadline or its subject's
erasure, a new read in that process was still answered, in plaintext, where
every other process got ``KeyDestroyed``.

A result meta opened here remembers the keys it was opened with
(:class:`OpenedMeta`); served from either place, its keys are looked up again
(in the key cache: no round trip while they are cached), and one that has
gone makes it read as the failure a stored result reads as.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery.result import GroupResult, ResultBase, result_from_tuple

from ._context import derive_in_redelivery
from ._sealer import is_result_meta, unreadable_result
from .exceptions import KeyDestroyed, KeyNotFound

if TYPE_CHECKING:
    from ._pii import PII

__all__ = ["OpenedMeta", "collecting_keys", "guard_celery_result_caches", "opened_meta", "opened_with_keys"]

#: ``(key id, version)`` of the keys of one opened value, with the app whose store holds them.
_Opened = tuple["PII", tuple[tuple[str, int], ...]]


class OpenedMeta(dict[str, Any]):
    """A result meta the ``pii`` serializer opened, and the keys it was opened with."""

    __slots__ = ("opened",)

    opened: tuple[_Opened, ...]


def opened_meta(value: Any, pii: PII, keys: tuple[tuple[str, int], ...]) -> Any:
    """``value`` as the serializer returns it: a result meta remembers ``keys``."""
    found = _collected.get()
    if found is not None:  # a database row's columns are opened one by one
        found.append((pii, keys))
    if not is_result_meta(value):
        return value
    meta = OpenedMeta(value)
    meta.opened = ((pii, keys),)
    return meta


_collected: contextvars.ContextVar[list[_Opened] | None] = contextvars.ContextVar(
    "celery_pii_opened_keys", default=None
)


@contextmanager
def collecting_keys() -> Iterator[list[_Opened]]:
    """The keys of every value opened meanwhile (the database backend builds its meta from columns)."""
    found: list[_Opened] = []
    token = _collected.set(found)
    try:
        yield found
    finally:
        _collected.reset(token)


def opened_with_keys(meta: Any, opened: list[_Opened]) -> Any:
    """A meta built from opened values, remembering their keys."""
    if not opened or not isinstance(meta, dict):
        return meta
    held = OpenedMeta(meta)
    held.opened = tuple(opened)
    return held


def as_read_now(backend: Any, meta: Any) -> Any:
    """``meta``, or the failure it reads as now that one of its keys is gone."""
    if type(meta) is not OpenedMeta:
        return meta
    try:
        for pii, keys in meta.opened:
            for key_id, version in keys:
                pii.keys.decryption_key(key_id, version)  # KeyDestroyed past a deadline or an erasure
    except (KeyDestroyed, KeyNotFound) as error:
        return backend.meta_from_decoded(unreadable_result(dict(meta), error))
    return meta


def guard_celery_result_caches() -> None:
    """Check what ``result_cache_max``, the Redis pub/sub buffer and ``rpc://`` serve (once per process)."""
    from celery.backends.asynchronous import AsyncBackendMixin  # noqa: PLC0415 - only when set up
    from celery.backends.base import Backend, BaseKeyValueStoreBackend  # noqa: PLC0415

    get_task_meta, get_many = Backend.get_task_meta, BaseKeyValueStoreBackend.get_many
    if getattr(get_task_meta, "celery_pii_wrapped", False):
        return

    def checked(backend: Any, task_id: Any, meta: Any) -> Any:
        read = as_read_now(backend, meta)
        if read is not meta:
            backend._cache.pop(task_id, None)  # noqa: SLF001 - what Celery serves it from
            return read
        return _served(meta)

    def checked_get_task_meta(self: Any, task_id: Any, cache: bool = True) -> Any:
        meta = checked(self, task_id, get_task_meta(self, task_id, cache=cache))
        derive_in_redelivery(task_id, meta, _keys_of)  # a worker tracing a redelivery (rare)
        return meta

    def checked_get_many(self: Any, task_ids: Any, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
        # A group's results (GroupResult.get, join_native): ready ones come from the cache too.
        for task_id, meta in get_many(self, task_ids, *args, **kwargs):
            yield task_id, checked(self, task_id, meta)

    def checked_from_buffer(self: Any, result: Any) -> None:
        # Celery's own two lines, with the check between: take() raises Empty when
        # nothing is buffered, and the caller then subscribes to the task's result.
        meta = self._pending_messages.take(result.id)
        result._maybe_set_cache(as_read_now(self, meta))  # noqa: SLF001

    checked_get_task_meta.celery_pii_wrapped = True  # type: ignore[attr-defined]
    Backend.get_task_meta = checked_get_task_meta
    BaseKeyValueStoreBackend.get_many = checked_get_many
    Backend.get_group_meta = _fresh_group_results(Backend.get_group_meta)
    _guard_rpc_backend(checked)
    AsyncBackendMixin._maybe_resolve_from_buffer = checked_from_buffer  # noqa: SLF001


def _keys_of(meta: Any) -> list[tuple[str, int]]:
    """The keys a meta was opened with, each once (none: it was not sealed)."""
    if type(meta) is not OpenedMeta:
        return []
    return list(dict.fromkeys(key for _, keys in meta.opened for key in keys))


def _served(meta: Any) -> Any:
    """A copy of a meta for the ``AsyncResult`` that asked, with its children as ids, not objects.

    Celery's cache hands out the meta it keeps, and ``AsyncResult`` changes it
    in place: its ``children`` become result objects, which then answer
    ``.get()`` from what they read, without asking the backend.  Every new
    ``AsyncResult(parent).children`` got those same objects, and a child's
    result read once was served in plaintext after its keys were gone.  With
    a copy, each reader builds children of its own, which read (and are
    checked) again.
    """
    if not isinstance(meta, dict):
        return meta
    served: dict[str, Any]
    if type(meta) is OpenedMeta:
        served = OpenedMeta(meta)
        served.opened = meta.opened
    else:
        served = dict(meta)
    children = served.get("children")
    if children:
        served["children"] = [
            child.as_tuple() if isinstance(child, ResultBase) else child for child in children
        ]
    return served


def _fresh_group_results(get_group_meta: Any) -> Any:
    """``get_group_meta`` whose group is new each time: its results are read, and checked, again.

    ``result_cache_max`` keeps a group's meta, and with it the restored
    ``GroupResult`` and its children, each holding the result it had read:
    ``GroupResult.restore(id)`` handed back the same objects, which served
    those results without asking the backend, in plaintext after their keys
    were gone.  A new group of new results is built from the cached ids
    (no round trip); objects the caller already holds are left alone.
    """

    def fresh_get_group_meta(self: Any, group_id: Any, cache: bool = True) -> Any:
        meta = get_group_meta(self, group_id, cache=cache)
        if isinstance(meta, dict) and isinstance(meta.get("result"), GroupResult):
            meta = {**meta, "result": result_from_tuple(meta["result"].as_tuple(), self.app)}
        return meta

    return fresh_get_group_meta


def _guard_rpc_backend(checked: Any) -> None:
    """The rpc:// backend reads results with a ``get_task_meta`` of its own.

    It serves a result from its cache, or a copy (``dict(...)``, no longer an
    :class:`OpenedMeta`) of the last one its consumer buffered: each held copy
    is checked before anything is served, and all go once one fails.
    """
    from celery.backends.rpc import RPCBackend  # noqa: PLC0415 - only when set up

    get_task_meta = RPCBackend.get_task_meta

    def checked_get_task_meta(self: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        buffered = self._pending_messages.get(task_id)
        for held in (self._cache.get(task_id), buffered[-1] if buffered else None):
            read = as_read_now(self, held)
            if read is not held:
                self._cache.pop(task_id, None)
                self._pending_messages.pop(task_id, None)
                return read
        return checked(self, task_id, get_task_meta(self, task_id, *args, **kwargs))

    RPCBackend.get_task_meta = checked_get_task_meta
    RPCBackend.poll = checked_get_task_meta  # Celery's alias of it
