"""Alembic revisions of the celery-pii key store."""
