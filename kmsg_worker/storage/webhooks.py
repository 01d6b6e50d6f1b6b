"""Webhooks in the system of record: endpoints, the event outbox, and the dispatcher's reads and writes.

**The outbox.** A status change a client may be told about writes its event rows in the same
statement (PostgreSQL: the UPDATE's ``RETURNING`` feeds an ``INSERT ... SELECT`` in a ``WITH``) or
the same transaction (SQLite) as the change itself: a rolled-back transition leaves no event, a
committed one cannot lose its event. One INSERT per statement, never one per row, and the join to
the endpoints table makes rows only for tenants with an enabled endpoint subscribed to the type:
a deployment without webhooks pays a join against an empty table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Insert,
    Select,
    Subquery,
    Update,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from kmsg_worker.status import FINAL, MessageStatus
from kmsg_worker.storage.models import TS, Batch, MessageRow, WebhookAttempt, WebhookEndpoint, WebhookEvent

__all__ = [
    "EVENT_FOR_STATUS",
    "EVENT_SOURCE",
    "EVENT_TYPES",
    "PendingEvent",
    "claim_due_endpoints",
    "count_with_events",
    "event_insert",
    "events_for_ids",
    "execute_with_events",
    "expire_events",
    "pending_events",
    "record_completed_batches",
    "record_delivery",
    "recipients",
    "replay",
]

S = MessageStatus

#: Every event type a webhook endpoint can subscribe to.
EVENT_TYPES = (
    "message.sent",
    "message.delivered",
    "message.failed",
    "message.unknown",
    "message.cancelled",
    "message.fallback_created",
    "batch.completed",
)

#: The event a move to each status causes (``dead`` is a failure the client must hear of too).
EVENT_FOR_STATUS: Mapping[MessageStatus, str] = {
    S.SENT: "message.sent",
    S.DELIVERED: "message.delivered",
    S.FAILED: "message.failed",
    S.DEAD: "message.failed",
    S.UNKNOWN: "message.unknown",
    S.CANCELLED: "message.cancelled",
}

#: The message columns an event copies, as the transition's ``RETURNING`` list (in this order).
EVENT_SOURCE = (
    MessageRow.id,
    MessageRow.tenant,
    MessageRow.batch_id,
    MessageRow.status,
    MessageRow.provider,
    MessageRow.provider_status_code,
    MessageRow.provider_status_message,
    MessageRow.error_code,
    MessageRow.parent_id,
)

_EVENT_COLUMNS = [
    "endpoint_id",
    "tenant",
    "type",
    "message_id",
    "batch_id",
    "status",
    "provider",
    "provider_code",
    "provider_text",
    "error_code",
    "parent_id",
    "child_id",
    "created_at",
    "attempts",
]

_ENDPOINTS = WebhookEndpoint.__table__.alias("wh_e")


def event_insert(
    changed: CTE | Subquery, event_type: str, now: datetime | ColumnElement[Any], child_id: str | None = None
) -> Insert:
    """``INSERT INTO kmsg_webhook_events ... SELECT`` one event per changed row and subscribed endpoint.

    Args:
        changed: The changed rows, with the columns of :data:`EVENT_SOURCE` (a ``RETURNING`` CTE on
            PostgreSQL, a select of the rows by id on SQLite).
        event_type: One of :data:`EVENT_TYPES`.
        now: The event's time (a value, or a bind parameter of a statement built once).
        child_id: The fallback child (``message.fallback_created``).
    """
    c = changed.c
    e = _ENDPOINTS.c
    when = now if isinstance(now, ColumnElement) else literal(now, TS)
    rows = select(
        e.id,
        c.tenant,
        literal(event_type),
        c.id,
        c.batch_id,
        c.status,
        c.provider,
        c.provider_status_code,
        c.provider_status_message,
        c.error_code,
        c.parent_id,
        literal(child_id) if child_id is not None else null(),
        when,
        literal(0),
    ).select_from(
        changed.join(
            _ENDPOINTS,
            and_(
                e.tenant == c.tenant,
                e.disabled_at.is_(None),
                # LIKE with '_' and '.' escaped: "message.fallback_created" matches only itself.
                e.events.contains(f",{event_type},", autoescape=True),
            ),
        )
    )
    return insert(WebhookEvent).from_select(_EVENT_COLUMNS, rows)


def _rows_by_id(ids: Sequence[str]) -> Subquery:
    return select(*EVENT_SOURCE).where(MessageRow.id.in_(list(ids))).subquery("changed")


#: Ids per SQLite statement: below its bound-parameter limit.
_SQLITE_IDS = 10_000


def events_for_ids(
    session: Session, ids: Sequence[str], event_type: str, now: datetime, child_id: str | None = None
) -> None:
    """Insert the events of rows ``ids`` just changed in ``session``'s transaction (the SQLite path)."""
    for start in range(0, len(ids), _SQLITE_IDS):
        session.execute(event_insert(_rows_by_id(ids[start : start + _SQLITE_IDS]), event_type, now, child_id))


