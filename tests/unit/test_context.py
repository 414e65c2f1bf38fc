"""The running-task context: what a task's start and end do to it, and what tasks do with it."""

from __future__ import annotations

import threading
import traceback
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.app.task import Context
from celery.utils.saferepr import saferepr

from celery_pii import _context
from celery_pii._context import RunningTask
from celery_pii._redact import REDACTED
from celery_pii._taskclass import ResultReprSize, install_opening, wrap_instance_run

CARD = "4111 1111 1111 1111"


class _AppsPII:
    """Stands in for an app's PII object (which an ended task's record holds weakly)."""


APPS_PII = _AppsPII()


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
        APPS_PII, task.name, "outer-id", None, ["a value"], None, None, request, task.request_stack
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


def test_ended_pii_tasks_are_remembered_without_values_and_boundedly(task, monkeypatch):
    """A result stored for a task after its end is sealed with what is kept: its key, never its values."""
    from celery_pii._keys import KeySpec

    monkeypatch.setattr(_context, "_ended", type(_context._ended)())
    monkeypatch.setattr(_context, "ENDED_KEPT", 3)
    pii = _AppsPII()
    for i in range(5):
        request = Context(id=f"task-{i}", group="g-1")
        running = RunningTask(
            pii, task.name, f"task-{i}", None, [CARD], KeySpec("orders"), (), request, task.request_stack
        )
        task.request_stack.push(request)
        _context.running.set(running)
        _context.leave(request)
        task.request_stack.pop()
    assert _context.ended_with_id("task-0") is None  # the oldest went: a bounded memory
    ended = _context.ended_with_id("task-4")
    assert ended is not None
    assert (ended.name, ended.task_id, ended.result_key, ended.group) == (
        task.name,
        "task-4",
        KeySpec("orders"),
        "g-1",
    )
    assert CARD not in repr(ended)
    assert list(_context._ended) == ["task-2", "task-3", "task-4"]
    _context.running.set(None)  # what the test set last (a worker's context is set per task)
    del pii, running, ended
    # Held weakly: an app that went away (with its key store's connections) is not kept for this.
    assert _context.ended_with_id("task-4") is None


def test_result_repr_size_hides_return_values_only_inside_a_context_with_values(task):
    """Celery's saferepr of a return value shows nothing while opened values are around, as usual otherwise."""
    size = ResultReprSize(1024)
    returned = {"card_number": CARD, "total": 3}
    assert saferepr(returned, size) == saferepr(returned, 1024)
    running = _running_in(task, Context(id="outer-id"))
    _context.running.set(running)
    assert CARD not in saferepr(returned, size)
    assert "3" not in saferepr(returned, size)
    running.values = []  # a PII context with nothing opened
    assert saferepr(returned, size) == saferepr(returned, 1024)
    task.request_stack.pop()


def test_tasks_without_pii_get_a_result_repr_size_and_pii_tasks_none(task):
    """Only tasks declaring PII show no return value at all; the others keep their own size."""
    plain = type(task._get_current_object())
    declared = type("Declared", (plain,), {})
    install_opening(plain, is_pii=False)
    install_opening(declared, is_pii=True)
    assert isinstance(plain.resultrepr_maxsize, ResultReprSize)
    assert plain.resultrepr_maxsize == 1024
    assert declared.resultrepr_maxsize == 0


def _declining_task(**options):
    """A task of an app of its own that raises with the card it was given; its class has the scrubbing run."""
    app = Celery("context-test", set_as_current=False)

    @app.task(shared=False, **options)
    def pay(card_number):
        msg = f"card {card_number} declined"
        raise ValueError(msg)

    app.finalize()
    task = pay._get_current_object()
    install_opening(type(task), is_pii=True)
    return task


def _raised_with_opened(task, values):
    """What ``task.run(CARD)`` raises inside a running context holding ``values``."""
    task.request_stack.push(Context(id="t-1"))
    _context.running.set(
        RunningTask(
            APPS_PII, task.name, "t-1", None, values, None, None, task.request_stack.top, task.request_stack
        )
    )
    try:
        with pytest.raises(ValueError, match="declined") as info:
            task.run(CARD)
    finally:
        task.request_stack.pop()
    return info.value


def test_a_run_set_on_the_instance_by_autoretry_scrubs_too():
    """A task given autoretry_for before setup_pii runs the instance's run: it is wrapped as well."""
    pay = _declining_task(autoretry_for=(KeyError,))  # the class's run: not what the instance calls
    wrap_instance_run(pay)
    wrap_instance_run(pay)  # once is enough
    assert str(_raised_with_opened(pay, [CARD])) == f"card {REDACTED} declined"


def _opened_running(task, request, values, *, message_key="k", opened_at=()):
    task.request_stack.push(request)
    return RunningTask(
        APPS_PII,
        task.name,
        request.id,
        None,
        values,
        None,
        message_key,
        request,
        task.request_stack,
        opened_at=opened_at,
    )


def test_markers_go_back_where_values_were_opened_when_the_task_ends(task):
    """Celery keeps the request's args (and stores them from the worker after the task): no value stays."""
    from celery_pii._sealer import MARKER

    customer = {"email": "ann@example.com", "tier": "gold"}
    args = [CARD, 7, customer]
    kwargs = {"note": "ok", "ssn": "900-00-0001"}
    request = Context(id="t-1", args=args, kwargs=kwargs)
    values = [args[0], customer["email"], kwargs["ssn"]]
    opened_at = [("args", 0), ("args", 2, "email"), ("kwargs", "ssn"), ("chain", 0, "args", 0)]
    _context.running.set(_opened_running(task, request, values, opened_at=opened_at))
    _context.hide_opened(request, rejected=True)
    task.request_stack.pop()
    assert request.args is args  # the very list Celery keeps, changed in place
    assert args == [MARKER, 7, {"email": MARKER, "tier": "gold"}]
    assert kwargs == {"note": "ok", "ssn": MARKER}
    assert customer == {"email": "ann@example.com", "tier": "gold"}  # the task function may still hold it


