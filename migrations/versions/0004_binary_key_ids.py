"""Compare key ids case-sensitively on MySQL/MariaDB (binary collation); no-op elsewhere.

MySQL and MariaDB compare strings with the column's collation, which is
case-insensitive by default (``utf8mb4_general_ci``, ``utf8mb4_0900_ai_ci``):
key ids ``Payments`` and ``payments`` were one key there, so destroying one
shredded the other's data.  PostgreSQL and SQLite compare them byte for byte
already.  Key ids, subject hashes and master-key references become
``utf8mb4_bin``.

Downgrading restores the table's default collation; it fails if key ids that
differ only in case now both exist (the unique key on key id and version).

Revision ID: 0004_binary_key_ids
Revises: 0003_destroyed_at_index
Create Date: 2026-11-29 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004_binary_key_ids"
down_revision: str | Sequence[str] | None = "0003_destroyed_at_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column, length, nullable) per table, as created by 0001 and 0002.
_COLUMNS: dict[str, tuple[tuple[str, int, bool], ...]] = {
    "celery_pii_keys": (
        ("key_id", 160, False),
        ("subject_id", 64, True),
        ("master_key_ref", 160, True),
        ("master_key_ref_next", 160, True),
    ),
    "celery_pii_key_audit": (("key_id", 160, False),),
}


def _on_mysql() -> bool:
    return op.get_context().dialect.name in {"mysql", "mariadb"}


def _alter(collation: str) -> None:
    # One ALTER per table: MySQL rebuilds the table (and its key id indexes) once.
    for table, columns in _COLUMNS.items():
        changes = ", ".join(
            f"MODIFY {name} VARCHAR({length}){collation} {'NULL' if nullable else 'NOT NULL'}"
            for name, length, nullable in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")


def upgrade() -> None:
    """Upgrade schema."""
    if _on_mysql():
        _alter(" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")


def downgrade() -> None:
    """Downgrade schema."""
    if _on_mysql():
        _alter("")  # the table's default character set and collation
