"""What celery-pii knows about the task running in this thread.

Set by the opening step before each task and given back to what it was when
the task ends; read by the result serializer (which key seals the result), the
logging filter and the exception scrubber (which values to hide), and the
publish path (is this message derived from PII?).

Tasks can run inside tasks: ``task.apply()`` in a task body, or any call with
``task_always_eager``.  The inner task's end gives the outer task its context
back (else the outer task's result would be stored unsealed), and an inner
task with no PII context of its own shares the outer one: what it is given
and returns may be derived from the outer task's PII.
"""

from __future__ import annotations

import collections
import contextvars
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from celery import states
from celery._state import _task_stack

from ._keys import KeySpec
from ._paths import Location, replace_in_copies
from ._redact import Scrubber
from ._sealer import MARKER, derived_key_spec, is_marker, opened_with
from .exceptions import PIIError

if TYPE_CHECKING:
    from ._pii import PII
    from ._specs import TaskSpec

#: Where ``setup_pii`` stores an app's :class:`~celery_pii._pii.PII`.
APP_ATTRIBUTE: Final = "_celery_pii"


class RunningTask:
    """The task running in this thread: what its results, logs and exceptions need.

    The scrubber and the result key are built on first use: most tasks raise
    nothing and many store no result, and this runs before every task.
    """

    __slots__ = (
        "_carried_keys",
        "_message_keys",
        "_opened_at",
        "_request",
        "_request_stack",
        "_result_key",
        "_scrubber",
        "is_pii",
        "name",
        "pii",
        "spec",
        "steps_unopened",
        "task_id",
        "values",
    )

    def __init__(  # noqa: PLR0913, PLR0917 - the running task's facts
        self,
        pii: PII,
        name: str,
        task_id: str,
        spec: TaskSpec | None,
        values: list[Any],
        result_key: KeySpec | None,
        message_keys: Sequence[tuple[str, int]] = (),
        request: Any = None,
        request_stack: Any = None,
        *,
        opened_at: Sequence[Location] = (),
        carried_keys: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.pii, self.name, self.task_id, self.spec, self.values = pii, name, task_id, spec, values
        # Celery's request of this run and the stack it is on, to tell whether it is still running.
        self._request = request
        self._request_stack = request_stack
        self.is_pii = spec is not None and spec.is_pii
        self._result_key = result_key
        self._message_keys = message_keys
        # Keys of envelopes of steps the message carries (a subject's chain step, under its key).
        self._carried_keys = carried_keys
        # Where values were opened into the message, when Celery may store the arguments later.
        self._opened_at = opened_at
        self._scrubber: Scrubber | None = None
        # The steps it publishes hold markers no envelope here opened: they go out as they
        # came (a redelivered task's, whose message did not open: see ``_redelivery.py``).
        self.steps_unopened = False

    def is_live(self) -> bool:
        """True while the task's request is on Celery's request stack (it has not ended)."""
        if self._request_stack is None:
            return False
        return any(request is self._request for request in self._request_stack.stack)

    @property
    def group(self) -> str | None:
        """The group the task runs in (a chord's header, a group), if any."""
        group = getattr(self._request, "group", None)
        return group if isinstance(group, str) else None

    def hide_too(self, args: Any, kwargs: Any) -> None:
        """The task gave its declared fields new values (``self.retry(args=..., kwargs=...)``): hide them too.

        Celery puts a retry's arguments in the text of ``MaxRetriesExceededError``
        (logged, sent in events) when no retry is left; they were never opened
        here, so nothing else would know them.
        """
        binder = self.spec.binder if self.spec is not None else None
        if binder is None:
            return
        new = [value for value in binder.locate_apart(args or (), kwargs or {})[1] if not is_marker(value)]
        if new:
            self.values = [*self.values, *new]
            self._scrubber = None
            _with_values[id(self)] = self

    def read_result(self, keys: tuple[tuple[str, int], ...], values: list[Any]) -> None:
        """The task opened a sealed result: it holds those values too.

        Its logs and errors hide them, and what it stores and publishes from
        now on takes the result's subject and retention bucket (as a chain step
        given a PII task's return value does), so forgetting that subject
        reaches the copy as well (``keys``: the result's key, then its co-keys).
        """
        self.values = [*self.values, *values]
        self._scrubber = None
        _with_values[id(self)] = self
        own = self.result_key or KeySpec(self.pii.settings.default_key)
        self._result_key = derived_key_spec(own, opened_with(keys))

    @property
    def scrubber(self) -> Scrubber:
        """Replaces the values opened for this task."""
        if self._scrubber is None:
            self._scrubber = Scrubber(self.values)
        return self._scrubber

    @property
    def publish_source(self) -> KeySpec | None:
        """What the messages this task publishes derive from (``None``: nothing).

        Its own data's key (see :attr:`result_key`), and the keys of the steps
        its message carried: it publishes those steps, and their subjects and
        retention buckets go with them (a step re-sealed now would otherwise
        take the retention bucket of now, not of when it was first sealed).
        """
        source = self.result_key
        for key in self._carried_keys:
            carried = opened_with([key])
            source = carried if source is None else derived_key_spec(source, carried)
        return source

    def kept_after_end(self) -> _Ended:
        """What a result stored for this task after its end is sealed with (never its values)."""
        return _Ended(
            weakref.ref(self.pii), self.name, self.spec, self._result_key, self._message_keys, self.group
        )

    @property
    def result_key(self) -> KeySpec | None:
        """The key results of this task are sealed under (``None``: not a PII task).

        The key its message was sealed under, when it came sealed (never once
        the version that opened it is destroyed: see ``KeySpec.derived_from``);
        otherwise the one given (a subject's), or the task's own.
        """
        if self._result_key is None:
            self._result_key = _result_key_of(self.pii, self.name, self.spec, self._message_keys)
        return self._result_key


def _result_key_of(
    pii: PII, name: str, spec: TaskSpec | None, message_keys: Sequence[tuple[str, int]]
) -> KeySpec | None:
    """See :attr:`RunningTask.result_key` (found on first use: many tasks store no result)."""
    if message_keys:
        return opened_with(message_keys)
    if spec is not None and spec.is_pii:
        return pii.sealer.key_spec(name, spec, {}, [spec])
    return None


running: contextvars.ContextVar[RunningTask | None] = contextvars.ContextVar(
    "celery_pii_running", default=None
)

# Every task running in this process with opened values, by id.  A thread a
# task starts does not inherit the task's context; what such a thread logs is
# scrubbed of these values (see :func:`scrubber_elsewhere`).
_with_values: dict[int, RunningTask] = {}


def start(task: RunningTask) -> None:
    """A task's values are open: it is the running task here (until :func:`leave`)."""
    running.set(task)
    if task.values:
        _with_values[id(task)] = task


def derive_from_result(
    pii: PII, keys: tuple[tuple[str, int], ...], values: list[Any], task_id: object = None
) -> None:
    """A task opened a sealed result: it now holds that PII.

    A chord's body is published by whatever reads its header's results: the
    header task that finishes last (Redis' native join) or
    ``celery.chord_unlock``, neither of them a PII task.  From here until it
    ends, the task runs as one derived from the result (what it publishes is
    sealed whole under the result's key, its outcome is sealed, its logs hide
    the values), as a chain step given a PII task's return value does.  A task
    with a context already takes the values into it (:meth:`RunningTask.read_result`),
    unless it read its own result (``task_id``: the meta's; Celery's backends read
    a task's current meta before they store the next one).  Outside a task (a
    client reading its result) nothing changes.
    """
    current = running.get()
    if current is not None:
        if task_id is None or str(task_id) != current.task_id:
            current.read_result(keys, values)
        return
    runs = _entered_runs()
    if not runs:
        return
    # The values stay in the hands of the outermost run until it ends: a task that
    # ran another eagerly and got them from it holds them too.  Inner runs give
    # this context back when they end (their own outer, "none", is replaced).
    task, request = runs[0]
    derived = RunningTask(
        pii,
        task.name,
        request.id,
        pii.specs.get(task.name),
        list(values),
        None,
        keys,
        request,
        task.request_stack,
    )
    start(derived)
    for _, inner in runs[1:]:
        _runs[inner].outer = derived


class RedeliveryWindow:
    """A redelivered message being traced, until its task runs (see ``_redelivery.py``)."""

    __slots__ = ("args", "derived", "kwargs", "previous", "request", "task", "task_id", "token")

    def __init__(self, task: Any, task_id: str, args: Any, kwargs: Any, request: dict[str, Any]) -> None:
        self.task, self.task_id, self.args, self.kwargs, self.request = task, task_id, args, kwargs, request
        self.previous = running.get()
        self.derived: RunningTask | None = None
        self.token = _redelivery.set(self)


_redelivery: contextvars.ContextVar[RedeliveryWindow | None] = contextvars.ContextVar(
    "celery_pii_redelivery", default=None
)


def open_redelivery(
    task: Any, task_id: object, args: Any, kwargs: Any, request: dict[str, Any]
) -> RedeliveryWindow:
    """Celery traces a redelivered message of ``task``: it may send the stored result to the task's steps."""
    return RedeliveryWindow(task, str(task_id), args, kwargs, request)


def close_redelivery(window: RedeliveryWindow) -> None:
    """The trace ended: a context derived from the stored result ends with it."""
    global _elsewhere  # noqa: PLW0603 - see scrubber_elsewhere
    _redelivery.reset(window.token)
    derived = window.derived
    if derived is not None:
        if _with_values.pop(id(derived), None) is not None:
            _elsewhere = None  # it held the result's values: not kept past the trace
        if running.get() is derived:
            running.set(window.previous)


def derive_in_redelivery(
    task_id: object, meta: Any, keys_of: Callable[[Any], Sequence[tuple[str, int]]]
) -> None:
    """Celery read a redelivered task's stored result before running it: a success is sent on, not rerun.

    A task that already succeeded is not run again
    (``worker_deduplicate_successful_tasks``): its tracer sends the stored
    result to the task's callbacks and next chain step.  They are sent as the
    task would have sent them: their own sealed values opened first (as the
    task's opening step would have), then everything sealed whole, under keys
    derived from the result's (``keys_of(meta)``, none if it was not sealed)
    and their own.  Called for every result meta a backend serves (read or from
    its cache): anything else returns at the first check.
    """
    window = _redelivery.get()
    if (
        window is None
        or window.derived is not None
        or str(task_id) != window.task_id
        or not isinstance(meta, dict)
        or meta.get("status") != states.SUCCESS
        or any(task is window.task for task in _task_stack.stack)  # it runs: its own reads
    ):
        return
    pii: PII = getattr(window.task.app, APP_ATTRIBUTE)
    steps = pii.open_redelivered_steps(
        window.task, window.task_id, window.args, window.kwargs, window.request
    )
    name = window.task.name
    derived = RunningTask(
        pii,
        name,
        window.task_id,
        pii.specs.get(name),
        [meta.get("result"), *(steps.values if steps is not None else ())],
        None,
        keys_of(meta),
        carried_keys=steps.carried_keys if steps is not None else (),
    )
    derived.steps_unopened = steps is None
    window.derived = derived
    start(derived)


def _entered_runs() -> list[tuple[Any, Any]]:
    """``(task, request)`` of the task runs in progress in this thread, outermost first.

    Only runs whose start celery-pii saw and whose end it has not: only those
    give the context back at their end (see :func:`leave`).
    """
    runs = []
    depth: dict[int, int] = {}
    for task in list(_task_stack.stack):  # Celery's tasks running in this thread, outermost first
        index = depth.get(id(task), 0)  # the same task object run inside itself has one request per run
        depth[id(task)] = index + 1
        requests = task.request_stack.stack
        state = _runs.get(requests[index]) if index < len(requests) else None
        if state is not None and state.outer is not _NOT_ENTERED:
            runs.append((task, requests[index]))
    return runs


def running_with_id(task_id: object) -> RunningTask | None:
    """The task running in this process with opened values whose id is ``task_id``, if any.

    For a result stored outside the task's own context (``update_state``
    called from a thread the task started).
    """
    wanted = str(task_id)  # a UUID when the caller gave one
    for task in list(_with_values.values()):  # one step: other threads add and remove
        if task.task_id == wanted:
            return task
    return None


class EndedTask(NamedTuple):
    """A PII task that ended in this process: what a result stored for it later is sealed with.

    No values: nothing of the task's PII is kept past its end.
    """

    pii: PII
    name: str
    task_id: str
    result_key: KeySpec
    group: str | None


class _Ended(NamedTuple):
    """What is kept of each ended task: its key is found only if a result comes (most never do).

    Its app's :class:`PII` is held weakly: kept here, an app that went away
    (a test's, one a process replaced) kept its key store's connections open.
    """

    pii: weakref.ref[PII]
    name: str
    spec: TaskSpec | None
    result_key: KeySpec | None
    message_keys: Sequence[tuple[str, int]]
    group: str | None


#: The tasks with PII that ended here most recently, by id, oldest first (see :func:`ended_with_id`).
_ended: collections.OrderedDict[str, _Ended] = collections.OrderedDict()
#: How many are remembered: a thread storing for a task this many PII tasks ago is not recognised.
ENDED_KEPT: Final = 4096


def ended_with_id(task_id: object) -> EndedTask | None:
    """The PII task that ended in this process whose id is ``task_id``, if it is among the last ones.

    A thread the task started may still call ``update_state(task_id=...)``
    after the task returned: that result is sealed under the task's key too.
    """
    wanted = str(task_id)
    ended = _ended.get(wanted)
    pii = ended.pii() if ended is not None else None
    if ended is None or pii is None:  # not among the last ones, or its app is gone
        return None
    result_key = ended.result_key
    if result_key is None:
        try:
            result_key = _result_key_of(pii, ended.name, ended.spec, ended.message_keys)
        except PIIError:  # it cannot be found: nothing to seal a later result with
            return None
        if result_key is None:  # no PII: its results are stored as they are
            return None
    return EndedTask(pii, ended.name, wanted, result_key, ended.group)


def _remember_ended(task: RunningTask) -> None:
    # Every task with PII ends here: the least work that lets a late result be sealed.
    # Removed, then added: at the end (a retry of the same id), with no step another thread could undo.
    _ended.pop(task.task_id, None)
    _ended[task.task_id] = task.kept_after_end()
    if len(_ended) > ENDED_KEPT:
        _ended.popitem(last=False)


def scrubber_elsewhere() -> Scrubber | None:
    """A scrubber of the values of every task running in this process; ``None`` if none is.

    For records logged outside any task's context: by threads a task started
    (or, on the threads pool, while other tasks run; hiding their values there
    too only hides more).
    """
    global _elsewhere  # noqa: PLW0603 - one cache for the process, replaced whole (no lock needed)
    tasks = list(_with_values.values())  # one step: other threads add and remove
    if not tasks:
        return None
    # Built once per set of values (every record logged outside a task asks, twice:
    # the filter sits on loggers and handlers).  A task's values list is replaced,
    # never changed, when it learns more; holding the lists keeps their identity.
    lists = tuple(task.values for task in tasks)
    cached = _elsewhere
    if cached is not None and len(cached[0]) == len(lists) and all(map(operator.is_, cached[0], lists)):
        return cached[1]
    scrubber = Scrubber([value for values in lists for value in values])
    _elsewhere = (lists, scrubber)
    return scrubber


#: The last scrubber :func:`scrubber_elsewhere` built, with the values lists it was built from.
_elsewhere: tuple[tuple[list[Any], ...], Scrubber] | None = None


# What celery-pii remembers about a task run, by its request object: never as
# attributes of the request, which Celery fills from the message's headers and
# embed (whoever can publish a message could set them).
_NOT_ENTERED: Final = object()


class _RunState:
    """One task run, from its opening step on: the context it entered from, until it ends."""

    __slots__ = ("outer",)

    def __init__(self) -> None:
        self.outer: Any = _NOT_ENTERED


#: The runs whose message the opening step has seen (once per run), by request.
_runs: weakref.WeakKeyDictionary[Any, _RunState] = weakref.WeakKeyDictionary()

#: The task id of the database backend row being written or read: the whole
#: values in its columns are bound to it (the backend stores them apart from
#: any meta that would name the task).
backend_row: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "celery_pii_backend_row", default=None
)

