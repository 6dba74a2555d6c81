"""Initial schema: users, tokens, groups, memberships, messages, event stream, lease.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here rather than imported from models.py: a migration is a fixed record.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("username_key", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username_key", name="uq_users_username_key"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "auth_tokens",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_auth_tokens"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_auth_tokens_user_id_users"),
        sa.UniqueConstraint("token_hash", name="uq_auth_tokens_token_hash"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_auth_tokens_user_id", "auth_tokens", ["user_id"])
    op.create_table(
        "chat_groups",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_by", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_chat_groups"),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"],
                                name="fk_chat_groups_created_by_users"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "memberships",
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        _ts("added_at"),
        sa.PrimaryKeyConstraint("group_id", "user_id", name="pk_memberships"),
        sa.ForeignKeyConstraint(["group_id"], ["chat_groups.id"], ondelete="CASCADE",
                                name="fk_memberships_group_id_chat_groups"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_memberships_user_id_users"),
    )
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])
    op.create_table(
        "messages",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("client_message_id", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(["group_id"], ["chat_groups.id"], ondelete="CASCADE",
                                name="fk_messages_group_id_chat_groups"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_messages_user_id_users"),
        sa.UniqueConstraint("user_id", "client_message_id",
                            name="uq_messages_user_id_client_message_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_messages_group_id_id", "messages", ["group_id", "id"])
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("group_id", sa.BigInteger(), nullable=True),
        sa.Column("target_user_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
    )
    op.create_index("ix_events_group_id_position", "events", ["group_id", "position"])
    op.create_index("ix_events_target_user_id_position", "events",
                    ["target_user_id", "position"])
    op.create_index("ix_events_message_id", "events", ["message_id"])
    op.create_index("ix_events_created_at", "events", ["created_at"])
    stream_meta = op.create_table(
        "stream_meta",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("floor", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_stream_meta"),
    )
    lease = op.create_table(
        "lease",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("holder_url", sa.String(1024), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.Double(), nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.Double(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_lease"),
    )
    op.bulk_insert(stream_meta, [{"id": 1, "floor": 0}])
    op.bulk_insert(lease, [{"id": 1, "holder": None, "holder_url": None, "epoch": 0,
                            "expires_at": 0.0, "acquired_at": 0.0}])


def downgrade() -> None:
    for table in ("lease", "stream_meta", "events", "messages", "memberships",
                  "chat_groups", "auth_tokens", "users"):
        op.drop_table(table)
