"""Chunk leases: one claim row per bulk chunk instead of a claim UPDATE on every message row

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kmsg_chunks",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("in_flight", sa.Boolean(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "chunk"),
    )
    op.create_index(
        "ix_kmsg_chunks_in_flight",
        "kmsg_chunks",
        ["lease_until"],
        postgresql_where=sa.text("in_flight"),
        sqlite_where=sa.text("in_flight"),
    )


def downgrade() -> None:
    op.drop_index("ix_kmsg_chunks_in_flight", table_name="kmsg_chunks")
    op.drop_table("kmsg_chunks")