#: True while ``Task.apply`` runs a task in this thread: an eager call, whose
#: arguments never left the process.  Not the request's ``is_eager``, which a
#: message's embed can set.
applying: contextvars.ContextVar[bool] = contextvars.ContextVar("celery_pii_applying", default=False)

#: The declared values of an eagerly applied chain's or chord's steps, while it runs.
#: Celery applies each step alone (its request carries no chain or chord): on a
#: worker each step knows them from the envelopes its message carries.
eager_canvas_values: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "celery_pii_eager_canvas_values", default=()
)

#: The app's PII object and the task's name while an eager ``apply_async``
#: (``task_always_eager``) has Celery write and read its ``(args, kwargs)``
#: with the task serializer, before it runs the task: the serializer then
#: knows which of them a worker's message would carry sealed.
eager_call: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "celery_pii_eager_call", default=None
)

#: What PII tasks run eagerly outside any task returned (newest last), with the
#: context each ran in.  Celery's ``chain.apply()`` (and a chord's, a group's
#: before a task) gives one to the next step's ``apply()`` itself, after the
#: PII task's context has ended: the step must run as derived from it.
_eager_outputs: contextvars.ContextVar[tuple[tuple[Any, RunningTask], ...]] = contextvars.ContextVar(
    "celery_pii_eager_outputs", default=()
)
_EAGER_OUTPUTS_KEPT: Final = 8
#: True once this process has remembered one (most never run tasks eagerly: the
#: worker path then skips the context-variable lookups).
eager_outputs_seen = False


