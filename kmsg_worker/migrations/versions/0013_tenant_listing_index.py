"""an index for listing a tenant's messages newest first

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 03:20:00

``GET /v1/messages`` pages a tenant's messages by ``(created_at, id)``; without an index the
database sorted every row of the table for each page. Partial: the producer's own ``default``
tenant is never listed that way, so its bulk rows do not pay the index's write cost.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_kmsg_messages_tenant_created",
        "kmsg_messages",
        ["tenant", "created_at", "id"],
        postgresql_where=sa.text("tenant <> 'default'"),
        sqlite_where=sa.text("tenant <> 'default'"),
    )


def downgrade() -> None:
    op.drop_index("ix_kmsg_messages_tenant_created", table_name="kmsg_messages")
