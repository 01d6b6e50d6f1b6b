"""Attempts keyed by (message_id, attempt_no): no surrogate id, its sequence or its second index

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The unique constraint already guarded (message_id, attempt_no); it becomes the primary key.
    op.drop_constraint("uq_kmsg_attempts_message_attempt", "kmsg_attempts", type_="unique")
    op.drop_constraint("kmsg_attempts_pkey", "kmsg_attempts", type_="primary")
    op.drop_column("kmsg_attempts", "id")
    op.create_primary_key("kmsg_attempts_pkey", "kmsg_attempts", ["message_id", "attempt_no"])


def downgrade() -> None:
    op.drop_constraint("kmsg_attempts_pkey", "kmsg_attempts", type_="primary")
    op.execute("ALTER TABLE kmsg_attempts ADD COLUMN id BIGSERIAL")
    op.create_primary_key("kmsg_attempts_pkey", "kmsg_attempts", ["id"])
    op.create_unique_constraint("uq_kmsg_attempts_message_attempt", "kmsg_attempts", ["message_id", "attempt_no"])
