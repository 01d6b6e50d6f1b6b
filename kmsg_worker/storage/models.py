"""SQLAlchemy 2.0 typed models: the system of record.

Indexes are chosen for the sweeps, so each sweep's cost depends on the rows that are due, not on
the size of the table: partial indexes on PostgreSQL (``WHERE status = ...``), plain composite
indexes on SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from kmsg_worker.message.values import DEFAULT_TENANT

__all__ = [
    "SEND_STATE_COLUMNS",
    "Advertiser",
    "Suppression",
    "SENT_CLEARS",
    "ApiKey",
    "Attempt",
    "Base",
    "Batch",
    "ChunkLease",
    "DeadLetter",
    "Heartbeat",
    "IdempotencyKey",
    "MessageRow",
    "ProviderTemplate",
    "Template",
    "Tenant",
    "WebhookAttempt",
    "WebhookEndpoint",
    "WebhookEvent",
]

JsonType = JSON().with_variant(JSONB(), "postgresql")


def _partial(name: str, *columns: str, where: str) -> Index:
    """A partial index, the same predicate on PostgreSQL and SQLite."""
    return Index(name, *columns, postgresql_where=text(where), sqlite_where=text(where))


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type: values are stored as naive UTC text (which sorts correctly) and
    come back aware, so code never compares naive with aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


TS = UTCDateTime()


class Base(DeclarativeBase):
    """Declarative base of every table."""


class MessageRow(Base):
    """One message, from acceptance to its final state."""

    __tablename__ = "kmsg_messages"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    batch_id: Mapped[str | None] = mapped_column(String(40))
    #: Chunk of the batch this row is sent with (one provider request per chunk).
    chunk: Mapped[int | None] = mapped_column(Integer)
    #: The AlimTalk message this is the SMS/LMS fallback of.
    parent_id: Mapped[str | None] = mapped_column(String(80))
    type: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    #: Providers to try in order (failover route), and where we are in it.
    route: Mapped[list[str]] = mapped_column(JsonType)
    route_index: Mapped[int] = mapped_column(Integer, default=0)
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    #: Provider calls made (all providers) and calls on the current provider.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    provider_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Times a worker claimed the message; too many means it is poison.
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(TS)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS)
    #: True when a Celery countdown task will wake this retry; else the sweep does.
    retry_task_published: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The last provider call timed out: reconcile before any resend.
    outcome_unknown: Mapped[bool] = mapped_column(Boolean, default=False)
    scheduled_at: Mapped[datetime | None] = mapped_column(TS)
    next_check_at: Mapped[datetime | None] = mapped_column(TS)
    check_count: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)
    provider_status_code: Mapped[str | None] = mapped_column(String(40))
    provider_status_message: Mapped[str | None] = mapped_column(Text)
    native_fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    #: ``created``, or ``skipped:<reason>`` once the AlimTalk fallback was decided.
    fallback_state: Mapped[str | None] = mapped_column(String(64))
    warnings: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    #: The message itself. ``json``, not ``jsonb``, on PostgreSQL: no query looks inside it, and
    #: jsonb parses every document written and renders every one read (per 100,000 bulk rows, the
    #: backend's CPU: COPY 0.95-1.20 -> 0.83-0.96 s, reading a chunk's rows 0.19-0.30 -> 0.10-0.13 s).
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)
    queued_at: Mapped[datetime | None] = mapped_column(TS)
    sent_at: Mapped[datetime | None] = mapped_column(TS)
    delivered_at: Mapped[datetime | None] = mapped_column(TS)
    #: When the carrier or Kakao reported the failure (``final_at`` is when we learned it).
    failed_at: Mapped[datetime | None] = mapped_column(TS)
    final_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        # Sweeps: each reads only its due rows.
        _partial("ix_kmsg_messages_due_check", "next_check_at", where="status = 'sent'"),
        _partial("ix_kmsg_messages_due_schedule", "scheduled_at", where="status = 'scheduled'"),
        _partial("ix_kmsg_messages_due_retry", "next_attempt_at", where="status = 'retrying'"),
        _partial("ix_kmsg_messages_stale_queued", "queued_at", where="status = 'queued'"),
        _partial("ix_kmsg_messages_lease", "lease_until", where="status = 'sending'"),
        # Every index costs about 3 us per row written, and a bulk message is written at least twice
        # (intake, result): columns that are mostly NULL are indexed only where they are set,
        # and there is no index on ``status`` alone (each state that is looked up has its partial one).
        # Look-ups by the provider's own id (Store.find_by_provider_id, `kmsg get --provider-id`).
        _partial(
            "ix_kmsg_messages_provider_pmid", "provider", "provider_message_id", where="provider_message_id IS NOT NULL"
        ),
        _partial("ix_kmsg_messages_parent_id", "parent_id", where="parent_id IS NOT NULL"),
        Index("ix_kmsg_messages_batch_chunk", "batch_id", "chunk"),
        # Rows arrive in created_at order: a BRIN index serves the reports' time windows at a tiny
        # fraction of a B-tree's write cost (SQLite has no BRIN and keeps a plain index).
        Index("ix_kmsg_messages_created", "created_at", postgresql_using="brin"),
        # The HTTP API lists a tenant's messages newest first (keyset pagination on created_at, id).
        # The producer's own tenant is never listed that way, so its rows (most bulk rows of a
        # deployment without the API) pay nothing for it.
        _partial(
            "ix_kmsg_messages_tenant_created", "tenant", "created_at", "id", where=f"tenant <> '{DEFAULT_TENANT}'"
        ),
    )


#: Where a message stands in its delivery, read with it whenever it is claimed for sending (the
#: single-send claim's RETURNING and a bulk chunk's rows), in this order.
SEND_STATE_COLUMNS = (
    MessageRow.route_index,
    MessageRow.attempts,
    MessageRow.provider_attempts,
    MessageRow.deliveries,
    MessageRow.created_at,
    MessageRow.outcome_unknown,
)


#: The send state of a message just accepted: first provider of its route, nothing tried, claimed or checked.
NEW_MESSAGE_STATE: Mapping[str, Any] = MappingProxyType(
    {
        "route_index": 0,
        "attempts": 0,
        "provider_attempts": 0,
        "deliveries": 0,
        "retry_task_published": False,
        "outcome_unknown": False,
        "check_count": 0,
        "native_fallback": False,
    }
)

#: What a move to ``sent`` clears, on every path that records an accepted send (a single send, a
#: chunk's recipients, a reconciliation): no status checks yet, no lease, no unknown outcome, no error.
SENT_CLEARS: Mapping[str, Any] = MappingProxyType(
    {"check_count": 0, "lease_until": None, "outcome_unknown": False, "error_code": None, "error_message": None}
)


class Attempt(Base):
    """One provider call (or reconciliation) for one message."""

    __tablename__ = "kmsg_attempts"

    #: The message (``kmsg_messages.id``). Not a foreign key: PostgreSQL checks one with a trigger
    #: per inserted row, which doubled the cost of recording a bulk chunk; messages are never
    #: deleted while their attempts are kept.
    #: ``(message_id, attempt_no)`` is the key: it serves look-ups by message and turns a redelivered
    #: attempt into a conflict. No surrogate id: its sequence and second index cost a third of the
    #: COPY of a chunk's attempt rows (37 -> 24 ms per 5,000, measured on this machine).
    message_id: Mapped[str] = mapped_column(String(80))
    attempt_no: Mapped[int] = mapped_column(Integer, autoincrement=False)
    provider: Mapped[str] = mapped_column(String(32))
    #: ``accepted``, ``rejected``, ``retryable``, ``timeout``, ``reconciled_sent``, ``reconciled_missing``.
    outcome: Mapped[str] = mapped_column(String(24))
    error_code: Mapped[str | None] = mapped_column(String(40))
    provider_code: Mapped[str | None] = mapped_column(String(40))
    http_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)

    __table_args__ = (PrimaryKeyConstraint("message_id", "attempt_no", name="kmsg_attempts_pkey"),)


class IdempotencyKey(Base):
    """A producer's idempotency key, unique per tenant for its retention window."""

    __tablename__ = "kmsg_idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    message_ids: Mapped[list[str]] = mapped_column(JsonType)
    batch_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS, index=True)


