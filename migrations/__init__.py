"""Alembic migrations of the celery-pii key store (shipped as celery_pii.migrations)."""
