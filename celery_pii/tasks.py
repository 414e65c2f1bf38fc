"""Beat tasks of celery-pii, referenced by name from ``beat_schedule``.

``setup_pii`` adds this module to ``app.conf.imports`` so workers register
them; it is not imported by the package itself (no side effects on import).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app, shared_task

from ._celery import get_pii

__all__ = ["enforce_retention", "rotate_keys"]

logger = logging.getLogger("celery_pii.tasks")


@shared_task(name="celery_pii.rotate_keys", ignore_result=False)
def rotate_keys() -> dict[str, Any]:
    """Rotate keys that are due (age or message count); returns a report of key ids."""
    pii = get_pii(current_app._get_current_object())  # noqa: SLF001
    rotated = pii.keys.perform_automatic_rotation()
    report = {"rotated": len(rotated), "key_ids": rotated}
    logger.info("celery-pii: rotate_keys rotated %d key(s)", len(rotated))
    return report


@shared_task(name="celery_pii.enforce_retention", ignore_result=False)
def enforce_retention() -> dict[str, Any]:
    """Destroy the keys of expired retention buckets; returns a report of key ids."""
    pii = get_pii(current_app._get_current_object())  # noqa: SLF001
    destroyed = pii.keys.destroy_expired()
    report = {"destroyed": len(destroyed), "key_ids": sorted({key_id for key_id, _ in destroyed})}
    logger.info("celery-pii: enforce_retention destroyed %d key version(s)", len(destroyed))
    return report
