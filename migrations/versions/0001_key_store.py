"""Key store: celery_pii_keys and celery_pii_key_audit.

Revision ID: 0001_key_store
Revises:
Create Date: 2026-11-28 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from celery_pii._migrate import left_by_a_killed_run
from celery_pii._store import UTCDateTime

revision: str = "0001_key_store"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


_KEYS_INDEXES = (
    ("ix_celery_pii_keys_status", "status"),
    ("ix_celery_pii_keys_next_rotation_at", "next_rotation_at"),
    ("ix_celery_pii_keys_expires_at", "expires_at"),
    ("ix_celery_pii_keys_subject_id", "subject_id"),
)
_AUDIT_INDEXES = (
    ("ix_celery_pii_key_audit_key_id", "key_id"),
    ("ix_celery_pii_key_audit_timestamp", "timestamp"),
)


def upgrade() -> None:
    """Upgrade schema (each step skipped if a run killed halfway made it: MySQL/MariaDB)."""
    if not left_by_a_killed_run("celery_pii_keys"):
        _create_keys_table()
    for name, column in _KEYS_INDEXES:
        if not left_by_a_killed_run("celery_pii_keys", index=name):
            op.create_index(name, "celery_pii_keys", [column])
    if not left_by_a_killed_run("celery_pii_key_audit"):
        _create_audit_table()
    for name, column in _AUDIT_INDEXES:
        if not left_by_a_killed_run("celery_pii_key_audit", index=name):
            op.create_index(name, "celery_pii_key_audit", [column])


def _create_keys_table() -> None:
    op.create_table(
        "celery_pii_keys",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(160), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("master_key_ref", sa.String(160), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("rotated_at", UTCDateTime(), nullable=True),
        sa.Column("retired_at", UTCDateTime(), nullable=True),
        sa.Column("destroyed_at", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("next_rotation_at", UTCDateTime(), nullable=True),
        sa.Column("usage_count", sa.BigInteger(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("subject_id", sa.String(64), nullable=True),
        sa.Column("retention_deadline", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_celery_pii_keys"),
        sa.UniqueConstraint("key_id", "version", name="uq_celery_pii_keys_key_id"),
    )


def _create_audit_table() -> None:
    op.create_table(
        "celery_pii_key_audit",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("key_id", sa.String(160), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_celery_pii_key_audit"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_celery_pii_key_audit_timestamp", table_name="celery_pii_key_audit")
    op.drop_index("ix_celery_pii_key_audit_key_id", table_name="celery_pii_key_audit")
    op.drop_table("celery_pii_key_audit")
    op.drop_index("ix_celery_pii_keys_subject_id", table_name="celery_pii_keys")
    op.drop_index("ix_celery_pii_keys_expires_at", table_name="celery_pii_keys")
    op.drop_index("ix_celery_pii_keys_next_rotation_at", table_name="celery_pii_keys")
    op.drop_index("ix_celery_pii_keys_status", table_name="celery_pii_keys")
    op.drop_table("celery_pii_keys")
