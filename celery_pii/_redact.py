"""Redacted reprs, exception scrubbing and a logging filter.

Celery writes arguments and outcomes into headers (``argsrepr``), events,
logs and the result backend.  For PII tasks:

* ``argsrepr``/``kwargsrepr`` are the repr of the *sealed* copies, so PII
  values show as the fixed marker while other values stay visible;
* exceptions raised by the task are scrubbed in place before Celery formats,
  logs or stores them: every plaintext value opened for the task is replaced
  by :data:`REDACTED` in their arguments, attributes (``OSError`` file names
  too) and chained causes; an exception whose text still holds such a value
  (one that builds its message from state scrubbing cannot reach) is replaced
  by a :class:`RedactedError`;
* a logging filter scrubs the same values from records emitted while the
  task runs (their message, traceback and stack), and hides PII tasks' return
  values in Celery's success log.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import datetime as dt
import inspect
import json
import logging
import os
import pickle  # nosec B403 - checks that an exception pickles (_pickles)
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any, Final, Protocol
from urllib.parse import quote, quote_plus
from uuid import UUID

from celery.exceptions import TaskPredicate

__all__ = ["REDACTED", "RedactedError", "RedactingFilter", "Scrubber", "forget_locals", "redacted_repr"]

REDACTED: Final = "[pii:redacted]"
# Text forms shorter than this are not scrubbed from free text: replacing every
# "42" (or "True") in a message would destroy it, and such values are not
# identifying.  It applies to each form of a value (see ``_forms``).
MIN_SCRUB_LENGTH: Final = 4
#: A number written with separators ("4111 1111 1111 1111", "900-12-3456") is also
#: searched for as its digits alone, when there are at least this many of them.
MIN_DIGITS_FORM: Final = 6
_SEPARATED_DIGITS: Final = re.compile(r"[+(]?[0-9][0-9 ./()+-]*[0-9]")
_MAX_SCRUB_DEPTH: Final = 8
# Exceptions a traceback shows (causes, contexts, group members) that are looked at.
_MAX_SHOWN_EXCEPTIONS: Final = 256
# Scalars (besides str) whose text forms are searched for when opened as
# values, and which are replaced whole when their text shows one.
_SCALARS: Final = (int, float, Decimal, dt.date, dt.time, UUID, bytes, bytearray)
# Plain data rebuilt with its items scrubbed (exactly these types: not their subclasses).
_CONTAINERS: Final = frozenset({list, tuple, dict, set, frozenset})
# Attributes some C exceptions keep outside ``args`` and ``vars()`` and show in their text.
_TEXT_ATTRIBUTES: Final = ((OSError, ("filename", "filename2")), (SyntaxError, ("filename", "text")))
# Code flags of frames that can be suspended and resumed (generators, coroutines).
_SUSPENDABLE: Final = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
)


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
    """Replaces known plaintext values (and their text forms) in text and objects.

    Each value is searched for in every form a message is likely to show it
    in: its ``str()``; for strings also the inside of their ``repr()`` (a
    value with a newline or quote appears escaped in the repr of the
    arguments, as in ``MaxRetriesExceededError``), of the repr of that (the
    repr of such an exception), of their JSON, their lower- and upper-case
    forms, and, for digits written with separators, the digits alone; for dates and times also
    ``isoformat()`` and ``repr()``; for UUIDs ``hex``; for bytes the inside
    of their repr and their UTF-8 text.  Forms shorter than
    :data:`MIN_SCRUB_LENGTH` characters are not searched for.  Other
    objects (and formats such as ``strftime`` output) are not searched for.
    """

    __slots__ = ("_needles",)

    def __init__(self, values: Iterable[Any]) -> None:
        needles: set[str] = set()
        for value in values:
            _collect(value, needles)
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

    def value(self, value: Any, depth: int = 0, *, limit: int = _MAX_SCRUB_DEPTH) -> Any:
        """A copy of ``value`` with known values replaced in its strings.

        Only plain data is rebuilt (``list``, ``tuple``, ``dict``, ``set``,
        ``frozenset`` themselves, not their subclasses); a scalar whose text
        shows a known value is replaced whole; exceptions are scrubbed in place.  Other objects are
        left alone: a ``Retry``'s signature must stay a signature (Celery
        re-applies it), with the arguments it was given.  Plain data nested
        deeper than ``limit`` levels is replaced whole when its repr shows a
        known value (a formatter or an error tracker writes it as it is).
        """
        if isinstance(value, str):
            return self.text(value)
        kind = type(value)
        if kind in _CONTAINERS:
            if depth >= limit:
                return REDACTED if self._repr_may_show(value) else value
            if kind is dict:
                return {
                    self.value(k, depth + 1, limit=limit): self.value(v, depth + 1, limit=limit)
                    for k, v in value.items()
                }
            return kind(self.value(item, depth + 1, limit=limit) for item in value) if value else value
        if depth < limit:
            if isinstance(value, BaseException):
                self.exception(value, depth + 1)
            elif isinstance(value, _SCALARS) and not isinstance(value, bool):
                return REDACTED if self.contains(str(value)) or self.contains(repr(value)) else value
        return value

    def _repr_may_show(self, value: Any) -> bool:
        """True if ``repr(value)`` shows a known value, or cannot be written to tell."""
        try:
            return self.contains(repr(value))
        except Exception:  # noqa: BLE001 - an object's own __repr__ failed: assume the worst
            return True

    def exception(self, exc: BaseException, depth: int = 0) -> None:
        """Scrub an exception in place: args, attributes, notes, and chained causes.

        An exception held in an argument or attribute that stays unclean is
        replaced there by its :class:`RedactedError`.
        """
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and depth < _MAX_SCRUB_DEPTH:
            seen.add(id(current))
            _set_quietly(current, "args", tuple(self._held(arg, current, depth + 1) for arg in current.args))
            for name, attribute in list(vars(current).items()):
                if name.startswith("__") and name != "__notes__":
                    continue
                scrubbed = self._held(attribute, current, depth + 1)
                if scrubbed is not attribute:
                    _set_quietly(current, name, scrubbed)
            for kind, names in _TEXT_ATTRIBUTES:
                if isinstance(current, kind):
                    for name in names:
                        self._text_attribute(current, name)
            current = current.__cause__ or current.__context__

    def raised(self, exc: BaseException) -> BaseException:
        """What to let leave the task for ``exc``: itself, scrubbed, or its :class:`RedactedError`.

        What ends a thread or process (no ``Exception``) keeps its kind: see
        ``_ending``.  Celery's control-flow exceptions (``Retry``, ``Ignore``, ``Reject``)
        are kept: replacing them would change what Celery does with the task.
        """
        self.exception(exc)
        if not isinstance(exc, Exception):
            return self._ending(exc)
        if not isinstance(exc, TaskPredicate):
            return exc if self.is_clean(exc) else RedactedError.standing_in_for(exc)
        # A traceback of it shows the exception it was raised while handling
        # (``raise self.retry(exc=error)``, autoretry): replaced if unclean.
        for name in ("__cause__", "__context__"):
            linked = getattr(exc, name)
            if linked is not None and not self.is_clean(linked):
                setattr(exc, name, RedactedError.standing_in_for(linked))
        kept: BaseException = exc
        return kept

    def _ending(self, exc: BaseException) -> BaseException:
        """What leaves the task for what ends a thread or process (``sys.exit(text)``, ``KeyboardInterrupt``).

        Scrubbed in place and kept, type and all, so that the pool ends what it
        would; Celery's trace lets it through, and the pool prints it, records
        its repr, or sends it to the main process pickled.  A process that
        exits prints ``SystemExit.code``, an attribute of its own (set from the
        arguments once).  One still unclean gets the stand-in's message in place
        of its arguments, if it still pickles so; else (and for a group, whose
        text is its own) a builtin of its kind stands in for it.
        """
        if isinstance(exc, SystemExit) and exc.code is not None:
            _set_quietly(exc, "code", self.value(exc.code))
        if self._ends_clean(exc):
            return exc
        withheld = RedactedError.standing_in_for(exc).args[0]
        group = _base_exception_group()
        if group is not None and isinstance(exc, group):
            return group(withheld, [self.raised(member) for member in exc.exceptions])  # type: ignore[no-any-return]
        _set_quietly(exc, "args", (withheld,))
        if isinstance(exc, SystemExit):
            _set_quietly(exc, "code", withheld)
        if self._ends_clean(exc) and _pickles(exc):
            return exc
        kind = next(base for base in _ENDING_KINDS if isinstance(exc, base))
        return kind(withheld)

    def _ends_clean(self, exc: BaseException) -> bool:
        code = exc.code if isinstance(exc, SystemExit) else None
        return self.is_clean(exc) and not self._repr_may_show(code) and not self.contains(_shown_code(code))

    def is_clean(self, exc: BaseException) -> bool:
        """True if no known value is left in what a traceback of ``exc`` shows of it.

        An exception chaining more exceptions than are looked at is not clean:
        a traceback prints them all.
        """
        shown = list(_shown_exceptions(exc))
        if len(shown) >= _MAX_SHOWN_EXCEPTIONS:
            return False
        return not any(self.contains(text) for text in _shown_text(shown))

    def _held(self, value: Any, owner: BaseException, depth: int) -> Any:
        if value is owner:  # Celery's Retry holds itself in its args
            return value
        scrubbed = self.value(value, depth)
        if isinstance(scrubbed, BaseException) and scrubbed is not owner and not self.is_clean(scrubbed):
            return RedactedError.standing_in_for(scrubbed)
        return scrubbed

    def _text_attribute(self, exc: BaseException, name: str) -> None:
        """Scrub a file name (or source line) a C exception keeps outside ``args``."""
        attribute = getattr(exc, name, None)
        if isinstance(attribute, os.PathLike):
            attribute = os.fspath(attribute)
        if isinstance(attribute, str):
            scrubbed: Any = self.text(attribute)
        elif isinstance(attribute, bytes):
            scrubbed = self.value(attribute)
        else:
            return
        if scrubbed is not attribute:
            # If it cannot be set, the exception stays unclean and raised() replaces it.
            _set_quietly(exc, name, scrubbed)


def forget_locals(exc: BaseException) -> None:
    """Clear the local variables of the frames a task's exception carries out of the task.

    Error trackers send every frame's local variables with an exception
    (Sentry does by default): a task's locals are the values opened for it.
    Cleared: the finished frames of ``exc``'s traceback (the task's own), and
    of the exceptions it chains or carries (a ``Retry``'s ``exc``) that were
    caught inside those frames, not the caller's exception an eager call
    was made while handling.  Frames still running are left alone, and so
    are generators' and coroutines' (clearing a suspended one would close it:
    it may live on outside the task).  Files, lines and code stay, so
    tracebacks print as before.
    """
    task_frames: set[int] = set()
    for current in _shown_exceptions(exc, carried=True):
        trace = current.__traceback__
        if current is not exc and (trace is None or id(trace.tb_frame) not in task_frames):
            continue  # raised and caught outside the task
        while trace is not None:
            frame = trace.tb_frame
            task_frames.add(id(frame))
            if not frame.f_code.co_flags & _SUSPENDABLE:
                with contextlib.suppress(RuntimeError):  # still running
                    frame.clear()
            trace = trace.tb_next


def _set_quietly(exc: BaseException, name: str, value: Any) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # read-only attributes of C exceptions
        setattr(exc, name, value)


def _shown_text(shown: Iterable[BaseException]) -> Iterator[str]:
    """The text a traceback shows of these exceptions: each one's str, repr and notes."""
    for current in shown:
        yield from (_safely(show, current) for show in (str, repr))
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, (list, tuple)):
            yield from (note for note in notes if isinstance(note, str))


