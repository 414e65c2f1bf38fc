"""Index destroyed_at: every process asks for keys destroyed since its last check.

Revision ID: 0003_destroyed_at_index
Revises: 0002_master_key_rotation
Create Date: 2026-11-29 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from celery_pii._migrate import left_by_a_killed_run

revision: str = "0003_destroyed_at_index"
down_revision: str | Sequence[str] | None = "0002_master_key_rotation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema (unless a run killed halfway made the index: MySQL/MariaDB)."""
    if not left_by_a_killed_run("celery_pii_keys", index="ix_celery_pii_keys_destroyed_at"):
        op.create_index("ix_celery_pii_keys_destroyed_at", "celery_pii_keys", ["destroyed_at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_celery_pii_keys_destroyed_at", table_name="celery_pii_keys")
