"""What celery-pii adds to task classes: the opening step and exception scrubbing.

Every task of a PII app is given a ``before_start`` that opens its envelopes
(it runs inside Celery's traced ``try``, so a failure stops the task) and a
``run`` (and the class's own hooks) that scrub exceptions.  PII tasks' return
values are kept out of Celery's logs and events; other tasks' are too while
they run inside a PII context (a chain step or callback of a PII task).  The
app's task registry is hooked so tasks registered after ``setup_pii`` are
given them too.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, cast

from celery.app.autoretry import add_autoretry_behaviour
from celery.app.task import Task

from . import _context
from ._logfilter import filter_every_handler_outside_workers
from ._redact import forget_locals
from ._redelivery import tracing_redeliveries

if TYPE_CHECKING:
    from celery import Celery
    from celery.app.registry import TaskRegistry

    from ._pii import PII

# Marks a ``run`` that already scrubs (a subclass inherits its parent's).  The
# mark is the function itself: ``functools.wraps`` copies it onto wrappers
# (autoretry's ``run``), which do not scrub.
_SCRUBS: Final = "_celery_pii_scrubs"


class _OuterLayer:
    """An instance's own ``run`` (autoretry's) running: it scrubs what leaves its task.

    The first class ``run`` entered under it is that task's own, which lets
    its exceptions through as they are; tasks run eagerly further inside
    (with a context of their own, or sharing this one) scrub their own.
    """

    __slots__ = ("claimed",)

    def __init__(self) -> None:
        self.claimed = False


_outer_run: ContextVar[_OuterLayer | None] = ContextVar("celery_pii_outer_run", default=None)


class ResultReprSize(int):
    """``resultrepr_maxsize`` of a task of a PII app that declares no PII.

    Celery builds the return value's repr for its success log line and the
    ``task-succeeded`` event with ``saferepr(retval, resultrepr_maxsize)``,
    which shows nothing once the size left is ``<= 0``.  This size is the
    task's own, except while the task runs inside a PII context with opened
    values (a chain step or callback of a PII task): then it compares as used
    up, and the return value is not shown.  Outside such a context it costs
    one context-variable lookup per successful task.
    """

    __slots__ = ()

    def __le__(self, other: object) -> bool:
        current = _context.running.get()
        if current is not None and current.values:
            return True
        return int.__le__(self, other)  # type: ignore[operator]


def install_opening(cls: type[Any], *, is_pii: bool) -> None:
    """Give a task class the fail-closed opening step, exception scrubbing, and hidden results."""
    if not cls.__dict__.get("_celery_pii_opening"):
        chained = inspect.getattr_static(cls, "before_start", None)
        if getattr(_function_of(chained), "__qualname__", "") == Task.before_start.__qualname__:
            chained = None
        else:  # it runs with the values open, as the task function does
            chained = _scrubbing_attribute(chained) or chained

        def before_start(self: Task, task_id: str, args: Any, kwargs: Any) -> None:
            getattr(self.app, _context.APP_ATTRIBUTE)._open(self, task_id, args, kwargs)  # noqa: SLF001
            if chained is not None:
                # Bound as Celery would find it on the task: a method, static or class method.
                chained.__get__(self, type(self))(task_id, args, kwargs)

        cls.before_start = before_start
        cls._celery_pii_opening = True
    if not cls.__dict__.get("_celery_pii_calls"):  # apply and retry, wrapped once per class
        _mark_eager_runs(cls)
        _hide_retry_arguments(cls)
        cls._celery_pii_calls = True
    if not cls.__dict__.get("_celery_pii_scrubbing"):
        # Every task: one that declares no PII still runs inside a PII context
        # when it is a chain step or callback of a PII task.
        _wrap_run(cls)
        _wrap_hooks(cls)
        _wrap_autoretry_runs(cls)
        cls._celery_pii_scrubbing = True
    size = cls.resultrepr_maxsize
    if is_pii:
        # Return values of PII tasks stay out of logs and events (see docs/security.md).
        cls.resultrepr_maxsize = 0
    elif not isinstance(size, ResultReprSize) and (size is None or size > 0):
        cls.resultrepr_maxsize = ResultReprSize(sys.maxsize if size is None else size)


def _mark_eager_runs(cls: type[Any]) -> None:
    """Say, for the opening step, that ``cls.apply`` is running a task in this thread.

    An eager call's arguments never left the process, so declared values in
    them are not "arrived unsealed".  The request's ``is_eager`` cannot say
    so: a message's embed sets request attributes, so a forged message could
    claim to be eager and be run on plaintext it was never sealed with.

    Outside a worker, the host's handlers get the log filter first: what the
    task and its hooks log reaches them, not Celery's loggers.

    ``apply_async`` of an eager app (``task_always_eager``) first has Celery
    write and read the call's ``(args, kwargs)`` with the task serializer: it
    says which task's they are (:data:`_context.eager_call`).
    """
    original = cls.apply
    original_async = cls.apply_async

    @functools.wraps(original)
    def apply(self: Task, *args: Any, **kwargs: Any) -> Any:
        if self.app.conf.task_store_eager_result:
            _refuse_storing_in_plaintext(self.app)
        filter_every_handler_outside_workers()
        token = _context.applying.set(True)
        eager_call = _context.eager_call.set(None)  # its arguments are written by now
        try:
            return original(self, *args, **kwargs)
        finally:
            _context.eager_call.reset(eager_call)
            _context.applying.reset(token)

    @functools.wraps(original_async)
    def apply_async(self: Task, *args: Any, **kwargs: Any) -> Any:
        pii = getattr(self.app, _context.APP_ATTRIBUTE, None)
        if pii is None or not self.app.conf.task_always_eager:
            return original_async(self, *args, **kwargs)
        token = _context.eager_call.set((pii, self.name))
        try:
            return original_async(self, *args, **kwargs)
        finally:
            _context.eager_call.reset(token)

    cls.apply = apply
    cls.apply_async = apply_async


def eager_canvas_knows_its_fields() -> None:
    """An eagerly applied chain or chord: each step it runs knows the declared values of them all.

    Celery's ``chain.apply()`` and ``chord.apply()`` (``task_always_eager``)
    apply each step alone, its request carrying no chain or chord; on a
    worker each step's message carries the later steps sealed, and opening
    them tells its scrubber their values.  A plain first step logged and
    raised a value a later step declares.  (Idempotent: once per process.)
    """
    from celery import canvas  # noqa: PLC0415 - Celery's canvas, only once set up

    for cls in (canvas._chain, canvas._chord):  # noqa: SLF001 - the classes chain() and chord() build
        original = cls.apply
        if getattr(original, "celery_pii_wrapped", False):
            continue

        def apply(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            pii = getattr(self.app, _context.APP_ATTRIBUTE, None)
            if pii is None:
                return _original(self, *args, **kwargs)
            values = pii.sealer.values_in_steps({"chain": [self]})
            token = _context.eager_canvas_values.set((*_context.eager_canvas_values.get(), *values))
            try:
                return _original(self, *args, **kwargs)
            finally:
                _context.eager_canvas_values.reset(token)

        apply.celery_pii_wrapped = True  # type: ignore[attr-defined]
        cls.apply = apply


def _refuse_storing_in_plaintext(app: Any) -> None:
    """Before an eager call stores its result: refuse a backend that would write it in plaintext.

    A worker checks when it starts; an app that stores eager results (tests,
    development) writes through the backend without ever starting one.
    """
    if getattr(app, _EAGER_STORE_CHECKED, False):
        return
    from ._celery import refuse_backend_ignoring_the_serializer  # noqa: PLC0415 - it imports this module

    refuse_backend_ignoring_the_serializer(app)
    setattr(app, _EAGER_STORE_CHECKED, True)


_EAGER_STORE_CHECKED: Final = "_celery_pii_eager_store_checked"


def _hide_retry_arguments(cls: type[Any]) -> None:
    """Make the declared values a task retries with known to its scrubber before Celery uses them.

    With no retry left, Celery raises ``MaxRetriesExceededError`` naming the
    new arguments in its text (see :meth:`_context.RunningTask.hide_too`).
    """
    original = cls.retry

    @functools.wraps(original)
    def retry(self: Task, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        running = _context.running.get()
        given = args is not None or kwargs is not None
        if given and running is not None and running.task_id == str(self.request.id):
            running.hide_too(args, kwargs)
        return original(self, args, kwargs, *rest, **options)

    cls.retry = retry


def wrap_instance_run(task: Any) -> None:
    """Scrub exceptions of a task instance that already has a ``run`` of its own.

    Celery's ``autoretry_for`` sets ``task.run`` on the instance (wrapping the
    ``run`` the class had then, kept as ``task._orig_run``).  For a task
    declared before ``setup_pii``, Celery did so before the class had
    :func:`_wrap_autoretry_runs` to catch it: that ``run`` is wrapped here.
    """
    own = vars(task).get("run")
    if own is not None and not _scrubs(own):
        task.run = _scrubbing(own, outermost=True)


def _wrap_autoretry_runs(cls: type[Any]) -> None:
    """Wrap the ``run`` autoretry sets on an instance of ``cls``, as the outermost scrubbing layer.

    Celery's ``autoretry_for`` sets it right after registering the task (after
    the registry hook has run), on every path: a worker, an eager call, an app
    that is never finalized.  Catching the assignment itself covers them all.
    Autoretry sets ``_orig_run`` first, then the instance's first ``run``; any
    other ``run`` set on an instance (a test's mock, also over autoretry's) is
    left as it is.
    """
    inherited = cast("Callable[[Any, str, Any], None]", cls.__setattr__)  # read off the class: unbound
    if getattr(inherited, _SCRUBS, None) is inherited:  # a parent class's already wraps
        return

    def __setattr__(self: Any, name: str, value: Any) -> None:  # noqa: N807
        own = vars(self)
        if (
            name == "run"
            and "_orig_run" in own
            and "run" not in own
            and callable(value)
            and not _scrubs(value)
        ):
            value = _scrubbing(value, outermost=True)
        elif name == "__trace__" and callable(value):
            # The tracer a worker builds for the task: it sends a redelivered task's steps.
            value = tracing_redeliveries(self, value)
        inherited(self, name, value)

    setattr(__setattr__, _SCRUBS, __setattr__)
    cls.__setattr__ = __setattr__  # type: ignore[assignment]


def _wrap_run(cls: type[Any]) -> None:
    """Scrub exceptions leaving the task function before Celery formats, logs or stores them.

    ``run`` is wrapped rather than ``__call__``: Celery's tracer calls ``run``
    directly unless ``__call__`` is overridden, and an override would cost every
    task a second request context.
    """
    run = _scrubbing_attribute(inspect.getattr_static(cls, "run"))
    if run is not None:
        cls.run = run


# Task methods the tracer calls while the task's values are open, besides ``run``
# (``before_start`` is chained by the opening step).  What a class's own version
# raises is logged, stored and sent in events as the task's failure; one raised
# by ``on_failure`` or ``on_retry`` is stored again by Celery after the task ended,
# unsealed.  ``__call__`` is what the tracer calls instead of ``run`` once a class
# overrides it.
_HOOKS: Final = ("__call__", "on_success", "on_failure", "on_retry", "after_return")


def _wrap_hooks(cls: type[Any]) -> None:
    """Scrub what a task class's own hooks (and ``__call__``) raise, as :func:`_wrap_run` does for ``run``.

    Celery's own hooks raise nothing of the task's and stay as they are (the
    tracer skips hooks a class does not override).
    """
    for name in _HOOKS:
        raw = inspect.getattr_static(cls, name)
        if raw is not inspect.getattr_static(Task, name):
            hook = _scrubbing_attribute(raw)
            if hook is not None:
                setattr(cls, name, hook)


def _scrubbing_attribute(raw: Any) -> Any:
    """A class attribute that scrubs what ``raw`` raises, bound as ``raw`` is; ``None`` if nothing to do.

    A function, static or class method is wrapped inside its kind; a callable
    object (no ``__get__``: called without the task) becomes a static method
    calling it.  Other descriptors, and what already scrubs, are left as they are.
    """
    fun = _function_of(raw)
    if fun is None or _scrubs(fun):
        return None
    if isinstance(raw, classmethod):
        return classmethod(_scrubbing(fun))
    if isinstance(raw, staticmethod) or not inspect.isfunction(raw):
        return staticmethod(_scrubbing(fun))
    return _scrubbing(fun)


def _function_of(raw: Any) -> Callable[..., Any] | None:
    """What a class attribute calls: a function, a static or class method's, or a callable object."""
    if isinstance(raw, (staticmethod, classmethod)):
        return cast("Callable[..., Any]", raw.__func__)
    if inspect.isfunction(raw) or (callable(raw) and not hasattr(raw, "__get__")):
        return cast("Callable[..., Any]", raw)
    return None


