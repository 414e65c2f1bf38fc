"""The :class:`PII` object of one app: publishing, opening, results, operations.

``setup_pii`` (``_celery.py``) creates one per app and routes Celery's hooks to
it: ``create_task_message`` calls :meth:`PII._create_task_message` (seal),
each task's ``before_start`` calls :meth:`PII._open` (open, or retry, refuse,
quarantine), and the result serializer calls :meth:`PII.seal_result`.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, NoReturn

from celery import Celery
from celery.app.annotations import prepare as prepare_annotations
from celery.app.task import Context, Task
from celery.exceptions import Reject, Retry
from sqlalchemy.exc import SQLAlchemyError

from . import _context, _envelope
from ._config import Settings
from ._context import EndedTask, RunningTask
from ._detect import Finding, detect, shown_path
from ._errortrackers import scrub_sentry_events
from ._keys import KeyManager, KeySpec
from ._paths import Binder, Location, get_at, replace_in_copies, set_all_in_place
from ._quarantine import origin, park
from ._redact import REDACTED, Scrubber, redacted_repr
from ._retention import RetentionReport, enforce
from ._sealer import (
    EMBED_KEY,
    MARKER,
    Opened,
    Sealed,
    Sealer,
    derived_key_spec,
    field_path,
    has_canvas,
    hide_in_step_shadows,
    is_marker,
    step_holds_marker,
    steps_hold_markers,
    withheld_outcome,
)
from ._serializer import CONTENT_ENCODING, CONTENT_TYPE, PIISerializer, PublishTicket, publish_ticket
from ._specs import TaskSpec, default_spec, spec_for_task
from ._store import aware, utcnow
from ._taskclass import call_target, install_opening, wrap_instance_run
from .exceptions import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
    PIIError,
)

__all__ = ["PII"]

logger = logging.getLogger("celery_pii")


class PII:
    """celery-pii for one app: ``setup_pii(app)`` returns it, ``get_pii(app)`` finds it."""

    def __init__(self, app: Celery, settings: Settings, keys: KeyManager, serializer: PIISerializer) -> None:
        self.app = app
        self.serializer = serializer
        self.settings = settings
        self.keys = keys
        self.specs: dict[str, TaskSpec] = {}
        # Names of the tasks registered here, PII or not (see register_missed).
        self._registered: set[str] = set()
        self.sealer = Sealer(keys, settings, self._lookup, self._parameters)
        # Celery stores a task's arguments with its outcome (result_extended), some of
        # them after the task ended: where values were opened is then put back to markers.
        self.stores_arguments = bool(app.conf.result_extended)
        self._parameter_binders: dict[str, Binder] = {}
        #: Undeclared PII seen on publish in "warn" mode, by (task name, category).
        self.detections: collections.Counter[tuple[str, str]] = collections.Counter()
        # Attempts to open each task id this process put off (outage, quarantine refused),
        # for the backoff: the copies it publishes keep their retry count (see _retry_unopened).
        self._put_off: dict[str, int] = {}

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

        Raises:
            ConfigurationError: ``now`` without a time zone.
        """
        return enforce(self.keys.destroy_expired, aware(now, "PII.enforce_retention: now") or utcnow())

    def rotate_keys(self, now: datetime | None = None, *, max_keys: int = 10_000) -> dict[str, Any]:
        """Rotate due keys and trim versions beyond ``pii_max_key_versions`` (one bounded run).

        Returns:
            A report of counts and key ids (no values).

        Raises:
            ConfigurationError: ``now`` without a time zone.
        """
        rotated = self.keys.perform_automatic_rotation(aware(now, "PII.rotate_keys: now"), max_keys=max_keys)
        trimmed = self.keys.enforce_max_versions()
        return {
            "rotated": len(rotated),
            "rotated_key_ids": rotated,
            "destroyed_versions": len(trimmed),
            "complete": len(rotated) < max_keys,
        }

    # -- task registry ------------------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[bool, TaskSpec | None]:
        tasks = self.app._tasks  # noqa: SLF001 - the raw registry (``app.tasks`` may refuse to finalize)
        task = tasks.get(name)
        if task is None and not self.app.finalized and self.app.autofinalize:
            # ``send_task`` before anything finalized the app: its tasks are still pending.
            self.app.finalize(auto=True)
            task = tasks.get(name)
        if task is None:
            return False, None
        spec = self.specs.get(name)
        if spec is None and name not in self._registered:
            # Put in the registry past its hook: its pii_fields were never read, and its
            # declared fields would go out in plaintext.
            self._register_missed(task)
            spec = self.specs.get(name)
        if spec is None and self.settings.detect != "off":
            spec = default_spec(name, self.settings)
        return True, spec

    def register_missed(self) -> None:
        """Register the app's tasks that reached its registry past celery-pii's hook.

        Every registration goes through ``TaskRegistry.__setitem__``, which
        celery-pii hooks; a task put there another way (``dict.__setitem__``,
        another extension's registry) would run without its opening step, and
        be published with its declared fields in plaintext.  Called when a
        worker starts, and for a task published before it is registered.
        """
        for name, task in list(self.app._tasks.items()):  # noqa: SLF001 - as _lookup
            if name not in self._registered:
                self._register_missed(task)

    def _register_missed(self, task: Any) -> None:
        logger.warning("celery-pii: task %s was registered past celery-pii's hook; registered now", task.name)
        self._register(task)
        wrap_instance_run(task)

    def _parameters(self, name: str) -> Binder | None:
        """The parameters of a registered task's function (to name places as ``pii_fields`` does)."""
        binder = self._parameter_binders.get(name)
        if binder is None:
            task = self.app._tasks.get(name)  # noqa: SLF001 - as _lookup
            if task is None:  # sent by name to a task this process does not have: nothing to name
                return None
            spec = self.specs.get(name)
            binder = (
                spec.binder
                if spec is not None and spec.binder is not None
                else Binder(call_target(task.run), [], task=name)
            )
            self._parameter_binders[name] = binder  # one per registered task
        return binder

    def _register(self, task: Any) -> None:
        self._registered.add(task.name)
        spec = spec_for_task(task, self.settings, prepare_annotations(self.app.conf.task_annotations))
        if spec is not None:
            self.specs[spec.name] = spec
            if spec.retention.is_immediate:
                # delete_immediately(): nothing of the outcome is ever stored.
                type(task).ignore_result = True
        install_opening(type(task), is_pii=spec is not None and spec.is_pii)

    # -- publish -------------------------------------------------------------------------------

    def _create_task_message(self, original: Any, task_id: str, name: str, *args: Any, **options: Any) -> Any:
        call = _Call(task_id, name, args, options)
        root = call.root()
        bound_id = str(task_id)  # apply_async(task_id=uuid.uuid4()) gives a UUID; envelopes bind text
        carried = _context.carried.get()
        # The retry of a message this process could not open (key store down, quarantine
        # refusing it): its markers stand for the envelopes it carries on (if any).
        is_carried = carried is not None and carried[0] == bound_id
        tokens: list[str] = list(carried[1]) if is_carried and carried is not None else []
        running = _context.running.get()
        # Sent for a task that is not running here: the errbacks a worker's main process
        # publishes after a hard time limit or Reject.  That process never opened their
        # sealed values, so they go out with their markers (the receiving worker parks
        # them), not refused as a client's marker text is.  So do the steps of a
        # redelivered task that did not open (see _redelivery.py).
        on_behalf_of_a_task = call.options.get("parent_id") is not None and (
            running is None or running.steps_unopened
        )
        # Published from inside a PII task (a chain step gets its return value,
        # callbacks too): anything in the call may be derived from PII.
        derived = running is not None and (running.is_pii or bool(running.values))
        source_key = running.publish_source if running is not None and derived else None
        sealed = self.sealer.seal_message(
            name,
            bound_id,
            root,
            seal_all=derived,
            derived_from=source_key,
            keep_markers=is_carried or on_behalf_of_a_task,
        )
        _, spec = self._lookup(name)
        display = root
        if sealed is not None:
            root = display = _hide_in_shadows(call, root, sealed)
            if sealed.token is not None:
                tokens.append(sealed.token)
            tokens.extend(sealed.step_tokens)
            if sealed.detected or sealed.truncated:
                display = self._report_detected(name, sealed)
        self._check_headers(name, spec, call.options)
        if spec is not None and not spec.declared_names.isdisjoint(call.options):
            _refuse_arguments_among_options(name, spec, call.options)
        if self.settings.redact_headers and (tokens or (spec is not None and spec.is_pii)):
            maxsize = self.app.amqp.argsrepr_maxsize
            call.options["argsrepr"] = redacted_repr(tuple(display["args"]), maxsize)
            call.options["kwargsrepr"] = redacted_repr(display["kwargs"], self.app.amqp.kwargsrepr_maxsize)
        message = original(**call.arguments(root))
        if tokens:
            message.body[2][EMBED_KEY] = tokens
        # With msgpack, a bytes key where field paths or detection look is refused (see _serializer).
        paths_matter = spec is not None or bool(tokens) or has_canvas(root)
        publish_ticket.set(PublishTicket(message.body, name, paths_matter))
        return message

    def _report_detected(self, name: str, sealed: Sealed) -> dict[str, Any]:
        """Log and count undeclared PII ("warn"), and redact it from the reprs either way."""
        unsealed = [(loc, category) for loc, category in sealed.detected if loc not in sealed.locations]
        binder = self._parameters(name)
        for location, category in unsealed:
            self.detections[(name, category)] += 1
            logger.warning(
                "celery-pii: task %s: undeclared PII (%s) at %s published in plaintext; "
                "declare it in pii_fields or set pii_detect='encrypt'",
                name,
                category,
                field_path(binder, location),
            )
        if sealed.truncated and not sealed.tokens:
            logger.warning("celery-pii: task %s: payload too large to scan fully for PII", name)
        located = [loc for loc, _ in unsealed if loc[0] in ("args", "kwargs")]
        return replace_in_copies(sealed.root, located, REDACTED) if located else sealed.root

    def _check_headers(self, name: str, spec: TaskSpec | None, options: dict[str, Any]) -> None:
        """Report (``warn``) or refuse (``encrypt``, ``refuse``) PII that detection finds in message headers.

        What a call gives that travels as a header (``task_id=``, ``group_id=``,
        ``shadow=``, ``apply_async(headers=...)`` and stamps) is never sealed,
        and events, ``inspect``, logs and the result backend's keys show the
        ids and the name: "encrypt" cannot seal them, so it refuses them as
        "refuse" does.
        """
        mode = spec.detect if spec is not None else self.settings.detect
        if mode == "off":
            return
        for where, value in _headers_of_call(options).items():
            categories = sorted({finding.category for finding in detect(value)})
            if not categories:
                continue
            if mode == "warn":
                self.detections[(name, categories[0])] += 1
                logger.warning(
                    "celery-pii: task %s: PII (%s) in %s published in plaintext; "
                    "headers are never sealed: pass it as an argument",
                    name,
                    ", ".join(categories),
                    where,
                )
                continue
            msg = (
                f"task {name!r}: {where} holds PII ({', '.join(categories)}); headers are "
                f"never sealed: pass it as an argument (pii_detect={mode!r}); nothing published"
            )
            raise EncryptionFailed(msg)

    def detect(self, value: object) -> list[Finding]:
        """The PII in a JSON-like value, by field path and category (see docs/detection.md).

        Paths are relative to ``value``; a string value itself has the path ``""``.
        """
        return detect(value)

    # -- consume -------------------------------------------------------------------------------

    def _open(self, task: Task, task_id: str, args: Any, kwargs: Any) -> None:
        request = task.request
        if not _context.first_opening(request):
            # A task class subclassing another registered one inherits its opening
            # step too (chained, or called through super()): once per run is all.
            return
        task_id = str(task_id)  # kombu's JSON envelope reads an id sent as a UUID back as one
        outer = _context.enter(request)
        if outer is None and _context.eager_outputs_seen and _context.applying.get():
            # A chain's next step run eagerly (chain.apply()), given a PII task's return value.
            outer = _context.eager_source(args, kwargs)
        name = task.name
        spec = self.specs.get(name)
        tokens = getattr(request, EMBED_KEY, None)
        values: list[Any] = []
        message_keys: Sequence[tuple[str, int]] = ()
        carried_keys: Sequence[tuple[str, int]] = ()
        opened_at: Sequence[Location] = ()
        arrived_unsealed = False
        if tokens:
            opened = self._open_message(task, task_id, _message_root(request, args, kwargs), tokens)
            # Kept to put the markers back when the task ends: Celery may use the request's
            # arguments after it (result_extended, the errbacks of Reject on solo and threads).
            values, message_keys, opened_at = opened.values, opened.own_keys, opened.locations
            carried_keys = opened.carried_keys
            setattr(request, EMBED_KEY, None)
        else:
            values, arrived_unsealed = self._values_without_envelope(task, task_id, spec, args, kwargs)
        is_pii = spec is not None and spec.is_pii
        if not (is_pii or values):
            _context.running.set(outer)  # inside a PII task, its outcome may be derived from that PII
            return
        if outer is not None:  # its logs and errors hide the outer task's values too
            values = [*values, *outer.values]
        result_key = None if message_keys else self._unsealed_result_key(name, spec, args, kwargs, outer)
        running = RunningTask(
            self,
            name,
            task_id,
            spec,
            values,
            result_key,
            message_keys,
            request,
            task.request_stack,
            opened_at=opened_at,
            carried_keys=carried_keys,
        )
        _context.start(running)
        scrub_sentry_events(running)
        if arrived_unsealed:
            # Every publish path of a PII app seals declared fields, so this message
            # bypassed celery-pii.  Refused (its outcome is stored sealed: the context is set).
            # Not parked: the quarantine would keep its plaintext on the broker.
            logger.error(
                "celery-pii: task %s[%s]: declared PII fields arrived unsealed; not run "
                "(published without celery-pii? pii_allow_plaintext admits this during a rollout)",
                name,
                task_id,
            )
            self._audit_quietly("tamper_detected", name, task_id, reason="declared fields arrived unsealed")
            raise DecryptionFailed

    def _unsealed_result_key(
        self, name: str, spec: TaskSpec | None, args: Any, kwargs: Any, outer: RunningTask | None
    ) -> KeySpec | None:
        """The key a run that came without a sealed message stores its outcome under, found now.

        Results are sealed under the message's own key (its subject, its
        retention bucket), so they become unreadable together.  Without one,
        a subject's key depends on this call's arguments: found now, before
        the task function can change them; other keys are found on first use
        (``None``).
        """
        result_key = None
        if spec is not None and spec.subject is not None:
            result_key = self._result_key(name, spec, args, kwargs)
        elif _context.applying.get():
            # An eager map/starmap/chunks of a PII task: its results are that task's.
            items = self.sealer.items_called(name, {"args": args, "kwargs": kwargs})
            result_key = items[1] if items is not None else None
        if outer is None:
            return result_key
        own = result_key or (spec.key_spec if spec is not None else KeySpec(self.settings.default_key))
        if outer.result_key is not None:
            # Run eagerly inside a PII task (``apply()``): what it was given may be the
            # outer task's subject's data, so its result and what it publishes take that
            # subject and retention bucket too (and are refused once that key is destroyed).
            return derived_key_spec(own, outer.result_key)
        if outer.values:
            # Given what an eager run holding a later step's values returned (the plain
            # steps of an eager chain): on a worker that run's message to this step is
            # sealed whole, under the carried step's key, and so is this step's outcome.
            return own
        return result_key

    def _open_message(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> Opened:
        """Open the message's envelopes into ``root``; a marker left after that is never run on."""
        opened = self._open_or_handle(task, task_id, root, tokens)
        if _holds_markers(root):
            # A marker no envelope opened (an errback a worker's main process sent with
            # the markers it never opened, beside a value sealed afresh).  Sealed again
            # as it came, then parked.
            set_all_in_place(root, opened.locations, [MARKER] * len(opened.locations))
            self._refuse_unopenable(task, task_id, root, tokens)
        return opened

    def open_redelivered_steps(
        self, task: Task, task_id: str, args: Any, kwargs: Any, request: dict[str, Any]
    ) -> Opened | None:
        """Open the envelopes of a redelivered message whose steps Celery sends without running the task.

        See ``_redelivery.py``.  ``None`` when they do not open: the steps go
        out with their markers and the worker given one parks it, rather than
        Celery putting the message back again and again.
        """
        tokens = request.get(EMBED_KEY)
        if not tokens:
            return Opened()
        root = _message_root(Context(request), args, kwargs)
        try:
            return self.sealer.open_message(task.name, task_id, root, tokens)
        except Exception as error:  # noqa: BLE001 - whatever the cause, the message stays sealed as it came
            logger.warning(  # the type says enough; a traceback could show SQL
                "celery-pii: the steps of redelivered task %s[%s] did not open (%s): sent as they came",
                task.name,
                task_id,
                type(error).__name__,
            )
            return None

    def marked_call(self, name: str, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """``(args, kwargs)`` of a call of task ``name`` with the marker at its declared fields (copies).

        ``None`` for a task without declared fields here.
        """
        spec = self.specs.get(name)
        if spec is None or spec.binder is None or not isinstance(kwargs, dict):
            return None
        locations = spec.binder.locate_apart(args or (), kwargs)[0]
        marked = replace_in_copies({"args": args or (), "kwargs": kwargs}, locations, MARKER, sealing=True)
        return marked["args"], marked["kwargs"]

    def _values_without_envelope(
        self, task: Task, task_id: str, spec: TaskSpec | None, args: Any, kwargs: Any
    ) -> tuple[list[Any], bool]:
        """The values a call with no envelope holds open, and whether declared ones arrived unsealed.

        Its own declared values (:meth:`_unsealed_values`) and, for an eager
        call of any task, the declared values of the steps it carries, and of
        the chain or chord it is a step of, as a worker knows them from the
        envelopes: Celery calls an errback taking the request in this task's
        context, on the errback's own fields.
        """
        values: list[Any] = []
        arrived_unsealed = False
        if spec is not None and spec.binder is not None:
            values, arrived_unsealed = self._unsealed_values(task, task_id, spec.binder, args, kwargs)
        if _context.applying.get():
            values += self.sealer.values_in_steps(_message_root(task.request, args, kwargs))
            values += _context.eager_canvas_values.get()
            items = self.sealer.items_called(task.name, {"args": args, "kwargs": kwargs})
            if items is not None:  # celery.map & co. calling a PII task on each item
                values += items[0]
        return values, arrived_unsealed

    def _unsealed_values(
        self, task: Task, task_id: str, binder: Binder, args: Any, kwargs: Any
    ) -> tuple[list[Any], bool]:
        """Declared values of a call with nothing sealed, and whether they arrived unsealed.

        An eager call (``task.apply()`` never serializes) or a plaintext message
        of a rollout: the values are what the scrubber and the logging filter
        must hide.  Anything else arrived unsealed, bypassing celery-pii.
        """
        located = binder.locate_apart(args, kwargs)[1]
        eager = _context.applying.get()  # never the request's is_eager: a message's embed sets it
        if eager:  # its arguments never travelled: a marker in them is the caller's own text
            return list(located), False
        values = [value for value in located if not is_marker(value)]
        if len(values) != len(located):  # sealed values whose envelope is gone: never run on markers
            self._refuse_unopenable(task, task_id, _message_root(task.request, args, kwargs), [])
        return values, bool(values) and not self.settings.allow_plaintext

    def _open_or_handle(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> Opened:
        name = task.name
        try:
            if not isinstance(tokens, (list, tuple)):  # a forged body: not a list of envelopes
                raise DecryptionFailed  # noqa: TRY301 - handled below like every failure to open
            opened = self.sealer.open_message(name, task_id, root, tokens)
        except KeyStoreUnavailable as error:  # the database or the master key's KMS (the text says which)
            countdown = self._retry_countdown(task_id)
            logger.warning("celery-pii: %s; task %s[%s] retried in %ss", error, name, task_id, countdown)
            raise self._retry_unopened(task, task_id, tokens, countdown) from None
        except ConfigurationError as error:
            # The master key cannot be used (a KMS key disabled or scheduled for deletion,
            # access revoked): an operator must act, and the message is kept until they have.
            countdown = self._retry_countdown(task_id)
            logger.error(  # noqa: TRY400 - the message names the setting; a traceback adds nothing
                "celery-pii: %s; task %s[%s] not opened, retried in %ss", error, name, task_id, countdown
            )
            raise self._retry_unopened(task, task_id, tokens, countdown) from None
        except SQLAlchemyError as error:
            # Not an outage (a missing table, a permission revoked): an operator must
            # act, and the message, which may be sound, is kept until they have.
            countdown = self._retry_countdown(task_id)
            logger.error(  # noqa: TRY400 - the traceback would show SQL, never needed here
                "celery-pii: key store error (%s) while opening task %s[%s]; retried in %ss",
                type(error).__name__,
                name,
                task_id,
                countdown,
            )
            raise self._retry_unopened(task, task_id, tokens, countdown) from None
        except KeyDestroyed as error:
            # Filed under the message's own key (the reason names the destroyed one, which
            # is that key but for a canvas step's), so its audit trail shows the refusal.
            self._audit_quietly("decrypt_denied", name, task_id, reason=str(error), key_ids=_key_ids(tokens))
            _drop_errbacks_on_markers(task)
            raise
        except (DecryptionFailed, KeyNotFound):
            self._refuse_unopenable(task, task_id, root, tokens)
        if self._put_off:
            self._put_off.pop(task_id, None)  # opened at last
        return opened

    def _refuse_unopenable(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> NoReturn:
        """The task does not run: its message is parked, or, if the broker does not take it, kept."""
        _drop_errbacks_on_markers(task)
        if not self._quarantine(task, task_id, root, tokens):
            # Not parked: publish it again rather than drop it; parking is tried again then.
            raise self._retry_unopened(task, task_id, tokens, self._retry_countdown(task_id)) from None
        raise DecryptionFailed from None

    def _retry_countdown(self, task_id: str) -> float:
        """Seconds until the next attempt: doubling per attempt put off here, at most ten times the setting.

        Counted per process (a copy may reach another worker, which starts again at the setting).
        """
        if len(self._put_off) >= _PUT_OFF_LIMIT:
            self._put_off.clear()
        attempts = self._put_off.get(task_id, 0)
        self._put_off[task_id] = attempts + 1
        delay = self.settings.key_unavailable_retry_delay
        return float(min(delay * 2 ** min(attempts, 10), delay * 10))

    def _retry_unopened(self, task: Task, task_id: str, tokens: Any, countdown: float) -> Retry:
        """Publish the message again as it came (sealed), to run in ``countdown`` seconds.

        What ``task.retry()`` does, except that the copy keeps its retry count
        and no ``max_retries`` applies: this is not the task failing, so it
        neither spends nor is limited by the task's own retries.  (``retry``
        with ``max_retries=`` would also leave ``override_max_retries`` on the
        task object, which autoretry reads in later runs.)
        """
        request = task.request
        carried = _context.carried.set((task_id, tuple(tokens) if isinstance(tokens, (list, tuple)) else ()))
        try:
            again = task.signature_from_request(request, countdown=countdown, retries=request.retries or 0)
            try:
                again.apply_async()
            except Exception as error:  # noqa: BLE001 - as Task.retry: the broker refused the copy
                raise Reject(error, requeue=False) from None
        finally:
            _context.carried.reset(carried)
        return Retry(when=countdown, sig=again)

    def _quarantine(self, task: Task, task_id: str, root: dict[str, Any], tokens: Any) -> bool:
        """Park the still-sealed message and record why; the task does not run.

        Returns:
            False if the broker did not take it (nothing was parked).
        """
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
            "argsrepr": getattr(request, "argsrepr", None),
            "kwargsrepr": getattr(request, "kwargsrepr", None),
        }
        # What decides how a replayed copy runs (when, until when, how long, under which name).
        for header in _REPLAYED_HEADERS:
            value = getattr(request, header, None)
            if value is not None:
                headers[header] = value
        delivery = request.delivery_info or {}
        try:
            encoded = self._encode_trusted(body, task.name)
        except (TypeError, ValueError, RecursionError, EncryptionFailed):
            # Edited on the broker past what can be written again (nested too deep to encode
            # here): nothing can be parked, and Celery cannot publish it again either.
            logger.error(  # noqa: TRY400 - the traceback would show only the encoder's recursion
                "celery-pii: task %s[%s] failed authentication and cannot be encoded to be parked; not run",
                task.name,
                task_id,
            )
            self._audit_quietly(
                "tamper_detected",
                task.name,
                task_id,
                key_ids=_key_ids(tokens),
                reason="not parked: unencodable",
            )
            return True
        try:
            park(
                self.app,
                self.settings.quarantine_queue,
                body=encoded,
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                headers=headers,
                reason="authentication failed",
                original=origin(
                    delivery, {"reply_to": request.reply_to, "correlation_id": request.correlation_id}
                ),
            )
        except Exception:  # reported; the task still must not run
            logger.exception("celery-pii: could not park task %s[%s] in quarantine", task.name, task_id)
            return False
        key_ids = _key_ids(tokens)
        logger.error(
            "celery-pii: task %s[%s] failed authentication (key %s); parked in %s, not run",
            task.name,
            task_id,
            ", ".join(key_ids) or "?",
            self.settings.quarantine_queue,
        )
        self._audit_quietly("tamper_detected", task.name, task_id, key_ids=key_ids)
        return True

    def _encode_trusted(self, body: Any, name: str) -> bytes:
        """Frame an already-sealed body of task ``name`` (for the quarantine: it needs no ticket)."""
        token = publish_ticket.set(PublishTicket(body, name, paths_matter=False))
        try:
            return self.serializer.dumps(body)
        finally:
            publish_ticket.reset(token)

    def _audit_quietly(self, operation: str, name: str, task_id: str, **details: Any) -> None:
        try:
            key_id = next(iter(details.get("key_ids") or ()), None)  # none: no envelope parsed
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

    def seal_late_result(self, obj: Any, ended: EndedTask) -> Any:
        """Seal what is stored for a PII task after it ended here (a thread it started); never raises.

        Celery stores some outcomes itself after a task's end (on the solo and
        threads pools): nothing may stop it recording them, so a key that cannot
        be had withholds the outcome rather than raise.
        """
        try:
            return self.seal_result(obj, ended)
        except PIIError as error:
            where = f"{ended.name}[{ended.task_id}]"
            logger.warning("celery-pii: task %s: outcome not stored: %s", where, error)
            return withheld_outcome(obj, f"the outcome of task {where} was not stored: {error}")

    def seal_result(self, obj: Any, running: RunningTask | EndedTask) -> Any:
        """Seal what the result backend stores for a running (or just ended) PII task."""
        if running.result_key is None:
            return obj
        task_id = _context.backend_row.get()  # a database backend row: its own task's id
        if task_id is None:
            task_id = obj.get("task_id", running.task_id) if isinstance(obj, dict) else running.task_id
        try:
            return self.sealer.seal_result(
                obj, task_id=str(task_id), key_spec=running.result_key, group=running.group
            )
        except KeyDestroyed as error:
            # The subject was erased, or the retention deadline passed, while the task
            # ran: its outcome must not be readable.  Raising here would leave Celery
            # nothing it can store (the failure is sealed under the same key), and a
            # solo or threads worker stops on that.
            logger.warning("celery-pii: task %s[%s]: outcome not stored: %s", running.name, task_id, error)
            return withheld_outcome(
                obj, f"the outcome of task {running.name}[{task_id}] was not stored: {error}"
            )


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

    @classmethod
    def check_matches(cls, as_task_v2: Callable[..., Any]) -> None:
        """Raise if Celery's ``as_task_v2`` no longer takes its arguments in the order named here.

        Celery passes them by position: another order would bind callbacks as
        errbacks, or a chain as a chord, and leave embedded steps unsealed.
        """
        names = tuple(inspect.signature(as_task_v2).parameters)[2 : 2 + len(cls._POSITIONAL)]  # after the ids
        if names != cls._POSITIONAL:
            msg = (
                "this Celery's AMQP.as_task_v2 takes its arguments in an order celery-pii does not know; "
                "install a Celery release celery-pii supports (setup.cfg)"
            )
            raise ConfigurationError(msg)

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


def check_task_message_arguments(app: Celery) -> None:
    """Raise ``ConfigurationError`` if this Celery builds task messages from arguments in another order."""
    _Call.check_matches(app.amqp.as_task_v2)


def _refuse_arguments_among_options(name: str, spec: TaskSpec, options: dict[str, Any]) -> None:
    """Raise if a declared field came as an ``apply_async`` option: ``notify.apply_async((7,), email=...)``.

    Options Celery does not know go to the broker as message properties,
    never sealed (Redis keeps them in plaintext); the task gets no such
    argument.  Celery's own options (which a field could be named like) pass.
    """
    misplaced = sorted(spec.declared_names.intersection(options) - _CELERY_OPTIONS)
    if misplaced:
        msg = (
            f"task {name!r}: PII field {misplaced[0]!r} was given as an apply_async option, which goes to "
            "the broker unsealed: pass it in args= or kwargs=; nothing published"
        )
        raise EncryptionFailed(msg)


# What Celery's apply_async and kombu's publish take as options themselves.
_CELERY_OPTIONS: Final = frozenset(
    (
        *_Call._POSITIONAL,  # noqa: SLF001 - as_task_v2's own, by position
        *("task_id", "name", "ignore_result", "argsrepr", "kwargsrepr", "stamped_headers", "origin"),
        *("replaced_task_nesting", "queue", "exchange", "exchange_type", "routing_key", "priority"),
        *("headers", "serializer", "compression", "retry", "retry_policy", "declare", "delivery_mode"),
        *("producer", "connection", "link", "link_error", "publisher", "add_to_parent", "mandatory"),
        *("immediate", "content_type", "content_encoding", "expiration", "timeout", "confirm_timeout"),
    )
)


#: The options of a call Celery sends as message headers of their own (``id``, ``group``, ``shadow``).
_HEADER_OPTIONS: Final = ("task_id", "group_id", "shadow")


def _headers_of_call(options: dict[str, Any]) -> dict[str, Any]:
    """What a call puts in the message's headers, by how errors name it (``shadow``, ``custom header ...``).

    The ids and shadow name it gives, ``headers={...}`` and Celery's stamps.
    """
    headers = {option: options[option] for option in _HEADER_OPTIONS if isinstance(options.get(option), str)}
    given = options.get("headers")
    custom = dict(given) if isinstance(given, dict) else {}
    stamps = options.get("stamped_headers")
    if isinstance(stamps, (list, tuple)):
        custom.update(
            (stamp, options[stamp]) for stamp in stamps if isinstance(stamp, str) and stamp in options
        )
    headers.update(
        (f"custom header {shown_path(('headers', header))}", value) for header, value in custom.items()
    )
    return headers


def _drop_errbacks_on_markers(task: Task) -> None:
    """A message that does not open fails its task: its errbacks holding markers are not called.

    Celery calls errbacks that take ``(request, exc, traceback)`` in this
    process, with the arguments as the message has them: sealed values whose
    key is destroyed (an erased subject's errback), or whose envelope is gone.
    """
    request = task.request
    errbacks = getattr(request, "errbacks", None)
    if not errbacks:
        return
    kept = []
    for errback in errbacks:
        if not step_holds_marker(errback):
            kept.append(errback)
            continue
        logger.warning(
            "celery-pii: task %s[%s]: errback %r not called: its arguments could not be opened",
            task.name,
            request.id,
            errback.get("task") if isinstance(errback, dict) else "?",
        )
    request.errbacks = kept


def _hide_in_shadows(call: _Call, root: dict[str, Any], sealed: Sealed) -> dict[str, Any]:
    """The sealed root, with the sealed values hidden in shadow names: the call's and its steps'.

    ``Task.shadow_name`` is given the call's arguments as they are, before
    anything is sealed, and the name it makes (or one the caller gives, to
    the call or to a step it carries) travels in plaintext: in a header, and
    as the task's name in logs, events and ``inspect``.
    """
    shadow = call.options.get("shadow")
    if not (sealed.locations and (shadow or has_canvas(sealed.root))):
        return sealed.root  # the common case: nothing to look at
    scrubber: Scrubber | None = None

    def scrubbing() -> Scrubber:
        nonlocal scrubber
        if scrubber is None:
            scrubber = Scrubber(get_at(root, location) for location in sealed.locations)
        return scrubber

    if isinstance(shadow, str) and shadow:
        call.options["shadow"] = scrubbing().text(shadow)
    return hide_in_step_shadows(sealed.root, scrubbing)


# Task ids whose put-off attempts a process remembers (then it forgets them all).
_PUT_OFF_LIMIT: Final = 10_000

# Protocol-2 headers a parked message keeps from its request, besides those it always has.
_REPLAYED_HEADERS: Final = ("eta", "expires", "timelimit", "shadow", "ignore_result", "origin")


def _holds_markers(root: dict[str, Any]) -> bool:
    """True if an argument of a received call, or of a step it carries, is the marker.

    (A sealed value whose envelope is elsewhere, or gone.)  ``in`` compares
    with ``==``: safe on a decoded message's plain data, and it runs for every task.
    """
    kwargs = root["kwargs"]
    return MARKER in root["args"] or (bool(kwargs) and MARKER in kwargs.values()) or steps_hold_markers(root)


def _message_root(request: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """The parts of a received task message that envelopes' locations point into."""
    return {
        "args": args,
        "kwargs": kwargs,
        "callbacks": request.callbacks,
        "errbacks": request.errbacks,
        "chain": request.chain,
        "chord": request.chord,
    }


def _key_ids(tokens: Any) -> list[str]:
    """The key ids named by envelopes that at least parse (for logs and audit), co-keys included."""
    ids: list[str] = []
    if not isinstance(tokens, (list, tuple)):  # a forged body
        return ids
    for token in tokens:
        try:
            keys = _envelope.parse(token).keys
        except DecryptionFailed:
            continue
        ids.extend(key_id for key_id, _ in keys)
    return ids
