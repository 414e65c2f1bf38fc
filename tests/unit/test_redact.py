"""The logging filter: PII tasks' return values hidden, opened values scrubbed from log lines."""

from __future__ import annotations

import logging

from celery.app.trace import LOG_SUCCESS

from celery_pii._redact import REDACTED, RedactingFilter, Scrubber

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
