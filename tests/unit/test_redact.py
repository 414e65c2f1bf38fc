"""The logging filter and the exception scrubber: opened values out of log lines, tracebacks, exceptions."""

from __future__ import annotations

import builtins
import logging
import pickle
import sys
import traceback
from typing import NamedTuple
from urllib.parse import quote

import pytest
from celery.app.trace import LOG_SUCCESS
from celery.exceptions import Retry

from celery_pii._redact import REDACTED, RedactedError, RedactingFilter, Scrubber, forget_locals

CARD, EMAIL = "4111 1111 1111 1111", "ann@example.com"


class Running:
    """A running task as the filter sees it; counts how often its scrubber is asked for."""

    def __init__(self, values, *, is_pii=True):
        self.is_pii = is_pii
        self.values = values
        self.scrubber_built = 0

    @property
    def scrubber(self):
        self.scrubber_built += 1
        return Scrubber(self.values)


def _record(name, msg, args):
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
    record.args = args  # a dict, as Celery passes it (LogRecord's constructor would unwrap it)
    return record


def _success(return_value, msg=LOG_SUCCESS):
    args = {"id": "t-1", "name": "t.charge", "return_value": return_value, "runtime": 0.01}
    return _record("celery.app.trace", msg, {**args, "args": "['[pii:sealed]']", "kwargs": "{}"})


def test_success_line_of_a_pii_task_hides_the_return_value_without_building_a_scrubber():
    running = Running([CARD, EMAIL])
    record = _success(repr({"card": CARD}))
    assert RedactingFilter(lambda: running).filter(record)
    assert record.getMessage() == f"Task t.charge[t-1] succeeded in 0.01s: {REDACTED}"
    assert running.scrubber_built == 0


def test_attributes_given_with_extra_are_scrubbed():
    """``log.info("...", extra={...})``: a structured (JSON) formatter writes those attributes out."""
    running = Running([CARD, EMAIL])
    logger = logging.getLogger("tests.structured")
    record = logger.makeRecord(
        "tests.structured",
        logging.INFO,
        __file__,
        1,
        "charged",
        (),
        None,
        extra={"customer_email": EMAIL, "ctx": {"card": CARD, "tries": 3}, "attempt": 2},
    )
    RedactingFilter(lambda: running).filter(record)
    assert record.customer_email == REDACTED
    assert record.ctx == {"card": REDACTED, "tries": 3}
    assert record.attempt == 2
    assert (record.msg, record.levelname, record.name) == ("charged", "INFO", "tests.structured")


def test_sets_given_with_extra_are_scrubbed():
    """A JSON formatter writes a set as a list of its items."""
    record = _record("tests.structured", "charged", ())
    record.tags, record.frozen = {CARD, "vip"}, frozenset({EMAIL})
    RedactingFilter(lambda: Running([CARD, EMAIL])).filter(record)
    assert record.tags == {REDACTED, "vip"}
    assert record.frozen == frozenset({REDACTED})


def test_an_attribute_nested_deeper_than_scrubbing_goes_is_replaced_whole():
    """A JSON formatter writes ``extra`` at any depth: past the limit, a branch showing a value goes."""
    nested: object = {"card": CARD}
    for _ in range(12):
        nested = {"inner": [nested]}
    clean: object = {"tries": 3}
    for _ in range(12):
        clean = {"inner": [clean]}
    record = _record("tests.structured", "charged", ())
    record.ctx, record.other = nested, clean
    RedactingFilter(lambda: Running([CARD])).filter(record)
    assert CARD not in repr(record.ctx)
    assert REDACTED in repr(record.ctx)
    assert record.other == clean  # nothing to hide: kept as it was


def test_a_deep_branch_whose_repr_fails_is_replaced():
    """A branch past the limit that cannot be written out to check is not kept."""

    class Unprintable:
        def __repr__(self):
            raise RuntimeError

    nested: object = [Unprintable()]
    for _ in range(12):
        nested = [nested]
    assert CARD not in repr(Scrubber([CARD]).value(nested))
    assert REDACTED in repr(Scrubber([CARD]).value(nested))


