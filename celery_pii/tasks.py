"""Beat tasks of celery-pii, referenced by name from ``beat_schedule``.

``setup_pii`` adds this module to ``app.conf.imports`` so workers register
them; it is not imported by the package itself (no side effects on import).
Both are idempotent and safe to run from two beat instances at once (rows
are locked, work already done is skipped) and bounded per run.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from ._celery import get_pii

__all__ = ["enforce_retention", "rotate_keys"]

logger = logging.getLogger("celery_pii.tasks")


@shared_task(name="celery_pii.rotate_keys", bind=True, ignore_result=False)
def rotate_keys(self: Task) -> dict[str, Any]:
    """Rotate due keys (age or message count) and trim old versions; returns the report."""
    report = get_pii(self.app).rotate_keys()
    logger.info(
        "celery-pii: rotate_keys rotated %d key(s), destroyed %d old version(s)",
        report["rotated"],
        report["destroyed_versions"],
    )
    return report


@shared_task(name="celery_pii.enforce_retention", bind=True, ignore_result=False)
def enforce_retention(self: Task) -> dict[str, Any]:
    """Destroy the keys of expired retention buckets; returns the report."""
    report = get_pii(self.app).enforce_retention()
    logger.info(
        "celery-pii: enforce_retention destroyed %d key version(s) of %d key id(s)%s",
        report.destroyed_versions,
        len(report.key_ids),
        "" if report.complete else " (more next run)",
    )
    return report.to_dict()
