"""What celery-pii adds to task classes: the opening step and exception scrubbing.

Every task of a PII app is given a ``before_start`` that opens its envelopes
(it runs inside Celery's traced ``try``, so a failure stops the task); PII
tasks also get a ``run`` that scrubs exceptions.  The app's task registry is
hooked so tasks registered after ``setup_pii`` are given them too.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from celery.app.task import Task

from . import _context

if TYPE_CHECKING:
    from celery import Celery
    from celery.app.registry import TaskRegistry

    from ._pii import PII


def install_opening(cls: type[Any], *, is_pii: bool) -> None:
    """Give a task class the fail-closed opening step (and, for PII tasks, scrubbing)."""
    if not cls.__dict__.get("_celery_pii_opening"):
        chained = getattr(cls, "before_start", None)
        if getattr(chained, "__qualname__", "") == Task.before_start.__qualname__:
            chained = None

        def before_start(self: Task, task_id: str, args: Any, kwargs: Any) -> None:
            getattr(self.app, _context.APP_ATTRIBUTE)._open(self, task_id, args, kwargs)  # noqa: SLF001
            if chained is not None:
                chained(self, task_id, args, kwargs)

        cls.before_start = before_start
        cls._celery_pii_opening = True
    if is_pii and not cls.__dict__.get("_celery_pii_scrubbing"):
        _wrap_run(cls)
        # Return values of PII tasks stay out of logs and events (see docs/security.md).
        cls.resultrepr_maxsize = 0
        cls._celery_pii_scrubbing = True


def _wrap_run(cls: type[Any]) -> None:
    """Scrub exceptions leaving the task function before Celery formats, logs or stores them.

    ``run`` is wrapped rather than ``__call__``: Celery's tracer calls ``run``
    directly unless ``__call__`` is overridden, and an override would cost every
    task a second request context.
    """
    raw = inspect.getattr_static(cls, "run")
    is_static = isinstance(raw, staticmethod)
    fun = raw.__func__ if is_static else raw

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except Exception as exc:
            current = _context.running.get()
            if current is not None and current.scrubber:
                current.scrubber.exception(exc)
            raise

    cls.run = staticmethod(run) if is_static else run


def hook_registry(app: Celery, pii: PII) -> None:
    """Register the app's tasks with ``pii``, now and whenever one is added."""
    registry = app._tasks  # noqa: SLF001 - the registry every registration goes through
    base = type(registry)
    if not getattr(base, "_celery_pii_hooked", False):

        def __setitem__(self: TaskRegistry, name: str, task: Any) -> None:  # noqa: N807
            owner = getattr(self, "_celery_pii_owner", None)
            if owner is not None:
                owner._register(task)  # noqa: SLF001
            base.__setitem__(self, name, task)

        registry.__class__ = type(
            f"PII{base.__name__}", (base,), {"__setitem__": __setitem__, "_celery_pii_hooked": True}
        )
    registry._celery_pii_owner = pii  # noqa: SLF001
    for task in list(registry.values()):
        pii._register(task)  # noqa: SLF001
