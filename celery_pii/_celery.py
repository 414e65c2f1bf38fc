"""``setup_pii(app)``: wire celery-pii into a Celery app.

This module installs the hooks; the work they do is the app's :class:`PII`
object's (``_pii.py``), and the task-class changes are in ``_taskclass.py``.

Where each job lives, and why (docs/architecture.md has the Celery internals each relies on):

* **Publish** — ``app.amqp.create_task_message`` (``as_task_v2``) is wrapped.
  It is the one place that sees the task name, id, arguments and embedded
  canvas *before* Celery builds ``argsrepr``/``kwargsrepr`` and the
  ``task-sent`` event, and an exception there aborts the publish.  It seals
  into copies and hands the body to the ``pii`` serializer with a ticket; the
  serializer refuses task bodies without one.  (Signal receivers would fail
  open: Celery logs and swallows their exceptions.)
* **Consume** — each task class gets a ``before_start`` that opens the
  envelope into the very ``args``/``kwargs`` the function receives; it runs
  inside Celery's traced ``try``, so a failure stops the task.  ``loads``
  never opens task arguments, so ``inspect``/Flower keep ciphertext.
* **Outcomes** — exceptions of tasks running on opened values (PII tasks,
  and steps that received a PII task's output) are scrubbed before Celery
  formats, logs or stores them, results are sealed by the result serializer
  while the task runs, and a logging filter hides what is left (tracebacks too).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

from celery import Celery, signals, states
from celery.backends.base import DisabledBackend
from kombu import serialization
from kombu.exceptions import DecodeError

from . import _context
from ._config import Settings, as_written, settings_from_conf
from ._heldresults import collecting_keys, guard_celery_result_caches, opened_meta, opened_with_keys
from ._keys import KeyManager, flush_all_usage
from ._logfilter import filter_celery_loggers
from ._paths import replace_in_copies
from ._pii import PII, check_task_message_arguments
from ._quarantine import make_quarantine_step
from ._sealer import (
    MARKER,
    OpenedResult,
    is_marker,
    is_result_meta,
    is_sealed_result,
    unreadable_result,
    withheld_reason,
)
from ._serializer import CONTENT_ENCODING, CONTENT_TYPE, NAME, PIISerializer
from ._sources import MasterKey, UnloadedMasterKey, load_master_key
from ._store import KeyStore
from ._taskclass import eager_canvas_knows_its_fields, hook_registry
from ._workerlost import (
    hand_out_requests_with_markers,
    hide_results_read_after_worker_lost,
    resend_sealed_on_worker_lost,
)
from .exceptions import (
    ConfigurationError,
    DecryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
    PIIError,
)

__all__ = ["get_pii", "setup_pii"]

logger = logging.getLogger("celery_pii")

_PLAINTEXT_CONTENT: Final = frozenset(("json", "application/json"))
_OUR_CONTENT: Final = frozenset((NAME, CONTENT_TYPE))
# Redis' native chord join stores each part as [1, task id, state, result].
_JOIN_ENTRY_LENGTH: Final = 4

_instances: weakref.WeakSet[PII] = weakref.WeakSet()
_serializer: PIISerializer | None = None
_store_checks_deferred = False


def defer_store_checks(*, enabled: bool) -> None:
    """Skip the key-store checks of ``setup_pii`` (for ``celery pii db ...``, which creates the store).

    The master key is then not required either: those commands never use it.
    """
    global _store_checks_deferred  # noqa: PLW0603 - one flag for the process, set by the CLI
    _store_checks_deferred = enabled


# -- the serializer and result hooks -----------------------------------------------------------


def _seal_result_hook(obj: Any) -> Any:
    running = _context.running.get()
    if running is not None:
        return running.pii.seal_result(obj, running)
    task_id = _stored_for(obj)
    if task_id is None:
        return obj
    elsewhere = _context.running_with_id(task_id)  # update_state from a thread the task started
    if elsewhere is not None:
        return elsewhere.pii.seal_result(obj, elsewhere)
    ended = _context.ended_with_id(task_id)  # ... even after the task ended
    if ended is not None:
        return ended.pii.seal_late_result(obj, ended)
    return _mark_declared_fields(obj)


def _stored_for(obj: Any) -> str | None:
    """The task a value stored outside any task's context is stored for, if that can be told.

    A result meta names it; the database backend stores each column alone,
    in the row of its task; Redis' native chord join stores ``[1, task id,
    state, result]`` per part.
    """
    row = _context.backend_row.get()
    if row is not None:  # whatever the value says: a meta of the caller's may hold a "task_id" too
        return row
    if isinstance(obj, dict) and "task_id" in obj:
        return str(obj["task_id"])
    if _is_join_entry(obj):
        return str(obj[1])
    return None


def _is_join_entry(value: Any) -> bool:
    """``[1, task id, state, result]``: what Redis' native chord join stores for one part."""
    return (
        isinstance(value, list)
        and len(value) == _JOIN_ENTRY_LENGTH
        and value[0] == 1
        and isinstance(value[1], str)
        and isinstance(value[2], str)
        and value[2] in states.ALL_STATES
    )