def test_a_number_given_with_extra_stays_a_number_unless_it_is_a_value():
    """A handler may format it with ``%(attempt)d``: 51234 holding a PIN 1234 is not the PIN."""
    running = Running(["1234", 4111111111111111])
    record = logging.getLogger("tests.structured").makeRecord(
        "tests.structured",
        logging.INFO,
        __file__,
        1,
        "x",
        (),
        None,
        extra={"attempt": 51234, "card": 4111111111111111},
    )
    RedactingFilter(lambda: running).filter(record)
    assert record.attempt == 51234
    assert record.card == REDACTED


def test_success_format_showing_the_arguments_is_scrubbed():
    running = Running([CARD, EMAIL])
    record = _success("None", msg=LOG_SUCCESS + " %(kwargs)s")
    record.args["kwargs"] = repr({"email": EMAIL})
    RedactingFilter(lambda: running).filter(record)
    assert EMAIL not in record.getMessage()
    assert REDACTED in record.getMessage()


def test_other_lines_are_scrubbed_of_opened_values():
    running = Running([CARD, EMAIL])
    record = _record("celery.app.trace", "Task %(name)s raised: %(exc)s", {"name": "t", "exc": f"bad {CARD}"})
    RedactingFilter(lambda: running).filter(record)
    assert record.getMessage() == f"Task t raised: bad {REDACTED}"


def test_a_task_without_pii_fields_keeps_its_return_value_minus_opened_values():
    running = Running([EMAIL], is_pii=False)  # values sealed by seal_all or detection, not declared
    record = _success(repr({"total": 3, "email": EMAIL}))
    RedactingFilter(lambda: running).filter(record)
    assert (
        record.getMessage() == f"Task t.charge[t-1] succeeded in 0.01s: {{'total': 3, 'email': '{REDACTED}'}}"
    )


def test_outside_tasks_records_are_left_alone():
    record = _success(repr({"card": CARD}))
    assert RedactingFilter(lambda: None).filter(record)
    assert CARD in record.getMessage()


def _failure_record(exc, *, stack_info=None):
    try:
        raise exc
    except ValueError:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "celery.app.trace", logging.ERROR, __file__, 1, "Task %s raised", ("t",), exc_info, sinfo=stack_info
    )


def test_the_traceback_of_a_record_is_scrubbed_and_printed_as_text():
    """exc_info is formatted, scrubbed into exc_text and cleared, so handlers print the scrubbed text."""
    running = Running([CARD, EMAIL])
    record = _failure_record(
        ValueError(f"card {CARD} declined"), stack_info=f"Stack (most recent call last):\n{EMAIL}"
    )
    assert RedactingFilter(lambda: running).filter(record)
    assert record.exc_info is None
    assert "Traceback (most recent call last)" in record.exc_text
    assert f"ValueError: card {REDACTED} declined" in record.exc_text
    assert EMAIL not in record.stack_info
    text = logging.Formatter().format(record)
    assert CARD not in text
    assert EMAIL not in text
    assert REDACTED in text


def test_a_traceback_already_formatted_is_scrubbed_too():
    """A record whose exc_text a handler already set keeps that text, scrubbed."""
    running = Running([CARD])
    record = _failure_record(ValueError(f"card {CARD} declined"))
    record.exc_text = logging.Formatter().formatException(record.exc_info)
    RedactingFilter(lambda: running).filter(record)
    assert record.exc_info is None
    assert CARD not in record.exc_text


def test_tracebacks_outside_tasks_are_left_alone():
    """Without a running PII context, exc_info stays for handlers (Sentry and the like) to use."""
    record = _failure_record(ValueError(f"card {CARD} declined"))
    RedactingFilter(lambda: None).filter(record)
    assert record.exc_info is not None
    assert record.exc_text is None


