"""``task_retry_on_worker_lost`` (Celery 5.7): the copy a worker's main process sends goes out sealed.

When a pool process dies mid-task, the worker's main process re-sends the
task from its own request (``Request._retry_worker_lost``).  That process
never opened the task's values: its request holds the markers and the
envelopes (``EMBED_KEY``) they stand for.  Published as given, the markers
were refused (they are no values to seal) and the task failed with
``WorkerLostError`` instead.  As the retry of a message a worker could not
open (``PII._retry_unopened``), the copy carries the markers on with their
envelopes.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from celery.worker.request import Request

from . import _context
from ._sealer import EMBED_KEY

__all__ = ["resend_sealed_on_worker_lost"]

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