def execute_with_events(
    session: Session, stmt: Update, event_type: str | None, *, now: datetime, is_postgres: bool
) -> int:
    """Run a status UPDATE of ``kmsg_messages`` and write the events it causes; returns the rows changed.

    PostgreSQL: one statement, ``WITH changed AS (UPDATE ... RETURNING ...), ev AS (INSERT ...)
    SELECT count(*) FROM changed``. SQLite: the UPDATE returns the ids it changed, and one INSERT
    ... SELECT per 10,000 of them follows in the same transaction.
    """
    if event_type is None:
        return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
    if is_postgres:
        changed = stmt.returning(*EVENT_SOURCE).cte("changed")
        return int(session.execute(count_with_events(changed, event_type, now)).scalar_one())
    ids = [str(i) for i in session.scalars(stmt.returning(MessageRow.id))]
    if ids:
        events_for_ids(session, ids, event_type, now)
    return len(ids)


def count_with_events(changed: CTE, event_type: str, now: datetime | ColumnElement[Any]) -> Select[int]:
    """``SELECT count(*) FROM changed`` with the event INSERT attached (a PostgreSQL ``RETURNING`` CTE)."""
    return select(func.count()).select_from(changed).add_cte(event_insert(changed, event_type, now).cte("ev"))


# -- batch.completed --------------------------------------------------------------------------------

#: Batches looked at per run.
_BATCHES_PER_RUN = 100


def record_completed_batches(
    sessions: sessionmaker[Session], *, now: datetime, since: datetime, is_postgres: bool
) -> int:
    """Write ``batch.completed`` for batches whose every message is final; returns how many batches.

    A batch completes when its last message settles, which no single transition can see cheaply;
    so this look-up (run by the dispatcher) writes the event, once per batch: the batch rows are
    locked (``SKIP LOCKED``) and a batch that has its event already is skipped, in the same
    transaction as the insert. Only batches since ``since`` of tenants with an endpoint subscribed
    to ``batch.completed`` are looked at: without such an endpoint this is one probe of an empty
    sub-select.
    """
    e = _ENDPOINTS.c
    wanted = e.events.contains(",batch.completed,", autoescape=True)
    tenants = select(e.tenant).where(e.disabled_at.is_(None), wanted)
    written = (
        select(WebhookEvent.id)
        .where(WebhookEvent.type == "batch.completed", WebhookEvent.batch_id == Batch.id)
        .exists()
    )
    open_rows = (
        select(MessageRow.id)
        .where(MessageRow.batch_id == Batch.id, MessageRow.status.not_in([s.value for s in FINAL]))
        .exists()
    )
    due = (
        select(Batch.id)
        .where(Batch.created_at >= since, Batch.tenant.in_(tenants), ~written, ~open_rows)
        .limit(_BATCHES_PER_RUN)
    )
    if is_postgres:
        due = due.with_for_update(skip_locked=True, of=Batch)
    batches = Batch.__table__
    with sessions.begin() as s:
        ids = [str(i) for i in s.scalars(due)]
        if not ids:
            return 0
        status = case((batches.c.status == "cancelled", "cancelled"), else_="completed")
        blanks = [null()] * 6  # provider, codes and texts, error, parent, child: a batch has none
        rows = (
            select(e.id, batches.c.tenant, literal("batch.completed"), null(), batches.c.id, status)
            .add_columns(*blanks, literal(now, TS), literal(0))
            .select_from(batches.join(_ENDPOINTS, and_(e.tenant == batches.c.tenant, e.disabled_at.is_(None), wanted)))
            .where(batches.c.id.in_(ids))
        )
        s.execute(insert(WebhookEvent).from_select(_EVENT_COLUMNS, rows))
    return len(ids)


# -- endpoints --------------------------------------------------------------------------------------


def subscribed(events: Sequence[str]) -> str:
    """The ``events`` column for a list of types."""
    return "," + ",".join(sorted(set(events))) + ","


def add_endpoint(sessions: sessionmaker[Session], row: Mapping[str, Any]) -> None:
    """Store a new endpoint."""
    with sessions.begin() as s:
        s.execute(insert(WebhookEndpoint), dict(row))


def list_endpoints(sessions: sessionmaker[Session], tenant: str | None = None) -> list[WebhookEndpoint]:
    """A tenant's endpoints (every tenant's with ``None``), oldest first."""
    stmt = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if tenant is not None:
        stmt = stmt.where(WebhookEndpoint.tenant == tenant)
    with sessions() as s:
        return list(s.scalars(stmt))