def _scrubbing(fun: Callable[..., Any], *, outermost: bool = False) -> Callable[..., Any]:
    """``fun``, with what it raises inside a PII context scrubbed (or replaced, if it cannot be).

    An ``outermost`` wrapper (of a ``run`` set on the instance: autoretry's)
    has the class's ``run`` inside it let exceptions through as they are, so
    that ``autoretry_for`` matches their own type; whatever then leaves the
    task (the ``Retry`` holding the exception, or the exception once retries
    are exhausted) is scrubbed or replaced here.
    """

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        inside, deferring = None, False
        if outermost:
            inside = _outer_run.set(_OuterLayer())
        else:
            layer = _outer_run.get()
            if layer is not None and not layer.claimed:  # the task's own run, right under its outer layer
                layer.claimed = deferring = True
        try:
            return fun(*args, **kwargs)
        except BaseException as exc:  # also sys.exit(text): a pool prints it (Scrubber.raised keeps its type)
            current = _context.running.get()
            if current is None or not current.scrubber or deferring:
                raise
            replacement = current.scrubber.raised(exc)
            forget_locals(exc)
            del args, kwargs  # this frame is in the traceback too, and still running
            if replacement is exc:
                raise
            # Keeps the task's frames (file, line and code; their locals are
            # gone); raised outside the handler so nothing links it to the original.
            trace = exc.__traceback__
        finally:
            if inside is not None:
                _outer_run.reset(inside)
        raise replacement.with_traceback(trace) from None

    setattr(run, _SCRUBS, run)
    return run


