"""KeyManager: data keys, their versions, rotation, destruction and audit.

Like ``MultiFernet``: one version of a key id encrypts (the *active* one),
every live version decrypts (*retired* ones are decrypt-only), and rotation
is an API.  Destroyed versions keep their row (audit, stats) but lose their
material, and anything sealed under them raises :class:`KeyDestroyed`.

Keys named by tasks are created on first use.  Per-subject keys are named by
a keyed hash of the subject id (the id itself may be personal data and never
reaches the key store or a log); retention buckets append their deadline.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import os
import socket
import sys
import threading
import time
import unicodedata
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, TypeVar, cast

from sqlalchemy import Select, and_, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ._crypto import Algorithm, DataKey, new_key_material
from ._keycache import KeyCache
from ._keylookup import KeyLookup
from ._sources import MasterKey
from ._store import (
    ACTIVE,
    DESTROYED,
    RETIRED,
    AuditRow,
    KeyRow,
    KeyStore,
    WriteConflict,
    aware,
    store_utcnow,
    utcnow,
)
from ._wrapping import MasterKeys, NoWrapping, wrap_context
from .exceptions import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionFailed,
    KeyDestroyed,
    KeyNotFound,
    KeyStoreUnavailable,
)

__all__ = ["AuditRecord", "KeyInfo", "KeyManager", "KeySpec", "KeyStats"]

logger = logging.getLogger("celery_pii.keys")

#: Key ids starting with this are the library's own: never rotated, retired or destroyed.
RESERVED_PREFIX: Final = "celery_pii."
SUBJECT_INDEX_KEY: Final = RESERVED_PREFIX + "subject-index"
#: A data subject's key id is this followed by the keyed hash of the subject id.
SUBJECT_KEY_PREFIX: Final = "subject."
#: How a retention bucket's key id names its deadline: ``payments@20261201T030000Z``.
BUCKET_FORMAT: Final = "%Y%m%dT%H%M%SZ"
_RETRIES: Final = 5
# The start-up check tries this many rows wrapped (their rows say) by this process's master key.
_ROWS_CHECKED_AT_START: Final = 3
# Each check asks for versions destroyed since a little before the previous
# one, so a slow commit is not missed.  Clocks: destructions and retirements are
# stamped with the later of the host's clock and the key store's, and checks
# reach back from the earlier of the two, so hosts whose clocks differ from the
# store's (by any amount) miss nothing.
_RECHECK_OVERLAP: Final = timedelta(minutes=5)
# Where a transaction keeps how far the store's clock is ahead of this host's.
_STORE_LEAD: Final = "celery_pii_store_lead"
# After checks that could not reach the store, wait up to this many intervals (one
# after the first failure, doubling after each next one): the check runs on the
# publish path, and an unreachable host costs a connect timeout.  A short outage
# must not hide an erasure for long: the first check after it comes one interval on.
_RECHECK_BACKOFF: Final = 10
# How long the publish and consume paths wait for the store's answer: loading a key not
# cached, the periodic check above, the usage flush, an audit record.  A store that accepts
# connections and never answers (a stalled pooler or load balancer: TCP timeouts never fire)
# held the publish or the task start for as long as it hung; past this the work counts as
# failed (KeyStoreUnavailable: the publish fails, the task is retried), and its thread is left.
STORE_ANSWER_TIMEOUT: Final = 10.0
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class KeyStats:
    """Counts over the key store, plus this process's cache counters."""

    total_keys: int
    active_keys: int
    retired_keys: int
    destroyed_keys: int
    rotations_performed: int
    cache_hits: int
    cache_misses: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the append-only audit trail."""

    timestamp: datetime
    key_id: str
    version: int | None
    operation: str
    actor: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the key store knows about one key version; never its material."""

    key_id: str
    version: int
    algorithm: str
    status: str
    created_at: datetime
    rotated_at: datetime | None
    retired_at: datetime | None
    destroyed_at: datetime | None
    expires_at: datetime | None
    next_rotation_at: datetime | None
    usage_count: int
    subject: bool
    master_key_ref: str | None
    #: The second wrapping's master key, while a master-key rotation is under way (else None).
    master_key_ref_next: str | None = None


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Which key to seal under, and what a newly created one records."""

    key_id: str
    subject_id: str | None = None
    expires_at: datetime | None = None
    retention_deadline: datetime | None = None
    #: ``(key id, version)`` of each key that opened the data this is derived from
    #: (a task's result, its retry, its chain's next step, a result it read).  Once
    #: one of those versions is destroyed (erasure, retention, by hand) nothing
    #: derived from it is sealed: not under a version created after the
    #: destruction either.
    derived_from: tuple[tuple[str, int], ...] = ()
    #: Ids of other data subjects' keys the data is sealed under too (each one is
    #: needed to open it): data derived from several subjects (a chord body
    #: gathering their results, a task reading another subject's result) is
    #: then erased with any of them, not only with the subject of ``key_id``.
    co_keys: tuple[str, ...] = ()


class KeyManager(KeyLookup):
    """Generate, rotate, retire, destroy and look up data keys (``pii.keys``)."""

    def __init__(  # noqa: PLR0913 - keyword-only configuration, read from Settings
        self,
        store: KeyStore,
        master: MasterKey,
        *,
        algorithm: Algorithm = Algorithm.AES_256_GCM,
        rotation_interval: timedelta = timedelta(days=90),
        rotation_max_messages: int = 2**31,
        max_key_versions: int = 5,
        cache_ttl: float = 3600.0,
        cache_size: int = 10_000,
        recheck_interval: float = 30.0,
        actor: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        previous_master: MasterKey | None = None,
    ) -> None:
        self.store = store
        self.masters = MasterKeys(master, previous_master)
        self.algorithm = algorithm
        self.rotation_interval = rotation_interval
        self.rotation_max_messages = rotation_max_messages
        self.max_key_versions = max_key_versions
        self.cache = KeyCache(cache_ttl, cache_size)
        self.recheck_interval = recheck_interval
        self._next_recheck = time.monotonic() + recheck_interval
        self._recheck_failures = 0  # checks in a row that could not reach the store
        self._last_check = time.monotonic()  # when the last check that reached the store began
        self._actor = actor
        self._clock = clock
        self._subject_secret: bytes | None = None
        _live_managers.add(self)

    def __repr__(self) -> str:
        return f"<KeyManager {self.store.url}>"

    @property
    def master(self) -> MasterKey:
        """The master key new data keys are wrapped under."""
        return self.masters.current

    @property
    def _waited_on(self) -> str:
        """What a key load waits on, for the error when nothing answers: the store, and KMS if used.

        Asked per key load, not when the manager is made: ``pii db`` commands make
        one with a master key that is not loaded (whose ``ref`` raises).
        """
        by_service = any(ref.startswith("aws-kms:") for ref in self.masters.refs)
        return _THE_STORE_OR_KMS if by_service else _THE_STORE

    @property
    def actor(self) -> str:
        """Who audit records name: the configured actor, or host/pid."""
        return self._actor or f"{socket.gethostname()}/{os.getpid()}"

    # -- the publish and consume paths -------------------------------------------------------

    # ``encryption_key`` and ``decryption_key`` are KeyLookup's (compiled when built so):
    # what their cache cannot answer comes here.

    def _load_version(self, key_id: str, version: int) -> DataKey:
        """That version from the store, for opening: cached, and checked against its deadline.

        Raises:
            KeyNotFound: no such key id or version.
            KeyDestroyed: that version was destroyed.
            KeyStoreUnavailable: the store cannot be reached.
        """
        if self.cache.is_destroyed(key_id, version):
            raise _destroyed(key_id, version)
        key, active = _answered_within(
            lambda: self._read_version(key_id, version), "celery-pii-key-load", self._waited_on
        )
        if key is None:
            # The refused message is audited by whoever refused it (it knows the task).
            self.cache.forget(key_id, version, destroyed=True)
            raise _destroyed(key_id, version)
        # If it is the active version, results sealed under this key need no round trip either.
        self.cache.put(key, active=active)
        return self._unexpired(key)

    def _read_version(self, key_id: str, version: int) -> tuple[DataKey | None, bool]:
        """That version from the store, unwrapped (``None`` if destroyed), and whether it is the active one.

        Raises:
            KeyNotFound: no such key id or version.
        """
        with self.store.transaction() as session:
            row = (
                session.scalars(
                    select(KeyRow).where(KeyRow.key_id == key_id, KeyRow.version == version)
                ).one_or_none()
                if _is_key_id(key_id)
                else None  # envelopes never name such an id; a caller's typo does
            )
            if row is None:
                msg = f"key {key_id!r} version {version} not found in the key store"
                raise KeyNotFound(msg)
            if row.status == DESTROYED:
                return None, False
            return self._unwrap(row), row.status == ACTIVE

    def recheck_cache(self) -> int:
        """Evict cached keys that another process destroyed or retired; returns how many versions.

        The process that destroys or rotates a key updates its cache at once.
        Every other process runs this on its publish and consume paths every
        ``pii_key_recheck_interval`` seconds: indexed queries for the versions
        destroyed, and those retired (by a rotation or by hand), since its
        previous check.  Destroyed versions are evicted and read from the store
        again on next use, which is what says they are destroyed (a check trusts
        nothing but the store).  A retired version stops being the one new data
        is sealed under (it still opens what it sealed): the next seal reads the
        active version from the store.
        An unreachable store leaves the cache as it is (``pii_key_cache_ttl``
        still bounds it) and is asked again one interval later, then two, four,
        eight, and ten at most while it stays unreachable; publishing and opening
        go on meanwhile.
        """
        started = time.monotonic()
        self._next_recheck = started + self.recheck_interval
        if not len(self.cache):  # nothing to evict; keys loaded later read the store as it is then
            self._last_check = started
            return 0

        def changes() -> tuple[Sequence[Any], Sequence[Any]]:
            with self.store.transaction() as session:
                # Since the previous check, measured back from the earlier of this host's clock
                # and the store's (stamps are never earlier than the store's clock: _stamp).  A
                # key cached before a destruction older than the TTL has expired since; one
                # loaded after it read the store then: neither needs that destruction.
                elapsed = timedelta(seconds=min(time.monotonic() - self._last_check, self.cache.ttl))
                own = self._clock()
                since = min(own, store_utcnow(session) or own) - elapsed - _RECHECK_OVERLAP
                destroyed = session.execute(
                    select(KeyRow.key_id, KeyRow.version).where(KeyRow.destroyed_at >= since)
                ).all()
                retired = session.execute(
                    select(KeyRow.key_id, KeyRow.version).where(KeyRow.retired_at >= since)
                ).all()
            return destroyed, retired

        try:
            destroyed, retired = _answered_within(changes, "celery-pii-key-check")
        except KeyStoreUnavailable:
            self._recheck_failures += 1
            backoff = min(2 ** (self._recheck_failures - 1), _RECHECK_BACKOFF)
            self._next_recheck = time.monotonic() + self.recheck_interval * backoff
            logger.warning(
                "celery-pii: could not check the key store for destroyed keys; cached keys are kept "
                "until the next check (in %s pii_key_recheck_interval) or their pii_key_cache_ttl",
                backoff,
            )
            return 0
        self._recheck_failures = 0
        self._last_check = started
        # Remembered as destroyed: what was derived from them is refused without a round trip.
        evicted = sum(self.cache.forget(key_id, version, destroyed=True) for key_id, version in destroyed)
        evicted += sum(self.cache.no_longer_active(key_id, version) for key_id, version in retired)
        if evicted:
            logger.info(
                "celery-pii: evicted %d cached key version(s) destroyed or retired elsewhere", evicted
            )
        return evicted

    def _load_active(self, spec: KeySpec) -> DataKey:
        now = self._clock()
        if spec.expires_at is not None and spec.expires_at <= now:
            raise _past_deadline(spec)
        key = _answered_within(
            lambda: self._read_or_create_active(spec, now), "celery-pii-key-load", self._waited_on
        )
        if key.expires_at is not None and key.expires_at <= now.timestamp():
            # Not destroyed yet (enforce_retention runs on a schedule), but what it
            # sealed now would be refused on arrival: say so now, as after the run.
            raise _past_deadline(spec)
        self.cache.put(key, active=True)
        return self.cache.active(spec.key_id) or key

    def _read_or_create_active(self, spec: KeySpec, now: datetime) -> DataKey:
        """The active version of ``spec.key_id`` from the store, unwrapped; its first version if none."""
        for _ in range(_RETRIES):
            try:
                with self.store.transaction() as session:
                    for source in spec.derived_from:
                        self._refuse_if_destroyed(session, *source)
                    row = self._active_row(session, spec.key_id)
                    if row is None and spec.key_id == SUBJECT_INDEX_KEY:
                        _refuse_a_second_subject_index(session)
                    if row is None:
                        # Its material is at hand: unwrapping the row just written would be one
                        # more KMS Decrypt per new key (a new data subject's) for an aws-kms:// key.
                        row, material = self._insert_version(
                            session, self._inherit(session, spec, now), now, reason="first use"
                        )
                        key = _data_key(row, material)
                    else:
                        key = self._unwrap(row)
                break
            except (IntegrityError, WriteConflict):  # another process created it first or won a lock: again
                continue
        else:  # pragma: no cover - only under pathological contention
            msg = f"key {spec.key_id!r}: could not create its first version"
            raise KeyStoreUnavailable(msg)
        return key

    def _refuse_derived_from_destroyed(self, key_id: str, version: int) -> None:
        """Raise :class:`KeyDestroyed` if the version data was opened with is destroyed.

        Asked when this process no longer holds that version (the periodic check
        evicts destroyed ones; a task may also run past the cache's TTL): what
        it remembers of destructions expires too, so only the store can say.
        """
        if self.cache.is_destroyed(key_id, version):
            raise _destroyed(key_id, version)

        def refuse() -> None:
            with self.store.transaction() as session:
                self._refuse_if_destroyed(session, key_id, version)

        _answered_within(refuse, "celery-pii-key-check")

    def _refuse_if_destroyed(self, session: Session, key_id: str, version: int) -> None:
        """Raise :class:`KeyDestroyed` if that version is destroyed (or gone from the store).

        Data derived from a subject's message (a result, a retry) would otherwise
        be sealed under a version created after the subject was erased, and be
        readable: the cache may not hold the source's destruction (another
        process destroyed it, or the entry expired).
        """
        status = session.scalar(
            select(KeyRow.status).where(KeyRow.key_id == key_id, KeyRow.version == version)
        )
        if status is None or status == DESTROYED:
            self.cache.forget(key_id, version, destroyed=True)
            raise _destroyed(key_id, version)

    def _inherit(self, session: Session, spec: KeySpec, now: datetime) -> KeySpec:
        """A spec that keeps the subject and expiry an earlier version of the key id had.

        A bucket key whose versions were all retired gets a new version with
        the same deadline (never a deadline-less one); one whose deadline has
        passed gets none.
        """
        if spec.expires_at is not None and spec.subject_id is not None:
            return spec
        latest = session.scalars(
            select(KeyRow).where(KeyRow.key_id == spec.key_id).order_by(KeyRow.version.desc()).limit(1)
        ).first()
        if latest is None:
            return spec
        expires_at = spec.expires_at or latest.expires_at
        if expires_at is not None and expires_at <= now:
            raise _past_deadline(spec)
        return KeySpec(
            spec.key_id,
            subject_id=spec.subject_id or latest.subject_id,
            expires_at=expires_at,
            retention_deadline=spec.retention_deadline or latest.retention_deadline,
        )

    # -- the KeyManager API of DESIGN §1 -----------------------------------------------------

    def generate_key(self, key_id: str, algorithm: Algorithm | str | None = None) -> int:
        """Create version 1 of a new key id (or the next version after destruction).

        Returns:
            The new version number.

        Raises:
            ConfigurationError: the key id is malformed, reserved (``celery_pii.*``,
                ``subject.*``: the library makes those), or already has an active version.
        """
        _check_user_key_id(key_id)
        chosen = _algorithm(algorithm) if algorithm is not None else self.algorithm

        def work(session: Session) -> int:
            if self._active_row(session, key_id) is not None:
                msg = f"key {key_id!r} already exists; rotate it instead"
                raise ConfigurationError(msg)
            spec = KeySpec(key_id)
            row, _ = self._insert_version(session, spec, self._clock(), reason="generate", algorithm=chosen)
            return row.version

        return self._transact(work)

    def bucket_key_ids(self, key_id: str) -> list[str]:
        """The retention bucket keys of ``key_id`` (``key_id@<deadline>``) that still seal and open.

        A task with a retention policy seals under these, never under ``key_id`` itself.
        """
        if "@" in key_id or not _is_key_id(key_id):
            return []
        now = self._clock()
        with self.store.transaction() as session:
            rows = session.execute(
                select(KeyRow.key_id)
                .where(
                    _named(KeyRow.key_id, key_id, buckets=True),
                    KeyRow.key_id != key_id,
                    KeyRow.status == ACTIVE,
                    or_(KeyRow.expires_at.is_(None), KeyRow.expires_at > now),
                )
                .distinct()
                .order_by(KeyRow.key_id)
            ).all()
        return [row.key_id for row in rows]

    def rotate_key(self, key_id: str) -> int:
        """Make a new active version; the previous one is retired (still decrypts).

        Versions beyond ``pii_max_key_versions`` are destroyed, oldest first.

        Returns:
            The new version number.

        Raises:
            KeyNotFound: the key id has no versions at all.
            ConfigurationError: the key id is one of celery-pii's own (``celery_pii.*``).
        """
        check_not_reserved(key_id)

        def work(session: Session) -> int:
            rows = self._lock_rows(session, key_id)
            if not rows:
                msg = f"key {key_id!r} not found in the key store"
                raise KeyNotFound(msg)
            return self._rotate_locked(session, rows, reason="manual").version

        return self._transact(work)

    def retire_key(self, key_id: str, version: int) -> None:
        """Stop a version from encrypting; it still decrypts.

        Raises:
            KeyNotFound: no such version.
            KeyDestroyed: it was destroyed.
            ConfigurationError: the key id is one of celery-pii's own (``celery_pii.*``).
        """
        check_not_reserved(key_id)
        with self.store.transaction() as session:
            row = session.scalars(
                select(KeyRow).where(KeyRow.key_id == key_id, KeyRow.version == version).with_for_update()
            ).one_or_none()
            if row is None:
                msg = f"key {key_id!r} version {version} not found in the key store"
                raise KeyNotFound(msg)
            if row.status == DESTROYED:
                raise _destroyed(key_id, version)
            if row.status == ACTIVE:
                row.status, row.retired_at, row.next_rotation_at = RETIRED, self._stamp(session), None
                self._audit(session, key_id, version, "retire")
        self.cache.forget(key_id, version)

    def destroy_key(self, key_id: str, version: int | None = None) -> int:
        """Destroy every version of ``key_id`` (or one version): crypto-shredding.

        Returns:
            How many versions were destroyed by this call.

        Raises:
            ConfigurationError: the key id is one of celery-pii's own (``celery_pii.*``).
            KeyNotFound: no such key id or version (a typo must not look like success;
                destroying what is already destroyed returns 0).
        """
        check_not_reserved(key_id)

        def work(session: Session) -> Sequence[KeyRow]:
            query = select(KeyRow).where(KeyRow.key_id == key_id, KeyRow.status != DESTROYED)
            if version is not None:
                query = query.where(KeyRow.version == version)
            rows = self._lock_and_reread(session, query.order_by(KeyRow.version))
            for row in rows:
                self._destroy_row(session, row, reason="manual")
            if not rows:
                known = select(KeyRow.id).where(KeyRow.key_id == key_id)
                if version is not None:
                    known = known.where(KeyRow.version == version)
                if session.scalars(known.limit(1)).first() is None:
                    which = f"key {key_id!r}" + (f" version {version}" if version is not None else "")
                    msg = f"{which} not found in the key store"
                    raise KeyNotFound(msg)
            return rows

        rows = self._transact(work)  # a rotation of the key may win a lock race: again
        for row in rows:
            self.cache.forget(row.key_id, row.version, destroyed=True)
        return len(rows)

    def perform_automatic_rotation(
        self, now: datetime | None = None, *, batch_size: int = 200, max_keys: int | None = None
    ) -> list[str]:
        """Rotate every key older than ``pii_rotation_interval`` or past ``pii_rotation_max_messages``.

        The interval is this process's: a version is due once it is that old,
        or at the ``next_rotation_at`` its creator stamped (with the creator's
        interval), whichever comes first; so lowering the setting takes effect
        on existing keys.  A retention bucket past its deadline is not rotated:
        nothing seals under it any more (``enforce_retention`` destroys it).

        Safe to run from two processes at once: rows being rotated elsewhere
        are skipped, and a rotated key is no longer due, so each due key gets
        exactly one new version.  Works in batches (bounded memory); with
        ``max_keys`` it stops after the batch in which it reached that many
        (at least ``max_keys``), and the next run goes on.

        Returns:
            The key ids rotated by this call.
        """
        self.flush_usage()
        now = aware(now, "KeyManager.perform_automatic_rotation: now") or self._clock()
        rotated: list[str] = []
        after_id = 0

        def one_batch(session: Session) -> tuple[list[str], int, int]:
            rows = session.scalars(
                select(KeyRow)
                .where(
                    KeyRow.id > after_id,
                    KeyRow.status == ACTIVE,
                    (KeyRow.next_rotation_at <= now)
                    | (KeyRow.created_at <= now - self.rotation_interval)
                    | (KeyRow.usage_count >= self.rotation_max_messages),
                    KeyRow.expires_at.is_(None) | (KeyRow.expires_at > now),
                )
                .order_by(KeyRow.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            done = []
            for row in rows:
                # Retired above with an earlier row of its key id (a store may hold two active
                # versions, made before first uses gave way to each other): rotated once.
                if row.key_id.startswith(RESERVED_PREFIX) or row.status != ACTIVE:
                    continue
                reason = "max_messages" if row.usage_count >= self.rotation_max_messages else "age"
                self._rotate_locked(session, self._lock_rows(session, row.key_id), reason=reason, now=now)
                done.append(row.key_id)
            return done, len(rows), rows[-1].id if rows else after_id

        while True:
            done, seen, after_id = self._transact(one_batch)
            rotated.extend(done)
            if seen < batch_size or (max_keys is not None and len(rotated) >= max_keys):
                return rotated

    def enforce_max_versions(self, *, batch_size: int = 200) -> list[tuple[str, int]]:
        """Destroy the oldest live versions of key ids that keep more than ``pii_max_key_versions``.

        Rotation already does this for the key it rotates; this sweep catches
        key ids left over the limit (for example after the setting was lowered,
        or versions a rotation kept because they had only just been retired).

        Returns:
            The ``(key id, version)`` pairs destroyed.
        """
        limit = self.max_key_versions
        now = self._clock()
        # Only key ids with a version that may go: one retired within the grace
        # (see _beyond_max_versions) would fill every batch and starve the others.
        may_go = case(
            (
                and_(
                    KeyRow.status == RETIRED,
                    or_(KeyRow.retired_at.is_(None), KeyRow.retired_at <= self._grace_end(now)),
                ),
                1,
            ),
            else_=0,
        )
        destroyed: list[tuple[str, int]] = []
        after = ""

        def one_batch(session: Session) -> tuple[list[tuple[str, int]], list[str]]:
            over = session.scalars(
                select(KeyRow.key_id)
                .where(KeyRow.status != DESTROYED, KeyRow.key_id > after)
                .group_by(KeyRow.key_id)
                .having(func.count() > limit, func.sum(may_go) > 0)
                .order_by(KeyRow.key_id)
                .limit(batch_size)
            ).all()
            done = []
            for key_id in over:
                live = [row for row in self._lock_rows(session, key_id) if row.status != DESTROYED]
                live.sort(key=lambda row: (row.status == ACTIVE, row.version))  # the active one is kept
                for row in self._beyond_max_versions(live[:-1], len(live), now):
                    self._destroy_row(session, row, reason="max_key_versions")
                    done.append((row.key_id, row.version))
            return done, list(over)

        while True:  # in batches (bounded memory and transactions), by key id
            done, over = self._transact(one_batch)
            destroyed.extend(done)
            if len(over) < batch_size:
                break
            after = over[-1]
        for key_id, version in destroyed:
            self.cache.forget(key_id, version, destroyed=True)
        return destroyed

    def list_keys(
        self, key_id: str | None = None, *, limit: int | None = None, buckets: bool = False
    ) -> list[KeyInfo]:
        """Key versions (all, or of one key id), by key id and version; metadata only.

        With ``buckets``, a key id's retention bucket keys (``key_id@...``) too.
        """
        if key_id is not None and not _is_key_id(key_id):
            return []  # no key store holds it
        query = select(KeyRow).order_by(KeyRow.key_id, KeyRow.version)
        if key_id is not None:
            query = query.where(_named(KeyRow.key_id, key_id, buckets=buckets))
        if limit is not None:
            query = query.limit(limit)
        with self.store.transaction() as session:
            return [
                KeyInfo(
                    key_id=row.key_id,
                    version=row.version,
                    algorithm=row.algorithm,
                    status=row.status,
                    created_at=row.created_at,
                    rotated_at=row.rotated_at,
                    retired_at=row.retired_at,
                    destroyed_at=row.destroyed_at,
                    expires_at=row.expires_at,
                    next_rotation_at=row.next_rotation_at,
                    usage_count=row.usage_count,
                    subject=row.subject_id is not None,
                    master_key_ref=row.master_key_ref,
                    master_key_ref_next=row.master_key_ref_next,
                )
                for row in session.scalars(query)
            ]

    def get_stats(self) -> KeyStats:
        """Counts of key versions by status, rotations, and this process's cache counters."""
        with self.store.transaction() as session:
            grouped = session.execute(select(KeyRow.status, func.count()).group_by(KeyRow.status))
            counts: dict[str, int] = {status: count for status, count in grouped}  # noqa: C416 - typed rows
            rotations = session.scalar(
                select(func.count()).select_from(AuditRow).where(AuditRow.operation == "rotate")
            )
        return KeyStats(
            total_keys=sum(counts.values()),
            active_keys=counts.get(ACTIVE, 0),
            retired_keys=counts.get(RETIRED, 0),
            destroyed_keys=counts.get(DESTROYED, 0),
            rotations_performed=rotations or 0,
            cache_hits=self.cache.hits,
            cache_misses=self.cache.misses,
        )

    def audit_trail(
        self,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        limit: int | None = None,
        buckets: bool = False,
    ) -> list[AuditRecord]:
        """Audit records, oldest first, optionally for one key id (and its buckets) and a time window."""
        if key_id is not None and "\x00" in key_id:
            return []  # no record names it (PostgreSQL refuses the NUL byte with DataError)
        query = select(AuditRow).order_by(AuditRow.timestamp, AuditRow.id)
        if key_id is not None:
            query = query.where(_named(AuditRow.key_id, key_id, buckets=buckets))
        if aware(since, "KeyManager.audit_trail: since") is not None:
            query = query.where(AuditRow.timestamp >= since)
        if aware(until, "KeyManager.audit_trail: until") is not None:
            query = query.where(AuditRow.timestamp <= until)
        if limit is not None:
            query = query.limit(limit)
        with self.store.transaction() as session:
            return [
                AuditRecord(r.timestamp, r.key_id, r.version, r.operation, r.actor, dict(r.details or {}))
                for r in session.scalars(query)
            ]

    # -- subjects, retention, audit events ------------------------------------------------------

    def subject_key_id(self, subject_id: object) -> tuple[str, str]:
        """``(key id, subject hash)`` of a data subject's key.

        The hash is keyed by a secret kept in the key store, so a subject id
        (often an email or a user id) cannot be guessed back from a key id.
        ``42`` and ``"42"`` are the same subject (the CLI gives text), and so
        are two texts Unicode reads as the same (NFC and NFD forms of ``"zoë"``).

        Raises:
            ConfigurationError: not a subject id (:func:`subject_text`).
        """
        digest = self._subject_digest(_subject_text_or_refuse(subject_id))
        return f"{SUBJECT_KEY_PREFIX}{digest}", digest

    def _subject_digest(self, text: str) -> str:
        secret = self._subject_secret or self._load_subject_secret()
        return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def destroy_subject(self, subject_id: object) -> int:
        """Destroy every key of one data subject (erasure); returns versions destroyed."""
        if isinstance(subject_id, str) and not subject_id.strip():
            # Refused as a subject now; earlier builds took it: their keys can still go.
            digests = [self._subject_digest(subject_id)]
        else:
            digests = [self.subject_key_id(subject_id)[1]]
        if isinstance(subject_id, str):
            # Builds before subject ids were normalised named keys by the text as given:
            # whichever form it arrived in then (composed, decomposed), the request's too.
            forms = {subject_id, unicodedata.normalize("NFD", subject_id)}
            digests.extend(self._subject_digest(form) for form in forms if _encodable(form))

        def work(session: Session) -> Sequence[KeyRow]:
            rows = self._lock_and_reread(session, subject_keys(digests))
            for row in rows:
                self._destroy_row(session, row, reason="forget_subject")
            if not rows:
                self._audit(session, f"{SUBJECT_KEY_PREFIX}{digests[0]}", None, "forget_subject", versions=0)
            return rows

        rows = self._transact(work)  # a rotation of the subject's key may win a lock race: again
        for row in rows:
            self.cache.forget(row.key_id, row.version, destroyed=True)
        return len(rows)

    def destroy_expired(self, now: datetime | None = None, *, batch_size: int = 500) -> list[tuple[str, int]]:
        """Destroy one batch of versions whose ``expires_at`` has passed (retention)."""
        now = aware(now, "KeyManager.destroy_expired: now") or self._clock()
        with self.store.transaction() as session:
            rows = session.scalars(
                select(KeyRow)
                .where(KeyRow.expires_at <= now, KeyRow.status != DESTROYED)
                .order_by(KeyRow.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                self._destroy_row(session, row, reason="retention")
        destroyed = [(row.key_id, row.version) for row in rows]
        for key_id, version in destroyed:
            self.cache.forget(key_id, version, destroyed=True)
        return destroyed

    def record(self, operation: str, key_id: str, version: int | None = None, **details: Any) -> None:
        """Append an audit record (e.g. ``tamper_detected``); details name ids, never values.

        Waits for the store at most ``STORE_ANSWER_TIMEOUT`` (a worker refusing a
        message writes one): a late write still lands.
        """

        def write() -> None:
            with self.store.transaction() as session:
                self._audit(session, key_id, version, operation, **details)

        _answered_within(write, "celery-pii-audit")

    def check_master_key(self) -> None:
        """Fail at start-up, not at first decrypt, if the master key does not match the store.

        On a store with no keys yet, the master key wraps and unwraps a probe.

        Raises:
            ConfigurationError: keys exist but none can be unwrapped with this master key,
                or some were wrapped by another master key; or the master key cannot serve.
            KeyStoreUnavailable: the store (or the master key's KMS) cannot be reached.
        """
        self.store.check_schema()
        refs = self.masters.refs
        with self.store.transaction() as session:
            named_mine = session.scalars(
                select(KeyRow)
                .where(
                    KeyRow.wrapped_key.is_not(None),
                    KeyRow.master_key_ref.in_(refs) | KeyRow.master_key_ref_next.in_(refs),
                )
                .order_by(KeyRow.id.desc())
                .limit(_ROWS_CHECKED_AT_START)
            ).all()
            mine = self._first_unwrapping(named_mine) if named_mine else None
            # Only rows no master key of this process opens.  (Under READ COMMITTED a row
            # another process wrapped with this same key may appear after the first query.)
            foreign = session.scalars(
                select(KeyRow.master_key_ref)
                .where(
                    KeyRow.wrapped_key.is_not(None),
                    KeyRow.master_key_ref.not_in(refs),
                    KeyRow.master_key_ref_next.is_(None) | KeyRow.master_key_ref_next.not_in(refs),
                )
                .limit(1)
            ).first()
            if mine is not None:
                # Two processes with different master keys that both started on an empty
                # store each created keys; each would fail on the other's at first use.
                if foreign is not None:
                    msg = (
                        "setting pii_master_key: the key store also holds keys wrapped by another master "
                        f"key ({foreign}), which this one cannot open; every process must use the same "
                        "master key (to change it, see master-key rotation in docs/operations.md)"
                    )
                    raise ConfigurationError(msg)
            elif foreign is not None:
                msg = (
                    "setting pii_master_key: this master key does not match the key store "
                    f"(its keys were wrapped by master key {foreign}); use the master key its keys "
                    "are wrapped under (after a master-key rotation, the new one)"
                )
                raise ConfigurationError(msg)
        if mine is None and foreign is None:
            # A new store: nothing to unwrap.  A master key that cannot serve (an aws-kms:// id
            # misspelt, in another region, or not allowed to encrypt) failed at the first publish.
            for master in (self.masters.current, self.masters.previous):
                if master is not None:
                    probe = wrap_context("celery_pii.start-up-check", 0, self.algorithm.value)
                    master.unwrap(master.wrap(bytes(32), context=probe), context=probe)

    def _first_unwrapping(self, rows: Sequence[KeyRow]) -> KeyRow:
        """The first of ``rows`` (each naming this master key) that unwraps; the others are reported.

        One damaged row (a storage fault, a restore in part, an edit) no longer
        stops every process from starting, blamed on the master key.

        Raises:
            ConfigurationError: none of them unwraps.
        """
        for index, row in enumerate(rows):
            try:
                self._unwrap(row)
            except KeyNotFound:  # cannot be unwrapped (a master key that cannot serve raises otherwise)
                continue
            for damaged in rows[:index]:
                logger.error(
                    "celery-pii: key %r version %d cannot be unwrapped with the master key its row names "
                    "(damaged or edited row): data sealed under it will not open",
                    damaged.key_id,
                    damaged.version,
                )
            return row
        names = ", ".join(f"{row.key_id!r} v{row.version}" for row in rows)
        msg = (
            f"setting pii_master_key: this master key does not match the key store (keys {names}, whose "
            "rows name it, cannot be unwrapped with it: a wrong master key, or damaged rows)"
        )
        raise ConfigurationError(msg)

    def flush_usage(self, *, quiet: bool = False) -> None:
        """Write accumulated usage counts (one UPDATE per key version, not per message)."""
        usage = self.cache.take_usage()
        if not usage:
            return
        now = self._clock()

        def write() -> None:
            with self.store.transaction() as session:
                # Sorted, so two flushes lock the same rows in the same order (no deadlock).
                for (key_id, version), count in sorted(usage.items()):
                    # Added in SQL, not read-then-written: processes flush at the same
                    # time, and a sum computed here would overwrite the other's count.
                    session.execute(
                        update(KeyRow)
                        .where(KeyRow.key_id == key_id, KeyRow.version == version)
                        .values(usage_count=func.coalesce(KeyRow.usage_count, 0) + count, last_used_at=now)
                        .execution_options(synchronize_session=False)
                    )

        try:
            _answered_within(write, "celery-pii-usage")
        except KeyStoreUnavailable:
            # (Unanswered, the write may still land later: then these uses count twice, which
            # brings a rotation by message count forward, never back.)
            self.cache.give_back_usage(usage)
            log = logger.debug if quiet else logger.warning
            log("celery-pii: usage counts kept in memory; the key store is unreachable")

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _active_row(session: Session, key_id: str) -> KeyRow | None:
        return session.scalars(
            select(KeyRow)
            .where(KeyRow.key_id == key_id, KeyRow.status == ACTIVE)
            .order_by(KeyRow.version.desc())
        ).first()

    @classmethod
    def _lock_rows(cls, session: Session, key_id: str) -> Sequence[KeyRow]:
        return cls._lock_and_reread(
            session, select(KeyRow).where(KeyRow.key_id == key_id).order_by(KeyRow.version)
        )

    @staticmethod
    def _lock_and_reread(session: Session, query: Select[Any]) -> Sequence[KeyRow]:
        # Lock, then read again.  Under READ COMMITTED (PostgreSQL) a locking
        # SELECT that waited for a concurrent rotation returns only the rows it
        # saw before waiting, not the version the rotation inserted; the second
        # statement sees (and locks) that one too, so erasure cannot miss it.
        locked = query.with_for_update()
        session.scalars(locked).all()
        return session.scalars(locked.execution_options(populate_existing=True)).all()

    def _insert_version(  # noqa: PLR0913 - keyword-only details of the new row
        self,
        session: Session,
        spec: KeySpec,
        now: datetime,
        *,
        reason: str,
        algorithm: Algorithm | None = None,
        previous: KeyRow | None = None,
    ) -> tuple[KeyRow, bytes]:
        """A new version of ``spec.key_id``, active, with its material wrapped; the row and the material."""
        _check_key_id(spec.key_id)
        latest = session.scalar(select(func.max(KeyRow.version)).where(KeyRow.key_id == spec.key_id))
        version = (latest or 0) + 1
        algorithm = algorithm or self.algorithm
        material = new_key_material()
        row = KeyRow(
            key_id=spec.key_id,
            version=version,
            algorithm=algorithm.value,
            **self.masters.wrap(spec.key_id, version, algorithm.value, material),
            status=ACTIVE,
            created_at=now,
            created_by=self.actor,
            next_rotation_at=now + self.rotation_interval,
            usage_count=0,
            subject_id=previous.subject_id if previous else spec.subject_id,
            expires_at=previous.expires_at if previous else spec.expires_at,
            retention_deadline=previous.retention_deadline if previous else spec.retention_deadline,
        )
        session.add(row)
        session.flush()
        self._refuse_second_active(session, row)
        operation = "rotate" if previous is not None else "generate"
        details: dict[str, Any] = {"reason": reason, "algorithm": algorithm.value}
        if previous is not None:
            details["previous_version"] = previous.version
        self._audit(session, spec.key_id, version, operation, **details)
        return row, material

    @staticmethod
    def _refuse_second_active(session: Session, row: KeyRow) -> None:
        """Give way if another version of ``row``'s key id is active too (the caller runs again).

        Under READ COMMITTED (PostgreSQL) a writer that found no active version
        still sees a version another writer committed since, and numbers its
        own one higher: the unique (key id, version) does not stop it.  Two
        active versions of the subject index are two secrets, so one subject
        under two key ids, of which ``forget_subject`` destroys one.

        Raises:
            WriteConflict: another writer's version is active.
        """
        other = session.scalar(
            select(KeyRow.version)
            .where(KeyRow.key_id == row.key_id, KeyRow.status == ACTIVE, KeyRow.id != row.id)
            .limit(1)
        )
        if other is not None:
            msg = f"key {row.key_id!r}: another process made version {other} active at the same time"
            raise WriteConflict(msg)

    def _rotate_locked(
        self, session: Session, rows: Sequence[KeyRow], *, reason: str, now: datetime | None = None
    ) -> KeyRow:
        now = now or self._clock()
        # The moment of retirement, never a run's ``now`` (as ``destroyed_at`` in _destroy_row):
        # other processes' rechecks look back a few minutes, and missed, the retired version
        # went on sealing there until its cache entry expired, past its destruction too.
        retired_at = self._stamp(session)
        latest = rows[-1]
        for row in rows:
            if row.status == ACTIVE:
                row.status, row.retired_at, row.rotated_at = RETIRED, retired_at, now
                row.next_rotation_at = None
        # A key keeps its algorithm across rotations (pii_algorithm is for new key ids).
        new, _ = self._insert_version(
            session,
            KeySpec(latest.key_id),
            now,
            reason=reason,
            previous=latest,
            algorithm=Algorithm(latest.algorithm),
        )
        live = [row for row in rows if row.status != DESTROYED]
        for row in self._beyond_max_versions(live, len(live) + 1, now):  # + 1: the new version
            self._destroy_row(session, row, reason="max_key_versions")
            self.cache.forget(row.key_id, row.version, destroyed=True)
        self.cache.forget(latest.key_id)
        return new

    def _beyond_max_versions(self, retired: Sequence[KeyRow], live: int, now: datetime) -> list[KeyRow]:
        """Which of a key's ``retired`` versions (oldest first) to destroy so ``live`` fits the limit.

        A version retired less than a recheck interval ago (plus the checks'
        clock overlap) is kept: other processes may still seal with it until
        their next check (``pii_key_recheck_interval``) tells them it was
        retired, and what they publish meanwhile must open.  It goes at a later
        ``rotate_keys`` run, so with ``pii_max_key_versions=1`` the key keeps
        two versions for a while after each rotation.
        """
        grace_end = self._grace_end(now)
        old = [row for row in retired if row.retired_at is None or row.retired_at <= grace_end]
        return old[: max(0, live - self.max_key_versions)]

    def _grace_end(self, now: datetime) -> datetime:
        """Versions retired after this may still be sealed with somewhere (see _beyond_max_versions)."""
        return now - timedelta(seconds=self.recheck_interval) - _RECHECK_OVERLAP

    def _destroy_row(self, session: Session, row: KeyRow, *, reason: str) -> None:
        row.status, row.wrapped_key, row.wrapped_key_next = DESTROYED, None, None
        row.master_key_ref = row.master_key_ref_next = None  # nothing is wrapped by any master key now
        # The moment of destruction, never a run's ``now`` (which decides only what
        # is due): other processes' rechecks look back a few minutes from their
        # own clock, and a long run's start time would fall out of that window.
        row.destroyed_at = self._stamp(session)
        row.next_rotation_at = None
        self._audit(session, row.key_id, row.version, "destroy", reason=reason)

    def _stamp(self, session: Session) -> datetime:
        """The moment of a destruction or retirement: this host's clock, or the store's if it is ahead.

        Other processes' checks find what changed since their previous check by
        these stamps: one from a host whose clock lagged by more than the checks'
        overlap (five minutes) was never found, and a worker went on opening an
        erased subject's messages until its cache expired.
        """
        lead = session.info.get(_STORE_LEAD)
        if lead is None:  # asked once per transaction: a retention batch stamps many rows
            store_now = store_utcnow(session)
            lead = max(timedelta(0), store_now - self._clock()) if store_now is not None else timedelta(0)
            session.info[_STORE_LEAD] = lead
        return self._clock() + lead

    def _unwrap(self, row: KeyRow) -> DataKey:
        try:
            if row.wrapped_key is None:
                raise _destroyed(row.key_id, row.version)
            Algorithm(row.algorithm)  # one this build knows, or a damaged row (ValueError)
            material = self.masters.unwrap(row)
        except ConfigurationError:  # the master key source itself is misconfigured (e.g. a KMS key)
            raise
        except (DecryptionFailed, ValueError, NoWrapping):
            if not {row.master_key_ref, row.master_key_ref_next} & set(self.masters.refs):
                # Wrapped by a master key this process does not have: a deployment error (a
                # process started with another key on an empty store), not a forged message.
                # Raised as such, the message is retried and kept, not parked as tampered.
                msg = (
                    f"setting pii_master_key: key {row.key_id!r} v{row.version} is wrapped by another "
                    f"master key ({row.master_key_ref}); every process must use the same master key"
                )
                raise ConfigurationError(msg) from None
            msg = (
                f"key {row.key_id!r} v{row.version} cannot be unwrapped: wrong master key "
                "(setting pii_master_key) or damaged row"
            )
            raise KeyNotFound(msg) from None
        return _data_key(row, material)

    def _load_subject_secret(self) -> bytes:
        key = self._load_active(KeySpec(SUBJECT_INDEX_KEY))

        def read() -> bytes:
            with self.store.transaction() as session:
                row = session.scalars(
                    select(KeyRow).where(KeyRow.key_id == key.key_id, KeyRow.version == key.version)
                ).one()
                if row.wrapped_key is None:  # pragma: no cover - the index key is never destroyed
                    raise _destroyed(row.key_id, row.version)
                return self.masters.unwrap(row)

        secret = _answered_within(read, "celery-pii-key-load", self._waited_on)
        self._subject_secret = secret
        return secret

    def _audit(
        self, session: Session, key_id: str, version: int | None, operation: str, **details: Any
    ) -> None:
        session.add(
            AuditRow(
                timestamp=self._clock(),
                key_id=key_id,
                version=version,
                operation=operation,
                actor=self.actor,
                details=details,
            )
        )

    def _transact(self, work: Callable[[Session], _T]) -> _T:
        # Two writers can pick the same next version number; the unique
        # constraint stops the second, which then runs again and sees the first.
        # A deadlock between two rotations rolls one back, which also runs again.
        for attempt in range(_RETRIES):
            try:
                with self.store.transaction() as session:
                    return work(session)
            except (IntegrityError, WriteConflict):  # noqa: PERF203 - retrying is the point
                if attempt == _RETRIES - 1:
                    msg = "key store write kept conflicting with concurrent writers"
                    raise KeyStoreUnavailable(msg) from None
        raise AssertionError  # pragma: no cover - the loop always returns or raises


def _data_key(row: KeyRow, material: bytes) -> DataKey:
    """The data key of ``row``, with its unwrapped ``material``.

    A retention bucket's deadline is read from its key id, which the master
    key's wrapping authenticates, not from the ``expires_at`` column, which
    nothing does: a database writer who cleared or moved it made the data open
    past its deadline.
    """
    deadline = deadline_in_key_id(row.key_id) or row.expires_at
    expires_at = deadline.timestamp() if deadline is not None else None
    return DataKey(row.key_id, row.version, Algorithm(row.algorithm), material, expires_at=expires_at)


def deadline_in_key_id(key_id: str) -> datetime | None:
    """The deadline a retention bucket's key id names (``key@20261201T030000Z``); ``None`` for another id."""
    _, at, bucket = key_id.partition("@")
    if not at:
        return None
    try:
        return bucket_moment(bucket)
    except ValueError:  # a suffix of another form (tests name buckets freely)
        return None


def bucket_moment(bucket: str) -> datetime:
    """The deadline a retention bucket names (the ``20261201T030000Z`` of ``key@20261201T030000Z``).

    Raises:
        ValueError: not a bucket of :data:`BUCKET_FORMAT`.
    """
    return datetime.strptime(bucket, BUCKET_FORMAT).replace(tzinfo=timezone.utc)


def is_subject_id(value: object) -> bool:
    """True for what may name a data subject (see :func:`subject_text`)."""
    return subject_text(value) is not None


def subject_text(value: object) -> str | None:
    """The text a data subject's keys are named by (hashed), or ``None`` if ``value`` cannot name one.

    A string that is not blank, in Unicode's composed form (NFC): an erasure
    request typed on a system that decomposes accents names the same subject.
    An integer of at most :data:`SUBJECT_INT_BITS` bits, as decimal text; a
    UUID as its canonical text (so ``str(pk)`` names the same subject).
    ``None`` or a blank string would make every call without a subject one
    subject, and a dict or list would hash with its key order and every other
    field in it.  A float is refused too: ``42.0`` would be another subject
    than ``42``.  Nor text that UTF-8 cannot write (a lone surrogate).
    """
    if isinstance(value, str):
        if not value.strip():
            return None
        if not unicodedata.is_normalized("NFC", value):
            value = unicodedata.normalize("NFC", value)
        try:
            value.encode()
        except UnicodeEncodeError:
            return None
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() <= SUBJECT_INT_BITS:
        return str(value)
    if isinstance(value, uuid.UUID):  # a primary key (Django's UUIDField): its canonical text
        return str(value)
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


#: The largest integer subject id, in bits (a 128-bit UUID's integer fits; Python refuses
#: to write integers of more than 4300 digits as text).
SUBJECT_INT_BITS: Final = 256


def _subject_text_or_refuse(value: object) -> str:
    text = subject_text(value)
    if text is None:
        msg = (
            "a data subject's id must be a string (not blank, valid Unicode), an integer "
            f"of at most {SUBJECT_INT_BITS} bits or a UUID, not this {type(value).__name__}"
        )
        raise ConfigurationError(msg)
    return text


def _destroyed(key_id: str, version: int) -> KeyDestroyed:
    return KeyDestroyed(f"key {key_id!r} version {version} was destroyed; data sealed under it is gone")


def _past_deadline(spec: KeySpec) -> EncryptionFailed | KeyDestroyed:
    """What sealing under a retention bucket whose deadline has passed raises.

    New data: the caller's mistake (``EncryptionFailed``).  Data derived from a
    message of that bucket (a result, a retry): the source's key is destroyed,
    as for an erasure (``KeyDestroyed``).
    """
    if spec.derived_from:
        return KeyDestroyed(
            f"key {spec.key_id!r}: its retention deadline has passed; data sealed under it is gone"
        )
    return EncryptionFailed(
        f"the retention deadline (pii_retention) of key {spec.key_id!r} has passed; nothing was sealed"
    )


def check_not_reserved(key_id: str) -> None:
    """Refuse hand-made changes to the library's own keys.

    The subject-index key is the HMAC secret behind every subject key id: a
    new version would give every data subject a new key id, and
    ``forget_subject`` would then miss the keys their data is sealed under.
    """
    _check_key_id(key_id)
    if key_id.startswith(RESERVED_PREFIX):
        msg = f"key {key_id!r} is celery-pii's own key and is never rotated, retired or destroyed by hand"
        raise ConfigurationError(msg)


def _check_user_key_id(key_id: str) -> None:
    """What a person may name a key: as ``pii_key=`` (no ``@`` or ``:``, which the library's own ids use)."""
    from ._config import USER_KEY_ID_HINT, USER_KEY_ID_PATTERN  # noqa: PLC0415 - as _check_key_id

    if not isinstance(key_id, str) or not USER_KEY_ID_PATTERN.match(key_id):
        msg = f"key ids {USER_KEY_ID_HINT}"
        raise ConfigurationError(msg)


def _check_key_id(key_id: str) -> None:
    from ._config import USER_KEY_ID_HINT  # noqa: PLC0415 - as _is_key_id

    if not _is_key_id(key_id):
        # Said as people name keys (pii_key=): the library's own ids are what `keys list` prints.
        msg = f"no key is named {key_id!r}: key ids {USER_KEY_ID_HINT}, or are ids `keys list` prints"
        raise ConfigurationError(msg)


def subject_keys(digests: Sequence[str]) -> Select[Any]:
    """The live versions of the keys of the subjects hashed to ``digests``, bucket keys included.

    Found by the ``subject_id`` column and by the key id too: the master key's
    wrapping authenticates the key id, not the column, which a database
    writer could clear to make erasure miss the keys.  Both through an index.
    """
    by_key_id = [_named(KeyRow.key_id, SUBJECT_KEY_PREFIX + digest, buckets=True) for digest in digests]
    return (
        select(KeyRow)
        .where(or_(KeyRow.subject_id.in_(digests), *by_key_id), KeyRow.status != DESTROYED)
        .order_by(KeyRow.key_id, KeyRow.version)
    )


def _named(column: Any, key_id: str, *, buckets: bool) -> Any:
    """``column`` is ``key_id`` (or, with ``buckets``, one of its retention bucket keys ``key_id@...``).

    The prefix is compared with ``=``, which is case-sensitive on every store,
    not ``LIKE``: SQLite's ignores case, and ``keys destroy Payments`` destroyed
    the buckets of ``payments`` too.
    """
    if not buckets or "@" in key_id:
        return column == key_id
    return or_(column == key_id, _bucket_keys_of(column, key_id))


def _bucket_keys_of(column: Any, key_id: str) -> Any:
    """``column`` is one of ``key_id``'s retention bucket keys (``key_id@20261201T030000Z``).

    A range the key id's index serves, then the exact test (``substr`` alone,
    or ``LIKE``, uses no index everywhere: erasure scanned the whole store).
    ``[key_id@, key_idA)`` holds every bucket key where the column orders by
    bytes, and also under the linguistic collations PostgreSQL databases often
    have (``en_US.UTF-8``, ICU): they ignore (or sort first) punctuation such
    as ``@``, and sort the bucket's first character, a digit, before letters.
    """
    start = f"{key_id}@"
    return and_(column >= start, column < f"{key_id}A", func.substr(column, 1, len(start)) == start)


def _refuse_a_second_subject_index(session: Session) -> None:
    """Raise if the store held a subject index before: a new one would rename every subject's key.

    celery-pii never retires or destroys it, so a store without an active
    version of it but with one of its rows, or with subjects' keys, was
    changed by hand (or restored in part): creating a new secret then made
    every later ``forget_subject`` miss the subjects' keys, and say so as
    "nothing was sealed for this id".

    Raises:
        WriteConflict: another process has just made the first version (it is read instead).
        KeyNotFound: naming the key and what to do.
    """
    statuses = set(session.scalars(select(KeyRow.status).where(KeyRow.key_id == SUBJECT_INDEX_KEY)))
    if ACTIVE in statuses:  # committed since this transaction looked for it
        msg = "the subject index was made by another process meanwhile"
        raise WriteConflict(msg)
    # The exact test alone, whatever the collation: this runs only when there is no active index
    # (the first subject ever, or a store changed by hand).
    prefix = func.substr(KeyRow.key_id, 1, len(SUBJECT_KEY_PREFIX))
    earlier = statuses or session.scalar(select(KeyRow.id).where(prefix == SUBJECT_KEY_PREFIX).limit(1))
    if earlier:
        msg = (
            f"key {SUBJECT_INDEX_KEY!r} has no active version, but the key store holds subjects' keys "
            "made with it (its row was changed or removed by hand); a new one would rename every "
            "subject's key and erasure would miss them: restore its row from a backup of the key store"
        )
        raise KeyNotFound(msg)


def _is_key_id(key_id: object) -> bool:
    """True if a key store can hold ``key_id`` (PostgreSQL refuses a NUL byte with DataError)."""
    from ._config import KEY_ID_PATTERN  # noqa: PLC0415 - avoid a cycle at import time

    return isinstance(key_id, str) and KEY_ID_PATTERN.match(key_id) is not None


# Every key manager alive in this process, for what happens to all of them at
# once: flushing usage counts when the process ends, dropping the parent's at fork.
_live_managers: weakref.WeakSet[KeyManager] = weakref.WeakSet()


#: How long a process that is ending waits for its last usage counts to be written.
#: A key store that hangs (a lock held, a network black hole) must not keep a
#: worker from shutting down or a pool child from being replaced; the counts
#: only steer rotation.
EXIT_FLUSH_TIMEOUT: Final = 5.0


_THE_STORE: Final = "setting pii_key_store_url: the key store"
# With a master key of a service (aws-kms://), a key load waits for it too.
_THE_STORE_OR_KMS: Final = "the key store (pii_key_store_url) or AWS KMS (pii_master_key)"


def _answered_within(work: Callable[[], _T], name: str, waited_on: str = _THE_STORE) -> _T:
    """``work()``'s result, if the key store answers it within ``STORE_ANSWER_TIMEOUT`` seconds.

    Run on a thread of its own, which is left to finish (or hang) on its own
    after that: the publish or task start that waits for it goes on.
    ``waited_on`` names what may not have answered, for the error.

    Raises:
        KeyStoreUnavailable: no answer in time.
        Exception: whatever ``work`` raised, unchanged.
    """
    if _under_eventlet():
        return _answered_on_an_os_thread(work, waited_on)
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(STORE_ANSWER_TIMEOUT)
    if not outcome:
        raise _no_answer(waited_on)
    answered, value = outcome[0]
    if not answered:
        raise value
    return value  # type: ignore[no-any-return]


def _under_eventlet() -> bool:
    """True in a process eventlet has monkey-patched (``celery worker -P eventlet``)."""
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and bool(patcher.is_monkey_patched("thread"))


def _answered_on_an_os_thread(work: Callable[[], _T], waited_on: str) -> _T:
    """:func:`_answered_within` under eventlet: ``work`` on eventlet's pool of OS threads.

    There ``threading.Thread`` is a green thread, and psycopg waits for the
    store in C: the whole worker (every green thread, the one timing the wait
    too) stood still for as long as the store hung.  Waiting for a pool thread
    leaves the hub running.
    """
    from eventlet import Timeout, tpool  # noqa: PLC0415 - only where eventlet runs the process

    with Timeout(STORE_ANSWER_TIMEOUT, False):  # False: on expiry, leave the block quietly
        return cast("_T", tpool.execute(work))
    raise _no_answer(waited_on)


def _no_answer(waited_on: str) -> KeyStoreUnavailable:
    return KeyStoreUnavailable(f"{waited_on} did not answer within {STORE_ANSWER_TIMEOUT:.0f} s")


def flush_all_usage(timeout: float = EXIT_FLUSH_TIMEOUT) -> None:
    """Write the usage counts of every key manager in this process (it is about to end).

    Run at interpreter exit, and by the Celery integration when a pool child
    ends: Celery's prefork children leave through ``os._exit``, which skips
    ``atexit``.  Waits at most ``timeout`` seconds; the writing thread is left
    to the process's end after that.
    """
    managers = list(_live_managers)
    if not managers:
        return
    writer = threading.Thread(target=_flush_each, args=(managers,), name="celery-pii-usage", daemon=True)
    try:
        writer.start()
    except RuntimeError:
        # At interpreter exit some Pythons start no thread (3.12.1 does not;
        # 3.11 and 3.13 do): written here, without the time limit.
        _flush_each(managers)
        return
    writer.join(timeout)
    if writer.is_alive():
        logger.warning("celery-pii: usage counts not written within %.0f s at exit (no answer)", timeout)


def _flush_each(managers: list[KeyManager]) -> None:
    for manager in managers:
        try:
            manager.flush_usage(quiet=True)
        except Exception:  # noqa: BLE001, PERF203 - never fail a process's shutdown
            logger.debug("celery-pii: could not flush usage counts at exit")


def _forget_parents_usage() -> None:
    # A forked child starts with a copy of its parent's unflushed counts, which
    # the parent still flushes itself: counting them here too would count twice.
    for manager in list(_live_managers):
        manager.cache.after_fork()


atexit.register(flush_all_usage)
os.register_at_fork(after_in_child=_forget_parents_usage)


def _algorithm(algorithm: Algorithm | str) -> Algorithm:
    """The algorithm a caller named (``generate_key``), or a ConfigurationError listing the choices."""
    try:
        return Algorithm(algorithm)
    except ValueError:
        choices = ", ".join(repr(known.value) for known in Algorithm)
        msg = f"KeyManager.generate_key: algorithm must be one of {choices}"
        raise ConfigurationError(msg) from None
