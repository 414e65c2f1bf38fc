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
import re
from typing import Any, Final

from celery import signals

from . import _context
from ._redact import RedactingFilter, Scrubber

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
        _scrub_what_formatters_add(handler)


# Formatters that add to a record's text after the handler's filters ran:
# structlog's ProcessorFormatter runs processors then (``merge_contextvars``
# adds what a task bound with ``bind_contextvars``), and so do its subclasses.
_ADDING_FORMATTERS: Final = ("structlog.",)
_SCRUBS_OUTPUT: Final = "_celery_pii_scrubs_output"  # marks a handler's format as wrapped
# Terminal colour codes (SGR): a coloured renderer writes them between a card's digit groups.
_COLOURS: Final = re.compile(r"\x1b\[[0-9;]*m")


def _adds_to_records(formatter: logging.Formatter) -> bool:
    kind = type(formatter)
    adds = _ADDING_BY_TYPE.get(kind)
    if adds is None:  # a formatter class or two per process: read once each
        adds = _ADDING_BY_TYPE[kind] = any(k.__module__.startswith(_ADDING_FORMATTERS) for k in kind.__mro__)
    return adds


_ADDING_BY_TYPE: dict[type, bool] = {}


def _scrub_what_formatters_add(handler: logging.Handler) -> None:
    """Have ``handler`` scrub its formatted text too, when its formatter adds to the record.

    Checked on every record: a formatter can be set after this ran.  Other
    formatters write only what the filter has scrubbed already, and the
    scrubber is not built for them (Celery's success line of a PII task needs
    none).
    """
    original = handler.format
    if getattr(original, _SCRUBS_OUTPUT, False):
        return

    def format(record: logging.LogRecord) -> str:  # noqa: A001 - replaces Handler.format
        text = original(record)
        formatter = handler.formatter
        if formatter is None or not _adds_to_records(formatter):
            return text
        scrubber = _FILTER.scrubber_now()
        return _scrubbed_output(text, scrubber) if scrubber else text

    setattr(format, _SCRUBS_OUTPUT, True)
    handler.format = format  # type: ignore[method-assign]  # this handler's, not its class's


def _scrubbed_output(text: str, scrubber: Scrubber) -> str:
    """``text`` scrubbed; without its colours if only they hid a value (the line then loses them)."""
    text = scrubber.text(text)
    if "\x1b[" in text:
        plain = _COLOURS.sub("", text)
        if scrubber.contains(plain):
            return scrubber.text(plain)
    return text


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