class _Held:
    """An object whose text is a value: scrubbing does not reach into it."""

    def __init__(self, value):
        self._value = value

    def __str__(self):
        return str(self._value)

    def __repr__(self):
        return f"<held {id(self):#x}>"


class BuildsItsMessage(Exception):
    """Builds its message in __str__, from state scrubbing cannot reach (as pydantic's ValidationError does)."""

    def __init__(self, value):
        super().__init__(_Held(value))

    def __str__(self):
        return f"invalid input {self.args[0]}"


def test_an_exception_scrubbing_cannot_clean_is_replaced_by_a_redacted_error():
    """Its stand-in names the original type and holds none of its text."""
    scrubber = Scrubber([CARD])
    original = BuildsItsMessage(CARD)
    raised = scrubber.raised(original)
    assert isinstance(raised, RedactedError)
    assert f"{__name__}.BuildsItsMessage" in str(raised)
    assert CARD not in str(raised)
    assert CARD not in repr(raised)


def test_an_exception_scrubbed_clean_is_kept():
    """Scrubbing its args is enough: the very exception leaves the task."""
    scrubber = Scrubber([CARD])
    original = ValueError(f"card {CARD} declined")
    assert scrubber.raised(original) is original
    assert str(original) == f"card {REDACTED} declined"


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_what_ends_a_process_keeps_its_type_and_is_scrubbed_in_place(kind):
    """The pool must still end the thread or process; what it prints (a SystemExit's code too) is scrubbed."""
    scrubber = Scrubber([CARD])
    original = kind(f"card {CARD} declined")
    assert scrubber.raised(original) is original
    assert str(original) == f"card {REDACTED} declined"
    assert getattr(original, "code", str(original)) == f"card {REDACTED} declined"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are new in Python 3.11")
def test_a_group_of_what_ends_a_process_is_replaced_by_a_clean_group_that_pickles():
    """Its text is its own ``message``: arguments rewritten in place showed the card and broke unpickling.

    (A prefork child sends it to the worker's main process pickled: that
    process stopped, and the task was lost.)
    """
    original = BaseExceptionGroup(f"group for card {CARD}", [SystemExit(f"card {CARD}")])  # noqa: F821
    raised = Scrubber([CARD]).raised(original)
    shown = "".join(traceback.format_exception(raised))
    assert CARD not in shown
    assert "BaseExceptionGroup raised; its message held PII" in shown
    assert isinstance(raised, BaseExceptionGroup)  # noqa: F821
    (member,) = pickle.loads(pickle.dumps(raised)).exceptions  # noqa: S301 - its own bytes
    assert isinstance(member, SystemExit)
    assert member.code == f"card {REDACTED}"


def test_what_ends_a_process_and_cannot_take_a_message_is_replaced_by_its_builtin_kind():
    """A subclass whose constructor wants other arguments would not unpickle with the stand-in's message."""

    class Exit(SystemExit):
        def __init__(self, card, reason):
            super().__init__(reason)
            self.card = card

        def __str__(self):
            return f"exit over {self.card}"

    raised = Scrubber([CARD]).raised(Exit(_Held(CARD), "declined"))
    assert type(raised) is SystemExit
    assert CARD not in str(raised)
    assert pickle.loads(pickle.dumps(raised)).code == raised.code  # noqa: S301 - its own bytes


def test_an_exit_status_is_kept():
    """``sys.exit(3)`` still exits with 3."""
    original = SystemExit(3)
    assert Scrubber([CARD]).raised(original) is original
    assert original.code == 3


def test_what_ends_a_process_and_cannot_be_scrubbed_has_its_text_withheld():
    """A code whose text is built elsewhere (printed by the exiting process) gives way to the stand-in's message."""
    original = SystemExit(_Held(CARD))
    assert Scrubber([CARD]).raised(original) is original
    assert CARD not in str(original.code)
    assert CARD not in str(original)
    assert "SystemExit raised; its message held PII" in str(original.code)


