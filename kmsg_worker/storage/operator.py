"""The operator's read and repair queries (``kmsg messages``, ``kmsg dead``), kept out of the CLI.

Every query here reads a bounded number of rows or aggregates per state. Non-final states are
counted one state at a time: each ``WHERE status = '<state>'`` matches the predicate of that
state's partial index (``ix_kmsg_messages_due_*``, ``ix_kmsg_messages_stale_queued``,
``ix_kmsg_messages_lease``), so the counts read only the rows in that state, never the whole table
(there is deliberately no index on ``status`` alone: see :mod:`kmsg_worker.storage.models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.models import DeadLetter, MessageRow

__all__ = [
    "NON_FINAL",
    "DeadLetterSummary",
    "MessageSummary",
    "PendingState",
    "dead_letters",
    "list_messages",
    "pending_by_state",
    "requeue_dead",
]

S = MessageStatus

#: Every state a message can still leave, in the order a message passes through them.
NON_FINAL: tuple[MessageStatus, ...] = (S.SCHEDULED, S.QUEUED, S.SENDING, S.RETRYING, S.SENT)


@dataclass(frozen=True)
class MessageSummary:
    """One line of ``kmsg messages list``: no text, the recipient as stored (mask it to show it)."""

    id: str
    status: str
    type: str
    to: str
    tenant: str
    batch_id: str | None
    provider: str | None
    error_code: str | None
    deliveries: int
    created_at: datetime
    updated_at: datetime


_SUMMARY_COLUMNS = (
    MessageRow.id,
    MessageRow.status,
    MessageRow.type,
    MessageRow.recipient,
    MessageRow.tenant,
    MessageRow.batch_id,
    MessageRow.provider,
    MessageRow.error_code,
    MessageRow.deliveries,
    MessageRow.created_at,
    MessageRow.updated_at,
)


def list_messages(
    sessions: sessionmaker[Session],
    *,
    statuses: Sequence[str] = (),
    since: datetime | None = None,
    batch_id: str | None = None,
    limit: int = 50,
) -> list[MessageSummary]:
    """The most recent messages matching every filter given, newest first.

    Args:
        sessions: The store's session factory.
        statuses: Keep only these states (all when empty).
        since: Keep only messages created at or after this time (served by the ``created_at`` index).
        batch_id: Keep only this batch's messages (served by ``ix_kmsg_messages_batch_chunk``).
        limit: At most this many rows.
    """
    stmt = select(*_SUMMARY_COLUMNS)
    if statuses:
        stmt = stmt.where(MessageRow.status.in_(list(statuses)))
    if since is not None:
        stmt = stmt.where(MessageRow.created_at >= since)
    if batch_id is not None:
        stmt = stmt.where(MessageRow.batch_id == batch_id)
    stmt = stmt.order_by(MessageRow.created_at.desc(), MessageRow.id.desc()).limit(limit)
    with sessions() as s:
        return [MessageSummary(*row) for row in s.execute(stmt)]


@dataclass(frozen=True)
class PendingState:
    """The messages in one non-final state.

    Attributes:
        status: The state.
        count: Messages in it.
        oldest_age: Seconds since the oldest of them was due (accepted, or its scheduled time for
            ``scheduled``); 0 when none is, or when every scheduled one is still in the future.
        older: How many were due longer ago than the threshold asked for.
    """

    status: str
    count: int
    oldest_age: float
    older: int


def pending_by_state(sessions: sessionmaker[Session], *, now: datetime, older_than: timedelta) -> list[PendingState]:
    """Counts of the non-final messages per state, with their age, in :data:`NON_FINAL` order.

    A message's age runs from when it was due: its ``created_at`` (accepted), or for a
    ``scheduled`` one its ``scheduled_at``, so a send planned for next week is not "old".

    Args:
        sessions: The store's session factory.
        now: The current time.
        older_than: Threshold for :attr:`PendingState.older`.
    """
    cutoff = now - older_than
    out = []
    with sessions() as s:
        for status in NON_FINAL:
            due = MessageRow.scheduled_at if status is S.SCHEDULED else MessageRow.created_at
            stmt = select(
                func.count(),
                func.min(due),
                func.coalesce(func.sum(case((due < cutoff, 1), else_=0)), 0),
            ).where(MessageRow.status == status.value)
            count, oldest, older = s.execute(stmt).one()
            age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
            out.append(PendingState(status.value, int(count), age, int(older)))
    return out


@dataclass(frozen=True)
class DeadLetterSummary:
    """A task that could not even be read (malformed or unknown), kept for inspection."""

    id: int
    task: str
    reason: str
    created_at: datetime


def dead_letters(sessions: sessionmaker[Session], limit: int) -> list[DeadLetterSummary]:
    """The most recent dead letters, newest first."""
    stmt = select(DeadLetter.id, DeadLetter.task_name, DeadLetter.reason, DeadLetter.created_at)
    with sessions() as s:
        rows = s.execute(stmt.order_by(DeadLetter.id.desc()).limit(limit))
        return [DeadLetterSummary(int(i), str(t), str(r), c) for i, t, r, c in rows]


def requeue_dead(sessions: sessionmaker[Session], message_id: str, *, now: datetime) -> str | None:
    """Put a ``dead`` message back to ``queued`` with its delivery count reset.

    Only a message that is ``dead`` at the time of the update moves (a conditional update, like
    every state change): the caller publishes its task afterwards.

    Returns:
        The message's priority (to publish it with), or ``None`` when it is not ``dead``.
    """
    values: dict[str, Any] = {
        "status": S.QUEUED.value,
        "deliveries": 0,
        "queued_at": now,
        "updated_at": now,
        "final_at": None,
    }
    stmt = (
        update(MessageRow)
        .where(MessageRow.id == message_id, MessageRow.status == S.DEAD.value)
        .values(**values)
        .returning(MessageRow.priority)
    )
    with sessions.begin() as s:
        priority = s.execute(stmt).scalar_one_or_none()
    return None if priority is None else str(priority)