@pytest.mark.parametrize(
    ("rejected", "stores_arguments", "hidden"), [(False, False, False), (False, True, True)]
)
def test_markers_go_back_only_where_celery_reads_the_arguments_later(
    task, rejected, stores_arguments, hidden
):
    """After Reject (errbacks taking the request) or with result_extended; otherwise left as they are."""
    from celery_pii._sealer import MARKER

    args = [CARD]
    request = Context(id="t-1", args=args, kwargs={})
    running = _opened_running(task, request, [CARD], opened_at=[("args", 0)])
    running.pii = SimpleNamespace(stores_arguments=stores_arguments)
    _context.running.set(running)
    _context.hide_opened(request, rejected=rejected)
    task.request_stack.pop()
    assert args == ([MARKER] if hidden else [CARD])


def test_arguments_of_a_call_that_came_unsealed_are_left_alone(task):
    """An eager call's arguments are the caller's own objects: nothing was opened into them."""
    args = [CARD]
    request = Context(id="t-1", args=args, kwargs={})
    _context.running.set(_opened_running(task, request, [CARD], message_key=None, opened_at=()))
    _context.hide_opened(request, rejected=True)
    task.request_stack.pop()
    assert args == [CARD]


def test_the_arguments_of_another_request_are_left_alone(task):
    """Only the task whose values were opened has its arguments marked (not an outer or inner task's)."""
    args = [CARD]
    request = Context(id="t-1", args=args, kwargs={})
    _context.running.set(_opened_running(task, request, [CARD], opened_at=[("args", 0)]))
    _context.hide_opened(Context(id="other", args=args, kwargs={}), rejected=True)
    task.request_stack.pop()
    assert args == [CARD]


def test_a_task_with_values_is_known_to_other_threads_until_it_ends(task):
    """Threads the task starts have no context of their own: they scrub with the running tasks' values."""
    request = Context(id="t-1")
    _context.enter(request)
    _context.start(_opened_running(task, request, [CARD]))
    seen = []
    helper = threading.Thread(target=lambda: seen.append(_context.scrubber_elsewhere()))
    helper.start()
    helper.join()
    assert seen[0].text(f"card {CARD} declined") == f"card {REDACTED} declined"
    _context.leave(request)
    task.request_stack.pop()
    assert _context.scrubber_elsewhere() is None


def test_the_scrubber_for_other_threads_is_built_once_per_set_of_values(task):
    """Every record logged outside a task asks (twice): built again only when the values change.

    On the threads pool a task holding many values made every consumer log
    line rebuild it, about 30 times slower.
    """
    request = Context(id="t-3")
    _context.enter(request)
    running = _opened_running(task, request, [CARD])
    _context.start(running)
    first = _context.scrubber_elsewhere()
    assert _context.scrubber_elsewhere() is first
    running.values = [*running.values, "900-12-3456"]  # as hide_too and read_result replace them
    again = _context.scrubber_elsewhere()
    assert again is not first
    assert again.text("ssn 900-12-3456") == f"ssn {REDACTED}"
    _context.leave(request)
    task.request_stack.pop()
    assert _context._elsewhere is None  # not kept past the task


def test_a_task_without_values_is_not_known_to_other_threads(task):
    """Nothing opened (a PII task whose declared fields were absent): nothing to scrub elsewhere."""
    request = Context(id="t-2")
    _context.enter(request)
    _context.start(_opened_running(task, request, []))
    assert _context.scrubber_elsewhere() is None
    _context.leave(request)
    task.request_stack.pop()


def test_a_run_set_on_an_instance_by_anything_but_autoretry_is_left_as_it_is(task):
    """Only autoretry's run (set after ``_orig_run``) is wrapped: a test's stand-in stays itself."""
    task = task._get_current_object()
    install_opening(type(task), is_pii=False)

    def stand_in():
        return "stood in"

    task.run = stand_in
    assert task.run is stand_in


def test_the_task_frames_an_exception_leaves_with_hold_no_local_variables():
    """Error trackers send frame locals with an exception: the task function's held the opened value."""
    raised = _raised_with_opened(_declining_task(), [CARD])
    frames = [frame for frame, _ in traceback.walk_tb(raised.__traceback__)][1:]  # below the catching frame
    assert [frame.f_code.co_name for frame in frames] == ["run", "pay"]  # the scrubbing wrapper, the task
    assert all(CARD not in repr(frame.f_locals) for frame in frames)


def test_a_chord_join_entry_is_read_as_its_result_alone():
    """Redis' join entry is [1, task id, state, result]: the reader holds the result, not the bookkeeping.

    Holding the task id and state hid every log line naming that task.
    """
    from celery_pii._celery import _values_read
    from celery_pii._sealer import OpenedResult

    entry = [1, "3f1c9d2e-0b7a-4c51-9e2d-6a8b1f0c7d44", "SUCCESS", {"value": CARD}]
    assert _values_read(OpenedResult(entry, ("orders", 1), [entry])) == [{"value": CARD}]
    listed = [1, "not a state", "x", CARD]  # any other whole value: all of it
    assert _values_read(OpenedResult(listed, ("orders", 1), [listed])) == [listed]
    meta = {"status": "SUCCESS", "result": {"value": CARD}, "task_id": "t-1"}
    assert _values_read(OpenedResult(meta, ("orders", 1), [{"value": CARD}])) == [{"value": CARD}]