def test_an_unclean_cause_replaces_the_whole_exception():
    """A traceback prints chained causes: an unclean one makes the exception unclean."""
    scrubber = Scrubber([CARD])
    outer = RuntimeError("lookup failed")
    outer.__cause__ = BuildsItsMessage(CARD)
    assert isinstance(scrubber.raised(outer), RedactedError)


def test_notes_are_scrubbed():
    """Notes added to an exception are printed by tracebacks: they are scrubbed like its args."""
    scrubber = Scrubber([EMAIL])
    original = ValueError("bad")
    # What add_note (Python 3.11+) does; on 3.10 the exceptiongroup backport's tracebacks print them too.
    original.__notes__ = [f"while mailing {EMAIL}"]
    assert scrubber.raised(original) is original
    assert original.__notes__ == [f"while mailing {REDACTED}"]


def test_a_retry_is_kept_and_its_unclean_exception_replaced():
    """Celery's Retry keeps its type (the task is still retried); the exception it carries is replaced."""
    scrubber = Scrubber([CARD])
    retry = Retry(exc=BuildsItsMessage(CARD), when=1)
    assert scrubber.raised(retry) is retry
    assert isinstance(retry.exc, RedactedError)
    assert CARD not in str(retry)
    assert CARD not in repr(retry)


def test_a_retry_raised_while_handling_an_unclean_exception_shows_its_stand_in():
    """``raise self.retry(exc=error)`` chains the error as context, which tracebacks print: replaced."""
    scrubber = Scrubber([CARD])

    def task_body():
        try:
            raise BuildsItsMessage(CARD)  # noqa: TRY301 - the task's own failure
        except BuildsItsMessage as error:
            raise Retry(exc=error, when=1)  # noqa: B904 - chained as context, as in tasks

    with pytest.raises(Retry) as info:
        task_body()
    retry = info.value
    assert scrubber.raised(retry) is retry
    assert isinstance(retry.__context__, RedactedError)
    shown = "".join(traceback.format_exception(retry))
    assert "BuildsItsMessage raised" in shown
    assert CARD not in shown


def test_a_redacted_error_is_rebuilt_from_its_message():
    """Celery rebuilds a stored exception from its args: one message."""
    error = RedactedError.standing_in_for(BuildsItsMessage(CARD))
    assert str(RedactedError(*error.args)) == str(error)


def test_a_value_escaped_by_repr_is_scrubbed():
    """A value with a newline or quote shows escaped in a repr of the arguments (MaxRetriesExceededError)."""
    address = "Ann Example\n1 Fake Street\nSpringfield"
    scrubber = Scrubber([address, 'O\'Brien "Ann"'])
    message = f"Can't retry t.send[t-1] args:({address!r},) kwargs:{{}}"
    assert scrubber.text(message) == f"Can't retry t.send[t-1] args:('{REDACTED}',) kwargs:{{}}"
    assert "Fake Street" not in scrubber.text(repr(ValueError(message)))  # escaped twice
    assert scrubber.text(repr({"name": 'O\'Brien "Ann"'})) == f"{{'name': '{REDACTED}'}}"
    original = ValueError(message)
    assert scrubber.raised(original) is original
    assert "Fake Street" not in str(original)
    assert "Fake Street" not in repr(original)


def test_values_in_a_url_or_as_utf8_bytes_are_scrubbed():
    """An HTTP client's error names the URL it called; a UnicodeDecodeError shows a name's UTF-8 bytes.

    ``?email=ann%40example.com`` and ``b'Zo\\xc3\\xab'`` went out in logs and events.
    """
    from urllib.parse import urlencode

    name, email = "Zoë Müller-Example", "ann.o'hara+tag@example.com"
    scrubber = Scrubber([name, email])
    url = f"https://crm.example.com/api/users?{urlencode({'email': email, 'name': name})}"
    path = f"https://crm.example.com/api/users/{quote(email)}/{quote(name, safe='')}"
    for text in (
        f"404 Client Error: Not Found for url: {url}",
        f"404 Client Error: Not Found for url: {path}",
        repr(UnicodeDecodeError("ascii", name.encode(), 2, 3, "ordinal not in range(128)")),
    ):
        scrubbed = scrubber.text(text)
        assert REDACTED in scrubbed
        for needle in ("ann", "o%27hara", "Zo%C3", "Zo\\xc3", "M%C3%BCller"):
            assert needle not in scrubbed, scrubbed
    assert (
        scrubber.text("https://crm.example.com/api/users?page=2")
        == "https://crm.example.com/api/users?page=2"
    )


