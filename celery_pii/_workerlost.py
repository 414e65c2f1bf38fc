"""``task_retry_on_worker_lost`` (Celery 5.7): the copy a worker's main process sends goes out sealed.

When a pool process dies mid-task, the worker's main process re-sends the
task from its own request (``Request._retry_worker_lost``).  That process
never opened the task's values: its request holds the markers and the
envelopes (``EMBED_KEY``) they stand for.  Published as given, the markers
were refused (they are no values to seal) and the task failed with
``WorkerLostError`` instead.  As the retry of a message a worker could not
open (``PII._retry_unopened``), the copy carries the markers on with their
envelopes.

A pool process lost after its task stored a success (an OOM kill in a
``task_postrun`` receiver): that main process reads the stored result back and
sends it in a ``task-succeeded`` event (``Request._success_was_stored``).  It
holds the keys, so a sealed result read there comes back opened, and a task
declaring no PII (a chain step given a PII task's return value) has its
return value's whole repr sent.  The event is given the marker instead.

The request the worker hands out after it terminated or cancelled a task
(``Request._context``: to ``task_revoked`` and ``task_retry`` receivers, to
errbacks taking the request, to what stores the outcome) is built from the
arguments the task ran on.  On the pools that run tasks in the worker's own
process (solo, threads, eventlet, gevent) those are the lists the values were
opened into (Celery's tracer decodes the body again and puts its arguments in
the request): it is given the arguments as the worker received them, markers
in place, as on prefork.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from celery.worker.request import Request
from kombu.utils.objects import cached_property

from . import _context
from ._heldresults import OpenedMeta
from ._sealer import EMBED_KEY, MARKER

__all__ = [
    "hand_out_requests_with_markers",
    "hide_results_read_after_worker_lost",
    "resend_sealed_on_worker_lost",
]

_WRAPS: Final = "_celery_pii_carries"  # marks the wrapper, so it is installed once


def resend_sealed_on_worker_lost() -> None:
    """Have Celery's worker-lost retry carry the message's envelopes on (a no-op before Celery 5.7)."""
    original = getattr(Request, "_retry_worker_lost", None)
    if original is None or getattr(original, _WRAPS, False):
        return

    @functools.wraps(original)
    def _retry_worker_lost(self: Request, exc: BaseException, exc_info: Any) -> Any:
        _, _, embed = self._payload  # what the message embeds: its envelopes among them
        tokens = embed.get(EMBED_KEY) if isinstance(embed, dict) else None
        carried = _context.carried.set(
            (str(self.id), tuple(tokens) if isinstance(tokens, (list, tuple)) else ())
        )
        try:
            return original(self, exc, exc_info)
        finally:
            _context.carried.reset(carried)

    setattr(_retry_worker_lost, _WRAPS, True)
    Request._retry_worker_lost = _retry_worker_lost  # noqa: SLF001 - Celery 5.7+


def hide_results_read_after_worker_lost() -> None:
    """Have the success Celery reads back after losing a pool process go out sealed in its event."""
    original = getattr(Request, "_success_was_stored", None)
    if original is None or getattr(original, _WRAPS, False):
        return

    @functools.wraps(original)
    def _success_was_stored(self: Request) -> Any:
        meta = original(self)
        if isinstance(meta, OpenedMeta):  # a sealed result, opened here: its event shows no value
            return {**meta, "result": MARKER}
        return meta

    setattr(_success_was_stored, _WRAPS, True)
    Request._success_was_stored = _success_was_stored  # noqa: SLF001 - Celery 5.7+


def hand_out_requests_with_markers() -> None:
    """Have the request the worker hands out after a task hold the markers, whatever the pool."""
    built = Request.__dict__.get("_context")
    build = getattr(built, "func", None)
    if build is None or getattr(build, _WRAPS, False):
        return

    @functools.wraps(build)
    def _context_with_markers(self: Request) -> Any:
        context = build(self)
        # The arguments as the worker decoded them: markers in place.
        context.args, context.kwargs = self._args, self._kwargs
        return context

    setattr(_context_with_markers, _WRAPS, True)
    context = cached_property(_context_with_markers)
    context.__set_name__(Request, "_context")  # cached under Celery's name, as the class statement would
    Request._context = context  # noqa: SLF001 - Celery's own, cached per request
