"""The key lookups of the publish and consume paths: answered from the cache here.

:class:`KeyManager` (``_keys``) inherits these two methods; only a cache miss,
a due recheck or a usage flush reaches its own methods, which talk to the key
store.  They live apart from the key manager because this module is one of
those compiled with mypyc when celery-pii is built with ``CELERY_PII_COMPILE=1``
(see ``setup.py``): every message published or opened asks for a key, and a
compiled cache hit costs a fraction of an interpreted one.  ``_keys`` itself
stays interpreted (SQLAlchemy sessions, threads, weak references).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

# The decorator tells mypyc how to compile the class and does nothing at run time
# (black depends on mypy_extensions for the same reason).
from mypy_extensions import mypyc_attr

from ._crypto import DataKey
from ._keycache import KeyCache
from .exceptions import KeyDestroyed

if TYPE_CHECKING:
    from ._keys import KeySpec


__all__ = ["KeyLookup"]


# KeyManager, interpreted, subclasses it: compiled, it must say it allows that.
@mypyc_attr(allow_interpreted_subclasses=True)
class KeyLookup:
    """Data keys for sealing and opening, from the cache; what the cache cannot answer is the subclass's."""

    cache: KeyCache
    #: ``time.monotonic()`` at which the next check for keys destroyed elsewhere is due.
    _next_recheck: float
    _clock: Callable[[], datetime]

    def encryption_key(self, spec: KeySpec) -> DataKey:
        """The active version of ``spec.key_id``, created on first use.

        Raises:
            KeyStoreUnavailable: not cached and the store cannot be reached.
            EncryptionFailed: a retention bucket whose deadline has passed.
            KeyDestroyed: the data is derived from a destroyed key version, or from
                one whose retention deadline has passed (``spec.derived_from``).
        """
        now = time.monotonic()
        if now >= self._next_recheck:
            self.recheck_cache()
        for key_id, version in spec.derived_from:
            if not self.cache.holds(key_id, version, now):
                self._refuse_derived_from_destroyed(key_id, version)
        key = self.cache.active(spec.key_id, now)
        if key is None or (key.expires_at is not None and key.expires_at <= self._clock().timestamp()):
            # A bucket key past its deadline seals nothing, cached or not (what it
            # sealed would be refused on arrival): the store says what to do.
            key = self._load_active(spec)
        if self.cache.flush_due(now):
            self.flush_usage()
        return key

    def decryption_key(self, key_id: str, version: int) -> DataKey:
        """Any live version of a key, for opening.

        Raises:
            KeyNotFound: no such key id or version.
            KeyDestroyed: that version was destroyed.
            KeyStoreUnavailable: not cached and the store cannot be reached.
        """
        now = time.monotonic()
        if now >= self._next_recheck:
            self.recheck_cache()
        key = self.cache.version(key_id, version, now)
        if key is None:
            return self._load_version(key_id, version)
        return key if key.expires_at is None else self._unexpired(key)

    def _unexpired(self, key: DataKey) -> DataKey:
        # Past its retention deadline a key opens nothing, in every process,
        # whether or not enforce_retention has destroyed it yet.
        if key.expires_at is not None and key.expires_at <= self._clock().timestamp():
            msg = (
                f"key {key.key_id!r} version {key.version} was destroyed at its retention deadline; "
                "data sealed under it is gone"
            )
            raise KeyDestroyed(msg)
        return key

    # -- what the subclass answers from the key store ---------------------------------------

    def recheck_cache(self) -> int:
        """Evict cached keys destroyed or retired elsewhere; returns how many versions."""
        raise NotImplementedError

    def flush_usage(self, *, quiet: bool = False) -> None:
        """Write the accumulated usage counts."""
        raise NotImplementedError

    def _refuse_derived_from_destroyed(self, key_id: str, version: int) -> None:
        raise NotImplementedError

    def _load_active(self, spec: KeySpec) -> DataKey:
        raise NotImplementedError

    def _load_version(self, key_id: str, version: int) -> DataKey:
        raise NotImplementedError
