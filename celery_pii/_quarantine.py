"""The quarantine queue: where messages that fail authentication are parked.

Celery acks and drops a message whose body cannot be decoded, and rejects one
of a refused content type (gone on Redis).  A body that decodes but is not a
protocol-2 task body (``[args, kwargs, embed]``) is worse: Celery's consumer
raises on it and the worker dies, then meets it again on every restart.  For
``pii`` messages a consumer bootstep parks all of these, byte for byte, in
``pii_quarantine_queue`` instead; the task-side opening step parks messages
whose envelope fails to authenticate.  Parked messages keep their original
body (still sealed) and headers, plus a ``x-celery-pii-quarantine`` header
naming the reason, the original routing and the time, and can be listed and
re-published with ``celery -A proj pii quarantine`` (:func:`list_parked`,
:func:`replay`, :func:`purge`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Final, NamedTuple
from uuid import UUID

from celery import bootsteps
from kombu.entity import Exchange, Queue
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import prepare_accept_content

__all__ = [
    "QUARANTINE_HEADER",
    "ReplayReport",
    "describe",
    "list_parked",
    "make_quarantine_step",
    "origin",
    "park",
    "purge",
    "quarantine_queue",
    "replay",
]

logger = logging.getLogger("celery_pii.quarantine")

QUARANTINE_HEADER: Final = "x-celery-pii-quarantine"
_MALFORMED: Final = "not a protocol-2 task message"
# Seconds the consumer waits before it requeues a message it could not park:
# the broker hands it straight back, and without a pause the worker would spin
# on it (thousands of attempts a second) for as long as parking fails.
REQUEUE_PAUSE: Final = 1.0


def quarantine_queue(name: str) -> Queue:
    """The durable queue (and its direct exchange) messages are parked in."""
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def park(  # noqa: PLR0913 - the parts of a raw message
    app: Any,
    queue_name: str,
    *,
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
    headers: Mapping[str, Any],
    reason: str,
    original: Mapping[str, Any] | None = None,
) -> None:
    """Publish a raw message to the quarantine queue, unchanged but for one header.

    Raises:
        kombu / transport errors when the broker cannot take it (the caller
        then must not ack the original).
    """
    queue = quarantine_queue(queue_name)
    meta = {
        "reason": reason,
        "parked_at": datetime.now(timezone.utc).isoformat(),
        "original": dict(original or {}),
    }
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            content_type=content_type,
            content_encoding=content_encoding,
            headers={**headers, QUARANTINE_HEADER: meta},
            retry=True,
        )


def origin(delivery_info: Mapping[str, Any] | None, properties: Mapping[str, Any]) -> dict[str, Any]:
    """Where a message came from, and the properties its replay must carry again.

    ``reply_to`` and ``correlation_id`` take an ``rpc://`` result back to its
    caller; ``priority`` orders it in a priority queue.
    """
    info = delivery_info or {}
    kept = {"exchange": info.get("exchange"), "routing_key": info.get("routing_key")}
    for name in _REPLAYED_PROPERTIES:
        value = properties.get(name, info.get(name))
        if value is not None:
            kept[name] = value
    return kept


# Message properties a parked message's replay carries again (see ``origin``).
_REPLAYED_PROPERTIES: Final = ("reply_to", "correlation_id", "priority")


def _replayed_properties(original: Mapping[str, Any]) -> dict[str, Any]:
    """The properties ``origin`` kept, those of the right type (a parked message can be edited too)."""
    return {name: original[name] for name in _REPLAYED_PROPERTIES if _well_typed(name, original.get(name))}


def _well_typed(name: str, value: object) -> bool:
    if name == "priority":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_PRIORITY
    return isinstance(value, str)


_MAX_PRIORITY: Final = 255  # AMQP's


def make_quarantine_step(
    content_type: str,
    queue_name: Callable[[Any], str | None],
    on_parked: Callable[[Any, str, str, str], None],
) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that parks undecodable, malformed and refused messages instead of losing them.

    Arguments:
        content_type: the ``pii`` content type (its undecodable and malformed messages, and those
            for a task the worker does not know, are parked).
        queue_name: ``app -> quarantine queue name``, or ``None`` if the app has no celery-pii.
        on_parked: ``(app, task name, task id, reason)``, called after parking (audit).
    """

    class QuarantineStep(bootsteps.StartStopStep):
        """Park instead of drop: ``pii`` messages that cannot run, and refused content."""

        label = "celery-pii quarantine"

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            name = queue_name(c.app)
            if name is None:
                return

            def parking(original: Callable[..., None], reason: str, ours: _Check) -> Callable[..., None]:
                """Celery's handler ``original(..., message, exc)``, but ``ours`` messages are parked."""

                def handle(*args: Any) -> None:
                    message, exc = args[-2], args[-1]
                    if ours(message, exc):
                        _park_or_requeue(c.app, name, message, reason, on_parked)
                    else:
                        original(*args)

                return handle

            def is_pii(message: Any, _exc: Exception) -> bool:
                return bool(message.content_type == content_type)

            # Set before the Tasks step builds its handler, which captures on_invalid_task
            # and on_unknown_task; the consumer loop calls create_task_handler when it starts.
            c.on_decode_error = parking(c.on_decode_error, "undecodable", is_pii)
            # Celery drops an invalid task message (an ``eta`` or ``expires`` header that is
            # no date): a pii one is parked, as a message edited on the broker.
            c.on_invalid_task = parking(
                parking(c.on_invalid_task, "invalid task message", is_pii),
                "content type not accepted",
                _is_refused_content,
            )
            # A sealed message for a task this worker does not know (its task header
            # changed, or routed to the wrong workers): Celery would reject it, and on
            # Redis it would be gone.  Parked, it can be replayed where it belongs.
            c.on_unknown_task = parking(c.on_unknown_task, "unknown task", is_pii)
            # Content the worker refuses, for a task it does not know (a producer not yet
            # on celery-pii, naming a renamed task): Celery would drop it and log its body
            # (plaintext arguments) at ERROR.  Parked, like refused content of known tasks.
            accepted = prepare_accept_content(c.app.conf.accept_content)
            c.on_unknown_task = parking(
                c.on_unknown_task,
                "content type not accepted",
                lambda message, _exc: message.content_type not in accepted,
            )
            original_create_task_handler = c.create_task_handler

            def create_task_handler(*args: Any, **kwargs: Any) -> Callable[[Any], None]:
                handler: Callable[[Any], None] = original_create_task_handler(*args, **kwargs)

                def on_task_received(message: Any) -> None:
                    # Celery's handler raises on a body of the wrong shape (the worker dies,
                    # the message is restored, and it kills every restart), or acks it as
                    # a failed task; so a pii message must be a protocol-2 one before it runs.
                    if message.content_type == content_type and _malformed(message):
                        _park_or_requeue(c.app, name, message, _MALFORMED, on_parked)
                        return
                    handler(message)

                return on_task_received

            c.create_task_handler = create_task_handler

    return QuarantineStep


