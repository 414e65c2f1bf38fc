"""The in-process key cache: what it remembers, and for how long."""

from __future__ import annotations

import os
import sys
import threading
import time

from celery_pii._crypto import Algorithm, DataKey
from celery_pii._keycache import CACHED_SWEEP_AT, DESTROYED_SWEEP_AT, KeyCache


def test_remembered_destructions_expire_and_are_swept():
    """A process that sees many keys destroyed (retention in a beat worker) does not keep them all."""
    cache = KeyCache(ttl=1.0)  # long enough that filling it never outlasts it
    for version in range(DESTROYED_SWEEP_AT):
        cache.forget("bucket@20260101T000000Z", version, destroyed=True)
    assert cache.is_destroyed("bucket@20260101T000000Z", 0)
    time.sleep(1.1)
    assert not cache.is_destroyed("bucket@20260101T000000Z", 0)  # expired with the TTL
    cache.forget("bucket@20260102T000000Z", 1, destroyed=True)
    assert len(cache._destroyed) == 1  # the expired ones were dropped
    assert cache.is_destroyed("bucket@20260102T000000Z", 1)


def test_live_destructions_survive_a_sweep():
    cache = KeyCache(ttl=3600)
    for version in range(DESTROYED_SWEEP_AT + 10):
        cache.forget("orders", version, destroyed=True)
    assert all(cache.is_destroyed("orders", version) for version in range(DESTROYED_SWEEP_AT + 10))


def test_live_destructions_are_not_swept_at_every_destruction():
    """With every remembered destruction still live, sweeps come at doubling sizes, not each time."""
    cache = KeyCache(ttl=3600)
    sweeps = 0
    for version in range(4 * DESTROYED_SWEEP_AT):
        before = cache._destroyed
        cache.forget("orders", version, destroyed=True)
        sweeps += cache._destroyed is not before  # a sweep builds a new dict
    assert sweeps == 2  # at 4,096 and at 8,192 remembered destructions
    assert all(cache.is_destroyed("orders", version) for version in range(4 * DESTROYED_SWEEP_AT))


def _subject_key(number):
    return DataKey(f"subject:{number:08d}", 1, Algorithm.AES_256_GCM, os.urandom(32))


def test_expired_keys_leave_the_cache():
    """One key per data subject: a worker meets thousands, each once; past their TTL they are dropped.

    They used to be skipped when read but kept in memory, about 4 KB each, for
    the life of the process.
    """
    cache = KeyCache(ttl=1.0)
    for number in range(CACHED_SWEEP_AT):
        cache.put(_subject_key(number), active=True)
    time.sleep(1.1)
    latest = _subject_key(CACHED_SWEEP_AT)
    cache.put(latest, active=True)
    assert len(cache) == 1
    assert len(cache._active) == 1
    assert cache.active(latest.key_id) is latest
    assert cache.version(latest.key_id, 1) is latest


def test_live_keys_survive_a_sweep_and_sweeps_come_at_doubling_sizes():
    cache = KeyCache(ttl=3600, size=10**6)
    keys = [_subject_key(number) for number in range(4 * CACHED_SWEEP_AT)]
    sweeps = 0
    for key in keys:
        before = cache._cached_sweep_at
        cache.put(key, active=True)
        sweeps += cache._cached_sweep_at != before  # a sweep sets the next one's size
    assert sweeps == 2  # at 4,096 and at 8,192 cached keys
    assert all(cache.active(key.key_id) is key for key in keys)


def test_the_cache_holds_at_most_its_size_dropping_the_longest_held_first():
    """A worker meeting a new data subject per task held every key for the whole TTL (an hour).

    At about 3.5 KB a key, 100 new subjects a second grew it by 1.2 GB an hour.
    """
    cache = KeyCache(ttl=3600, size=100)
    keys = [_subject_key(number) for number in range(250)]
    for key in keys[:100]:
        cache.put(key, active=True)
    cache.put(keys[0], active=True)  # read again from the store: now the most recent
    for key in keys[100:]:
        cache.put(key, active=True)
        assert len(cache) <= 100
        assert len(cache._active) <= 100
        assert cache.active(key.key_id) is key  # the key just put is always held
    held = {key_id for key_id, _ in cache._versions}
    assert len(held) >= 100 - 100 // 8
    assert keys[1].key_id not in held  # the longest-held went first
    assert cache.version(keys[1].key_id, 1) is None and cache.active(keys[1].key_id) is None
    assert held == {key.key_id for key in keys[-len(held) :]}
    assert keys[0].key_id not in held  # refreshed at 100 puts, but 150 more came since


def test_dropping_for_size_leaves_an_active_version_put_back_meanwhile():
    """Only the version dropped stops being the active one: a newer active version stays."""
    cache = KeyCache(ttl=3600, size=2)
    old = DataKey("orders", 1, Algorithm.AES_256_GCM, bytes(32))
    new = DataKey("orders", 2, Algorithm.AES_256_GCM, bytes(32))
    cache.put(old, active=True)
    cache.put(new, active=True)
    cache.put(_subject_key(1), active=True)  # over the size: version 1 of orders goes
    assert cache.version("orders", 1) is None
    assert cache.active("orders") is new