def get_endpoint(
    sessions: sessionmaker[Session], endpoint_id: str, tenant: str | None = None
) -> WebhookEndpoint | None:
    """One endpoint (only the tenant's own when ``tenant`` is given)."""
    with sessions() as s:
        row = s.get(WebhookEndpoint, endpoint_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return row


def remove_endpoint(sessions: sessionmaker[Session], endpoint_id: str, tenant: str | None = None) -> bool:
    """Delete an endpoint and its undelivered events; ``False`` when there was none (of that tenant)."""
    where = [WebhookEndpoint.id == endpoint_id]
    if tenant is not None:
        where.append(WebhookEndpoint.tenant == tenant)
    with sessions.begin() as s:
        gone = int(s.execute(delete(WebhookEndpoint).where(*where)).rowcount)  # type: ignore[attr-defined]
        if gone:
            s.execute(
                delete(WebhookEvent).where(WebhookEvent.endpoint_id == endpoint_id, WebhookEvent.delivered_at.is_(None))
            )
    return bool(gone)


def rotate_secret(
    sessions: sessionmaker[Session], endpoint_id: str, secret: str, *, keep_until: datetime, tenant: str | None = None
) -> bool:
    """Set a new secret; the current one keeps signing until ``keep_until``."""
    where = [WebhookEndpoint.id == endpoint_id]
    if tenant is not None:
        where.append(WebhookEndpoint.tenant == tenant)
    stmt = (
        update(WebhookEndpoint)
        .where(*where)
        .values(previous_secret=WebhookEndpoint.secret, previous_expires_at=keep_until, secret=secret)
    )
    with sessions.begin() as s:
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def enable_endpoint(sessions: sessionmaker[Session], endpoint_id: str) -> bool:
    """Enable a disabled endpoint again, its failure count cleared."""
    stmt = (
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(disabled_at=None, disabled_reason=None, failures=0, failing_since=None, next_attempt_at=None)
    )
    with sessions.begin() as s:
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


# -- the dispatcher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingEvent:
    """An event waiting for delivery, as the dispatcher sends it."""

    id: int
    tenant: str
    type: str
    message_id: str | None
    batch_id: str | None
    status: str | None
    provider: str | None
    provider_code: str | None
    provider_text: str | None
    error_code: str | None
    parent_id: str | None
    child_id: str | None
    created_at: datetime


def _pending(endpoint_id: str) -> ColumnElement[bool]:
    return and_(
        WebhookEvent.endpoint_id == endpoint_id, WebhookEvent.delivered_at.is_(None), WebhookEvent.expired_at.is_(None)
    )


def claim_due_endpoints(
    sessions: sessionmaker[Session], *, now: datetime, lease: timedelta, limit: int, is_postgres: bool
) -> list[WebhookEndpoint]:
    """Enabled endpoints with pending events whose next try is due: lease them to this run.

    A conditional UPDATE per endpoint: two dispatcher runs never send the same endpoint's events.
    """
    has_pending = (
        select(WebhookEvent.id)
        .where(_pending(WebhookEndpoint.id))  # type: ignore[arg-type]
        .limit(1)
        .correlate(WebhookEndpoint)
        .exists()
    )
    due = and_(
        WebhookEndpoint.disabled_at.is_(None),
        or_(WebhookEndpoint.next_attempt_at.is_(None), WebhookEndpoint.next_attempt_at <= now),
        or_(WebhookEndpoint.lease_until.is_(None), WebhookEndpoint.lease_until <= now),
    )
    with sessions() as s:
        candidates = list(s.scalars(select(WebhookEndpoint.id).where(due, has_pending).limit(limit)))
    claimed: list[WebhookEndpoint] = []
    for endpoint_id in candidates:
        stmt = (
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, due)
            .values(lease_until=now + lease)
            .returning(WebhookEndpoint)
            .execution_options(synchronize_session=False)
        )
        with sessions.begin() as s:
            row = s.scalars(stmt).first()
            if row is not None:
                s.expunge(row)
                claimed.append(row)
    return claimed


def expire_events(sessions: sessionmaker[Session], endpoint_id: str, *, older_than: datetime, now: datetime) -> int:
    """Give up on an endpoint's events created before ``older_than`` (the maximum age)."""
    stmt = (
        update(WebhookEvent)
        .where(_pending(endpoint_id), WebhookEvent.created_at < older_than)
        .values(expired_at=now)
        .execution_options(synchronize_session=False)
    )
    with sessions.begin() as s:
        return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def pending_events(sessions: sessionmaker[Session], endpoint_id: str, limit: int) -> list[PendingEvent]:
    """The endpoint's oldest pending events, in the order they were written."""
    cols = [getattr(WebhookEvent, name) for name in PendingEvent.__dataclass_fields__]
    stmt = select(*cols).where(_pending(endpoint_id)).order_by(WebhookEvent.id).limit(limit)
    with sessions() as s:
        return [PendingEvent(*row) for row in s.execute(stmt)]