class Batch(Base):
    """A bulk campaign: its messages carry ``batch_id``; counts come from the messages."""

    __tablename__ = "kmsg_batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    invalid_rows: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    chunk_size: Mapped[int] = mapped_column(Integer, default=1000)
    created_at: Mapped[datetime] = mapped_column(TS)
    started_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    cancelled_at: Mapped[datetime | None] = mapped_column(TS)


class ChunkLease(Base):
    """The claim on one chunk of a batch: whoever holds the lease is the only sender of its rows.

    A bulk chunk is claimed here, in one row, instead of moving each of its (up to 10,000) message
    rows to ``sending``: that per-row UPDATE was a third of the database's work per bulk message.
    The rows stay ``queued`` while their request is in flight; ``in_flight`` stays true until the
    chunk's outcomes are recorded. A chunk still ``in_flight`` when its lease runs out lost its
    worker: only the maintenance sweep takes it over, asks the provider which rows it already has,
    and frees the chunk for a new run. Created at intake, so a cancel always finds the row to lock.
    """

    __tablename__ = "kmsg_chunks"

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    lease_until: Mapped[datetime | None] = mapped_column(TS)
    in_flight: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Claims since the last completed run: too many means the chunk is poison.
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        # The sweep's look-up of dead claims reads only chunks in flight.
        _partial("ix_kmsg_chunks_in_flight", "lease_until", where="in_flight"),
    )


