"""Retention policies: when sealed data must become unreadable.

A policy turns a publish time into a *deadline*.  Enforcement is
crypto-shredding: values are sealed under a data key that belongs to a
retention *bucket* (key id + deadline rounded down), and the bucket's key is
destroyed once the deadline has passed, so every surviving copy (broker,
dead letters, backups, results) becomes unreadable at once.  See
docs/retention.md.

This module is plain data and arithmetic: no I/O, no Celery.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from dateutil.parser import isoparse

from .exceptions import ConfigurationError

__all__ = ["IMMEDIATE_GRACE", "RetentionPolicy", "RetentionReport", "bucket_deadline", "enforce"]

# How long a delete_immediately() message may wait in a queue: its bucket key
# is destroyed this long after the bucket closes (results are deleted as soon
# as the task finishes; see docs/retention.md).
IMMEDIATE_GRACE: Final = timedelta(days=1)

# Bucket widths, finest first.  A deadline is rounded *down* to a multiple of
# the widest step that is at most a tenth of the remaining time, so data is
# readable for at least 90% of its requested life and never past it, and a
# busy key id gets at most one new bucket key per step (no per-message writes).
_STEPS: Final = (
    timedelta(seconds=1),
    timedelta(minutes=1),
    timedelta(hours=1),
    timedelta(days=1),
)
_EPOCH: Final = datetime(2000, 1, 1, tzinfo=timezone.utc)
#: The longest duration a policy or setting may add to "now" (a deadline, a rotation):
#: beyond it the sum overflows datetime (timedelta.max), and "never" is keep_indefinitely().
MAX_DURATION: Final = timedelta(days=36525)  # 100 years
#: The shortest ``delete_after``: a bucket's deadline is rounded down to the second
#: and a message is sealed only before it, so a shorter life had often ended at once.
MIN_DURATION: Final = _STEPS[0]


class _Kind(enum.Enum):
    AFTER = "delete_after"
    AT = "delete_at"
    INDEFINITE = "keep_indefinitely"
    IMMEDIATE = "delete_immediately"
    DEFAULT = "use_default"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long the sealed data of a task's messages stays readable.

    Build one with the class methods; ``pii_retention=`` on a task or the
    ``pii_default_retention`` setting take it.
    """

    kind: _Kind
    duration: timedelta | None = None
    moment: datetime | None = None

    @classmethod
    def delete_after(cls, duration: timedelta) -> RetentionPolicy:
        """Unreadable once ``duration`` has passed since publishing.

        Raises:
            ConfigurationError: ``duration`` is not a timedelta of at least a second
                (deadlines fall on whole seconds: a shorter one had often passed when
                the message was sealed) and at most 100 years.
        """
        if not isinstance(duration, timedelta) or not MIN_DURATION <= duration <= MAX_DURATION:
            msg = (
                "RetentionPolicy.delete_after() needs a datetime.timedelta of at least 1 second (deadlines "
                "fall on whole seconds) and at most 100 years (use keep_indefinitely() for no deadline)"
            )
            raise ConfigurationError(msg)
        return cls(_Kind.AFTER, duration=duration)

    @classmethod
    def delete_at(cls, moment: datetime) -> RetentionPolicy:
        """Unreadable from ``moment`` (a timezone-aware datetime) on.

        Raises:
            ConfigurationError: ``moment`` is naive or not a datetime.
        """
        if not isinstance(moment, datetime) or moment.utcoffset() is None:
            msg = "RetentionPolicy.delete_at() needs a timezone-aware datetime.datetime"
            raise ConfigurationError(msg)
        return cls(_Kind.AT, moment=moment.astimezone(timezone.utc))

    @classmethod
    def keep_indefinitely(cls) -> RetentionPolicy:
        """Never shredded by retention (erasure and key destruction still apply)."""
        return cls(_Kind.INDEFINITE)

    @classmethod
    def delete_immediately(cls) -> RetentionPolicy:
        """Results gone when the task finishes; queued copies shredded within a day."""
        return cls(_Kind.IMMEDIATE)

    @classmethod
    def use_default(cls) -> RetentionPolicy:
        """Whatever ``pii_default_retention`` says."""
        return cls(_Kind.DEFAULT)

    @property
    def name(self) -> str:
        """The class-method name that built this policy."""
        return self.kind.value

    @property
    def is_default(self) -> bool:
        """True for :meth:`use_default`."""
        return self.kind is _Kind.DEFAULT

    @property
    def is_indefinite(self) -> bool:
        """True for :meth:`keep_indefinitely`."""
        return self.kind is _Kind.INDEFINITE

    @property
    def is_immediate(self) -> bool:
        """True for :meth:`delete_immediately`."""
        return self.kind is _Kind.IMMEDIATE

    def resolve(self, default: RetentionPolicy) -> RetentionPolicy:
        """This policy, or ``default`` for :meth:`use_default`."""
        return default if self.kind is _Kind.DEFAULT else self

    def bucket(self, now: datetime) -> datetime | None:
        """The retention bucket a message published at ``now`` belongs to.

        ``None`` means the data is kept indefinitely.  The bucket's moment is
        when its key is destroyed.

        Raises:
            ConfigurationError: called on :meth:`use_default` (resolve first).
        """
        if self.kind is _Kind.INDEFINITE:
            return None
        if self.kind is _Kind.AFTER and self.duration is not None:
            return bucket_deadline(now, now + self.duration)
        if self.kind is _Kind.AT and self.moment is not None:
            return bucket_deadline(now, self.moment)
        if self.kind is _Kind.IMMEDIATE:
            # Hour buckets, destroyed IMMEDIATE_GRACE after they close.
            start = _floor(now, timedelta(hours=1))
            return start + timedelta(hours=1) + IMMEDIATE_GRACE
        msg = "RetentionPolicy.use_default() must be resolved against pii_default_retention"
        raise ConfigurationError(msg)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form; :meth:`from_dict` reverses it."""
        out: dict[str, Any] = {"policy": self.kind.value}
        if self.duration is not None:
            out["seconds"] = self.duration.total_seconds()
        if self.moment is not None:
            out["at"] = self.moment.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetentionPolicy:
        """Rebuild a policy from :meth:`to_dict` output.

        Raises:
            ConfigurationError: the data names no valid policy.
        """
        try:
            kind = _Kind(data["policy"])
            if kind is _Kind.AFTER:
                return cls.delete_after(timedelta(seconds=float(data["seconds"])))
            if kind is _Kind.AT:
                return cls.delete_at(isoparse(str(data["at"])))  # Python 3.10's fromisoformat would not
        except ConfigurationError:
            raise  # a policy the constructors refuse says why itself
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: inf seconds
            msg = "not a serialized RetentionPolicy"
            raise ConfigurationError(msg) from exc
        return cls(kind)

    def __repr__(self) -> str:
        if self.duration is not None:
            return f"RetentionPolicy.delete_after({self.duration!r})"
        if self.moment is not None:
            return f"RetentionPolicy.delete_at({self.moment!r})"
        return f"RetentionPolicy.{self.kind.value}()"


def bucket_deadline(now: datetime, deadline: datetime) -> datetime:
    """Round ``deadline`` down to its bucket boundary (never before ``now``'s second)."""
    remaining = deadline - now
    step = _STEPS[0]
    for candidate in _STEPS:
        if candidate * 10 <= remaining:
            step = candidate
    rounded = _floor(deadline, step)
    return max(rounded, _floor(now, _STEPS[0]))


def _floor(moment: datetime, step: timedelta) -> datetime:
    elapsed = moment - _EPOCH
    return _EPOCH + (elapsed // step) * step


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one retention run did: counts and key ids, never values."""

    checked_at: datetime
    destroyed_versions: int
    key_ids: tuple[str, ...]
    batches: int
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (the beat task's result)."""
        return {
            "checked_at": self.checked_at.isoformat(),
            "destroyed_versions": self.destroyed_versions,
            "key_ids": list(self.key_ids),
            "batches": self.batches,
            "complete": self.complete,
        }


def enforce(
    destroy_batch: Callable[[datetime], list[tuple[str, int]]],
    now: datetime,
    *,
    max_batches: int = 20,
) -> RetentionReport:
    """Destroy expired bucket keys, batch by batch, at most ``max_batches`` per run.

    ``destroy_batch(now)`` destroys one batch of expired key versions and
    returns them (the key manager's ``destroy_expired``); a run that stops at
    the batch limit reports ``complete=False`` and the next run goes on.
    """
    destroyed: list[tuple[str, int]] = []
    for batch in range(1, max_batches + 1):
        done = destroy_batch(now)
        destroyed.extend(done)
        if not done:
            return RetentionReport(now, len(destroyed), _ids(destroyed), batch, complete=True)
    return RetentionReport(now, len(destroyed), _ids(destroyed), max_batches, complete=False)


def _ids(destroyed: list[tuple[str, int]]) -> tuple[str, ...]:
    return tuple(sorted({key_id for key_id, _ in destroyed}))
