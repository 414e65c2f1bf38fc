"""In-process cache of unwrapped data keys, and usage counters.

Publishing and opening look keys up here first: a hit is a dict lookup and a
clock read, with no database round trip.  A key destroyed by another process
is evicted by the key manager's periodic check (``pii_key_recheck_interval``);
entries also expire after ``pii_key_cache_ttl`` seconds, which bounds how long
a process that cannot reach the store keeps using one (the destroying process
evicts at once).  At most ``pii_key_cache_size`` versions are held: a worker
meets one key per data subject, and each costs about 3.5 KB with its cipher.

Usage counts (encryptions per key version) are accumulated here and flushed
by the key manager in batches, never one database write per message.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from typing import Final, TypeVar

from ._crypto import DataKey

__all__ = ["KeyCache"]

#: Flush usage counts after this many encryptions or seconds, whichever first
#: (a flush is one UPDATE per key version; rotation by count only needs them
#: to be roughly current).
FLUSH_EVERY_USES: Final = 100_000
FLUSH_EVERY_SECONDS: Final = 10.0
#: Past this many remembered destructions, expired ones are dropped (a beat worker
#: enforcing retention sees every destroyed bucket key go by, cached or not).
DESTROYED_SWEEP_AT: Final = 4096
#: Past this many cached key versions, expired ones are dropped when a key is added
#: (one key per data subject or retention bucket: a process meets many, each once).
CACHED_SWEEP_AT: Final = 4096


class KeyCache:
    """Unwrapped data keys by (key id, version) and the active version per key id."""

    __slots__ = (
        "_active",
        "_cached_sweep_at",
        "_destroyed",
        "_destroyed_sweep_at",
        "_lock",
        "_returned",
        "_swapped",
        "_swapped_counted",
        "_usage_since",
        "_uses",
        "_versions",
        "hits",
        "misses",
        "size",
        "ttl",
    )

    _uses: list[tuple[str, int]]  # the usage key of every use since the last take_usage, in order
    _swapped: list[tuple[str, int]]  # the list take_usage last took over
    _swapped_counted: int  # how much of it that counted
    _returned: dict[tuple[str, int], int]  # counts a failed flush gave back
    _usage_since: float

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._active: dict[str, tuple[DataKey, float]] = {}
        self._versions: dict[tuple[str, int], tuple[DataKey, float]] = {}
        self._destroyed: dict[tuple[str, int], float] = {}
        self._destroyed_sweep_at = DESTROYED_SWEEP_AT
        self._cached_sweep_at = CACHED_SWEEP_AT
        self._lock = threading.Lock()
        self._start_counting()
        self.hits = 0
        self.misses = 0

    def active(self, key_id: str, now: float | None = None) -> DataKey | None:
        """The cached active version of ``key_id``, counting one use of it.

        ``now`` is the caller's ``time.monotonic()``, if it has just read it.
        """
        entry = self._active.get(key_id)
        if entry is not None and entry[1] > (time.monotonic() if now is None else now):
            self.hits += 1
            key = entry[0]
            # One append per use: atomic, so threads sealing at once lose no count (adding
            # to a dict's entry lost a fifth to two fifths of them), and cheaper than a lock.
            self._uses.append(key.usage_key)
            return key
        self.misses += 1
        return None

    def version(self, key_id: str, version: int, now: float | None = None) -> DataKey | None:
        """A cached version of ``key_id`` (for opening); ``now`` as for :meth:`active`."""
        entry = self._versions.get((key_id, version))
        if entry is not None and entry[1] > (time.monotonic() if now is None else now):
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def holds(self, key_id: str, version: int, now: float | None = None) -> bool:
        """True if that version is cached (so not known destroyed: the periodic check evicts those)."""
        entry = self._versions.get((key_id, version))
        return entry is not None and entry[1] > (time.monotonic() if now is None else now)

    def is_destroyed(self, key_id: str, version: int) -> bool:
        """True if this process recently saw that version destroyed."""
        expiry = self._destroyed.get((key_id, version))
        return expiry is not None and expiry > time.monotonic()

    def put(self, key: DataKey, *, active: bool) -> None:
        """Cache a key (and make it the active one for its id)."""
        now = time.monotonic()
        if len(self._versions) >= self._cached_sweep_at:
            self._drop_expired(now)
        expiry = now + self.ttl
        if key.expires_at is not None:
            # A retention bucket's key opens and seals nothing past its deadline: gone from
            # memory then, not kept the whole TTL (one such key per bucket, per key id).
            expiry = min(expiry, now + max(0.0, key.expires_at - time.time()))
        entry = (key.key_id, key.version)
        self._versions.pop(entry, None)  # put back last: the oldest entries are dropped first
        self._versions[entry] = (key, expiry)
        if active:
            self._active[key.key_id] = (key, expiry)
        if len(self._versions) > self.size:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Forget the longest-held versions, an eighth of the cache at a time.

        A batch, not one: finding the oldest walks the dict from its start, past
        the room left by those dropped before.  A dropped key is read from the
        store again when next needed.
        """
        excess = len(self._versions) - self.size
        if excess <= 0:
            return
        # copy(): another thread may add an entry meanwhile (see forget()).
        oldest = list(itertools.islice(self._versions.copy(), max(excess, self.size // 8)))
        for key_id, version in oldest:
            held = self._versions.pop((key_id, version), None)
            active = self._active.get(key_id)
            if held is not None and active is not None and active[0] is held[0]:
                self._active.pop(key_id, None)

    def _drop_expired(self, now: float) -> None:
        """Forget keys past their TTL (they are skipped when read, but would stay in memory).

        In place, entry by entry: a filtered copy put back would undo what other
        threads did meanwhile (bring back a key ``forget`` had just evicted).
        """
        _drop_expired_from(self._versions, now)
        _drop_expired_from(self._active, now)
        # As for destroyed keys below: when most are still live, wait until the memory doubles.
        self._cached_sweep_at = max(CACHED_SWEEP_AT, 2 * len(self._versions))

    def forget(self, key_id: str, version: int | None = None, *, destroyed: bool = False) -> bool:
        """Evict a key id (all versions) or one version; remember destruction.

        Returns:
            True if something was cached.
        """
        expiry = time.monotonic() + self.ttl
        if version is None:
            # copy() takes the dict in one C call: another thread may add a key meanwhile
            # (list() iterates, and a collection during it can let another thread run).
            cached = [k for k in self._versions.copy() if k[0] == key_id]
        else:  # a direct lookup: the periodic check forgets versions one by one
            cached = [(key_id, version)] if (key_id, version) in self._versions else []
        for entry in cached:
            self._versions.pop(entry, None)  # a sweep in another thread may have dropped it
            if destroyed:
                self._remember_destroyed(entry, expiry)
        if destroyed and version is not None:
            self._remember_destroyed((key_id, version), expiry)
        active = self._active.get(key_id)
        if active is not None and version in (None, active[0].version):
            self._active.pop(key_id, None)
            return True
        return bool(cached)

    def no_longer_active(self, key_id: str, version: int) -> bool:
        """A version was retired elsewhere: stop sealing with it (it stays cached for opening).

        Returns:
            True if it was the cached active version.
        """
        active = self._active.get(key_id)
        if active is None or active[0].version != version:
            return False
        self._active.pop(key_id, None)
        return True

    def _remember_destroyed(self, entry: tuple[str, int], expiry: float) -> None:
        if len(self._destroyed) >= self._destroyed_sweep_at:
            now = time.monotonic()
            # copy(): another thread may add an entry meanwhile (see forget()).
            remembered = self._destroyed.copy().items()
            self._destroyed = {known: until for known, until in remembered if until > now}
            # When most are still live, the next sweep waits until the memory doubles:
            # sweeping on every destruction would cost a pass over all of them each time.
            self._destroyed_sweep_at = max(DESTROYED_SWEEP_AT, 2 * len(self._destroyed))
        self._destroyed[entry] = expiry

    def clear(self) -> None:
        """Drop every cached key."""
        self._active.clear()
        self._versions.clear()
        self._destroyed.clear()
        self._destroyed_sweep_at = DESTROYED_SWEEP_AT
        self._cached_sweep_at = CACHED_SWEEP_AT

    def __len__(self) -> int:
        return len(self._versions)

    def flush_due(self, now: float) -> bool:
        """True when enough uses or time have accumulated to flush counts.

        ``now`` is the caller's ``time.monotonic()`` (the publish path reads it anyway).
        """
        pending = self.pending_uses()
        return bool(pending or self._returned) and (
            pending >= FLUSH_EVERY_USES or now - self._usage_since >= FLUSH_EVERY_SECONDS
        )

    def pending_uses(self) -> int:
        """How many uses were counted since the last :meth:`take_usage`."""
        return len(self._uses)

    def take_usage(self) -> dict[tuple[str, int], int]:
        """Hand over the accumulated counts (and reset them).

        The list of uses is swapped for a new one; a thread that read the old
        one just before may still append to it, so what the old list holds
        past what was counted is counted next time.
        """
        with self._lock:
            uses, self._uses = self._uses, []
            late = self._swapped[self._swapped_counted :]
            counted = len(uses)
            self._swapped, self._swapped_counted = uses, counted
            returned, self._returned = self._returned, {}
            self._usage_since = time.monotonic()
        usage = Counter(uses[:counted])
        usage.update(late)
        usage.update(returned)
        return dict(usage)

    def after_fork(self) -> None:
        """In a forked child: start counting from zero, with a lock no parent thread holds."""
        self._lock = threading.Lock()
        self._start_counting()

    def give_back_usage(self, usage: dict[tuple[str, int], int]) -> None:
        """Return counts that could not be flushed, to try again later."""
        with self._lock:
            for key, count in usage.items():
                self._returned[key] = self._returned.get(key, 0) + count

    def _start_counting(self) -> None:
        self._uses = []
        self._swapped = []
        self._swapped_counted = 0
        self._returned = {}
        self._usage_since = time.monotonic()


_Entry = TypeVar("_Entry")


def _drop_expired_from(cache: dict[_Entry, tuple[DataKey, float]], now: float) -> None:
    # copy(): another thread may add an entry meanwhile (see KeyCache.forget()).
    for entry, held in cache.copy().items():
        if held[1] <= now and cache.get(entry) is held:  # not one put back meanwhile
            cache.pop(entry, None)
