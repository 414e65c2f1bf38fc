"""Index retired_at: every process asks for versions retired (by a rotation or by hand) since its last check.

Revision ID: 0005_retired_at_index
Revises: 0004_binary_key_ids
Create Date: 2026-11-29 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from celery_pii._migrate import left_by_a_killed_run

revision: str = "0005_retired_at_index"
down_revision: str | Sequence[str] | None = "0004_binary_key_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema (unless a run killed halfway made the index: MySQL/MariaDB)."""
    if not left_by_a_killed_run("celery_pii_keys", index="ix_celery_pii_keys_retired_at"):
        op.create_index("ix_celery_pii_keys_retired_at", "celery_pii_keys", ["retired_at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_celery_pii_keys_retired_at", table_name="celery_pii_keys")
