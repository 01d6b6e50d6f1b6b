"""advertiser profiles and the opt-out suppression list

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kmsg_advertisers",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("sender", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("contact", sa.String(length=20), nullable=True),
        sa.Column("opt_out", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "sender"),
    )
    op.create_table(
        "kmsg_suppressions",
        sa.Column("digest", sa.LargeBinary(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("provider_code", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", "tenant"),
    )


def downgrade() -> None:
    op.drop_table("kmsg_suppressions")
    op.drop_table("kmsg_advertisers")
