"""``setup_pii(app)``: wire celery-pii into a Celery app.

Where each job lives, and why (see ``../shared/CELERY_INTERNALS.md``):

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
* **Outcomes** — PII tasks' exceptions are scrubbed before Celery formats,
  logs or stores them, results are sealed by the result serializer while the
  task runs, and a logging filter hides what is left.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import inspect
import logging
import weakref
from datetime import datetime
from typing import Any, Final

from celery import Celery, signals
from celery.app.registry import TaskRegistry
from celery.app.task import Task
from kombu import serialization

from . import _envelope
from ._config import Settings, settings_from_conf
from ._detect import Finding, detect
from ._keys import KeyManager, KeySpec
from ._paths import format_path, replace_in_copies
from ._quarantine import make_quarantine_step, park
from ._redact import REDACTED, RedactingFilter, Scrubber, redacted_repr
from ._retention import RetentionReport, enforce
from ._sealer import EMBED_KEY, Opened, Sealed, Sealer, is_sealed_result, unreadable_result
from ._serializer import CONTENT_ENCODING, CONTENT_TYPE, NAME, PIISerializer, publish_ticket
from ._sources import load_master_key
from ._specs import TaskSpec, default_spec, spec_for_task
from ._store import KeyStore, utcnow
from .exceptions import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
    PIIError,
)

__all__ = ["PII", "get_pii", "setup_pii"]

logger = logging.getLogger("celery_pii")

_APP_ATTRIBUTE: Final = "_celery_pii"
_PLAINTEXT_CONTENT: Final = frozenset(("json", "application/json"))
_OUR_CONTENT: Final = frozenset((NAME, CONTENT_TYPE))
# Celery loggers whose records can carry task arguments or outcomes.
_CELERY_LOGGERS: Final = (
    "celery.app.trace",
    "celery.worker.strategy",
    "celery.worker.request",
    "celery.worker.consumer.consumer",
    "celery.task",
)


class _Running:
    """The task running in this thread: what its results, logs and exceptions need.

    The scrubber and the result key are built on first use: most tasks raise
    nothing and many store no result, and this runs before every task.
    """

    __slots__ = ("_result_key", "_scrubber", "is_pii", "name", "pii", "spec", "task_id", "values")

    def __init__(  # noqa: PLR0913, PLR0917 - the running task's facts
        self,
        pii: PII,
        name: str,
        task_id: str,
        spec: TaskSpec | None,
        values: list[Any],
        result_key: KeySpec | None,
    ) -> None:
        self.pii, self.name, self.task_id, self.spec, self.values = pii, name, task_id, spec, values
        self.is_pii = spec is not None and spec.is_pii
        self._result_key = result_key
        self._scrubber: Scrubber | None = None

    @property
    def scrubber(self) -> Scrubber:
        """Replaces the values opened for this task."""
        if self._scrubber is None:
            self._scrubber = Scrubber(self.values)
        return self._scrubber

    @property
    def result_key(self) -> KeySpec | None:
        """The key results of this task are sealed under (``None``: not a PII task)."""
        if self._result_key is None and self.is_pii:
            self._result_key = self.pii.sealer.key_spec(
                self.name, self.spec, {}, [self.spec] if self.spec else []
            )
        return self._result_key


_running: contextvars.ContextVar[_Running | None] = contextvars.ContextVar("celery_pii_running", default=None)
# Envelopes carried from a task that could not open them (key store down) to
# its own retry message, so the retry keeps the ciphertext it came with.
_carried: contextvars.ContextVar[tuple[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "celery_pii_carried", default=None
)
_instances: weakref.WeakSet[PII] = weakref.WeakSet()
_serializer: PIISerializer | None = None
_store_checks_deferred = False


def defer_store_checks(*, enabled: bool) -> None:
    """Skip the key-store checks of ``setup_pii`` (for ``celery pii db ...``, which creates the store)."""
    global _store_checks_deferred  # noqa: PLW0603 - one flag for the process, set by the CLI
    _store_checks_deferred = enabled


class PII:
    """celery-pii for one app: ``setup_pii(app)`` returns it, ``get_pii(app)`` finds it."""

    def __init__(self, app: Celery, settings: Settings, keys: KeyManager) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        self.specs: dict[str, TaskSpec] = {}
        self.sealer = Sealer(keys, settings, self._lookup)
        #: Undeclared PII seen on publish in "warn" mode, by (task name, category).
        self.detections: collections.Counter[tuple[str, str]] = collections.Counter()

    def __repr__(self) -> str:
        return f"<PII app={self.app.main!r} store={self.keys.store.url}>"

    def forget_subject(self, subject_id: object) -> int:
        """Destroy a data subject's keys: every copy of their sealed data becomes unreadable.

        Returns:
            How many key versions were destroyed.
        """
        return self.keys.destroy_subject(subject_id)

    def enforce_retention(self, now: datetime | None = None) -> RetentionReport:
        """Destroy the keys of retention buckets whose deadline has passed (one bounded run).

        Every copy of data sealed under them (queues, dead letters, backups,
        stored results) becomes unreadable.  ``now`` lets tests and operators
        evaluate deadlines at a chosen instant.
        """
        return enforce(self.keys.destroy_expired, now or utcnow())

    def rotate_keys(self, now: datetime | None = None, *, max_keys: int = 10_000) -> dict[str, Any]:
        """Rotate due keys and trim versions beyond ``pii_max_key_versions`` (one bounded run).

        Returns:
            A report of counts and key ids (no values).
        """
        rotated = self.keys.perform_automatic_rotation(now, max_keys=max_keys)
        trimmed = self.keys.enforce_max_versions()
        return {
            "rotated": len(rotated),
            "rotated_key_ids": rotated,
            "destroyed_versions": len(trimmed),
            "complete": len(rotated) < max_keys,
        }

    # -- task registry ------------------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[bool, TaskSpec | None]:
        task = self.app._tasks.get(name)  # noqa: SLF001 - the raw registry: no finalize here
        if task is None:
            return False, None
        spec = self.specs.get(name)
        if spec is None and self.settings.detect != "off":
            spec = default_spec(name, self.settings)
        return True, spec

    def _register(self, task: Any) -> None:
        spec = spec_for_task(task, self.settings)
        if spec is not None:
            self.specs[spec.name] = spec
            if spec.retention.is_immediate:
                # delete_immediately(): nothing of the outcome is ever stored.
                type(task).ignore_result = True
        _install_opening(type(task), is_pii=spec is not None and spec.is_pii)

    # -- publish -------------------------------------------------------------------------------

    def _create_task_message(self, original: Any, task_id: str, name: str, *args: Any, **options: Any) -> Any:
        call = _Call(task_id, name, args, options)
        root = call.root()
        carried = _carried.get()
        tokens: list[str] = list(carried[1]) if carried is not None and carried[0] == task_id else []
        running = _running.get()
        # Published from inside a PII task (a chain step gets its return value,
        # callbacks too): anything in the call may be derived from PII.
        derived = running is not None and (running.is_pii or bool(running.values))
        sealed = self.sealer.seal_message(name, task_id, root, seal_all=derived)
        _, spec = self._lookup(name)
        display = root
        if sealed is not None:
            root = display = sealed.root
            if sealed.token is not None:
                tokens.append(sealed.token)
            if sealed.detected or sealed.truncated:
                display = self._report_detected(name, sealed)
        if self.settings.redact_headers and (tokens or (spec is not None and spec.is_pii)):
            maxsize = self.app.amqp.argsrepr_maxsize
            call.options["argsrepr"] = redacted_repr(tuple(display["args"]), maxsize)
            call.options["kwargsrepr"] = redacted_repr(display["kwargs"], self.app.amqp.kwargsrepr_maxsize)
        message = original(**call.arguments(root))
        if tokens:
            message.body[2][EMBED_KEY] = tokens
        publish_ticket.set(message.body)
        return message

    def _report_detected(self, name: str, sealed: Sealed) -> dict[str, Any]:
        """Log and count undeclared PII ("warn"), and redact it from the reprs either way."""
        unsealed = [(loc, category) for loc, category in sealed.detected if loc not in sealed.locations]
        for location, category in unsealed:
            self.detections[(name, category)] += 1
            logger.warning(
                "celery-pii: task %s: undeclared PII (%s) at %s published in plaintext; "
                "declare it in pii_fields or set pii_detect='encrypt'",
                name,
                category,
                format_path(location),
            )
        if sealed.truncated and not sealed.token:
            logger.warning("celery-pii: task %s: payload too large to scan fully for PII", name)
        located = [loc for loc, _ in unsealed if loc[0] in ("args", "kwargs")]
        return replace_in_copies(sealed.root, dict.fromkeys(located, REDACTED)) if located else sealed.root

    def detect(self, value: object) -> list[Finding]:
        """The PII in a JSON-like value, by field path and category (see docs/detection.md).

        Paths are relative to ``value``; a string value itself has the path ``""``.
        """
        return detect(value)

    # -- consume -------------------------------------------------------------------------------

    def _open(self, task: Task, task_id: str, args: Any, kwargs: Any) -> None:
        _running.set(None)  # nothing of the previous task may leak into this one's outcome
        request = task.request
        name = task.name
        spec = self.specs.get(name)
        tokens = getattr(request, EMBED_KEY, None)
        values: list[Any] = []
        message_key: str | None = None
        if tokens:
            root = {
                "args": args,
                "kwargs": kwargs,
                "callbacks": request.callbacks,
                "errbacks": request.errbacks,
                "chain": request.chain,
                "chord": request.chord,
            }
            opened = self._open_or_handle(task, task_id, root, tokens)
            values, message_key = opened.values, opened.key_ids[0]
            setattr(request, EMBED_KEY, None)
        is_pii = spec is not None and spec.is_pii
        if not (is_pii or values):
            _running.set(None)
            return
        # Results are sealed under the message's own key (its subject, its
        # retention bucket), so they become unreadable together.  Without one,
        # a subject's key depends on this call's arguments: find it now, before
        # the task function can change them; other keys are found on first use.
        result_key = None
        if message_key is not None:
            result_key = KeySpec(message_key)
        elif spec is not None and spec.subject is not None:
            result_key = self._result_key(name, spec, args, kwargs)
        _running.set(_Running(self, name, task_id, spec, values, result_key))

    def _open_or_handle(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> Opened:
        name = task.name
        try:
            return self.sealer.open_message(name, task_id, root, list(tokens))
        except KeyStoreUnavailable:
            retries = task.request.retries or 0
            delay = self.settings.key_unavailable_retry_delay
            countdown = min(delay * 2 ** min(retries, 10), delay * 10)
            logger.warning(
                "celery-pii: key store unreachable; task %s[%s] retried in %ss", name, task_id, countdown
            )
            token = _carried.set((task_id, tuple(tokens)))
            try:
                # Celery reads max_retries=None as "the task's own limit": allow one
                # more than has been done instead, so an outage is never fatal.
                raise task.retry(countdown=countdown, max_retries=retries + 1) from None
            finally:
                _carried.reset(token)
        except KeyDestroyed as error:
            self._audit_quietly("decrypt_denied", name, task_id, reason=str(error))
            raise
        except (DecryptionFailed, KeyNotFound):
            self._quarantine(task, task_id, root, tokens)
            raise DecryptionFailed from None

    def _quarantine(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> None:
        """Park the still-sealed message and record why; the task does not run."""
        request = task.request
        body = (
            list(root["args"]),
            dict(root["kwargs"]),
            {part: root[part] for part in ("callbacks", "errbacks", "chain", "chord")} | {EMBED_KEY: tokens},
        )
        headers = {
            "lang": "py",
            "task": task.name,
            "id": task_id,
            "retries": request.retries or 0,
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "group": request.group,
            "argsrepr": request.argsrepr,
            "kwargsrepr": request.kwargsrepr,
        }
        delivery = request.delivery_info or {}
        try:
            park(
                self.app,
                self.settings.quarantine_queue,
                body=_raw_serializer(self.settings).encode_trusted(body),
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                headers=headers,
                reason="authentication failed",
                original={"exchange": delivery.get("exchange"), "routing_key": delivery.get("routing_key")},
            )
        except Exception:  # reported; the task still must not run
            logger.exception("celery-pii: could not park task %s[%s] in quarantine", task.name, task_id)
        key_ids = _key_ids(tokens)
        logger.error(
            "celery-pii: task %s[%s] failed authentication (key %s); parked in %s, not run",
            task.name,
            task_id,
            ", ".join(key_ids) or "?",
            self.settings.quarantine_queue,
        )
        self._audit_quietly("tamper_detected", task.name, task_id, key_ids=key_ids)

    def _audit_quietly(self, operation: str, name: str, task_id: str, **details: Any) -> None:
        try:
            key_id = details.get("key_ids", [None])[0] if "key_ids" in details else None
            self.keys.record(operation, key_id or f"task:{name}", task=name, task_id=task_id, **details)
        except Exception:  # the audit must not hide the original failure
            logger.exception(
                "celery-pii: could not write the %s audit record for %s[%s]", operation, name, task_id
            )

    def _result_key(self, name: str, spec: TaskSpec | None, args: Any, kwargs: Any) -> KeySpec:
        root = {"args": args, "kwargs": kwargs}
        specs = [spec] if spec is not None else []
        try:
            return self.sealer.key_spec(name, spec, root, specs, now=utcnow())
        except EncryptionFailed:  # subject absent (an eager call): seal under the task's own key
            return KeySpec(spec.key_id if spec is not None else self.settings.default_key)

    # -- results -------------------------------------------------------------------------------

    def seal_result(self, obj: Any, running: _Running) -> Any:
        """Seal what the result backend stores for a running PII task."""
        if running.result_key is None:
            return obj
        task_id = obj.get("task_id", running.task_id) if isinstance(obj, dict) else running.task_id
        return self.sealer.seal_result(obj, task_id=str(task_id), key_spec=running.result_key)


class _Call:
    """The arguments of ``as_task_v2``, by name, so sealed parts can be swapped in."""

    _POSITIONAL: Final = (
        "args",
        "kwargs",
        "countdown",
        "eta",
        "group_id",
        "group_index",
        "expires",
        "retries",
        "chord",
        "callbacks",
        "errbacks",
        "reply_to",
        "time_limit",
        "soft_time_limit",
        "create_sent_event",
        "root_id",
        "parent_id",
        "shadow",
        "chain",
    )

    def __init__(self, task_id: str, name: str, args: tuple[Any, ...], options: dict[str, Any]) -> None:
        if len(args) > len(self._POSITIONAL):
            msg = "create_task_message() got more positional arguments than as_task_v2 takes"
            raise TypeError(msg)
        self.options = dict(zip(self._POSITIONAL, args, strict=False))
        self.options.update(options)
        self.options["task_id"], self.options["name"] = task_id, name

    def root(self) -> dict[str, Any]:
        return {
            "args": self.options.get("args") or (),
            "kwargs": self.options.get("kwargs") or {},
            "callbacks": self.options.get("callbacks"),
            "errbacks": self.options.get("errbacks"),
            "chain": self.options.get("chain"),
            "chord": self.options.get("chord"),
        }

    def arguments(self, root: dict[str, Any]) -> dict[str, Any]:
        return {**self.options, **root}


def _key_ids(tokens: Any) -> list[str]:
    """The key ids named by envelopes that at least parse (for logs and audit)."""
    ids = []
    for token in tokens or ():
        key_id = _key_id_or_none(token)
        if key_id is not None:
            ids.append(key_id)
    return ids


def _key_id_or_none(token: object) -> str | None:
    try:
        return _envelope.parse(token).key_id
    except DecryptionFailed:
        return None


# -- task classes ------------------------------------------------------------------------------


def _install_opening(cls: type[Any], *, is_pii: bool) -> None:
    """Give a task class the fail-closed opening step (and, for PII tasks, scrubbing)."""
    if not cls.__dict__.get("_celery_pii_opening"):
        chained = getattr(cls, "before_start", None)
        if getattr(chained, "__qualname__", "") == Task.before_start.__qualname__:
            chained = None

        def before_start(self: Task, task_id: str, args: Any, kwargs: Any) -> None:
            get_pii(self.app)._open(self, task_id, args, kwargs)  # noqa: SLF001
            if chained is not None:
                chained(self, task_id, args, kwargs)

        cls.before_start = before_start
        cls._celery_pii_opening = True
    if is_pii and not cls.__dict__.get("_celery_pii_scrubbing"):
        _wrap_run(cls)
        # Return values of PII tasks stay out of logs and events (see docs/security.md).
        cls.resultrepr_maxsize = 0
        cls._celery_pii_scrubbing = True


def _wrap_run(cls: type[Any]) -> None:
    """Scrub exceptions leaving the task function before Celery formats, logs or stores them.

    ``run`` is wrapped rather than ``__call__``: Celery's tracer calls ``run``
    directly unless ``__call__`` is overridden, and an override would cost every
    task a second request context.
    """
    raw = inspect.getattr_static(cls, "run")
    is_static = isinstance(raw, staticmethod)
    fun = raw.__func__ if is_static else raw

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except Exception as exc:
            running = _running.get()
            if running is not None and running.scrubber:
                running.scrubber.exception(exc)
            raise

    cls.run = staticmethod(run) if is_static else run


def _hook_registry(app: Celery, pii: PII) -> None:
    registry = app._tasks  # noqa: SLF001 - the registry every registration goes through
    base = type(registry)
    if not getattr(base, "_celery_pii_hooked", False):

        def __setitem__(self: TaskRegistry, name: str, task: Any) -> None:  # noqa: N807
            owner = getattr(self, "_celery_pii_owner", None)
            if owner is not None:
                owner._register(task)  # noqa: SLF001
            base.__setitem__(self, name, task)

        registry.__class__ = type(
            f"PII{base.__name__}", (base,), {"__setitem__": __setitem__, "_celery_pii_hooked": True}
        )
    registry._celery_pii_owner = pii  # noqa: SLF001
    for task in list(registry.values()):
        pii._register(task)  # noqa: SLF001


# -- the serializer and result hooks -----------------------------------------------------------


class _RawSerializer:
    """Frames an already-sealed body for the quarantine (no ticket needed)."""

    def __init__(self, serializer: PIISerializer) -> None:
        self._serializer = serializer

    def encode_trusted(self, body: Any) -> bytes:
        token = publish_ticket.set(body)
        try:
            return self._serializer.dumps(body)
        finally:
            publish_ticket.reset(token)


def _raw_serializer(_settings: Settings) -> _RawSerializer:
    if _serializer is None:  # pragma: no cover - setup_pii registers it first
        msg = "celery-pii: the serializer is not registered"
        raise ConfigurationError(msg)
    return _RawSerializer(_serializer)


def _seal_result_hook(obj: Any) -> Any:
    running = _running.get()
    if running is None:
        return obj
    return running.pii.seal_result(obj, running)


def _open_result_hook(value: Any) -> Any:
    if not is_sealed_result(value):
        return value
    failures: list[PIIError] = []
    for pii in _candidate_instances():
        # Several apps in one process (tests, multi-tenant hosts): the result
        # opens with the keys of whichever app's store holds its key.
        try:
            return pii.sealer.open_result(value)
        except (KeyNotFound, DecryptionFailed, KeyDestroyed) as error:  # noqa: PERF203 - trying each app
            failures.append(error)
    # KeyDestroyed says the most (the data is gone on purpose); then DecryptionFailed.
    failures.sort(key=lambda error: (not isinstance(error, KeyDestroyed), isinstance(error, KeyNotFound)))
    return unreadable_result(value, failures[0])


def _candidate_instances() -> list[PII]:
    """PII instances to open a result with, the likeliest first."""
    from celery import current_app  # noqa: PLC0415 - only for results read outside a task

    running = _running.get()
    first = running.pii if running is not None else None
    if first is None:
        first = getattr(current_app._get_current_object(), _APP_ATTRIBUTE, None)  # noqa: SLF001
    ordered = [first] if first is not None else []
    ordered += [pii for pii in list(_instances) if pii is not first]
    if not ordered:
        msg = "a sealed result was read in a process where setup_pii() was never called"
        raise ConfigurationError(msg)
    return ordered


def _register_serializer(settings: Settings) -> PIISerializer:
    global _serializer  # noqa: PLW0603 - kombu's registry is process-global too
    if _serializer is None:
        _serializer = PIISerializer(
            settings.inner_serializer, seal_result=_seal_result_hook, open_result=_open_result_hook
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
    if settings.allow_plaintext:
        _serializer.legacy_json = True
    return _serializer


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
        accepted = {accepted} if isinstance(accepted, str) else set(accepted)
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
    existing = getattr(app, _APP_ATTRIBUTE, None)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    settings = settings_from_conf(app.conf)
    _check_celery_config(app, settings)
    keys = _key_manager(settings)
    _register_serializer(settings)
    pii = PII(app, settings, keys)
    setattr(app, _APP_ATTRIBUTE, pii)
    _instances.add(pii)
    original = app.amqp.create_task_message

    def create_task_message(task_id: str, name: str, *args: Any, **options: Any) -> Any:
        return pii._create_task_message(original, task_id, name, *args, **options)  # noqa: SLF001

    app.amqp.create_task_message = create_task_message
    _hook_registry(app, pii)
    app.steps["consumer"].add(make_quarantine_step(CONTENT_TYPE, _quarantine_queue_of, _on_parked))
    imports = tuple(app.conf.imports or ())
    if "celery_pii.tasks" not in imports:
        app.conf.imports = (*imports, "celery_pii.tasks")
    _install_logging_filter()
    return pii


def get_pii(app: Celery) -> PII:
    """The :class:`PII` object ``setup_pii(app)`` returned.

    Raises:
        ConfigurationError: ``setup_pii`` was not called for this app.
    """
    found = getattr(app, _APP_ATTRIBUTE, None)
    if found is None:
        msg = "celery-pii is not set up for this app; call celery_pii.setup_pii(app)"
        raise ConfigurationError(msg)
    return found  # type: ignore[no-any-return]


def _on_parked(app: Any, task_id: str, reason: str) -> None:
    found = getattr(app, _APP_ATTRIBUTE, None)
    if found is not None:
        found._audit_quietly("tamper_detected", "?", task_id, reason=reason)  # noqa: SLF001


def _quarantine_queue_of(app: Any) -> str | None:
    found = getattr(app, _APP_ATTRIBUTE, None)
    return None if found is None else found.settings.quarantine_queue


def _key_manager(settings: Settings) -> KeyManager:
    master = load_master_key(settings.master_key, settings)
    previous = None
    if settings.previous_master_key is not None:
        previous = load_master_key(settings.previous_master_key, settings, setting="pii_previous_master_key")
    store = KeyStore(settings.key_store_url, connect_timeout=settings.key_store_connect_timeout)
    keys = KeyManager(
        store,
        master,
        algorithm=settings.algorithm,
        rotation_interval=settings.rotation_interval,
        rotation_max_messages=settings.rotation_max_messages,
        max_key_versions=settings.max_key_versions,
        cache_ttl=settings.key_cache_ttl,
        actor=settings.actor,
        previous_master=previous,
    )
    if _store_checks_deferred:
        return keys
    try:
        keys.check_master_key()
    except KeyStoreUnavailable as error:
        msg = (
            f"settings pii_key_store_url / pii_master_key: the key store at {store.url} or the "
            f"master key's KMS cannot be reached ({error})"
        )
        raise ConfigurationError(msg) from None
    return keys


# -- logging -------------------------------------------------------------------------------------


def _current_scrubbing() -> tuple[Scrubber | None, bool]:
    running = _running.get()
    if running is None:
        return None, False
    return running.scrubber, running.is_pii


_FILTER = RedactingFilter(_current_scrubbing)


def _install_logging_filter() -> None:
    for name in _CELERY_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


@signals.after_setup_logger.connect(weak=False)
@signals.after_setup_task_logger.connect(weak=False)
def _filter_handlers(logger: logging.Logger | None = None, **_: Any) -> None:
    # Handler-level too: records of user task loggers propagate to these.
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


@signals.task_postrun.connect(weak=False)
def _task_finished(**_: Any) -> None:
    _running.set(None)
