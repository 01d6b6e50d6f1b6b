"""Leaner indexes on the hot message table; attempts without a foreign key

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 04:40:00

A bulk message row is written three times (intake COPY, chunk claim, result) and every index adds
about 3 us to each write; the attempts foreign key added a per-row trigger (about 14 us per row).
Measured with ``bench/run.py``; the figures are in docs/PERFORMANCE.md (History).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # Each state that sweeps and gauges look up has its own partial index; one on status alone
    # was only ever written.
    op.drop_index("ix_kmsg_messages_status", table_name="kmsg_messages")
    op.drop_index("ix_kmsg_messages_created", table_name="kmsg_messages")
    if postgres:
        op.create_index("ix_kmsg_messages_created", "kmsg_messages", ["created_at"], postgresql_using="brin")
    else:
        op.create_index("ix_kmsg_messages_created", "kmsg_messages", ["created_at"])
    op.drop_index("ix_kmsg_messages_parent_id", table_name="kmsg_messages")
    op.create_index(
        "ix_kmsg_messages_parent_id",
        "kmsg_messages",
        ["parent_id"],
        postgresql_where=sa.text("parent_id IS NOT NULL"),
        sqlite_where=sa.text("parent_id IS NOT NULL"),
    )
    op.drop_index("ix_kmsg_messages_provider_pmid", table_name="kmsg_messages")
    op.create_index(
        "ix_kmsg_messages_provider_pmid",
        "kmsg_messages",
        ["provider", "provider_message_id"],
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
        sqlite_where=sa.text("provider_message_id IS NOT NULL"),
    )
    if postgres:
        op.drop_constraint("kmsg_attempts_message_id_fkey", "kmsg_attempts", type_="foreignkey")
    else:
        # SQLite's constraint has no name: batch mode names it by convention to drop it.
        with op.batch_alter_table(
            "kmsg_attempts", naming_convention={"fk": "fk_%(table_name)s_%(column_0_name)s"}
        ) as batch:
            batch.drop_constraint("fk_kmsg_attempts_message_id", type_="foreignkey")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.create_foreign_key(
            "kmsg_attempts_message_id_fkey",
            "kmsg_attempts",
            "kmsg_messages",
            ["message_id"],
            ["id"],
            ondelete="CASCADE",
        )
    op.drop_index("ix_kmsg_messages_provider_pmid", table_name="kmsg_messages")
    op.create_index("ix_kmsg_messages_provider_pmid", "kmsg_messages", ["provider", "provider_message_id"])
    op.drop_index("ix_kmsg_messages_parent_id", table_name="kmsg_messages")
    op.create_index("ix_kmsg_messages_parent_id", "kmsg_messages", ["parent_id"])
    op.drop_index("ix_kmsg_messages_created", table_name="kmsg_messages")
    op.create_index("ix_kmsg_messages_created", "kmsg_messages", ["created_at"])
    op.create_index("ix_kmsg_messages_status", "kmsg_messages", ["status"])
