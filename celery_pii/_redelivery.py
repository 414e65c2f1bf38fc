"""A redelivered task that already succeeded: the steps Celery sends for it go out sealed.

With ``task_acks_late`` and ``worker_deduplicate_successful_tasks``, a worker
given a redelivered message of a task that already succeeded does not run it
again.  Celery's tracer reads the stored result and, when it names no child
(the first run's worker was lost before it sent them), publishes the task's
link callbacks and next chain step with that result, before and instead of
the task (``celery.app.trace``, ``_dispatch_callbacks_and_chain``).  No task
runs, so nothing knew the result was PII: it was published in plaintext.

The tracer of every task of a PII app is wrapped: while it traces a
redelivered message, Celery's read of that task's successful result (served
by the backend or from its ``result_cache_max`` cache: ``_heldresults.py``
sees both) opens the sealed values of the message's steps and starts a
context derived from the result (``_context.derive_in_redelivery``), as a
task given that result would run in.  What Celery sends then is sealed whole
under keys derived from the result's and the steps' own, and its logs hide
the values.  The context ends with the tracer.  A message whose steps do not
open (a subject forgotten meanwhile) has them sent with their markers, to be
parked by the worker given them, rather than refused: Celery would put the
message back on the queue, to fail the same way forever.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from . import _context

__all__ = ["tracing_redeliveries"]

_WRAPS: Final = "_celery_pii_redeliveries"  # marks the wrapper, so a tracer is wrapped once

Tracer = Callable[..., Any]


def tracing_redeliveries(task: Any, tracer: Tracer) -> Tracer:
    """``tracer`` (Celery's, built for ``task``), deriving from the result a redelivery reads first."""
    if getattr(tracer, _WRAPS, False):
        return tracer

    @functools.wraps(tracer)
    def trace(uuid: Any, args: Any, kwargs: Any, request: Any = None) -> Any:
        if not _redelivered(request):
            return tracer(uuid, args, kwargs, request)
        window = _context.open_redelivery(task, uuid, args, kwargs, request)
        try:
            return tracer(uuid, args, kwargs, request)
        finally:
            _context.close_redelivery(window)

    setattr(trace, _WRAPS, True)
    return trace


def _redelivered(request: Any) -> bool:
    delivery_info = request.get("delivery_info") if isinstance(request, dict) else None
    return isinstance(delivery_info, dict) and bool(delivery_info.get("redelivered"))