def _shown_exceptions(exc: BaseException, *, carried: bool = False) -> Iterator[BaseException]:
    """``exc`` and each exception a traceback of it shows (causes, contexts, group members), once.

    Breadth first, so an exception comes before those it chains.  With
    ``carried``, also the exception a Celery ``Retry`` carries (``exc``).
    """
    seen: set[int] = set()
    pending: collections.deque[BaseException] = collections.deque([exc])
    while pending and len(seen) < _MAX_SHOWN_EXCEPTIONS:
        current = pending.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__]
        if carried and isinstance(current, TaskPredicate):
            linked.append(getattr(current, "exc", None))
        pending.extend(e for e in linked if isinstance(e, BaseException))
        grouped = getattr(current, "exceptions", None)  # an exception group's members
        if isinstance(grouped, tuple):
            pending.extend(e for e in grouped if isinstance(e, BaseException))


# The builtin kinds of what ends a thread or process, most specific first (see Scrubber._ending).
_ENDING_KINDS: Final = (SystemExit, KeyboardInterrupt, GeneratorExit, BaseException)


def _base_exception_group() -> Any:
    """Python 3.11's ``BaseExceptionGroup``, or on 3.10 the exceptiongroup backport's if it is loaded."""
    return getattr(builtins, "BaseExceptionGroup", None) or getattr(
        sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None
    )