def eager_source(args: Any, kwargs: Any) -> RunningTask | None:
    """The context of an eager PII run whose return value this eager call is given (a chain's next step).

    Found by identity, in an argument or one level inside one (a chord body
    gets the list of its header's results).  Its values are added to those of
    every other such run found, for scrubbing.
    """
    outputs = _eager_outputs.get()
    if not outputs:
        return None
    given = [*(args or ()), *((kwargs or {}).values() if isinstance(kwargs, dict) else ())]
    given += [item for value in given if isinstance(value, (list, tuple)) for item in value]
    found = [run for output, run in outputs if any(value is output for value in given)]
    if not found:
        return None
    first = found[0]
    if len(found) > 1:  # a chord body: every part's values (each once, however often this runs)
        first.values = list({id(value): value for run in found for value in run.values}.values())
        first._scrubber = None  # noqa: SLF001 - this module's own class
    return first


def _remember_eager_output(retval: Any, current: RunningTask) -> None:
    global eager_outputs_seen  # noqa: PLW0603 - one flag for the process
    # Only containers: strings and numbers may be shared objects ("ok", 1), found by
    # identity in any later call.
    if type(retval) in (dict, list, tuple):
        eager_outputs_seen = True
        _eager_outputs.set((*_eager_outputs.get()[-(_EAGER_OUTPUTS_KEPT - 1) :], (retval, current)))


