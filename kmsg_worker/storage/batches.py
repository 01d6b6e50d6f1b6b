"""A batch's control and counts: cancelling what was not dispatched, and the figures of its summary."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from kmsg_worker.errors import MessageNotFoundError
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.chunks import in_flight_chunks
from kmsg_worker.storage.models import Batch, MessageRow, UTCDateTime
from kmsg_worker.storage.webhooks import execute_with_events

if TYPE_CHECKING:
    from kmsg_worker.storage.repo import Store

__all__ = ["BatchCounts", "batch_counts", "cancel_message_of_batch", "cancel_unsent"]

S = MessageStatus


def cancel_unsent(store: Store, batch_id: str, *, now: datetime) -> tuple[int, int]:
    """Cancel every message of a batch not dispatched yet; ``(cancelled, chunks in flight)``.

    Chunks whose request is in flight are left to finish (what is sent stays sent); their run then
    sees the batch cancelled and cancels whatever it did not send.

    Raises:
        MessageNotFoundError: No such batch.
    """
    with store.sessions.begin() as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise MessageNotFoundError(f"no batch with id {batch_id!r}")
        busy = in_flight_chunks(s, batch_id)
        where = [MessageRow.batch_id == batch_id, MessageRow.status.in_([S.SCHEDULED, S.QUEUED, S.RETRYING])]
        if busy:
            where.append(MessageRow.chunk.not_in(sorted(busy)))
        cancelled = execute_with_events(
            s,
            update(MessageRow)
            .where(*where)
            .values(status=S.CANCELLED, updated_at=now, final_at=now, error_code="CANCELLED")
            .execution_options(synchronize_session=False),
            "message.cancelled",
            now=now,
            is_postgres=store.is_postgres,
        )
        batch.status = "cancelled"
        batch.cancelled_at = now
    return cancelled, len(busy)


def cancel_message_of_batch(store: Store, message_id: str, batch_id: str, chunk: int, *, now: datetime) -> int:
    """Cancel one message of a batch unless its chunk is in flight; returns 1 if it was cancelled."""
    with store.sessions.begin() as s:
        if in_flight_chunks(s, batch_id, [chunk]):
            return 0
        return store.transition(message_id, S.CANCELLED, now=now, session=s, error_code="CANCELLED")


@dataclass
class BatchCounts:
    """What the database says of a batch: its row, and its messages grouped every way a summary shows."""

    status: str
    total: int
    invalid: int
    created_at: datetime | None
    cancelled_at: datetime | None
    by_status: dict[str, int]
    by_type: dict[str, int]
    by_provider: dict[str, int]
    by_error_code: dict[str, int]
    #: Messages a provider accepted, by type (what is billed).
    billed: dict[str, int]
    first_sent_at: datetime | None
    last_sent_at: datetime | None
    last_final_at: datetime | None


def batch_counts(store: Store, batch_id: str) -> BatchCounts:
    """Read a batch's counts.

    Raises:
        MessageNotFoundError: No such batch.
    """
    with store.sessions() as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise MessageNotFoundError(f"no batch with id {batch_id!r}")
        where = MessageRow.batch_id == batch_id

        def grouped(col: Any, *extra: Any) -> dict[str, int]:
            stmt = select(col, func.count()).where(where, *extra).group_by(col)
            return {str(k): int(n) for k, n in s.execute(stmt) if k}

        first_sent, last_sent, last_final = s.execute(
            select(func.min(MessageRow.sent_at), func.max(MessageRow.sent_at), func.max(MessageRow.final_at)).where(
                where
            )
        ).one()
        counts = BatchCounts(
            status=batch.status,
            total=batch.total,
            invalid=batch.invalid,
            created_at=batch.created_at,
            cancelled_at=batch.cancelled_at,
            by_status=grouped(MessageRow.status),
            by_type=grouped(MessageRow.type),
            by_provider=grouped(MessageRow.provider),
            by_error_code=grouped(MessageRow.error_code),
            billed=grouped(MessageRow.type, MessageRow.sent_at.is_not(None)),
            first_sent_at=None,
            last_sent_at=None,
            last_final_at=None,
        )
    # Aggregates come back without the column type's conversion (naive on SQLite): apply it.
    conv = UTCDateTime()
    dialect = store.engine.dialect
    counts.first_sent_at = conv.process_result_value(first_sent, dialect) if isinstance(first_sent, datetime) else None
    counts.last_sent_at = conv.process_result_value(last_sent, dialect) if isinstance(last_sent, datetime) else None
    counts.last_final_at = conv.process_result_value(last_final, dialect) if isinstance(last_final, datetime) else None
    return counts