# Which messages a parking handler takes: ``(message, exc) -> bool``.
_Check = Callable[[Any, Exception], bool]


def _is_refused_content(_message: Any, exc: Exception) -> bool:
    return isinstance(exc, ContentDisallowed)


def _malformed(message: Any) -> bool:
    """True for a message that is not ``task`` and ``id`` headers + ``[args, kwargs, embed]`` body.

    celery-pii publishes protocol 2 only.  The body is decoded here once, as
    Celery's strategy would (kombu keeps it), so a good message costs a few
    ``isinstance`` checks.  A body that does not decode is left to Celery's
    handler, which calls ``on_decode_error`` (parked as undecodable).  What is
    checked is what Celery's consumer and tracer use without checking, where a
    wrong type kills the worker: the two headers (a dict key, an id), the
    body's shape and the canvas steps it embeds.
    """
    headers = message.headers
    if not (isinstance(headers, dict) and _is_name(headers.get("task")) and _is_id(headers.get("id"))):
        return True
    try:
        body = message.payload
    except (DecodeError, ContentDisallowed):
        return False
    return not (
        isinstance(body, (list, tuple))
        and len(body) == 3  # args, kwargs, embed
        and isinstance(body[0], (list, tuple))
        and isinstance(body[1], dict)
        and isinstance(body[2], dict)
        and _is_canvas(body[2])
    )


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_id(value: object) -> bool:
    # kombu's JSON envelope (Redis) reads an id sent as a UUID back as one.
    return _is_name(value) or isinstance(value, UUID)


def _is_canvas(embed: Mapping[str, Any]) -> bool:
    """The embedded steps are absent or signatures: lists of them, and one for ``chord``."""
    steps = [embed.get("chord")]
    for part in ("callbacks", "errbacks", "chain"):
        listed = embed.get(part)
        if listed is not None and not isinstance(listed, (list, tuple)):
            return False
        steps.extend(listed or ())
    return all(step is None or (isinstance(step, dict) and _is_name(step.get("task"))) for step in steps)


