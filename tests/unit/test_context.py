"""The running-task context: what a task's start and end do to it."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.app.task import Context

from celery_pii import _context
from celery_pii._context import RunningTask


@pytest.fixture
def task():
    app = Celery("context-test", set_as_current=False)

    @app.task(shared=False)
    def noop():
        return None

    app.finalize()
    return noop


@pytest.fixture(autouse=True)
def _isolated_context():
    token = _context.running.set(None)
    yield
    _context.running.reset(token)


def _running_in(task, request):
    task.request_stack.push(request)  # as the tracer does
    return RunningTask(
        None, task.name, "outer-id", None, ["a value"], None, None, request, task.request_stack
    )


def test_a_task_started_inside_another_gets_it_back_when_it_ends(task):
    outer = _running_in(task, Context(id="outer-id"))
    _context.running.set(outer)
    inner_request = Context(id="inner-id")
    assert _context.enter(inner_request) is outer
    assert _context.running.get() is None
    _context.leave(inner_request)
    assert _context.running.get() is outer
    task.request_stack.pop()


def test_a_context_left_behind_by_an_ended_task_is_not_an_outer_task(task):
    stale = _running_in(task, Context(id="outer-id"))
    task.request_stack.pop()  # that task ended without giving its context back
    assert not stale.is_live()
    _context.running.set(stale)
    request = Context(id="next-id")
    assert _context.enter(request) is None
    _context.leave(request)
    assert _context.running.get() is None


def test_leaving_without_entering_changes_nothing(task):
    outer = _running_in(task, Context(id="outer-id"))
    _context.running.set(outer)
    _context.leave(Context(id="never-entered"))
    assert _context.running.get() is outer
    task.request_stack.pop()
