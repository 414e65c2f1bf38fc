"""Where the redacting log filter goes: Celery's loggers, then every handler.

The filter (:class:`~celery_pii._redact.RedactingFilter`) hides the values a
task in this process has opened.  It is put on Celery's loggers when
``setup_pii`` runs, and on every handler of every logger when a worker
starts (its logging is set up by then, by Celery or by the user) and before
a task runs eagerly (``apply()``, ``task_always_eager``): records of the
task's own loggers and of its hooks reach the host's handlers there, not
Celery's.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from celery import signals

from . import _context
from ._redact import RedactingFilter

__all__ = ["filter_celery_loggers", "filter_every_handler_outside_workers"]

# Celery loggers whose records can carry task arguments or outcomes.
_CELERY_LOGGERS: Final = (
    "celery.app.trace",
    "celery.worker.strategy",
    "celery.worker.request",
    "celery.worker.consumer.consumer",
    "celery.task",
)

_FILTER: Final = RedactingFilter(_context.running.get, _context.scrubber_elsewhere)


def filter_celery_loggers() -> None:
    """Put the filter on Celery's loggers (records that reach any handler)."""
    for name in _CELERY_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


@signals.after_setup_logger.connect(weak=False)
@signals.after_setup_task_logger.connect(weak=False)
def _filter_handlers(logger: logging.Logger | None = None, **_: Any) -> None:
    # Handler-level too: records of user task loggers propagate to these.
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def filter_every_handler() -> None:
    """Put the filter on every handler of every logger there is now.

    Logging set up by the user's own ``setup_logging`` receiver (or by
    ``dictConfig`` in Django's settings) gets no ``after_setup_logger``, and
    its handlers may sit on any logger.
    """
    _filter_handlers(logging.getLogger())
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            _filter_handlers(logger)


def filter_every_handler_outside_workers() -> None:
    """:func:`filter_every_handler` before an eager run, unless a worker runs in this process.

    A worker did it when it started, once its logging was set up.  Elsewhere
    (a web process, a script) logging may change at any time, and a walk
    costs about 0.1 ms per thousand loggers.
    """
    if not _in_a_worker:
        filter_every_handler()


@signals.celeryd_after_setup.connect(weak=False)
@signals.worker_process_init.connect(weak=False)
def _worker_started(**_: Any) -> None:
    global _in_a_worker  # noqa: PLW0603 - one flag for the process
    _in_a_worker = True
    filter_every_handler()


_in_a_worker = False
