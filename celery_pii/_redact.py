"""Redacted reprs, exception scrubbing and a logging filter.

Celery writes arguments and outcomes into headers (``argsrepr``), events,
logs and the result backend.  For PII tasks:

* ``argsrepr``/``kwargsrepr`` are the repr of the *sealed* copies, so PII
  values show as the fixed marker while other values stay visible;
* exceptions raised by the task are scrubbed in place before Celery formats,
  logs or stores them: every plaintext value opened for the task is replaced
  by :data:`REDACTED` in their arguments, attributes and chained causes; an
  exception whose text still holds such a value (one that builds its message
  from state scrubbing cannot reach) is replaced by a :class:`RedactedError`;
* a logging filter scrubs the same values from records emitted while the
  task runs (their message, traceback and stack), and hides PII tasks' return
  values in Celery's success log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from celery.exceptions import TaskPredicate

__all__ = ["REDACTED", "RedactedError", "RedactingFilter", "Scrubber", "redacted_repr"]

REDACTED: Final = "[pii:redacted]"
# Values shorter than this are not scrubbed from free text: replacing every
# "42" in a message would destroy it, and such values are not identifying.
MIN_SCRUB_LENGTH: Final = 4
_MAX_SCRUB_DEPTH: Final = 8


class RedactedError(Exception):
    """Stands in for an exception whose text still held a value opened for the task.

    Raised (``from None``) in place of an exception that scrubbing could not
    clean: one that builds its message from state outside its ``args`` and
    attributes (pydantic's ``ValidationError``, for example).  The message
    names the original exception's type, never its text.
    """

    def __init__(self, message: str) -> None:
        # One argument, so Celery can rebuild it from a stored result.
        super().__init__(message)

    @classmethod
    def standing_in_for(cls, exc: BaseException) -> RedactedError:
        """The stand-in for ``exc``: its type's name, not its text."""
        kind = type(exc)
        module = kind.__module__
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        return cls(f"{name} raised; its message held PII and was withheld")


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

    def contains(self, text: str) -> bool:
        """True if ``text`` holds a known value."""
        return any(needle in text for needle in self._needles)

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
        """Scrub an exception in place: args, attributes, notes, and chained causes.

        An exception held in an argument or attribute that stays unclean is
        replaced there by its :class:`RedactedError`.
        """
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and depth < _MAX_SCRUB_DEPTH:
            seen.add(id(current))
            try:
                current.args = tuple(self._held(arg, current, depth + 1) for arg in current.args)
                for name, attribute in list(vars(current).items()):
                    if name.startswith("__") and name != "__notes__":
                        continue
                    setattr(current, name, self._held(attribute, current, depth + 1))
            except (AttributeError, TypeError):  # read-only attributes of C exceptions
                pass
            current = current.__cause__ or current.__context__

    def raised(self, exc: BaseException) -> BaseException:
        """What to let leave the task for ``exc``: itself, scrubbed, or its :class:`RedactedError`.

        Celery's control-flow exceptions (``Retry``, ``Ignore``, ``Reject``)
        are kept: replacing them would change what Celery does with the task.
        """
        self.exception(exc)
        if isinstance(exc, TaskPredicate) or self.is_clean(exc):
            return exc
        return RedactedError.standing_in_for(exc)

    def is_clean(self, exc: BaseException) -> bool:
        """True if no known value is left in what a traceback of ``exc`` shows of it."""
        return not any(self.contains(text) for text in _shown_text(exc))

    def _held(self, value: Any, owner: BaseException, depth: int) -> Any:
        scrubbed = self.value(value, depth)
        if isinstance(scrubbed, BaseException) and scrubbed is not owner and not self.is_clean(scrubbed):
            return RedactedError.standing_in_for(scrubbed)
        return scrubbed


def _shown_text(exc: BaseException) -> Iterator[str]:
    """The text a traceback of ``exc`` shows: each chained exception's str, repr and notes."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < _MAX_SCRUB_DEPTH * 4:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield from (_safely(show, current) for show in (str, repr))
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, (list, tuple)):
            yield from (note for note in notes if isinstance(note, str))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        grouped = getattr(current, "exceptions", None)  # an exception group's members
        if isinstance(grouped, tuple):
            pending.extend(e for e in grouped if isinstance(e, BaseException))


def _safely(show: Callable[[BaseException], str], exc: BaseException) -> str:
    try:
        return show(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ is printed as a placeholder
        return ""


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
            _scrub_traceback(record, scrubber)
        return True


_TRACEBACK_FORMATTER: Final = logging.Formatter()


def _scrub_traceback(record: logging.LogRecord, scrubber: Scrubber) -> None:
    """Format the record's traceback now, scrubbed, so handlers print that text instead.

    Handlers print ``exc_text`` when it is set and format ``exc_info`` only
    when it is not, so ``exc_info`` is cleared once its text is stored.
    """
    exc_info: Any = record.exc_info
    if exc_info:
        if not record.exc_text:
            if not isinstance(exc_info, tuple):  # exc_info=True on a hand-made record
                exc_info = sys.exc_info()
            if exc_info[0] is not None:
                record.exc_text = _TRACEBACK_FORMATTER.formatException(exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = scrubber.text(record.exc_text)
    if record.stack_info:
        record.stack_info = scrubber.text(record.stack_info)
