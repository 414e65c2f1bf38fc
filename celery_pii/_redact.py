"""Redacted reprs, exception scrubbing and a logging filter.

Celery writes arguments and outcomes into headers (``argsrepr``), events,
logs and the result backend.  For PII tasks:

* ``argsrepr``/``kwargsrepr`` are the repr of the *sealed* copies, so PII
  values show as the fixed marker while other values stay visible;
* exceptions raised by the task are scrubbed in place before Celery formats,
  logs or stores them: every plaintext value opened for the task is replaced
  by :data:`REDACTED` in their arguments, attributes and chained causes;
* a logging filter scrubs the same values from records emitted while the
  task runs, and hides PII tasks' return values in Celery's success log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

__all__ = ["REDACTED", "RedactingFilter", "Scrubber", "redacted_repr"]

REDACTED: Final = "[pii:redacted]"
# Values shorter than this are not scrubbed from free text: replacing every
# "42" in a message would destroy it, and such values are not identifying.
MIN_SCRUB_LENGTH: Final = 4
_MAX_SCRUB_DEPTH: Final = 8


def redacted_repr(value: Any, maxsize: int) -> str:
    """A bounded repr of already-redacted data (never empty: Celery falls back to plaintext)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not stop a publish
        return "<unrepresentable>"
    if len(text) > maxsize:
        text = text[: max(maxsize - 3, 1)] + "..."
    return text or "()"


class Scrubber:
    """Replaces known plaintext values (and their string forms) in text and objects."""

    __slots__ = ("_needles",)

    def __init__(self, values: Iterable[Any]) -> None:
        needles: set[str] = set()
        for value in values:
            _collect(value, needles, 0)
        # Longest first, so a value containing another is replaced whole.
        self._needles = sorted((n for n in needles if len(n) >= MIN_SCRUB_LENGTH), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._needles)

    def text(self, text: str) -> str:
        """``text`` with every known value replaced."""
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, REDACTED)
        return text

    def value(self, value: Any, depth: int = 0) -> Any:
        """A copy of ``value`` with known values replaced in its strings."""
        if isinstance(value, str):
            return self.text(value)
        if depth < _MAX_SCRUB_DEPTH:
            if isinstance(value, (list, tuple)) and value:
                return type(value)(self.value(item, depth + 1) for item in value)
            if isinstance(value, dict):
                return {self.value(k, depth + 1): self.value(v, depth + 1) for k, v in value.items()}
            if isinstance(value, BaseException):
                self.exception(value, depth + 1)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                return REDACTED if self.text(str(value)) != str(value) else value
        return value

    def exception(self, exc: BaseException, depth: int = 0) -> None:
        """Scrub an exception in place: args, attributes, and chained causes."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and depth < _MAX_SCRUB_DEPTH:
            seen.add(id(current))
            try:
                current.args = tuple(self.value(arg, depth + 1) for arg in current.args)
                for name, attribute in list(vars(current).items()):
                    if name.startswith("__"):
                        continue
                    setattr(current, name, self.value(attribute, depth + 1))
            except (AttributeError, TypeError):  # read-only attributes of C exceptions
                pass
            current = current.__cause__ or current.__context__


def _collect(value: Any, needles: set[str], depth: int) -> None:
    if depth > _MAX_SCRUB_DEPTH:
        return
    if isinstance(value, str):
        needles.add(value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (int, float)):
        needles.add(str(value))
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, needles, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, needles, depth + 1)


# Celery's trace logger: "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
_TRACE_LOGGER: Final = "celery.app.trace"


class Scrubbing(Protocol):
    """What the logging filter needs of the running task."""

    #: A PII task: its return value is hidden from Celery's success line.
    is_pii: bool

    @property
    def scrubber(self) -> Scrubber:
        """Replaces the values opened for the task (built on first use)."""


class RedactingFilter(logging.Filter):
    """Scrubs the running PII task's plaintext values from log records.

    ``current`` returns the running task (``None`` outside tasks).
    """

    def __init__(self, current: Callable[[], Scrubbing | None]) -> None:
        super().__init__("celery_pii")
        self._current = current

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drop it."""
        running = self._current()
        if running is None:
            return True
        args = record.args
        if (
            running.is_pii
            and record.name == _TRACE_LOGGER
            and isinstance(args, dict)
            and "return_value" in args  # Celery's success line
        ):
            record.args = dict(args, return_value=REDACTED)
            message = str(record.msg)
            if "%(args)" not in message and "%(kwargs)" not in message:
                # Celery's success line, once per PII task: with the return value hidden,
                # what is left (task name, id, runtime) holds no value of the call, so
                # the scrubber need not be built for it.
                return True
        scrubber = running.scrubber
        if scrubber:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is the logger's problem
                return True
            scrubbed = scrubber.text(message)
            if scrubbed != message:
                record.msg, record.args = scrubbed, None
            data = getattr(record, "data", None)
            if isinstance(data, dict):
                record.data = scrubber.value(data)
        return True
