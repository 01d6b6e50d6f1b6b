"""The message state machine.

::

    scheduled -> queued -> sending -> sent -> delivered
                   ^  |       |  \\            \\-> failed | unknown
                   |  |       |   \\-> retrying -> queued | sending
                   |  |       \\-> failed | unknown | dead | queued (reconciled: provider never got it)
                   |  \\-> cancelled | dead
    scheduled -> cancelled

Batch (bulk) rows skip ``sending``: the chunk's lease row (``kmsg_chunks``) holds them while their
request is in flight, and the chunk's run moves them straight from ``queued``/``retrying`` to
``sent``, ``retrying``, ``failed``, ``unknown``, ``dead`` or (fail-over, throttled) ``queued``.
Only the chunk's task, under that lease, ever sends them.

Every change is a conditional UPDATE from an allowed previous state
(:func:`kmsg_worker.storage.repo.transition`); terminal states never change again.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ALLOWED", "FINAL", "MessageStatus", "can_transition"]


class MessageStatus(StrEnum):
    """Where a message is in its life."""

    SCHEDULED = "scheduled"  #: Waiting for ``scheduled_at``; the schedule sweep dispatches it.
    QUEUED = "queued"  #: Stored and handed to the broker; waiting for a worker.
    SENDING = "sending"  #: Claimed by a worker, which is talking to the provider (leased).
    RETRYING = "retrying"  #: A retryable error; the next try is at ``next_attempt_at``.
    SENT = "sent"  #: Accepted by the provider; tracking waits for the delivery report.
    DELIVERED = "delivered"  #: Final: the provider reported delivery.
    FAILED = "failed"  #: Final: refused, failed delivery, or retries exhausted.
    CANCELLED = "cancelled"  #: Final: cancelled before dispatch.
    UNKNOWN = "unknown"  #: Final: the outcome could not be established (tracking timeout, lost response).
    DEAD = "dead"  #: Final: a poison message (redelivered or crashed workers too often).


#: States from which nothing moves on.
FINAL = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.CANCELLED,
        MessageStatus.UNKNOWN,
        MessageStatus.DEAD,
    }
)

S = MessageStatus
#: A bulk row is not moved to ``sending``: its chunk's lease (``kmsg_chunks``) says it is in flight,
#: and the chunk's run records outcomes straight from the state the row was claimed in.
_CHUNK_HELD = frozenset({S.QUEUED, S.RETRYING})

#: Target state -> the states it may be reached from.
ALLOWED: dict[MessageStatus, frozenset[MessageStatus]] = {
    S.QUEUED: frozenset({S.SCHEDULED, S.SENDING}) | _CHUNK_HELD,
    S.SENDING: frozenset({S.QUEUED, S.RETRYING}),
    S.RETRYING: frozenset({S.SENDING}) | _CHUNK_HELD,
    S.SENT: frozenset({S.SENDING}) | _CHUNK_HELD,
    S.DELIVERED: frozenset({S.SENT}),
    S.FAILED: frozenset({S.SENDING, S.SENT, S.QUEUED, S.RETRYING}),
    S.CANCELLED: frozenset({S.SCHEDULED, S.QUEUED, S.RETRYING}),
    S.UNKNOWN: frozenset({S.SENDING, S.SENT}) | _CHUNK_HELD,
    S.DEAD: frozenset({S.QUEUED, S.SENDING, S.RETRYING}),
    S.SCHEDULED: frozenset(),
}


def can_transition(current: MessageStatus, target: MessageStatus) -> bool:
    """Whether ``current -> target`` is allowed."""
    return current in ALLOWED[target]
