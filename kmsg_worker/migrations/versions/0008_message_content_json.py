"""Message content as json, not jsonb: nothing queries inside it, and jsonb parses every write

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite keeps JSON as text already
    # Rewrites the table (every row's content is rendered back to text once): run it in a quiet hour.
    op.execute("ALTER TABLE kmsg_messages ALTER COLUMN content TYPE json USING content::json")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE kmsg_messages ALTER COLUMN content TYPE jsonb USING content::jsonb")
