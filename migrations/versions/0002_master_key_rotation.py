"""Second wrapping per key, for master-key rotation without downtime.

Revision ID: 0002_master_key_rotation
Revises: 0001_key_store
Create Date: 2026-11-28 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from celery_pii._migrate import left_by_a_killed_run

revision: str = "0002_master_key_rotation"
down_revision: str | Sequence[str] | None = "0001_key_store"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema (each column skipped if a run killed halfway made it: MySQL/MariaDB)."""
    columns = (
        sa.Column("wrapped_key_next", sa.LargeBinary(), nullable=True),
        sa.Column("master_key_ref_next", sa.String(160), nullable=True),
    )
    with op.batch_alter_table("celery_pii_keys") as batch:
        for column in columns:
            if not left_by_a_killed_run("celery_pii_keys", column=column.name):
                batch.add_column(column)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("celery_pii_keys") as batch:
        batch.drop_column("master_key_ref_next")
        batch.drop_column("wrapped_key_next")
