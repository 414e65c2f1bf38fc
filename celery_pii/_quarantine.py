"""The quarantine queue: where messages that fail authentication are parked.

Celery acks and drops a message whose body cannot be decoded, and rejects one
of a refused content type (gone on Redis).  For ``pii`` messages that would
lose data silently, so a consumer bootstep parks them, byte for byte, in
``pii_quarantine_queue`` instead; the task-side opening step parks messages
whose envelope fails to authenticate.  Parked messages keep their original
body (still sealed) and headers, plus a ``x-celery-pii-quarantine`` header
naming the reason, the original routing and the time, and can be listed and
re-published with ``celery -A proj pii quarantine``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Final

from celery import bootsteps
from kombu.entity import Exchange, Queue
from kombu.exceptions import ContentDisallowed

__all__ = ["QUARANTINE_HEADER", "make_quarantine_step", "park", "quarantine_queue"]

logger = logging.getLogger("celery_pii.quarantine")

QUARANTINE_HEADER: Final = "x-celery-pii-quarantine"


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


def _routing(message: Any) -> dict[str, Any]:
    info = getattr(message, "delivery_info", None) or {}
    return {"exchange": info.get("exchange"), "routing_key": info.get("routing_key")}


def make_quarantine_step(
    content_type: str, queue_name: Callable[[Any], str | None], on_parked: Callable[[Any, str, str], None]
) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that parks undecodable and refused messages instead of dropping them.

    Arguments:
        content_type: the ``pii`` content type (its decode errors are parked).
        queue_name: ``app -> quarantine queue name``, or ``None`` if the app has no celery-pii.
        on_parked: ``(app, task id, reason)``, called after parking (audit).
    """

    class QuarantineStep(bootsteps.StartStopStep):
        """Park instead of drop: decode errors of ``pii`` messages and refused content."""

        label = "celery-pii quarantine"

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            name = queue_name(c.app)
            if name is None:
                return
            original_decode_error = c.on_decode_error
            original_invalid_task = c.on_invalid_task

            def on_decode_error(message: Any, exc: Exception) -> None:
                if message.content_type != content_type:
                    original_decode_error(message, exc)
                    return
                _park_or_requeue(c.app, name, message, "undecodable", on_parked)

            def on_invalid_task(body: Any, message: Any, exc: Exception) -> None:
                if not isinstance(exc, ContentDisallowed):
                    original_invalid_task(body, message, exc)
                    return
                _park_or_requeue(c.app, name, message, "content type not accepted", on_parked)

            # Set before the Tasks step builds its handler, which captures on_invalid_task.
            c.on_decode_error = on_decode_error
            c.on_invalid_task = on_invalid_task

    return QuarantineStep


def _park_or_requeue(
    app: Any, name: str, message: Any, reason: str, on_parked: Callable[[Any, str, str], None]
) -> None:
    headers = dict(message.headers or {})
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
            original=_routing(message),
        )
    except Exception:
        # Parking failed: keep the message rather than lose it.
        logger.exception("celery-pii: could not park message %s[%s]; requeued", task, task_id)
        message.reject(requeue=True)
        return
    # The body is never logged: it may be plaintext (refused content) or sealed.
    logger.error("celery-pii: message %s[%s] parked in %s: %s", task, task_id, name, reason)
    message.ack()
    on_parked(app, task_id, reason)