class DeadLetter(Base):
    """A task payload that could not be processed (malformed, unknown id): kept, never crashing a worker."""

    __tablename__ = "kmsg_dead_letters"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[str | None] = mapped_column(String(100))
    message_id: Mapped[str | None] = mapped_column(String(80), index=True)
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)


class Heartbeat(Base):
    """The last run of a periodic job (``sweep``, ``poll``): proves that beat fires and a worker consumes.

    One row per job, overwritten on every run, so ``kmsg doctor`` and the metrics can tell a stopped
    beat (or an unconsumed maintenance queue) from a quiet system.
    """

    __tablename__ = "kmsg_heartbeats"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    beat_at: Mapped[datetime] = mapped_column(TS)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)


class Tenant(Base):
    """A customer of the HTTP API; its name is the ``tenant`` of every message its keys send."""

    __tablename__ = "kmsg_tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    #: Set when the tenant is disabled: every one of its keys is refused from then on.
    disabled_at: Mapped[datetime | None] = mapped_column(TS)


class ApiKey(Base):
    """An HTTP API key: its public id and kind are in the key itself, its secret only as a SHA-256 hash."""

    __tablename__ = "kmsg_api_keys"

    #: The public part of the key (``kmsg_live_<id>_<secret>``): found by primary key, then the
    #: secret's hash is compared in constant time.
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    #: ``live`` or ``test`` (a test key's messages only ever reach the simulator).
    kind: Mapped[str] = mapped_column(String(8))
    label: Mapped[str | None] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS)


class Template(Base):
    """One version of a tenant's SMS/LMS/MMS/FriendTalk template.

    ``state`` moves ``draft -> published -> archived`` only; a published (or archived) version is
    never changed again: an edit of it starts the next version as a draft. Messages store the text
    they were rendered to and the ``name@version`` they came from, so archiving a version never
    changes a message already accepted (scheduled ones included).
    """

    __tablename__ = "kmsg_templates"

    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, autoincrement=False)
    #: ``draft``, ``published`` or ``archived``.
    state: Mapped[str] = mapped_column(String(12))
    #: ``SMS``, ``LMS``, ``MMS``, ``FRIENDTALK``, or empty: SMS or LMS by the rendered text's bytes.
    type: Mapped[str | None] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(String(200))
    #: The ``#{name}`` variables of ``body`` and ``subject``, in order of first appearance.
    variables: Mapped[list[str]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)
    published_at: Mapped[datetime | None] = mapped_column(TS)
    archived_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (PrimaryKeyConstraint("tenant", "name", "version", name="kmsg_templates_pkey"),)


class ProviderTemplate(Base):
    """An AlimTalk template as a provider last reported it (``kmsg templates sync``).

    The AlimTalk preflight reads these rows: a send is refused before it is queued when its template
    is unknown, not approved, deleted, or its text differs from the approved body.
    """

    __tablename__ = "kmsg_provider_templates"

    provider: Mapped[str] = mapped_column(String(32))
    #: The provider's template code (Solapi ``templateId``, IWINV ``templateCode``, Aligo ``templtCode``).
    code: Mapped[str] = mapped_column(String(128))
    #: The Kakao channel it belongs to (Solapi ``pfId``/``channelId``, Aligo sender key), or empty
    #: where the provider account has only one.
    channel: Mapped[str] = mapped_column(String(128), default="")
    name: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    variables: Mapped[list[str]] = mapped_column(JsonType)
    #: Buttons in the message form (``name``, ``type``, ``url_mobile`` ...).
    buttons: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    #: ``approved``, ``inspecting`` or ``rejected``.
    approval: Mapped[str] = mapped_column(String(16))
    #: The provider's own status word, as it gave it.
    provider_status: Mapped[str | None] = mapped_column(String(32))
    synced_at: Mapped[datetime] = mapped_column(TS)
    #: Set when a sync no longer found the template at the provider.
    deleted_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (PrimaryKeyConstraint("provider", "code", name="kmsg_provider_templates_pkey"),)