def test_values_as_a_task_usually_rewrites_them_are_scrubbed():
    """A card or SSN without its separators, an email upper- or lower-cased.

    ``card_number.replace(" ", "")`` or ``email.upper()`` in an error message
    went out in logs, task-failed events and stored tracebacks.
    """
    scrubber = Scrubber([CARD, "Ann@Example.com", "900-12-3456", "+1 (555) 010-0000"])
    text = (
        "card 4111111111111111 declined for ANN@EXAMPLE.COM (ann@example.com), "
        "ssn 900123456, phone 15550100000"
    )
    scrubbed = scrubber.text(text)
    for needle in ("4111111111111111", "EXAMPLE", "example", "900123456", "15550100000"):
        assert needle not in scrubbed, scrubbed
    assert scrubbed.startswith("card [pii:redacted] declined for [pii:redacted]")


def test_short_numbers_are_not_searched_for_without_their_separators():
    """A value like ``12-34`` is not searched for as ``1234``: that would hide unrelated numbers."""
    scrubber = Scrubber(["12-34", "ab.cd"])
    assert scrubber.text("order 1234 of abcd") == "order 1234 of abcd"
    assert scrubber.text("code 12-34") == f"code {REDACTED}"


def test_a_short_value_is_not_searched_for_in_its_longer_encoded_forms():
    """ "é" percent-encoded is six characters: searched for, it hid every URL holding it."""
    scrubber = Scrubber(["é", "Zoë Example"])
    assert scrubber.text("https://example.com/caf%C3%A9") == "https://example.com/caf%C3%A9"
    assert REDACTED in scrubber.text("name=Zo%C3%AB%20Example")


def test_non_string_values_are_scrubbed_in_their_text_forms():
    """Dates, datetimes, decimals, UUIDs, bytes and numbers opened as values: their str, isoformat, repr."""
    import datetime as dt
    import uuid
    from decimal import Decimal

    dob = dt.date(1980, 1, 2)
    seen = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    balance = Decimal("1234.56")
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    scrubber = Scrubber([dob, seen, balance, ident, b"900-00-0001", 4111111111111111, 98.6123])
    for text in (
        f"date of birth {dob} is in the future",
        f"{dob!r}",
        f"seen {seen} / {seen.isoformat()} / {seen!r}",
        f"balance {balance} ({balance!r})",
        f"id {ident} {ident.hex}",
        f"ssn {b'900-00-0001'!r} or 900-00-0001",
        "card 4111111111111111, temperature 98.6123",
    ):
        scrubbed = scrubber.text(text)
        assert REDACTED in scrubbed
        for needle in ("1980", "2024", "1234.56", "12345678", "900-00-0001", "4111111111111111", "98.6123"):
            assert needle not in scrubbed
    original = ValueError("bad date", dob, balance)
    assert scrubber.raised(original) is original
    assert original.args == ("bad date", REDACTED, REDACTED)


def test_dict_keys_that_are_values_are_scrubbed_and_field_names_are_not():
    """A card number, email or number keying a dict is a value; other keys name fields."""
    scrubber = Scrubber(
        [
            {
                "4242424242424242": -5,
                90012345: 1,
                "customer": {EMAIL: "gold"},
                "Content-Type": "x",
                "first name": 1,
            }
        ]
    )
    text = scrubber.text("balances 4242424242424242, 90012345 and ann@example.com of customer gold")
    assert text == f"balances {REDACTED}, {REDACTED} and {REDACTED} of customer {REDACTED}"
    assert (
        scrubber.text("missing Content-Type header, no first name")
        == "missing Content-Type header, no first name"
    )


