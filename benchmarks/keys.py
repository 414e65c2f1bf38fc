"""The key path: cached lookups, PostgreSQL fetches, per-subject keys, rotation at scale.

    python -m benchmarks.keys [--url postgresql+psycopg://...] [--subjects 100000] [--rotate 10000]

Runs against a fresh schema in the PostgreSQL on this machine (dropped at the
end).  Reports: a cached key lookup (ns), an uncached fetch from PostgreSQL
(ms), the first use of a per-subject key (ms), creating 100,000 per-subject
keys and finding one among them, ``perform_automatic_rotation`` over 10,000
key ids (time and peak memory), and the memory of a key cache holding
100,000 subjects' keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa

from benchmarks import _harness
from celery_pii import migrate
from celery_pii._crypto import Algorithm, DataKey, new_key_material
from celery_pii._keycache import KeyCache
from celery_pii._keys import KeyManager, KeySpec
from celery_pii._sources import LocalMasterKey
from celery_pii._store import ACTIVE, KeyRow, KeyStore, utcnow

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def fresh_schema(url: str) -> tuple[str, Any]:
    schema = f"pii_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    return f"{url}?options={quote(f'-csearch_path={schema}')}", drop


def ms(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "p95_ms": sorted(samples)[int(len(samples) * 0.95)] * 1e3,
    }


def bulk_keys(
    manager: KeyManager, key_ids: list[str], *, subject: bool, due_in: timedelta, batch: int = 2000
) -> float:
    """Insert one active version per key id directly (wrapped as the manager would); seconds taken.

    ``due_in``: when the keys come due for rotation.
    """
    started = time.perf_counter()
    now = utcnow()
    rows = []
    for key_id in key_ids:
        wrapped = manager.masters.wrap(key_id, 1, Algorithm.AES_256_GCM.value, new_key_material())
        rows.append(
            {
                "key_id": key_id,
                "version": 1,
                "algorithm": Algorithm.AES_256_GCM.value,
                "status": ACTIVE,
                "created_at": now,
                "created_by": "benchmark",
                "next_rotation_at": now + due_in,
                "usage_count": 0,
                "subject_id": key_id.removeprefix("subject.") if subject else None,
                **wrapped,
            }
        )
        if len(rows) >= batch:
            _insert(manager, rows)
            rows = []
    if rows:
        _insert(manager, rows)
    return time.perf_counter() - started


def _insert(manager: KeyManager, rows: list[dict[str, Any]]) -> None:
    with manager.store.transaction() as session:
        session.execute(sa.insert(KeyRow), rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: PLR0915 - one measurement after another
    parser = argparse.ArgumentParser(description="key path costs")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--rotate", type=int, default=10_000)
    parser.add_argument("--json", help="output file (default benchmarks/results/keys.json)")
    options = parser.parse_args(argv)
    url, drop = fresh_schema(options.url)
    results: dict[str, Any] = {}
    try:
        migrate(url)
        manager = KeyManager(KeyStore(url), LocalMasterKey(bytes(range(32))))

        # Cached lookup: the publish path once a key is known.
        spec = KeySpec("bench")
        manager.encryption_key(spec)
        number = 1_000_000
        started = time.perf_counter()
        for _ in range(number):
            manager.encryption_key(spec)
        results["cached_lookup_ns"] = (time.perf_counter() - started) / number * 1e9

        # Uncached fetch from PostgreSQL (cache cleared each time): the consume path's first open.
        samples = []
        for _ in range(300):
            manager.cache.clear()
            started = time.perf_counter()
            manager.decryption_key("bench", 1)
            samples.append(time.perf_counter() - started)
        results["uncached_fetch"] = ms(samples)

        # First use of a per-subject key: hash the subject id, create its key (one INSERT).
        samples = []
        for i in range(200):
            started = time.perf_counter()
            key_id, digest = manager.subject_key_id(f"user-{i}")
            manager.encryption_key(KeySpec(key_id, subject_id=digest))
            samples.append(time.perf_counter() - started)
        results["first_subject_key"] = ms(samples)

        # 100,000 per-subject keys in the store; fetching one of them uncached.
        subject_ids = [manager.subject_key_id(f"subject-{i}")[0] for i in range(options.subjects)]
        results["subjects"] = {
            "count": options.subjects,
            # Not due in the rotation measured below, which is over the rot-* keys only.
            "create_seconds": bulk_keys(manager, subject_ids, subject=True, due_in=timedelta(days=365)),
        }
        samples = []
        for i in range(0, options.subjects, max(1, options.subjects // 300)):
            manager.cache.clear()
            started = time.perf_counter()
            manager.decryption_key(subject_ids[i], 1)
            samples.append(time.perf_counter() - started)
        results["subjects"]["uncached_fetch_among_them"] = ms(samples)

        # The key cache holding 100,000 subjects' keys (above pii_key_cache_size's default).
        cache = KeyCache(3600, size=len(subject_ids))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for key_id in subject_ids:
            cache.put(DataKey(key_id, 1, Algorithm.AES_256_GCM, new_key_material()), active=True)
        results["cache_100k_subjects_mb"] = (tracemalloc.get_traced_memory()[0] - before) / 1e6
        tracemalloc.stop()
        del cache

        # perform_automatic_rotation over 10,000 due key ids: time and peak memory.
        rotate_ids = [f"rot-{i:05d}" for i in range(options.rotate)]
        bulk_keys(manager, rotate_ids, subject=False, due_in=timedelta(days=1))
        tracemalloc.start()
        started = time.perf_counter()
        rotated = manager.perform_automatic_rotation(now=utcnow() + timedelta(days=2))
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results["rotation"] = {
            "key_ids": options.rotate,
            "rotated": len(rotated),  # the rot-* keys and the few made above
            "rotated_bulk_keys": len([k for k in rotated if k.startswith("rot-")]),
            "seconds": seconds,
            "per_key_ms": seconds / max(len(rotated), 1) * 1e3,
            "peak_memory_mb": peak / 1e6,
        }
        manager.store.dispose()
    finally:
        drop()
    print(f"cached lookup                 {results['cached_lookup_ns']:8.0f} ns")
    fetch = results["uncached_fetch"]
    print(f"uncached fetch (PostgreSQL)   {fetch['median_ms']:8.2f} ms (p95 {fetch['p95_ms']:.2f})")
    print(f"first use of a subject key    {results['first_subject_key']['median_ms']:8.2f} ms")
    subjects = results["subjects"]
    print(
        f"{subjects['count']} subject keys created in {subjects['create_seconds']:.1f} s; "
        f"one fetched uncached in {subjects['uncached_fetch_among_them']['median_ms']:.2f} ms"
    )
    print(f"key cache with {subjects['count']} subjects: {results['cache_100k_subjects_mb']:.1f} MB")
    rotation = results["rotation"]
    print(
        f"rotation of {rotation['rotated']} key ids: {rotation['seconds']:.1f} s "
        f"({rotation['per_key_ms']:.2f} ms each), peak memory {rotation['peak_memory_mb']:.1f} MB"
    )
    print("written to", _harness.write("keys", results, options.json))
    return results


if __name__ == "__main__":
    main()
