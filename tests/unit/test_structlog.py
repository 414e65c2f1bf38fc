"""structlog through the standard library: its event dicts and what its formatter adds are scrubbed.

structlog hands a record its event dict as ``msg`` (``wrap_for_formatter``)
and renders it in ``ProcessorFormatter``, after the handler's filters ran;
that formatter's own processors may add to it then (``merge_contextvars``
adds what a task bound with ``bind_contextvars``).
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from celery_pii import _context, _logfilter
from celery_pii._redact import REDACTED, Scrubber

structlog = pytest.importorskip("structlog")

CARD, EMAIL = "4111 1111 1111 1111", "ann@example.com"


class Running:
    is_pii = True

    def __init__(self, values):
        self.scrubber = Scrubber(values)


class ProjectFormatter(structlog.stdlib.ProcessorFormatter):
    """A project's own subclass: its module is the project's, not structlog's."""


def _formatter(kind=structlog.stdlib.ProcessorFormatter, renderer=None):
    return kind(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars],
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer or structlog.processors.JSONRenderer(),
        ],
    )


@pytest.fixture
def written():
    """A logger whose handler renders structlog events as JSON, filtered as a worker's handlers are."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter())
    logger = logging.getLogger("tests.structlog")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    _logfilter._filter_handlers(logger)  # what a worker's start does to every handler
    token = _context.running.set(Running([CARD, EMAIL]))
    try:
        yield logger, stream
    finally:
        _context.running.reset(token)
        structlog.contextvars.clear_contextvars()
        logger.handlers = []


def _lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_event_dict_stays_a_dict_and_is_written_scrubbed(written):
    """The filter turned it into a string: structlog's formatter then failed and the line was lost."""
    logger, stream = written
    log = structlog.wrap_logger(
        logger,
        processors=[structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    log.info("charged", card=CARD, customer={"email": EMAIL, "tries": 2})
    assert _lines(stream) == [
        {"event": "charged", "card": REDACTED, "customer": {"email": REDACTED, "tries": 2}}
    ]


def test_values_the_formatter_adds_after_filtering_are_scrubbed(written):
    """``merge_contextvars`` in the formatter adds what the task bound, after every filter ran."""
    logger, stream = written
    structlog.contextvars.bind_contextvars(card=CARD)
    logger.info("charging %s", "now")
    (line,) = _lines(stream)
    assert line == {"event": "charging now", "card": REDACTED}
    assert CARD not in stream.getvalue()


def test_a_subclass_of_structlogs_formatter_is_scrubbed_too(written):
    """Told apart by its class's module, a project's subclass wrote what it added in plaintext."""
    logger, stream = written
    logger.handlers[0].setFormatter(_formatter(ProjectFormatter))
    structlog.contextvars.bind_contextvars(card=CARD)
    logger.info("charging")
    assert _lines(stream) == [{"event": "charging", "card": REDACTED}]


def test_colour_codes_between_a_values_parts_do_not_hide_it(written):
    """A coloured renderer writes each digit group in its own colour: the value never appeared whole."""
    logger, stream = written

    def colour_each_group(_, __, event_dict):
        return " ".join(f"\x1b[1;36m{part}\x1b[0m" for part in str(event_dict["card"]).split())

    logger.handlers[0].setFormatter(_formatter(renderer=colour_each_group))
    structlog.contextvars.bind_contextvars(card=CARD)
    logger.info("charging")
    written_text = stream.getvalue()
    assert written_text.strip() == REDACTED
    plain = _formatter(renderer=colour_each_group)
    assert "\x1b[" in plain.format(logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None))