def test_values_nested_at_any_depth_are_scrubbed():
    """Values deeper than the rebuilding of objects goes are still known (so tracebacks are checked)."""
    nested: object = {"email": EMAIL}
    for level in range(20):
        nested = {f"level{level}": [nested]}
    scrubber = Scrubber([nested])
    assert scrubber.text(f"sent to {EMAIL}") == f"sent to {REDACTED}"
    assert not scrubber.is_clean(ValueError(f"no account for {EMAIL}"))


def test_values_holding_themselves_are_collected_once():
    """A task's own new values (a retry's arguments) may hold themselves: collecting ends."""
    looped: list[object] = [CARD]
    looped.append(looped)
    assert Scrubber([looped]).text(CARD) == REDACTED


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are new in Python 3.11")
def test_an_exception_showing_more_exceptions_than_are_looked_at_is_not_clean():
    """A traceback prints every chained exception: past what is checked, it is replaced, not trusted."""

    def member(index: int, last: bool) -> Exception:
        cause = LookupError(f"no order for {EMAIL}" if last else "no order")
        try:
            try:
                raise cause
            except LookupError as inner:
                raise KeyError(index) from inner
        except KeyError as error:
            return error

    group = builtins.ExceptionGroup  # Python 3.11+ (the package supports 3.10)
    few = group("orders", [member(i, i == 14) for i in range(15)])
    many = group("orders", [member(i, False) for i in range(300)])
    scrubber = Scrubber([EMAIL])
    assert not scrubber.is_clean(few)  # the value sits 46 exceptions deep
    assert scrubber.is_clean(group("orders", [member(i, False) for i in range(15)]))
    assert not scrubber.is_clean(many)


def test_values_too_short_to_be_meaningful_are_not_scrubbed_from_text():
    """Short numbers, booleans and None would redact everything: forms under MIN_SCRUB_LENGTH are skipped."""
    from celery_pii._redact import MIN_SCRUB_LENGTH

    scrubber = Scrubber([42, True, None, 7.5, "abc"])
    assert MIN_SCRUB_LENGTH == 4
    assert not scrubber
    assert scrubber.text("42 True None 7.5 abc") == "42 True None 7.5 abc"


def test_os_error_file_names_are_scrubbed():
    """OSError keeps its file names outside args; the exception is kept with them scrubbed."""
    scrubber = Scrubber(["900-00-0001"])
    try:
        open("/nonexistent/records/900-00-0001.pdf")  # noqa: PTH123, SIM115 - the real C exception
    except OSError as error:
        original = error
    original.filename2 = "/backup/900-00-0001.pdf"
    assert scrubber.raised(original) is original
    assert original.filename == f"/nonexistent/records/{REDACTED}.pdf"
    assert original.filename2 == f"/backup/{REDACTED}.pdf"
    assert "900-00-0001" not in str(original)


class _FixedFileName(OSError):
    """A file name scrubbing cannot set (a read-only property), shown in the message."""

    @property
    def filename(self):
        return "/records/900-00-0001.pdf"

    def __str__(self):
        return f"cannot open {self.filename}"


def test_an_os_error_whose_file_name_cannot_be_set_is_replaced():
    """The RedactedError backstop replaces it."""
    raised = Scrubber(["900-00-0001"]).raised(_FixedFileName(2, "No such file"))
    assert isinstance(raised, RedactedError)
    assert "900-00-0001" not in str(raised)


def test_a_retry_keeps_its_signature_and_the_arguments_to_retry_with():
    """Celery re-applies Retry.sig (eagerly: sig.apply()), so it stays a Signature with the values it had."""
    from celery import Celery
    from celery.canvas import Signature

    app = Celery("redact-test", set_as_current=False)
    sig = app.signature("t.retry_once", args=("900-00-0001",), kwargs={"email": EMAIL})
    retry = Retry(exc=ValueError(f"mail to {EMAIL} bounced"), when=0, sig=sig)
    assert Scrubber(["900-00-0001", EMAIL]).raised(retry) is retry
    assert isinstance(retry.sig, Signature)
    assert retry.sig is sig
    assert sig.args == ("900-00-0001",)
    assert sig.kwargs == {"email": EMAIL}
    assert str(retry.exc) == f"mail to {REDACTED} bounced"


