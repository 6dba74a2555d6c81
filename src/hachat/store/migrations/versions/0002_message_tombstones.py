"""Message tombstones: a deleted message's idempotency key stays used.

Without them, a retried `POST /messages` carrying the key of a message deleted since would
store the message again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "message_tombstones",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("client_message_id", sa.String(128), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "client_message_id",
                                name="pk_message_tombstones"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_message_tombstones_user_id_users"),
    )
    op.create_index("ix_message_tombstones_deleted_at", "message_tombstones", ["deleted_at"])


def downgrade() -> None:
    op.drop_table("message_tombstones")
