"""Wrapping data keys under master keys, and moving them to a new master key.

Each key row holds up to two wrappings of its material: the *primary* one
(``wrapped_key``, ``master_key_ref``) and, while a master key is being
replaced, a *next* one (``wrapped_key_next``, ``master_key_ref_next``).  A
process unwraps with whichever wrapping its own master keys match, so during
a master-key rotation processes on the old key and on the new key both keep
working:

1. ``rewrap(new)`` (run with the old key configured) adds a wrapping under
   the new key to every live row, in batches, resumably;
2. processes are redeployed with ``pii_master_key`` = new and
   ``pii_previous_master_key`` = old; keys they create get both wrappings;
3. ``finish(...)`` makes the new wrapping primary and drops the old one; then
   ``pii_previous_master_key`` is removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._sources import MasterKey

if TYPE_CHECKING:
    from ._store import KeyRow

__all__ = ["MasterKeys", "NoWrapping", "wrap_context"]


class NoWrapping(Exception):
    """No wrapping of a row matches the master keys this process has."""


def wrap_context(key_id: str, version: int, algorithm: str) -> bytes:
    """Associated data of a wrapped key: moving it to another row makes it fail to unwrap."""
    return f"celery-pii key\x00{key_id}\x00{version}\x00{algorithm}".encode()


class MasterKeys:
    """The master key of this process, and the one it replaces (during a rotation)."""

    __slots__ = ("current", "previous")

    def __init__(self, current: MasterKey, previous: MasterKey | None = None) -> None:
        self.current = current
        self.previous = previous

    @property
    def refs(self) -> tuple[str, ...]:
        """The references of every master key this process holds."""
        return (self.current.ref,) + ((self.previous.ref,) if self.previous is not None else ())

    def wrap(self, key_id: str, version: int, algorithm: str, material: bytes) -> dict[str, object]:
        """Column values of a new row: wrapped under the current key (and the previous one too)."""
        context = wrap_context(key_id, version, algorithm)
        columns: dict[str, object] = {
            "wrapped_key": self.current.wrap(material, context=context),
            "master_key_ref": self.current.ref,
            "wrapped_key_next": None,
            "master_key_ref_next": None,
        }
        if self.previous is not None:
            # Processes not yet moved to the new master key can still read it.
            columns["wrapped_key_next"] = self.previous.wrap(material, context=context)
            columns["master_key_ref_next"] = self.previous.ref
        return columns

    def unwrap(self, row: KeyRow) -> bytes:
        """The row's key material, from whichever wrapping one of our master keys matches.

        Raises:
            NoWrapping: none of the row's wrappings is under a master key we hold.
            DecryptionFailed: the matching wrapping does not open (damaged or moved).
        """
        context = wrap_context(row.key_id, row.version, row.algorithm)
        for master in self._masters():
            wrappings = (
                (row.wrapped_key, row.master_key_ref),
                (row.wrapped_key_next, row.master_key_ref_next),
            )
            for wrapped, ref in wrappings:
                if wrapped is not None and ref == master.ref:
                    return master.unwrap(wrapped, context=context)
        raise NoWrapping

    def _masters(self) -> Sequence[MasterKey]:
        return (self.current,) if self.previous is None else (self.current, self.previous)


def add_wrapping(row: KeyRow, material: bytes, new: MasterKey) -> bool:
    """Wrap ``material`` under ``new`` into the row's *next* slot; False if it already has it."""
    if new.ref in (row.master_key_ref, row.master_key_ref_next):
        return False
    row.wrapped_key_next = new.wrap(material, context=wrap_context(row.key_id, row.version, row.algorithm))
    row.master_key_ref_next = new.ref
    return True


def promote(row: KeyRow, current: MasterKey) -> bool:
    """Make the wrapping under ``current`` the primary one and drop the other.

    Returns:
        False if the row has no wrapping under ``current`` (rewrap it first).
    """
    if row.master_key_ref == current.ref:
        row.wrapped_key_next = row.master_key_ref_next = None
        return True
    if row.master_key_ref_next == current.ref:
        row.wrapped_key, row.master_key_ref = row.wrapped_key_next, row.master_key_ref_next
        row.wrapped_key_next = row.master_key_ref_next = None
        return True
    return False
