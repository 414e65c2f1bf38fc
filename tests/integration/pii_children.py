"""Functions run in child processes by the concurrency tests (spawned, so importable by name)."""

from __future__ import annotations

from datetime import timedelta


def rotate(url, master_material, barrier, results, automatic):
    """Rotate the key 'shared' (or every due key) once, after all children are ready."""
    from celery_pii._keys import KeyManager
    from celery_pii._sources import LocalMasterKey
    from celery_pii._store import KeyStore, utcnow

    manager = KeyManager(
        KeyStore(url), LocalMasterKey(master_material), rotation_interval=timedelta(seconds=1)
    )
    barrier.wait(timeout=60)
    try:
        if automatic:
            results.put(manager.perform_automatic_rotation(now=utcnow() + timedelta(days=100)))
        else:
            results.put(manager.rotate_key("shared"))
    except Exception as error:  # noqa: BLE001 - reported, so the test fails with a reason
        results.put(f"error: {type(error).__name__}: {error}")
    finally:
        manager.store.dispose()


def migrate(url, barrier, results, in_a_transaction=False):
    """Create the key store's tables, after all children are ready (by URL, or on an open connection)."""
    import sqlalchemy as sa

    from celery_pii import migrate as migrate_store

    barrier.wait(timeout=60)
    try:
        if in_a_transaction:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.begin() as connection:
                migrate_store(connection)
            engine.dispose()
        else:
            migrate_store(url)
        results.put("migrated")
    except Exception as error:  # noqa: BLE001 - reported, so the test fails with a reason
        results.put(f"error: {type(error).__name__}: {str(error)[:300]}")
