"""Second wrapping per key, for master-key rotation without downtime.

Revision ID: 0002_master_key_rotation
Revises: 0001_key_store
Create Date: 2026-11-28 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_master_key_rotation"
down_revision: str | Sequence[str] | None = "0001_key_store"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("celery_pii_keys") as batch:
        batch.add_column(sa.Column("wrapped_key_next", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("master_key_ref_next", sa.String(160), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("celery_pii_keys") as batch:
        batch.drop_column("master_key_ref_next")
        batch.drop_column("wrapped_key_next")