def _park_or_requeue(
    app: Any, name: str, message: Any, reason: str, on_parked: Callable[[Any, str, str, str], None]
) -> None:
    headers = dict(message.headers) if isinstance(message.headers, dict) else {}
    task_id = str(headers.get("id", "?"))
    task = str(headers.get("task", "?"))
    try:
        park(
            app,
            name,
            body=message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=headers,
            reason=reason,
            original=origin(
                getattr(message, "delivery_info", None), getattr(message, "properties", None) or {}
            ),
        )
    except Exception:
        # Parking failed: keep the message rather than lose it.
        logger.exception("celery-pii: could not park message %r[%r]; requeued", task, task_id)
        time.sleep(REQUEUE_PAUSE)
        message.reject(requeue=True)
        return
    # The body is never logged: it may be plaintext (refused content) or sealed.  The
    # headers are as the broker gave them: quoted, they cannot forge a line or a terminal.
    logger.error("celery-pii: message %r[%r] parked in %s: %s", task, task_id, name, reason)
    message.ack()
    on_parked(app, task, task_id, reason)


def _held(queue_name: str, connection: Any) -> list[Any]:
    """Every message of the quarantine queue, held unacknowledged on one channel."""
    bound = quarantine_queue(queue_name)(connection.default_channel)
    bound.declare()
    held = []
    while (message := bound.get(no_ack=False)) is not None:
        held.append(message)
    return held


def describe(message: Any) -> dict[str, Any]:
    """Metadata of a parked message: ids, task, reason, routing — never the body."""
    headers = dict(message.headers or {})
    meta = headers.get(QUARANTINE_HEADER) or {}
    return {
        "id": headers.get("id"),
        "task": headers.get("task"),
        "reason": meta.get("reason"),
        "parked_at": meta.get("parked_at"),
        "original": meta.get("original") or {},
        "content_type": message.content_type,
        "bytes": len(message.body or b""),
    }


def list_parked(app: Any, queue_name: str) -> list[dict[str, Any]]:
    """Describe every parked message; they all stay in the quarantine."""
    with app.connection_for_write() as connection:
        held = _held(queue_name, connection)
        try:
            return [describe(message) for message in held]
        finally:
            for message in held:
                message.requeue()


class ReplayReport(NamedTuple):
    """What a replay did: the task ids re-published, those left parked with why, and why it stopped."""

    replayed: list[str]
    left_parked: list[tuple[str, str]]
    #: Why the replay stopped before the end (the broker connection was lost), if it did.
    interrupted: str | None = None


def replay(app: Any, queue_name: str, ids: set[str] | None = None) -> ReplayReport:
    """Re-publish parked messages (all, or those with the given task ids) to where they came from.

    The body goes back byte for byte with its original headers; the message
    is removed from the quarantine only once the broker has taken it and
    routed it to a queue (RabbitMQ: ``mandatory`` and publisher confirms).  One
    with nowhere to go (its queue deleted, its exchange gone) stays parked and
    is reported; the others are replayed.  Messages are taken one at a time,
    as many as were parked when the replay began (one parked again meanwhile
    is not replayed twice): a replay of the whole quarantine holds one message
    at a time, whatever its size.  Those not asked for, or left parked, are
    held until the end (so that each is seen once), then put back.

    A lost connection stops the replay (what it had not taken stays parked).
    It is not reconnected: a publish retried on a new connection, then
    acknowledged on the dead one, left the message both replayed and parked,
    and the next replay ran it again.
    """
    replayed: list[str] = []
    left_parked: list[tuple[str, str]] = []
    interrupted: str | None = None
    # Confirms: the broker says it took each message (and, before that, if it could not route it).
    with app.connection_for_write(transport_options={"confirm_publish": True}) as connection:
        bound = quarantine_queue(queue_name)(connection.channel())
        bound.declare()
        publisher = _Publisher(app, connection)
        passed: list[Any] = []
        try:
            for message, task_id in _each_parked(bound):
                if ids is not None and task_id not in ids:
                    passed.append(message)
                    continue
                try:
                    refused = publisher.republish(message)
                    if refused is None:
                        message.ack()
                except connection.connection_errors as error:
                    # The broker gives back what this connection held unacknowledged.
                    interrupted = (
                        f"the broker connection was lost ({type(error).__name__}) while replaying {task_id}, "
                        f"which may have been published as well as left parked"
                    )
                    break
                if refused is None:
                    replayed.append(task_id)
                else:
                    passed.append(message)
                    left_parked.append((task_id, refused))
        finally:
            with contextlib.suppress(*connection.connection_errors):  # lost: the broker requeued them
                for message in passed:
                    message.requeue()
            publisher.close()
    return ReplayReport(replayed, left_parked, interrupted)


