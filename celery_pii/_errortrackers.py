"""Error trackers that copy a task's data into their events: Sentry.

Sentry's Celery integration gives each task run scopes of its own and copies
what the run holds into the events it sends: the task's arguments
(``extra["celery-job"]``, with ``send_default_pii=True``), which are the very
objects celery-pii opened, and, by default (``include_local_variables``), the
local variables of Celery's ``__protected_call__`` frame, which hold them
too.  While a task holds opened values, an event processor added to the run's
own scope, after Sentry's, replaces them in every event of that run: its
errors, what it logs, its transaction.

Nothing here imports Sentry: it is looked at only once a process has.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._context import RunningTask
    from ._redact import Scrubber

__all__ = ["scrub_sentry_events"]

logger = logging.getLogger("celery_pii")

#: Deeper than Sentry's own serializer goes (it cuts events at 10 levels).
_MAX_EVENT_DEPTH: Final = 32

_warned = False


def scrub_sentry_events(running: RunningTask) -> None:
    """Have Sentry's events of this task run hide its opened values (no-op without an active Sentry)."""
    sentry = sys.modules.get("sentry_sdk")
    if sentry is None:
        return
    try:
        from sentry_sdk.integrations.celery import CeleryIntegration  # noqa: PLC0415 - only when Sentry is

        client = sentry.get_client()
        if not client.is_active() or client.get_integration(CeleryIntegration) is None:
            # Without the integration no scope is the run's own (a processor would outlive
            # it), and nothing copies the task's arguments into events.
            return
        sentry.get_current_scope().add_event_processor(_processor_for(running))
    except (ImportError, AttributeError, TypeError) as error:  # a Sentry release that moved these
        _warn_once(error)


def _processor_for(running: RunningTask) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    def hide_opened_values(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
        scrubber = running.scrubber  # the values it holds now (a retry's new ones, results it read)
        return _scrubbed(event, scrubber, 0) if scrubber else event

    return hide_opened_values


def _scrubbed(value: Any, scrubber: Scrubber, depth: int) -> Any:
    """A copy of an event with known values replaced (the task's own objects are never changed)."""
    if isinstance(value, str):
        return scrubber.text(value)
    kind = type(value)
    if depth < _MAX_EVENT_DEPTH:
        if kind is dict:
            return {
                _scrubbed(key, scrubber, depth): _scrubbed(item, scrubber, depth + 1)
                for key, item in value.items()
            }
        if kind is list or kind is tuple:
            return kind(_scrubbed(item, scrubber, depth + 1) for item in value)
    return scrubber.value(value, depth)  # a scalar showing a value, an exception, nested plain data


def _warn_once(error: BaseException) -> None:
    global _warned  # noqa: PLW0603 - one warning a process
    if not _warned:
        _warned = True
        logger.warning(
            "celery-pii: could not add its event processor to Sentry (%s): Sentry's events of PII tasks may "
            "hold their values; set send_default_pii=False and include_local_variables=False",
            type(error).__name__,
        )