def _mark_declared_fields(obj: Any) -> Any:
    """A result meta of a PII task stored while it is not running: its declared fields as markers.

    Celery stores some outcomes from the worker after the task ended
    (``Reject(requeue=False)``, a lost worker, a time limit), with the
    arguments it kept (``result_extended``).  The end of the task put the
    markers back where values were opened (``_context.hide_opened``); this is
    the backstop for a declared field the task function changed in place.
    No crypto here: it runs where no failure may stop Celery recording it.
    """
    if not (isinstance(obj, dict) and "args" in obj and "kwargs" in obj and "task_id" in obj):
        return obj
    name = obj.get("name")
    args, kwargs = obj["args"], obj["kwargs"]
    if not isinstance(name, str) or not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        return obj
    for pii in list(_instances):
        spec = pii.specs.get(name)
        if spec is None or not spec.is_pii or spec.binder is None:
            continue
        locations, values = spec.binder.locate_apart(args, kwargs)
        places = [location for location, value in zip(locations, values, strict=True) if not is_marker(value)]
        return replace_in_copies(obj, places, MARKER) if places else obj
    return obj


def celery_subcommand(argv: Sequence[str]) -> str | None:
    """The ``celery`` subcommand ``argv`` runs (``worker``, ``flower``...): its first positional argument."""
    takes_value = False
    for arg in argv[1:]:
        if takes_value:
            takes_value = False
        elif arg in _GLOBAL_OPTIONS_WITH_VALUES:
            takes_value = True
        elif not arg.startswith("-"):
            return arg
    return None


# Celery's global options followed by a value (``-A proj``; ``--app=proj`` is one argument).
_GLOBAL_OPTIONS_WITH_VALUES: Final = frozenset(
    ("-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir")
)

# Flower (``celery -A proj flower``) imports the app, so it holds the master key, and serves
# what it reads over HTTP: ``/api/task/result`` and ``/api/task/apply`` returned opened results
# to whoever could reach it.  In its process sealed results stay sealed (their markers show).
_IN_FLOWER: Final = celery_subcommand(sys.argv) == "flower"


def _eager_call_as_sent(body: Any) -> Any:
    """An eager call's ``(args, kwargs)``, its declared values marked as a worker's message holds them."""
    eager = _context.eager_call.get()
    if eager is None or not (isinstance(body, tuple) and len(body) == 2):
        return None
    pii, name = eager
    return pii.marked_call(name, *body)