def test_usage_is_due_ten_seconds_after_the_last_flush_whatever_the_count():
    """A producer sealing a few messages now and then still writes its counts every 10 seconds.

    (Count-based rotation reads them.)  Nothing pending is never due.
    """
    from celery_pii._crypto import Algorithm, DataKey
    from celery_pii._keycache import FLUSH_EVERY_SECONDS

    cache = KeyCache(ttl=3600)
    now = time.monotonic()
    assert not cache.flush_due(now + FLUSH_EVERY_SECONDS)
    cache.put(DataKey("orders", 1, Algorithm.AES_256_GCM, bytes(32)), active=True)
    for _ in range(201):
        cache.active("orders")
    assert not cache.flush_due(now)
    assert cache.flush_due(now + FLUSH_EVERY_SECONDS)
    assert cache.take_usage() == {("orders", 1): 201}
    assert not cache.flush_due(time.monotonic() + FLUSH_EVERY_SECONDS)


def test_forgetting_a_key_id_while_other_threads_add_keys():
    """``forget(key_id)`` (every rotation) walks the cache while publishing threads add keys to it.

    Walking the dict itself raised "dictionary changed size during iteration".
    """
    cache = KeyCache(ttl=3600)
    keys = [_subject_key(number) for number in range(50_000)]
    for key in keys[:40_000]:
        cache.put(key, active=False)
    errors = []
    done = threading.Event()

    def forget_repeatedly():
        try:
            while not done.is_set():
                cache.forget("orders")
        except RuntimeError as error:
            errors.append(error)

    forgetting = threading.Thread(target=forget_repeatedly)
    forgetting.start()
    try:
        for key in keys[40_000:]:
            cache.put(key, active=False)
    finally:
        done.set()
        forgetting.join()
    assert errors == []


def test_a_sweep_never_brings_back_a_key_forgotten_meanwhile():
    """A thread meeting new keys sweeps while another forgets a destroyed one: it stays forgotten.

    The sweep used to put back a filtered copy of the cache, undoing an eviction
    made in between: the destroyed key was served from the cache again.
    """
    cache = KeyCache(ttl=3600)
    erased = _subject_key(0)
    spares = [_subject_key(number) for number in range(1, 65)]
    stop = threading.Event()

    def meet_new_keys():
        number = 0
        while not stop.is_set():
            past = time.monotonic() - 1
            for _ in range(CACHED_SWEEP_AT):  # versions cached earlier, now past their TTL
                number += 1
                cache._versions[(f"old.{number}", 1)] = (erased, past)
            cache.put(spares[number % len(spares)], active=False)  # sweeps

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    sweeping = threading.Thread(target=meet_new_keys)
    sweeping.start()
    brought_back = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not brought_back:
            cache._versions[(erased.key_id, erased.version)] = (erased, time.monotonic() + 3600)  # in use
            cache.forget(erased.key_id, erased.version, destroyed=True)
            brought_back += cache.version(erased.key_id, erased.version) is not None
    finally:
        stop.set()
        sweeping.join()
        sys.setswitchinterval(switch)
    assert brought_back == 0


def test_a_retention_bucket_key_leaves_the_cache_at_its_deadline():
    """Past its deadline a bucket's key opens and seals nothing: not held the whole TTL."""
    cache = KeyCache(ttl=3600)
    doomed = DataKey(
        "orders@20260101T000000Z", 1, Algorithm.AES_256_GCM, bytes(32), expires_at=time.time() + 0.2
    )
    kept = DataKey("orders", 1, Algorithm.AES_256_GCM, bytes(32))
    cache.put(doomed, active=True)
    cache.put(kept, active=True)
    assert cache.holds("orders@20260101T000000Z", 1)
    time.sleep(0.3)
    assert not cache.holds("orders@20260101T000000Z", 1)
    cache._drop_expired(time.monotonic())
    assert list(cache._versions) == [("orders", 1)]


def test_threads_using_a_key_at_once_lose_no_count():
    """Every use is counted: threads sealing at once lost a fifth to two fifths of their counts.

    Rotation by message count (``pii_rotation_max_messages``) came late by as much.
    """
    cache = KeyCache(ttl=3600)
    key = DataKey("orders", 1, Algorithm.AES_256_GCM, os.urandom(32))
    cache.put(key, active=True)
    threads, uses = 8, 20_000
    start = threading.Barrier(threads)

    def use() -> None:
        start.wait()
        for _ in range(uses):
            cache.active("orders")

    taken = []  # what flushes took meanwhile: a use made while one takes the counts is not lost either
    done = threading.Event()

    def flush() -> None:
        while not done.is_set():
            taken.append(cache.take_usage().get(key.usage_key, 0))
            time.sleep(0.001)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: the race shows at once
    try:
        flusher = threading.Thread(target=flush)
        workers = [threading.Thread(target=use) for _ in range(threads)]
        flusher.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        done.set()
        flusher.join()
    finally:
        sys.setswitchinterval(previous)
    taken += [cache.take_usage().get(key.usage_key, 0) for _ in range(2)]  # the second: late appends
    assert len(taken) > 3
    assert sum(taken) == threads * uses