def _each_parked(bound: Any) -> Iterator[tuple[Any, str]]:
    """Parked messages and their task ids, one at a time (unacknowledged), as many as were parked at first.

    One parked again meanwhile is not seen twice.
    """
    # Not passive: Redis knows no queue whose list is empty, and a passive declare of one fails.
    parked = bound.queue_declare().message_count
    for _ in range(parked):
        message = bound.get(no_ack=False)
        if message is None:
            return
        yield message, str(describe(message)["id"])


class _Publisher:
    """Publishes parked messages back on a channel of its own, and says when the broker could not route one.

    Its own channel: a publish the broker refuses (an exchange that no longer
    exists) closes the channel it was made on, and with it the parked message
    held there, whose acknowledgement was then lost after a false success.
    """

    def __init__(self, app: Any, connection: Any) -> None:
        self.app = app
        self.connection = connection
        self.returned = False  # set by the broker's basic.return, before it confirms
        self.producer: Any = None

    def republish(self, message: Any) -> str | None:
        """Publish ``message`` where it came from; ``None`` once routed, else why not (it stays parked)."""
        original = describe(message)["original"]
        exchange = original.get("exchange") or ""
        routing_key = original.get("routing_key") or self.app.conf.task_default_queue
        where = f"exchange {exchange!r} with routing key {routing_key!r}"
        if self.producer is None:
            channel = self.connection.channel()
            # Only AMQP channels hand back what they could not route (Redis routes in the client).
            on_return = self._on_return if hasattr(channel, "events") else None
            self.producer = self.app.amqp.Producer(channel, auto_declare=False, on_return=on_return)
        channel = self.producer.channel
        # Declare the destination if the app knows it, so the message cannot
        # vanish into an exchange nothing is bound to yet.
        known = self.app.amqp.queues.get(routing_key)
        if known is None and _unroutable_here(channel, exchange, routing_key):
            return f"nothing is bound to {where}"
        try:
            self.producer.publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                declare=[known] if known is not None else [],
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers={k: v for k, v in (message.headers or {}).items() if k != QUARANTINE_HEADER},
                **_replayed_properties(original),
                mandatory=True,
                retry=False,  # never on a new connection: see replay()
            )
        except self.connection.channel_errors as error:  # 404: no such exchange; the channel is closed
            self.close()
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return f"the broker refused {where}: {reason}"
        if self.returned:  # RabbitMQ returned it before confirming: no queue is bound there
            self.returned = False
            return f"nothing is bound to {where}"
        return None

    def _on_return(self, _exception: Any, _exchange: str, _routing_key: str, _message: Any) -> None:
        self.returned = True

    def close(self) -> None:
        if self.producer is not None:
            with contextlib.suppress(Exception):  # already closed by the broker
                self.producer.channel.close()
            self.producer = None


def _unroutable_here(channel: Any, exchange: str, routing_key: str) -> bool:
    """True if an in-process-routed transport (Redis) has no queue for it.

    Such transports route in the client: a message nothing is bound to goes to
    their ``ae.undeliver`` list, where nothing reads it, and ``mandatory`` is
    not looked at.  RabbitMQ returns such a message instead (see ``_on_return``).
    """
    if not exchange or not hasattr(channel, "typeof") or not hasattr(channel, "get_table"):
        return False
    try:
        return not channel.typeof(exchange).lookup(channel.get_table(exchange), exchange, routing_key, None)
    except KeyError:  # an exchange this transport never saw declared
        return True


def purge(app: Any, queue_name: str) -> int:
    """Delete every parked message; returns how many."""
    with app.connection_for_write() as connection:
        bound = quarantine_queue(queue_name)(connection.default_channel)
        bound.declare()
        return int(bound.purge() or 0)


def purge_ids(app: Any, queue_name: str, ids: set[str]) -> list[str]:
    """Delete the parked messages with these task ids (the others stay parked); returns the ids deleted.

    A plaintext message parked beside the evidence of tampering can go, and
    the evidence stay.  As :func:`replay`, it holds those it passes over
    until it ends, then puts them back.
    """
    deleted: list[str] = []
    with app.connection_for_write() as connection:
        bound = quarantine_queue(queue_name)(connection.channel())
        bound.declare()
        passed: list[Any] = []
        try:
            for message, task_id in _each_parked(bound):
                if task_id in ids:
                    message.ack()
                    deleted.append(task_id)
                else:
                    passed.append(message)
        finally:
            with contextlib.suppress(*connection.connection_errors):  # lost: the broker requeued them
                for message in passed:
                    message.requeue()
    return deleted