def first_opening(request: Any) -> bool:
    """True the first time the opening step sees this run (a subclass of a registered task calls it twice)."""
    if request in _runs:
        return False
    _runs[request] = _RunState()
    return True


def enter(request: Any) -> RunningTask | None:
    """A task starts: nothing is running for it yet; returns the task it runs inside, if any.

    The outer task is remembered for this run (in ``_runs``, keyed by the
    request, never on the request itself: see :class:`_RunState`), for :func:`leave`.  A context
    left behind by a task that ended without :func:`leave` (its process was
    being torn down) is not an outer task.
    """
    outer = running.get()
    if outer is not None and not outer.is_live():
        outer = None
    state = _runs.get(request)
    if state is None:  # entered without the opening step's first look (not expected)
        state = _runs[request] = _RunState()
    state.outer = outer
    running.set(None)
    return outer


def hide_opened(request: Any, *, rejected: bool) -> None:
    """A task ends: put the sealed marker back where its message's values were opened.

    Celery keeps the request's ``args``/``kwargs`` after the task: on the solo
    and threads pools they are the very objects the values were opened into.
    It stores them (``result_extended``) when it records an outcome after the
    task, from the worker (``Reject(requeue=False)``), when nothing is running
    any more to seal it, and after a ``Reject`` (``rejected``) it gives them to
    errbacks that take the request.  Otherwise nothing reads them: left as
    they are (this runs after every task).  What lies on the way to an opened
    place is copied, never changed (the task function may still hold it); only
    the request's own top-level list and dict are changed in place.
    """
    current = running.get()
    if current is None or current._request is not request or not current._opened_at:  # noqa: SLF001
        return
    if not (rejected or current.pii.stores_arguments):
        return
    root = {"args": getattr(request, "args", None), "kwargs": getattr(request, "kwargs", None)}
    opened_at: Sequence[Location] = current._opened_at  # noqa: SLF001
    places = _mark_arguments(root, opened_at)
    if not places:
        return
    try:
        marked = replace_in_copies(root, places, MARKER)
    except (KeyError, IndexError, TypeError):  # the task changed its arguments' shape: nothing to hide there
        return
    for part, container in root.items():
        copy = marked[part]
        if copy is container:
            continue
        if isinstance(container, list):
            container[:] = copy
        elif isinstance(container, dict):
            container.update(copy)