class Advertiser(Base):
    """Who advertises for a tenant's sender number: the parts of the (광고) head and opt-out footer.

    ``sender`` ``*`` is the tenant's profile for every sender number without its own.
    """

    __tablename__ = "kmsg_advertisers"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    sender: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    contact: Mapped[str | None] = mapped_column(String(20))
    opt_out: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(TS)


class Suppression(Base):
    """A number that refused advertising, per tenant, as a keyed hash (never the number itself).

    The key (``KMSG_SUPPRESSION_KEY``) is not in the database: a copy of this table alone does not
    give the numbers back. The primary key ``(digest, tenant)`` serves the intake's look-ups.
    """

    __tablename__ = "kmsg_suppressions"

    #: BLAKE2b keyed with the deployment's key, 16 bytes. Binary, not hex text, and first in the
    #: primary key: a batch probes the key once per advertising row, and every step down the
    #: B-tree is then a byte compare (tenant first, each step compared the tenant's text by
    #: collation); the index is half the size, too.
    digest: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: ``cli``, ``import``, ``api`` or ``provider:<name>`` (an automatic addition).
    source: Mapped[str] = mapped_column(String(40))
    #: The provider's refusal code, for automatic additions.
    provider_code: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(TS)


class WebhookEndpoint(Base):
    """A tenant's webhook endpoint: where its events go, which ones, and how they are signed.

    The signing secret is kept in clear: an HMAC needs it to sign. After a rotation the previous
    secret still signs (a second signature) until ``previous_expires_at``, so receivers can switch.
    The delivery state (failures, next try, the dispatcher's lease) lives on the endpoint: its
    events go out in order, one batch at a time.
    """

    __tablename__ = "kmsg_webhook_endpoints"

    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(Text)
    #: Subscribed event types, comma-separated with a comma at each end (``,message.sent,``), so one
    #: ``LIKE`` in the transition's INSERT ... SELECT tells whether a type is subscribed.
    events: Mapped[str] = mapped_column(Text)
    #: Include the recipient's full number in events (otherwise masked): the tenant's opt-in.
    include_phone: Mapped[bool] = mapped_column(Boolean, default=False)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_expires_at: Mapped[datetime | None] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS)
    disabled_at: Mapped[datetime | None] = mapped_column(TS)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    #: Consecutive failed deliveries, since when, and when the next try is due.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    failing_since: Mapped[datetime | None] = mapped_column(TS)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS)
    last_success_at: Mapped[datetime | None] = mapped_column(TS)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: A dispatcher run holds the endpoint until then (one sender per endpoint).
    lease_until: Mapped[datetime | None] = mapped_column(TS)


class WebhookEvent(Base):
    """One event for one endpoint: the transactional outbox of webhooks.

    Written by the status transition that causes it, in the same statement or transaction, only
    for endpoints subscribed to its type. ``delivered_at`` (or ``expired_at``, after the maximum
    age) ends it. The message text is never copied here; the recipient is read at delivery time.
    """

    __tablename__ = "kmsg_webhook_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(String(24))
    tenant: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(40))
    message_id: Mapped[str | None] = mapped_column(String(80))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str | None] = mapped_column(String(16))
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_code: Mapped[str | None] = mapped_column(String(40))
    provider_text: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(40))
    parent_id: Mapped[str | None] = mapped_column(String(80))
    child_id: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(TS)
    #: Deliveries tried that included this event.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[datetime | None] = mapped_column(TS)
    expired_at: Mapped[datetime | None] = mapped_column(TS)

    __table_args__ = (
        # The dispatcher reads an endpoint's pending events in order: only those are indexed.
        _partial(
            "ix_kmsg_webhook_events_pending",
            "endpoint_id",
            "id",
            where="delivered_at IS NULL AND expired_at IS NULL",
        ),
        # "Has this batch's batch.completed been written?" (one look-up per finished batch).
        _partial("ix_kmsg_webhook_events_batch_completed", "batch_id", where="type = 'batch.completed'"),
        # Replays select by time; events arrive in time order (BRIN on PostgreSQL, as for messages).
        Index("ix_kmsg_webhook_events_created", "created_at", postgresql_using="brin"),
    )


class WebhookAttempt(Base):
    """One POST to an endpoint (a batch of events): its answer or error, kept to explain deliveries."""

    __tablename__ = "kmsg_webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(String(24), index=True)
    events: Mapped[int] = mapped_column(Integer)
    first_event_id: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    ok: Mapped[bool] = mapped_column(Boolean)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(TS)