def recipients(sessions: sessionmaker[Session], message_ids: Sequence[str]) -> dict[str, str]:
    """The recipient of each message (read when an event is sent, never copied into the outbox)."""
    if not message_ids:
        return {}
    with sessions() as s:
        rows = s.execute(select(MessageRow.id, MessageRow.recipient).where(MessageRow.id.in_(list(message_ids))))
        return {str(i): str(r) for i, r in rows}


def record_delivery(
    sessions: sessionmaker[Session],
    endpoint: WebhookEndpoint,
    events: Sequence[PendingEvent],
    *,
    ok: bool,
    now: datetime,
    http_status: int | None,
    error: str | None,
    latency_ms: float | None,
    next_attempt_at: datetime | None,
    disable_reason: str | None = None,
    release: bool = True,
) -> None:
    """Record one POST: its attempt row, the events delivered (or their attempt count), the endpoint's state.

    With ``release`` the endpoint's lease is given back in the same transaction (the run is done
    with it); without, the run keeps it and sends the next batch.
    """
    ids = [e.id for e in events]
    endpoint_values: dict[str, Any] = {"lease_until": None} if release else {}
    if ok:
        endpoint_values.update(
            failures=0, failing_since=None, next_attempt_at=None, last_success_at=now, last_error=None
        )
    else:
        endpoint_values.update(
            failures=WebhookEndpoint.failures + 1,
            failing_since=func.coalesce(WebhookEndpoint.failing_since, literal(now, TS)),
            next_attempt_at=next_attempt_at,
            last_error=(error or "")[:500],
        )
        if disable_reason is not None:
            endpoint_values.update(disabled_at=now, disabled_reason=disable_reason)
    with sessions.begin() as s:
        s.execute(
            insert(WebhookAttempt).values(
                endpoint_id=endpoint.id,
                events=len(ids),
                first_event_id=min(ids),
                last_event_id=max(ids),
                ok=ok,
                http_status=http_status,
                error=(error or None) and error[:500],
                latency_ms=latency_ms,
                created_at=now,
            )
        )
        event_values: dict[str, Any] = {"attempts": WebhookEvent.attempts + 1}
        if ok:
            event_values["delivered_at"] = now
        s.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id.in_(ids))
            .values(**event_values)
            .execution_options(synchronize_session=False)
        )
        s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(**endpoint_values))


def release_endpoint(sessions: sessionmaker[Session], endpoint_id: str) -> None:
    """Give the endpoint's lease back (nothing left to send)."""
    with sessions.begin() as s:
        s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(lease_until=None))


def replay(
    sessions: sessionmaker[Session], *, since: datetime, endpoint_id: str | None = None, tenant: str | None = None
) -> int:
    """Make events since ``since`` pending again (same ids: a receiver that deduplicates skips what it has)."""
    where: list[ColumnElement[bool]] = [WebhookEvent.created_at >= since]
    if endpoint_id is not None:
        where.append(WebhookEvent.endpoint_id == endpoint_id)
    if tenant is not None:
        where.append(WebhookEvent.tenant == tenant)
    stmt = (
        update(WebhookEvent)
        .where(*where)
        .values(delivered_at=None, expired_at=None)
        .execution_options(synchronize_session=False)
    )
    with sessions.begin() as s:
        return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def delivery_attempts(sessions: sessionmaker[Session], endpoint_id: str, limit: int = 20) -> list[WebhookAttempt]:
    """An endpoint's most recent delivery attempts, newest first."""
    stmt = (
        select(WebhookAttempt)
        .where(WebhookAttempt.endpoint_id == endpoint_id)
        .order_by(WebhookAttempt.id.desc())
        .limit(limit)
    )
    with sessions() as s:
        return list(s.scalars(stmt))


def event_counts(sessions: sessionmaker[Session], endpoint_id: str) -> dict[str, int]:
    """How many of an endpoint's events are pending, delivered and expired."""
    state = case(
        (WebhookEvent.delivered_at.is_not(None), "delivered"),
        (WebhookEvent.expired_at.is_not(None), "expired"),
        else_="pending",
    )
    stmt = select(state, func.count()).where(WebhookEvent.endpoint_id == endpoint_id).group_by(state)
    counts = {"pending": 0, "delivered": 0, "expired": 0}
    with sessions() as s:
        counts.update({str(k): int(n) for k, n in s.execute(stmt)})
    return counts