class _Pair(NamedTuple):
    email: str
    count: int


def test_objects_that_are_not_plain_data_are_left_alone():
    """Subclasses of dict and tuple keep their type; only plain lists, tuples and dicts are rebuilt."""
    import collections

    scrubber = Scrubber([EMAIL])
    ordered = collections.OrderedDict(email=EMAIL)
    assert scrubber.value(ordered) is ordered
    point = _Pair(EMAIL, 1)
    assert scrubber.value(point) is point
    assert scrubber.value({"email": EMAIL}) == {"email": REDACTED}
    assert scrubber.value((EMAIL, [EMAIL])) == (REDACTED, [REDACTED])


def test_records_outside_any_task_are_scrubbed_of_values_running_elsewhere():
    """A thread a task started logs without the task's context: the values of running tasks are hidden."""
    record = logging.LogRecord("app.helpers", logging.WARNING, __file__, 1, "mailing %s", (EMAIL,), None)
    assert RedactingFilter(lambda: None, lambda: Scrubber([EMAIL])).filter(record)
    assert record.getMessage() == f"mailing {REDACTED}"


def test_records_outside_any_task_are_left_alone_when_no_task_runs():
    record = logging.LogRecord("app.helpers", logging.WARNING, __file__, 1, "mailing %s", (EMAIL,), None)
    assert RedactingFilter(lambda: None, lambda: None).filter(record)
    assert record.getMessage() == f"mailing {EMAIL}"


def test_forgetting_locals_leaves_a_suspended_generator_alive():
    """A generator outside the task whose frame the exception's traceback runs into keeps running."""

    def rows():
        while True:
            try:
                raise ValueError("bad row")  # noqa: TRY301 - caught right here, handed out
            except ValueError as error:
                yield error  # suspended here: the error's traceback holds this frame

    source = rows()
    error = next(source)

    def task_run():  # where the task's exception is caught (the scrubbing wrapper)
        try:
            raise error
        except ValueError as exc:
            forget_locals(exc)
            raise

    with pytest.raises(ValueError, match="bad row"):
        task_run()
    assert isinstance(next(source), ValueError)  # not closed


def test_forgetting_locals_leaves_the_callers_own_exception_alone():
    """An eager call made while its caller handled an exception: that exception's frames are the caller's."""

    def load(order_id):
        raise KeyError(order_id)

    def task_run():
        try:
            raise ValueError("declined")  # noqa: TRY301 - the task's own failure
        except ValueError as exc:
            forget_locals(exc)  # its context is the caller's KeyError
            raise

    def caller():
        try:
            load("order-1")
        except KeyError as handled:
            with pytest.raises(ValueError, match="declined"):
                task_run()
            return handled
        return None

    handled = caller()
    frames = {frame.f_code.co_name: frame for frame, _ in traceback.walk_tb(handled.__traceback__)}
    assert frames["load"].f_locals == {"order_id": "order-1"}


def test_forgetting_locals_reaches_the_exception_a_retry_carries():
    """``raise self.retry(exc=error)`` outside the handler: the error is carried, not chained."""

    def check(card_number):
        raise ValueError("invalid card")

    def task_run():
        stored = None
        try:
            check(CARD)
        except ValueError as error:
            stored = error
        try:
            raise Retry(exc=stored, when=1)  # noqa: TRY301 - as self.retry() raises it
        except Retry as retry:
            forget_locals(retry)
            return stored

    stored = task_run()
    frames = {frame.f_code.co_name: frame for frame, _ in traceback.walk_tb(stored.__traceback__)}
    assert CARD not in repr(frames["check"].f_locals)
