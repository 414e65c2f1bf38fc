"""Error trackers that copy a task's data into their events: Sentry.

Sentry's Celery integration gives each task run scopes of its own and copies
what the run holds into the events it sends: the task's arguments
(``extra["celery-job"]``, with ``send_default_pii=True``), which are the very
objects celery-pii opened, and, by default (``include_local_variables``), the
local variables of Celery's ``__protected_call__`` frame, which hold them
too.  While a task holds opened values, an event processor added to the run's
own scope, after Sentry's, replaces them in every event of that run: its
errors, what it logs, its transaction.  A global processor, added once,
replaces them in whatever else Sentry sends meanwhile (a run Sentry's
wrapper did not give a scope, threads a task started).

Nothing here imports Sentry: it is looked at only once a process has.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._context import RunningTask

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
        client = sentry.get_client()
        if not client.is_active():
            return
        _hide_in_every_event()
        # Sentry's tracer wrapper gives each run its own scopes (and names the isolation scope
        # "celery"), where it copies the task's arguments into every event and transaction;
        # a processor added there, after its own, sees them and ends with the run.  A tracer
        # Sentry did not wrap (built before sentry_sdk.init, as in a prefork child that calls
        # it from worker_process_init) runs in the process's scope: the global processor covers it.
        if getattr(sentry.get_isolation_scope(), "_name", None) == "celery":
            sentry.get_current_scope().add_event_processor(_processor_for(running))
    except (ImportError, AttributeError, TypeError) as error:  # a Sentry release that moved these
        _warn_once(error)


_global_added = False


def _hide_in_every_event() -> None:
    """Once a process: every event sent while a task runs with opened values has them replaced."""
    global _global_added  # noqa: PLW0603 - one processor a process
    if not _global_added:
        from sentry_sdk.scope import add_global_event_processor  # noqa: PLC0415 - only when Sentry is

        add_global_event_processor(_hide_running_values)  # type: ignore[arg-type]  # its Event: a TypedDict
        _global_added = True


def _hide_running_values(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
    """The global processor: the running task's values, or, in a thread a task started, every task's."""
    from ._context import running, scrubber_elsewhere  # noqa: PLC0415 - it imports this module's importers

    current = running.get()
    scrubber = scrubber_elsewhere() if current is None else current.scrubber
    return scrubber.value(event, limit=_MAX_EVENT_DEPTH) if scrubber else event


def _processor_for(running: RunningTask) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    def hide_opened_values(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
        scrubber = running.scrubber  # the values it holds now (a retry's new ones, results it read)
        return scrubber.value(event, limit=_MAX_EVENT_DEPTH) if scrubber else event

    return hide_opened_values


def _warn_once(error: BaseException) -> None:
    global _warned  # noqa: PLW0603 - one warning a process
    if not _warned:
        _warned = True
        logger.warning(
            "celery-pii: could not add its event processor to Sentry (%s): Sentry's events of PII tasks may "
            "hold their values; set send_default_pii=False and include_local_variables=False",
            type(error).__name__,
        )