def _mark_arguments(root: dict[str, Any], opened_at: Sequence[Location]) -> list[Location]:
    """Put the marker at each opened place that is an argument itself (most places).

    In the request's own list or dict, where the argument is still there.

    Returns:
        The places inside an argument, left to the caller (what leads there is copied).
    """
    inside: list[Location] = []
    for location in opened_at:
        if location[0] not in root:
            continue
        if len(location) != 2:
            inside.append(location)
            continue
        container, key = root[str(location[0])], location[1]
        if isinstance(container, dict):
            if key in container:
                container[key] = MARKER
        elif isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container):
            container[key] = MARKER
    return inside


def leave(request: Any, retval: Any = None) -> None:
    """A task ends: the context it ran inside (or none) is the running one again.

    ``retval``: what it returned, remembered when it ran eagerly outside any
    task with PII (see :func:`eager_source`).
    """
    global _elsewhere  # noqa: PLW0603 - see scrubber_elsewhere
    current = running.get()
    ending = current is not None and current._request is request  # noqa: SLF001
    if ending and _with_values.pop(id(current), None) is not None:
        _elsewhere = None  # it held this task's values: not kept past the task
    if ending and current is not None and (current.is_pii or current.values):
        _remember_ended(current)
    state = _runs.get(request)
    if state is not None and state.outer is None:
        if not applying.get():
            if eager_outputs_seen and _eager_outputs.get():  # a worker's task ended: not kept past it
                _eager_outputs.set(())
        elif current is not None:
            # Run eagerly outside any task, with PII of its own or given by an earlier
            # eager run: the next step of an eager chain gets what it returned.
            _remember_eager_output(retval, current)
    if state is not None and state.outer is not _NOT_ENTERED:
        running.set(state.outer)
        # Ended: a sealed result read after this (a task_postrun handler connected after
        # celery-pii's) must not start a context that nothing would end (derive_from_result).
        state.outer = _NOT_ENTERED


# Envelopes carried from a task that could not open them (key store down, or the
# quarantine refused it) to its own retry message, so the retry keeps the
# ciphertext it came with.
carried: contextvars.ContextVar[tuple[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "celery_pii_carried", default=None
)
