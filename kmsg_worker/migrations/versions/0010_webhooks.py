"""webhook endpoints, the event outbox and delivery attempts

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "kmsg_webhook_endpoints",
        sa.Column("id", sa.String(length=24), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("include_phone", sa.Boolean(), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("previous_secret", sa.String(length=100), nullable=True),
        sa.Column("previous_expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("disabled_at", _TS, nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", _TS, nullable=True),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("last_success_at", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_until", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_kmsg_webhook_endpoints_tenant", "kmsg_webhook_endpoints", ["tenant"])
    op.create_table(
        "kmsg_webhook_events",
        sa.Column("id", _BIGINT, autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.String(length=24), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("message_id", sa.String(length=80), nullable=True),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("provider", sa.String(length=32), nullable=True),
        sa.Column("provider_code", sa.String(length=40), nullable=True),
        sa.Column("provider_text", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=40), nullable=True),
        sa.Column("parent_id", sa.String(length=80), nullable=True),
        sa.Column("child_id", sa.String(length=80), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.Column("expired_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    where = sa.text("delivered_at IS NULL AND expired_at IS NULL")
    op.create_index(
        "ix_kmsg_webhook_events_pending",
        "kmsg_webhook_events",
        ["endpoint_id", "id"],
        postgresql_where=where,
        sqlite_where=where,
    )
    completed = sa.text("type = 'batch.completed'")
    op.create_index(
        "ix_kmsg_webhook_events_batch_completed",
        "kmsg_webhook_events",
        ["batch_id"],
        postgresql_where=completed,
        sqlite_where=completed,
    )
    op.create_index("ix_kmsg_webhook_events_created", "kmsg_webhook_events", ["created_at"], postgresql_using="brin")
    op.create_table(
        "kmsg_webhook_attempts",
        sa.Column("id", _BIGINT, autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.String(length=24), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("first_event_id", sa.BigInteger(), nullable=False),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_kmsg_webhook_attempts_endpoint_id", "kmsg_webhook_attempts", ["endpoint_id"])


def downgrade() -> None:
    op.drop_index("ix_kmsg_webhook_attempts_endpoint_id", table_name="kmsg_webhook_attempts")
    op.drop_table("kmsg_webhook_attempts")
    op.drop_index("ix_kmsg_webhook_events_created", table_name="kmsg_webhook_events")
    op.drop_index("ix_kmsg_webhook_events_batch_completed", table_name="kmsg_webhook_events")
    op.drop_index("ix_kmsg_webhook_events_pending", table_name="kmsg_webhook_events")
    op.drop_table("kmsg_webhook_events")
    op.drop_index("ix_kmsg_webhook_endpoints_tenant", table_name="kmsg_webhook_endpoints")
    op.drop_table("kmsg_webhook_endpoints")