def _open_result_hook(value: Any) -> Any:
    if not is_sealed_result(value):
        withheld = withheld_reason(value)
        if withheld is not None:  # stored in place of a result whose key was destroyed meanwhile
            raise KeyDestroyed(withheld)
        return value
    if _IN_FLOWER:
        return _left_sealed(value)
    failures: list[PIIError] = []
    group = _current_group()
    for index, pii in enumerate(_candidate_instances()):
        # Several apps in one process (tests, multi-tenant hosts): the result
        # opens with the keys of whichever app's store holds its key.
        try:
            opened = pii.sealer.open_result(value, group=group, task_id=_context.backend_row.get())
        except (KeyNotFound, DecryptionFailed, KeyDestroyed) as error:
            failures.append(error)
            continue
        except Exception:
            if index == 0:  # the likeliest app (the running task's, the current one): its error stands
                raise
            # Another app of this process whose key store cannot answer (gone, not
            # migrated, down) does not hold this result's key: try the next one.
            logger.debug("celery-pii: app %r could not look up a result's key", pii.app.main)
            continue
        read_id = opened.value.get("task_id") if isinstance(opened.value, dict) else None
        _context.derive_from_result(pii, opened.keys, _values_read(opened), read_id)
        return opened_meta(opened.value, pii, opened.keys)
    # KeyDestroyed says the most (the data is gone on purpose); then DecryptionFailed.
    failures.sort(key=lambda error: (not isinstance(error, KeyDestroyed), isinstance(error, KeyNotFound)))
    return unreadable_result(value, failures[0])


def _left_sealed(value: dict[str, Any]) -> Any:
    """A sealed result as Flower shows it: markers, and a failure's exception one Celery can rebuild.

    Celery rebuilds the exception of a failed (or retried, or revoked) task
    from its meta's ``result``: the marker there made every read of such a
    result, ``.state`` included, raise ``ValueError`` (an HTTP 500 in Flower).
    The database backend decodes its ``result`` column alone, before it knows
    the state: the marker it gets reads as that exception too.
    """
    if not is_result_meta(value):
        return _SEALED_VALUE
    if value.get("status") not in states.EXCEPTION_STATES or value.get("result") != MARKER:
        return value
    return dict(value, result=_SEALED_EXCEPTION)


# What a sealed failure reads as in Flower: Celery rebuilds PIIError('[pii:sealed]') from it.
_SEALED_EXCEPTION: Final = {
    "exc_type": PIIError.__name__,
    "exc_message": [MARKER],
    "exc_module": PIIError.__module__,
}


class _SealedValue(str):
    """The marker, which Celery also reads as a stored exception (``dict(value)``) where the state says one.

    For a value sealed whole (the database backend's ``result`` column): as a
    result it is the marker, as a failed task's exception :data:`_SEALED_EXCEPTION`.
    """

    __slots__ = ()

    def keys(self) -> Any:
        return _SEALED_EXCEPTION.keys()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return _SEALED_EXCEPTION[key]
        return super().__getitem__(key)


_SEALED_VALUE: Final = _SealedValue(MARKER)


def _unreadable_rows_read_as_failures() -> None:
    """Celery's database backend reads a row's values only as that task's, or as a failure saying why."""
    from celery.backends.database import DatabaseBackend  # noqa: PLC0415 - only when set up

    _bind_rows_of(DatabaseBackend, _row_facts)


def _adapt_built_backend(backend: Any) -> Any:
    """What :func:`_unreadable_rows_read_as_failures` does, for django-celery-results' ``django-db``.

    Its backend is a class of its own, importable only once Django is set up
    (it imports Django models): it is adapted when an app builds it.  Without
    this its traceback column was stored unsealed, a result copied from
    another row opened as that row's task, and an erased row read as kombu's
    ``DecodeError``.
    """
    django_backends = sys.modules.get("django_celery_results.backends.database")
    if django_backends is not None and isinstance(backend, django_backends.DatabaseBackend):
        _bind_rows_of(django_backends.DatabaseBackend, _django_row_facts)
    return backend