def _scrubs(fun: object) -> bool:
    return getattr(fun, _SCRUBS, None) is fun


# The code of the ``run`` Celery's ``autoretry_for`` puts on a task: it passes every argument on.
_AUTORETRY_RUNS: Final = frozenset(
    const for const in add_autoretry_behaviour.__code__.co_consts if isinstance(const, types.CodeType)
)


def call_target(run: Callable[..., Any]) -> Callable[..., Any]:
    """The function a task's ``run`` hands its arguments to as given: whose parameters name them.

    Celery calls ``run`` with a message's arguments and checks them against
    ``run``'s own signature (``getfullargspec`` does not follow ``__wrapped__``).
    A user's decorator with ``functools.wraps`` points ``__wrapped__`` at the
    function inside, whose parameters need not be the call's: a decorator that
    adds or drops an argument shifts every position, and binding by the inner
    names would seal the wrong argument.  So only the wrappers known to pass
    every argument on unchanged are looked through: celery-pii's own and
    autoretry's.  (A user's wrapper that passes them on unchanged can say so by
    setting its ``__signature__``.)
    """
    while True:
        bound_to = getattr(run, "__self__", None)
        fun = getattr(run, "__func__", run)
        inner = getattr(fun, "__wrapped__", None)
        if inner is None or not (_scrubs(fun) or getattr(fun, "__code__", None) in _AUTORETRY_RUNS):
            return run
        # A bound task's ``run`` is a method: what it wraps is bound to the task alike.
        run = types.MethodType(inner, bound_to) if fun is not run and inspect.isfunction(inner) else inner


def hook_registry(app: Celery, pii: PII) -> None:
    """Register the app's tasks with ``pii``, now and whenever one is added."""
    registry = app._tasks  # noqa: SLF001 - the registry every registration goes through
    base = type(registry)
    if not getattr(base, "_celery_pii_hooked", False):

        def __setitem__(self: TaskRegistry, name: str, task: Any) -> None:  # noqa: N807
            owner = getattr(self, "_celery_pii_owner", None)
            if owner is not None:
                owner._register(task)  # noqa: SLF001
                wrap_instance_run(task)
            base.__setitem__(self, name, task)

        registry.__class__ = type(
            f"PII{base.__name__}", (base,), {"__setitem__": __setitem__, "_celery_pii_hooked": True}
        )
    registry._celery_pii_owner = pii  # noqa: SLF001
    for task in list(registry.values()):
        pii._register(task)  # noqa: SLF001
        wrap_instance_run(task)
