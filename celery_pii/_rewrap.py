"""Master-key rotation: re-wrap every data key under a new master key, then switch.

See ``_wrapping`` for the two wrappings a row can hold, and
docs/operations.md for the procedure.  Both steps work in batches (one
transaction each, rows locked and skipped if another process holds them),
are resumable after an interruption (rows already done are not selected
again) and leave a ``master_rewrap`` audit record per batch.  A run counts
what is left when it ends, so rows skipped while locked make it incomplete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from ._keys import KeyManager
from ._sources import MasterKey
from ._store import DESTROYED, AuditRow, KeyRow
from ._wrapping import NoWrapping, add_wrapping, promote
from .exceptions import ConfigurationError, DecryptionFailed

__all__ = ["RewrapReport", "abort", "finish", "pending", "rewrap"]

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class RewrapReport:
    """What a re-wrap (or finish) run did; never key material."""

    done: int
    skipped: int
    unreadable: int
    complete: bool


def pending(keys: KeyManager, new_ref: str) -> int:
    """Live key versions that have no wrapping under the master key ``new_ref`` yet."""
    with keys.store.transaction() as session:
        return session.scalar(select(func.count()).select_from(KeyRow).where(_needs(new_ref))) or 0


def _needs(new_ref: str) -> ColumnElement[bool]:
    return and_(
        KeyRow.status != DESTROYED,
        or_(KeyRow.master_key_ref.is_(None), KeyRow.master_key_ref != new_ref),
        or_(KeyRow.master_key_ref_next.is_(None), KeyRow.master_key_ref_next != new_ref),
    )


def _unfinished(current_ref: str) -> ColumnElement[bool]:
    """Live key versions still wrapped by another master key than ``current_ref`` (or by two)."""
    return and_(
        KeyRow.status != DESTROYED,
        or_(KeyRow.master_key_ref != current_ref, KeyRow.master_key_ref_next.is_not(None)),
    )


def rewrap(
    keys: KeyManager, new: MasterKey, *, batch_size: int = 200, progress: Progress | None = None
) -> RewrapReport:
    """Add a wrapping under ``new`` to every live data key (the old wrapping stays).

    Run it with the *current* master key configured; the old key keeps working
    throughout.  Rows whose wrappings match none of this process's master keys
    are counted as ``unreadable`` and left alone.
    """
    refuse_overwriting_another_rotation(keys, new.ref)
    done = unreadable = 0
    after_id = 0
    while True:

        def batch(session: Session, start: int = after_id) -> tuple[int, int, int, int]:
            rows = session.scalars(
                select(KeyRow)
                .where(KeyRow.id > start, _needs(new.ref))
                .order_by(KeyRow.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            wrapped = failed = 0
            for row in rows:
                if row.master_key_ref_next is not None:
                    # A rewrap to another key, run meanwhile, wrote it after the check
                    # above: replacing its wrapping would strand that key's processes.
                    # (Locked here, so it cannot be written while this batch runs.)
                    raise _another_rotation(row.master_key_ref_next)
                try:
                    material = keys.masters.unwrap(row)
                except (NoWrapping, DecryptionFailed):
                    failed += 1
                    continue
                wrapped += add_wrapping(row, material, new)
            if wrapped:
                keys._audit(session, "*", None, "master_rewrap", rows=wrapped, new_master=new.ref)  # noqa: SLF001
            return len(rows), wrapped, failed, rows[-1].id if rows else start

        seen, wrapped, failed, after_id = keys._transact(batch)  # noqa: SLF001
        done, unreadable = done + wrapped, unreadable + failed
        if progress is not None and seen:
            progress(seen)
        if seen < batch_size:
            # SKIP LOCKED passed over rows another transaction held (a rotation, a
            # usage flush), and rows may have been added meanwhile: only a final
            # count says whether every live key now has a wrapping under ``new``.
            left = pending(keys, new.ref)
            busy = max(0, left - unreadable)
            return RewrapReport(done=done, skipped=busy, unreadable=unreadable, complete=left == 0)


def refuse_overwriting_another_rotation(keys: KeyManager, new_ref: str) -> None:
    """A row's second slot holding a third master key's wrapping is an unfinished rotation.

    Re-wrapping would replace that wrapping, and processes on that key would
    lose the row: the earlier rotation must be finished (or abandoned) first.
    Re-wrapping under this process's own master key is no rotation at all,
    unless the process also has a previous one: then it is step 3 of the
    procedure, which wraps under the new key what old processes created
    during the switch.
    """
    if new_ref == keys.masters.current.ref and keys.masters.previous is None:
        msg = (
            f"--new-master-key: {new_ref} is this process's own master key (pii_master_key); give the new one"
        )
        raise ConfigurationError(msg)
    with keys.store.transaction() as session:
        other = session.scalars(
            select(KeyRow.master_key_ref_next)
            .where(_needs(new_ref), KeyRow.master_key_ref_next.is_not(None))
            .limit(1)
        ).first()
    if other is not None:
        raise _another_rotation(other)


def _another_rotation(other_ref: str) -> ConfigurationError:
    msg = (
        f"--new-master-key: key versions already hold a second wrapping under master key {other_ref}: an "
        "earlier master-key rotation is unfinished; finish it (rewrap --finish), or abandon it "
        "(rewrap --abort), before starting another"
    )
    return ConfigurationError(msg)


def _refuse_to_finish_early(keys: KeyManager) -> None:
    """``finish`` only from a process on the new master key alone (docs/operations.md, step 4).

    One that still has ``pii_previous_master_key`` says the old key is still
    configured somewhere, and processes so configured wrap the keys they create
    under it again.  One whose ``pii_master_key`` is not the key the last
    rewrap added would drop the new wrappings and keep the old ones.
    """
    if keys.masters.previous is not None:
        msg = (
            "pii_previous_master_key is still set: remove it from every process (workers, producers, "
            "beat) first, else keys they create are wrapped under the old master key again; then finish"
        )
        raise ConfigurationError(msg)
    current = keys.masters.current.ref
    added = _last_added(keys) or current
    if added != current:
        msg = (
            f"pii_master_key: this process's master key ({current}) is not the one the last rewrap "
            f"added ({added}); finish from a process configured with that one"
        )
        raise ConfigurationError(msg)


#: How many of the latest master_rewrap records finish reads to find the last rewrap's.
_RECORDS_SEARCHED = 1000


def _last_added(keys: KeyManager) -> str | None:
    """The master key the last rewrap added (``None`` if no record of one is among the latest)."""
    with keys.store.transaction() as session:
        records = session.scalars(
            select(AuditRow.details)
            .where(AuditRow.key_id == "*", AuditRow.operation == "master_rewrap")
            .order_by(AuditRow.id.desc())
            .limit(_RECORDS_SEARCHED)
        ).all()
    return next((r["new_master"] for r in records if isinstance(r, dict) and "new_master" in r), None)


def finish(keys: KeyManager, *, batch_size: int = 200, progress: Progress | None = None) -> RewrapReport:
    """Make the current master key's wrapping the only one, once every process uses it.

    Rows without a wrapping under the current master key are left as they are
    (``skipped``): run :func:`rewrap` first, then finish again.

    Raises:
        ConfigurationError: this process still has ``pii_previous_master_key``,
            or its master key is not the one the last rewrap added.
    """
    _refuse_to_finish_early(keys)
    return _keep_only_current(keys, batch_size, progress, finished=True)


def abort(keys: KeyManager, *, batch_size: int = 200, progress: Progress | None = None) -> RewrapReport:
    """Abandon a master-key rotation: keep only the wrappings under this process's (old) master key.

    For when the new key is lost, wrong or exposed before the rotation is
    finished.  Run it once every process is back on the old master key
    alone: the wrappings under the new key are dropped, also from keys that
    processes on the new key created (they are wrapped under both).

    Raises:
        ConfigurationError: this process still has ``pii_previous_master_key``,
            or its master key is the one the last rewrap added (that is
            finishing the rotation: ``--finish``).
    """
    if keys.masters.previous is not None:
        msg = (
            "pii_previous_master_key is set: abandon a rotation from a process on the old master key "
            "alone, once every process (workers, producers, beat) is back on it"
        )
        raise ConfigurationError(msg)
    current = keys.masters.current.ref
    if _last_added(keys) == current:
        msg = (
            f"pii_master_key: this process's master key ({current}) is the one the last rewrap added: "
            "abandon from a process on the old master key (or finish the rotation with --finish)"
        )
        raise ConfigurationError(msg)
    return _keep_only_current(keys, batch_size, progress, finished=False)


def _keep_only_current(
    keys: KeyManager, batch_size: int, progress: Progress | None, *, finished: bool
) -> RewrapReport:
    """Make the current master key's wrapping the only one of every live row that has it."""
    current = keys.masters.current
    outcome = "finished" if finished else "abandoned"
    done = skipped = 0
    after_id = 0
    while True:

        def batch(session: Session, start: int = after_id) -> tuple[int, int, int, int]:
            rows = session.scalars(
                select(KeyRow)
                .where(KeyRow.id > start, _unfinished(current.ref))
                .order_by(KeyRow.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            promoted = sum(promote(row, current) for row in rows)
            if promoted:
                details = {outcome: promoted, "master": current.ref}
                keys._audit(session, "*", None, "master_rewrap", **details)  # noqa: SLF001
            return len(rows), promoted, len(rows) - promoted, rows[-1].id if rows else start

        seen, promoted, left, after_id = keys._transact(batch)  # noqa: SLF001
        done, skipped = done + promoted, skipped + left
        if progress is not None and seen:
            progress(seen)
        if seen < batch_size:
            keys.cache.clear()
            # As in rewrap: rows skipped while locked elsewhere are still unfinished.
            with keys.store.transaction() as session:
                # Destroyed versions hold no wrapping; an earlier build left them naming their master keys.
                session.execute(
                    update(KeyRow)
                    .where(KeyRow.status == DESTROYED, KeyRow.master_key_ref.is_not(None))
                    .values(master_key_ref=None, master_key_ref_next=None)
                )
                count = select(func.count()).select_from(KeyRow).where(_unfinished(current.ref))
                remaining = session.scalar(count) or 0
            return RewrapReport(
                done=done, skipped=max(skipped, remaining), unreadable=0, complete=remaining == 0
            )