def _bind_rows_of(backend_class: Any, row_facts: Callable[[Any, str], dict[str, Any]]) -> None:
    """Bind a database backend's rows to their task id; read an unreadable row as a failure.

    Its columns (``result``, and ``args``/``kwargs``/``children``) are whole
    values, sealed bound to the task id of the row they are written to: one
    copied from another row (another chord's header task, another subject's
    task) does not open.  Its ``traceback`` column, written outside any
    serializer, is sealed for a PII task.

    Key-value backends store a whole meta, which :func:`unreadable_result`
    turns into a failure meta.  A database backend decodes its ``result``
    column alone, so the error escaped as kombu's ``DecodeError`` from
    ``.state`` and ``.get()``, and ``celery.chord_unlock`` (no retry limit)
    retried forever on an erased header result.  ``row_facts(backend, task_id)``
    reads the row's other columns for that failure (which task, when, where).
    """
    read, store = backend_class._get_task_meta_for, backend_class._store_result  # noqa: SLF001
    if getattr(read, "celery_pii_wrapped", False):
        return

    def store_result(  # noqa: PLR0913, PLR0917 - the backends' own _store_result
        self: Any,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        row = _context.backend_row.set(str(task_id))
        try:
            traceback = _sealed_traceback(str(task_id), state, traceback)
            return store(self, task_id, result, state, traceback, request=request, **kwargs)
        finally:
            _context.backend_row.reset(row)

    def get_task_meta_for(self: Any, task_id: str) -> Any:
        row = _context.backend_row.set(str(task_id))
        try:
            with collecting_keys() as opened:
                meta = opened_with_keys(read(self, task_id), opened)
        except DecodeError as error:
            reason = error.args[0] if error.args else None
            if not isinstance(reason, (KeyDestroyed, DecryptionFailed, KeyNotFound)):
                raise
            failure = {"task_id": task_id, "status": states.FAILURE, "traceback": None, "children": None}
            facts = row_facts(self, task_id)
            return self.meta_from_decoded({**facts, **failure, "result": self.prepare_exception(reason)})
        else:
            if isinstance(meta, dict) and _is_sealed_traceback(meta.get("traceback")):
                meta["traceback"] = _opened_traceback(str(task_id), meta["traceback"])
            return meta
        finally:
            _context.backend_row.reset(row)

    get_task_meta_for.celery_pii_wrapped = True  # type: ignore[attr-defined]
    backend_class._get_task_meta_for = get_task_meta_for  # noqa: SLF001
    backend_class._store_result = store_result  # noqa: SLF001


#: The columns of a database backend's row that hold no value of the task (``result_extended`` adds all
#: but ``date_done``): read for a row whose values cannot be opened, as a key-value backend's meta keeps them.
_ROW_FACTS: Final = ("date_done", "name", "worker", "retries", "queue")
#: The same of django-celery-results' rows, named as its own reads name them.
_DJANGO_ROW_FACTS: Final = ("date_done", "task_name", "worker")


def _row_facts(backend: Any, task_id: str) -> dict[str, Any]:
    """When the row's task was done and, with ``result_extended``, which task it was and where it ran."""
    from celery.backends.database import session_cleanup  # noqa: PLC0415 - only when set up

    row_class = backend.task_cls
    names = [name for name in _ROW_FACTS if hasattr(row_class, name)]
    session = backend.ResultSession()
    with session_cleanup(session):
        columns = [getattr(row_class, name) for name in names]
        row = session.query(*columns).filter(row_class.task_id == task_id).first()
    return dict(zip(names, row, strict=True)) if row is not None else {}


def _django_row_facts(backend: Any, task_id: str) -> dict[str, Any]:
    """:func:`_row_facts` of a django-celery-results row (through its model's manager)."""
    rows = backend.TaskModel._default_manager.filter(task_id=task_id)  # noqa: SLF001 - Django's manager
    facts = rows.values(*_DJANGO_ROW_FACTS).first()
    return dict(facts) if facts is not None else {}


# The database backend writes a failure's traceback to a column of its own, outside
# any serializer: a PII task's is sealed there as its meta would be, behind this line.
_SEALED_TRACEBACK: Final = f"{MARKER}\n"


def _sealed_traceback(task_id: str, state: str, traceback: str | None) -> str | None:
    """A PII task's traceback as the database backend's column holds it: sealed, bound to the row."""
    if not traceback:
        return traceback
    meta = {"task_id": task_id, "status": state, "traceback": traceback}
    sealed = _seal_result_hook(meta)
    if not is_sealed_result(sealed) and withheld_reason(sealed) is None:  # not a PII task's
        return traceback
    return _SEALED_TRACEBACK + json.dumps(sealed)


def _is_sealed_traceback(text: object) -> bool:
    return isinstance(text, str) and text.startswith(_SEALED_TRACEBACK)


def _opened_traceback(task_id: str, text: str) -> str:
    """The traceback :func:`_sealed_traceback` sealed; the marker if it cannot be read here."""
    try:
        opened = _open_result_hook(json.loads(text.removeprefix(_SEALED_TRACEBACK)))
    except (PIIError, ValueError) as error:  # erased, another store's key, damaged: unreadable, said once
        logger.debug("celery-pii: the traceback of %s cannot be read: %s", task_id, type(error).__name__)
        return MARKER
    if not isinstance(opened, dict) or opened.get("task_id") != task_id or is_sealed_result(opened):
        return MARKER  # another row's (copied here), or left sealed (Flower)
    traceback = opened.get("traceback")
    return traceback if isinstance(traceback, str) else MARKER


def _current_group() -> str | None:
    """The group of the task this thread runs: a chord's last part reads its group's parts back.

    Celery's own current task, not celery-pii's context: that last part may
    be a task without PII whose group holds PII tasks' results.
    """
    from celery import current_task  # noqa: PLC0415 - as _candidate_instances

    task = current_task._get_current_object()  # noqa: SLF001 - None outside a task
    group = getattr(task.request, "group", None) if task is not None else None
    return group if isinstance(group, str) else None


def _values_read(opened: OpenedResult) -> list[Any]:
    """The values a reader of a result now holds: of a chord's join entry, its result alone.

    Redis' native join stores ``[1, task id, state, result]`` per part: the
    task id and state are Celery's bookkeeping, and hiding them would hide
    every log line naming that task.  Of a stored exception, its message
    alone: its class and module are code, and hiding them would hide every
    ``ValueError`` the reader logs.
    """
    entry = opened.value
    values = opened.values
    if len(values) == 1 and _is_join_entry(entry):
        values = [entry[3]]
    return [_message_of_exception(value) for value in values]


def _message_of_exception(value: Any) -> Any:
    """A stored exception's message (``{"exc_type", "exc_message", "exc_module"}``); else the value."""
    if isinstance(value, dict) and "exc_type" in value and "exc_message" in value:
        return value["exc_message"]
    return value


def _candidate_instances() -> list[PII]:
    """PII instances to open a result with, the likeliest first."""
    from celery import current_app  # noqa: PLC0415 - only for results read outside a task

    running = _context.running.get()
    first = running.pii if running is not None else None
    if first is None:
        first = getattr(current_app._get_current_object(), _context.APP_ATTRIBUTE, None)  # noqa: SLF001
    ordered = [first] if first is not None else []
    ordered += [pii for pii in list(_instances) if pii is not first]
    if not ordered:
        msg = "a sealed result was read in a process where setup_pii() was never called"
        raise ConfigurationError(msg)
    return ordered


def _with_pii_serializer(send_task_message: Any) -> Any:
    """Wrap ``app.amqp.send_task_message`` so task messages are always written by ``pii``.

    The body was sealed for it (``create_task_message``): written by another
    serializer (``apply_async(serializer="json")``, or ``celery call``, whose
    ``--serializer`` defaults to json) it reaches workers as a content type they
    refuse, and is parked.
    """

    def send_with_pii(producer: Any, name: str, message: Any, *args: Any, **options: Any) -> Any:
        asked = options.get("serializer")
        if asked not in (None, NAME):
            logger.info("celery-pii: task %s: serializer %r asked for, %r used", name, asked, NAME)
            options["serializer"] = NAME
        # A caller's apply_async(argsrepr=..., kwargsrepr=...) (Celery's own way to hide
        # arguments) stays among the options Celery hands on here, and the broker got them as
        # message properties: Redis keeps those, in plaintext.  The headers carry celery-pii's.
        options.pop("argsrepr", None)
        options.pop("kwargsrepr", None)
        return send_task_message(producer, name, message, *args, **options)

    return send_with_pii


def _register_serializer(settings: Settings) -> PIISerializer:
    global _serializer  # noqa: PLW0603 - kombu's registry is process-global too
    if _serializer is None:
        _serializer = PIISerializer(
            settings.inner_serializer,
            seal_result=_seal_result_hook,
            open_result=_open_result_hook,
            legacy_json=_an_app_reads_plain_json,
            eager_call=_eager_call_as_sent,
        )
        serialization.register(
            NAME,
            _serializer.dumps,
            _serializer.loads,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
        )
    elif _serializer.inner != settings.inner_serializer:
        msg = "setting pii_inner_serializer: every app in one process must use the same inner serializer"
        raise ConfigurationError(msg)
    return _serializer


def _an_app_reads_plain_json() -> bool:
    """An app alive in this process is in rollout mode (``pii_allow_plaintext``).

    The serializer is one per process (kombu's registry is): results stored as
    ``json`` before the switch are read while such an app lives, and no longer
    once it has gone (a flag set by it once stayed set for every later app).
    """
    return any(pii.settings.allow_plaintext for pii in list(_instances))


# -- setup ---------------------------------------------------------------------------------------


def _check_celery_config(app: Celery, settings: Settings) -> None:
    conf = app.conf
    if conf.task_serializer != NAME:
        msg = (
            "setting task_serializer: must be 'pii', or task messages go out in plaintext; "
            "set task_serializer='pii'"
        )
        raise ConfigurationError(msg)
    if int(conf.task_protocol or 2) != 2:
        msg = "setting task_protocol: celery-pii needs protocol 2 (the default)"
        raise ConfigurationError(msg)
    allowed = _OUR_CONTENT | (_PLAINTEXT_CONTENT if settings.allow_plaintext else frozenset())
    for setting in ("accept_content", "result_accept_content"):
        accepted = conf.get(setting)
        if accepted is None:
            continue
        if isinstance(accepted, str):  # kombu would read it letter by letter, and fail at worker start
            msg = f"setting {setting}: must be a list, e.g. {setting}=['pii']"
            raise ConfigurationError(msg)
        accepted = set(accepted)
        if setting == "accept_content" and not accepted & _OUR_CONTENT:
            msg = "setting accept_content: must include 'pii'; use accept_content=['pii']"
            raise ConfigurationError(msg)
        extra = accepted - allowed
        if extra:
            shown = ", ".join(sorted(repr(e) for e in extra))
            msg = (
                f"setting {setting}: admits {shown}, which would let plaintext messages through; use "
                f"{setting}=['pii'] (or add 'json' with pii_allow_plaintext=True during a rollout)"
            )
            raise ConfigurationError(msg)
    backend = conf.result_backend
    if backend and str(backend).split(":", 1)[0] != "disabled" and conf.result_serializer != NAME:
        msg = (
            "setting result_serializer: must be 'pii' when a result backend is configured; "
            "set result_serializer='pii'"
        )
        raise ConfigurationError(msg)


def setup_pii(app: Celery) -> PII:
    """Install celery-pii on ``app`` (idempotent) and return its :class:`PII` object.

    Validates the ``pii_*`` settings and the Celery settings that could let
    plaintext through, loads the master key, checks the key store, registers
    the ``pii`` serializer, and gives every task (declared before or after
    this call, with ``@app.task`` or ``@shared_task``) the opening step.

    Raises:
        ConfigurationError: naming the setting and the fix.
    """
    existing = getattr(app, _context.APP_ATTRIBUTE, None)
    if existing is not None:
        _refuse_changed_settings(existing)
        return existing  # type: ignore[no-any-return]
    settings = settings_from_conf(app.conf)
    try:
        _check_celery_config(app, settings)
        keys = _key_manager(settings)
    except ConfigurationError as error:
        raise as_written(error, app.conf) from None
    check_task_message_arguments(app)
    serializer = _register_serializer(settings)
    pii = PII(app, settings, keys, serializer)
    setattr(app, _context.APP_ATTRIBUTE, pii)
    _instances.add(pii)
    original = app.amqp.create_task_message

    def create_task_message(task_id: str, name: str, *args: Any, **options: Any) -> Any:
        return pii._create_task_message(original, task_id, name, *args, **options)  # noqa: SLF001

    app.amqp.create_task_message = create_task_message
    # Wrapped when Celery builds it (first publish): built now, it would read the
    # Celery settings an app may still change after setup_pii (compression, routing).
    create_task_sender = app.amqp._create_task_sender  # noqa: SLF001
    app.amqp._create_task_sender = lambda: _with_pii_serializer(create_task_sender())  # noqa: SLF001
    hook_registry(app, pii)
    app.steps["consumer"].add(make_quarantine_step(CONTENT_TYPE, _quarantine_queue_of, _on_parked))
    imports = tuple(app.conf.imports or ())
    if "celery_pii.tasks" not in imports:
        app.conf.imports = (*imports, "celery_pii.tasks")
    filter_celery_loggers()
    eager_canvas_knows_its_fields()
    resend_sealed_on_worker_lost()
    hide_results_read_after_worker_lost()
    hand_out_requests_with_markers()
    _unreadable_rows_read_as_failures()
    # Backends of their own (django-db) are adapted when built: see _adapt_built_backend.  (None
    # is built yet: a backend built before the pii serializer exists fails for want of it.)
    get_backend = app._get_backend  # noqa: SLF001
    app._get_backend = lambda: _adapt_built_backend(get_backend())  # noqa: SLF001
    guard_celery_result_caches()
    return pii


def get_pii(app: Celery) -> PII:
    """The :class:`PII` object ``setup_pii(app)`` returned.

    Raises:
        ConfigurationError: ``setup_pii`` was not called for this app.
    """
    found = getattr(app, _context.APP_ATTRIBUTE, None)
    if found is None:
        msg = "celery-pii is not set up for this app; call celery_pii.setup_pii(app)"
        raise ConfigurationError(msg)
    return found  # type: ignore[no-any-return]


def _on_parked(app: Any, task: str, task_id: str, reason: str) -> None:
    found = getattr(app, _context.APP_ATTRIBUTE, None)
    if found is not None:
        # The name as the message's headers give it (its audit key id has room for 160 characters).
        found._audit_quietly("tamper_detected", task[:150], task_id, reason=reason)  # noqa: SLF001


def _quarantine_queue_of(app: Any) -> str | None:
    # Asked when a worker's consumer is built: the settings are checked again there.
    found = getattr(app, _context.APP_ATTRIBUTE, None)
    if found is None:
        return None
    _refuse_changed_settings(found)
    refuse_backend_ignoring_the_serializer(app)
    found.register_missed()
    return found.settings.quarantine_queue  # type: ignore[no-any-return]


def refuse_backend_ignoring_the_serializer(app: Any) -> None:
    """Raise if the result backend writes results with a serializer of its own, not ``pii``.

    Checked when a worker starts, and before the first eager call that stores
    its result (``task_store_eager_result``): building the backend earlier
    needs what it needs, Django's settings for instance.  django-celery-results'
    ``django-cache`` backend sets ``pickle`` whatever ``result_serializer``
    says: results, and the opened arguments ``result_extended`` stores, went
    to the cache in plaintext.
    """
    try:
        _refuse_serializer_of_its_own(app)
    except ConfigurationError as error:
        raise as_written(error, app.conf) from None


def _refuse_serializer_of_its_own(app: Any) -> None:
    backend = app.backend
    serializer = getattr(backend, "serializer", NAME)
    if isinstance(backend, DisabledBackend) or serializer == NAME:
        return
    kind = f"{type(backend).__module__}.{type(backend).__qualname__}"
    msg = (
        f"setting result_backend: {kind} writes results with {serializer!r} whatever result_serializer "
        "says, so results (and result_extended's arguments) would be stored in plaintext; use a backend "
        "that writes with result_serializer (Redis, a database, django-db, rpc)"
    )
    raise ConfigurationError(msg)


def _refuse_changed_settings(pii: PII) -> None:
    """Raise if a setting changed since ``setup_pii`` read them (once).

    Changed after it (phase 3 of a rollout appended after ``setup_pii``), a
    setting was silently not applied: ``pii_allow_plaintext=False`` left
    unsealed messages admitted, and ``task_serializer='json'`` would publish
    plaintext.
    """
    now = settings_from_conf(pii.app.conf)
    changed = [
        f"pii_{f.name}"
        for f in dataclasses.fields(now)
        if getattr(now, f.name) != getattr(pii.settings, f.name)
    ]
    if changed:
        msg = (
            f"settings {', '.join(changed)}: changed after setup_pii(app), which reads them once; "
            "set every pii_* setting before calling setup_pii"
        )
        raise ConfigurationError(msg)
    _check_celery_config(pii.app, pii.settings)


def _key_manager(settings: Settings) -> KeyManager:
    master = _master_key(settings.master_key, settings)
    previous = None
    if settings.previous_master_key is not None:
        previous = _master_key(settings.previous_master_key, settings, setting="pii_previous_master_key")
    store = KeyStore(settings.key_store_url, connect_timeout=settings.key_store_connect_timeout)
    keys = KeyManager(
        store,
        master,
        algorithm=settings.algorithm,
        rotation_interval=settings.rotation_interval,
        rotation_max_messages=settings.rotation_max_messages,
        max_key_versions=settings.max_key_versions,
        cache_ttl=settings.key_cache_ttl,
        cache_size=settings.key_cache_size,
        recheck_interval=settings.key_recheck_interval,
        actor=settings.actor,
        previous_master=previous,
    )
    if _store_checks_deferred:
        return keys
    try:
        keys.check_master_key()
    except KeyStoreUnavailable as error:
        if settings.master_key.startswith("aws-kms://"):
            where = f"settings pii_key_store_url / pii_master_key: the key store at {store.url} or the KMS"
        else:
            where = f"setting pii_key_store_url: the key store at {store.url}"
        reason = str(error).removeprefix("setting pii_key_store_url: ")
        msg = f"{where} cannot be reached ({reason})"
        raise ConfigurationError(msg) from None
    return keys


def _master_key(source: str, settings: Settings, *, setting: str = "pii_master_key") -> MasterKey:
    """The master key ``source`` names; for a command that needs none, a stand-in if it cannot be loaded."""
    try:
        return load_master_key(source, settings, setting=setting)
    except ConfigurationError as error:
        if not _store_checks_deferred:
            raise
        return UnloadedMasterKey(error)


# -- worker start ----------------------------------------------------------------------------------


def _end_contexts_last() -> None:
    """Make celery-pii's ``task_postrun`` receiver the last one.

    Receivers run in the order they connected, and this one connected when
    celery-pii was imported: a user's receiver connected later ran after the
    task's context ended, and what it raised was logged with nothing hidden.
    """
    receivers = signals.task_postrun.receivers
    if receivers and receivers[-1][1] is _task_finished:
        return
    signals.task_postrun.disconnect(_task_finished)
    signals.task_postrun.connect(_task_finished, weak=False)


@signals.celeryd_after_setup.connect(weak=False)
@signals.worker_process_init.connect(weak=False)
def _worker_ready_to_run(**_: Any) -> None:
    # A worker's tasks (with their modules' receivers) are imported (its logging is set up:
    # _logfilter filters every handler then).
    _end_contexts_last()


@signals.worker_process_shutdown.connect(weak=False)
def _pool_child_ending(**_: Any) -> None:
    # Prefork children end with os._exit (no atexit): their usage counts would be lost.
    flush_all_usage()


@signals.task_postrun.connect(weak=False)
def _task_finished(task: Any = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    # Sent whatever the outcome (Retry, Ignore and Reject included), while the
    # task's request is still the current one.
    if task is not None:
        request = task.request
        try:
            _context.hide_opened(request, rejected=state == states.REJECTED)
        finally:  # the task's context must end whatever happens
            _context.leave(request, retval if state == states.SUCCESS else None)