def _pickles(exc: BaseException) -> bool:
    """True if ``exc`` comes back from pickling (a prefork child sends it to its main process so)."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301  # nosec B301 - bytes written here
    except Exception:  # noqa: BLE001 - whatever its constructor or attributes raise
        return False
    return True


def _shown_code(code: object) -> str:
    """What a process exiting with ``SystemExit(code)`` prints."""
    return _safely(str, code)


def _safely(show: Callable[[Any], str], value: object) -> str:
    try:
        return show(value)
    except Exception:  # noqa: BLE001 - a broken __str__ is printed as a placeholder: nothing to read
        return ""


def _collect(value: Any, needles: set[str]) -> None:
    """The text forms of every scalar in ``value``, however deep, and of its dict keys that are values.

    A dict key is taken when detection finds PII in it (a card number, an
    email keying a dict of balances) or it is not a string (an account
    number): most keys name fields (``email``, ``Content-Type``, ``first
    name``), and searching for those would hide every mention of the field.
    """
    from ._detect import scan_text  # noqa: PLC0415 - _detect imports this module

    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        if isinstance(current, bool) or current is None:
            continue
        if isinstance(current, (dict, list, tuple, set, frozenset)):
            if id(current) in seen:  # a task's own values (a retry's) may hold themselves
                continue
            seen.add(id(current))
        if isinstance(current, dict):
            pending.extend(current.values())
            pending.extend(key for key in current if not isinstance(key, str) or scan_text(key))
        elif isinstance(current, (list, tuple, set, frozenset)):
            pending.extend(current)
        else:
            needles.update(_forms(current))


def _rewritten(text: str) -> Iterator[str]:
    """What a task most often makes of a value before it shows it.

    An email normalised (``ANN@EXAMPLE.COM``), a card, SSN or phone number
    without its spaces, dashes or brackets.
    """
    yield text.lower()
    yield text.upper()
    if _SEPARATED_DIGITS.fullmatch(text):
        digits = "".join(char for char in text if char.isdigit())
        if len(digits) >= MIN_DIGITS_FORM:
            yield digits


def _forms(value: Any) -> Iterator[str]:
    """The text forms ``value`` can show in a message (see :class:`Scrubber`)."""
    if isinstance(value, str):
        yield value
        inside = repr(value)[1:-1]  # newlines, quotes, backslashes escaped
        yield inside
        yield repr(inside)[1:-1]  # escaped twice: the repr of a message holding a repr
        yield json.dumps(value)[1:-1]
        if len(value) >= MIN_SCRUB_LENGTH:  # encoded, a short value would look long enough
            # In a URL (an HTTP client's error names the URL it called: ?email=ann%40example.com).
            yield quote(value, safe="")
            yield quote(value)
            yield quote_plus(value)
            if not value.isascii():  # as UTF-8 bytes (a UnicodeDecodeError shows them)
                yield repr(value.encode("utf-8", "surrogatepass"))[2:-1]
            yield from _rewritten(value)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        yield repr(data)[2:-1]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        yield from _forms(text)
    elif isinstance(value, (dt.date, dt.time)):
        yield str(value)
        yield value.isoformat()
        yield repr(value)
    elif isinstance(value, UUID):
        yield str(value)
        yield value.hex
    elif isinstance(value, _SCALARS):  # int, float, Decimal
        yield str(value)


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

    ``current`` returns the running task (``None`` outside tasks);
    ``elsewhere`` a scrubber of the values of tasks running in other threads
    (``None`` when there are none), for records logged outside any task: by a
    thread a task started, which does not inherit the task's context.
    """

    def __init__(
        self,
        current: Callable[[], Scrubbing | None],
        elsewhere: Callable[[], Scrubber | None] = lambda: None,
    ) -> None:
        super().__init__("celery_pii")
        self._current = current
        self._elsewhere = elsewhere

    def scrubber_now(self) -> Scrubber | None:
        """The scrubber for a record logged here and now: the running task's, or other threads' tasks'."""
        running = self._current()
        if running is None:
            return self._elsewhere()
        return running.scrubber or None

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drop it."""
        running = self._current()
        if running is None:
            others = self._elsewhere()
            if others:
                _scrub_record(record, others)
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
            _scrub_record(record, scrubber)
        return True


#: What every record has; other attributes came with ``extra=`` (structured formatters write them out).
_RECORD_ATTRIBUTES: Final = frozenset(
    (*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "taskName")
)


def _scrub_record(record: logging.LogRecord, scrubber: Scrubber) -> None:
    """Scrub a record's message, its ``extra=`` attributes (Celery's ``data``) and its traceback."""
    if isinstance(record.msg, dict) and not record.args:
        # structlog's event dict (``wrap_for_formatter``): its formatter reads it as a dict.
        record.msg = scrubber.value(record.msg)
    else:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the logger's problem
            return
        scrubbed = scrubber.text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
    for name, extra in list(vars(record).items()):
        if name not in _RECORD_ATTRIBUTES:
            setattr(record, name, _scrubbed_extra(extra, scrubber))
    _scrub_traceback(record, scrubber)


def _scrubbed_extra(value: Any, scrubber: Scrubber) -> Any:
    """An ``extra=`` attribute, scrubbed; a number only when it is a value itself.

    A handler may format it as a number (``%(attempt)d``): one whose digits
    merely hold a short value (``51234`` holding a PIN ``1234``) keeps its type.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return REDACTED if scrubber.text(str(value)) == REDACTED else value
    return scrubber.value(value)


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
