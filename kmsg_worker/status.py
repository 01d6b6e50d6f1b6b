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

__all__ = ["ALLOWED", "FINAL", "AttemptOutcome", "DeliveryAction", "MessageStatus", "can_transition"]


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
    #: Final from the start: advertising to a number on the tenant's suppression list, never sent.
    SUPPRESSED = "suppressed"


#: States from which nothing moves on.
FINAL = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.CANCELLED,
        MessageStatus.UNKNOWN,
        MessageStatus.DEAD,
        MessageStatus.SUPPRESSED,
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
    # Stored so at intake (a batch row to a suppressed number); never reached by a transition.
    S.SUPPRESSED: frozenset(),
}


def can_transition(current: MessageStatus, target: MessageStatus) -> bool:
    """Whether ``current -> target`` is allowed."""
    return current in ALLOWED[target]


class DeliveryAction(StrEnum):
    """What one run of the delivery engine did with a message (a single send or a chunk's row)."""

    NOT_CLAIMED = "not_claimed"  #: Another run holds it, or it is not due: nothing done.
    SKIPPED = "skipped"  #: Nothing to settle (it moved on meanwhile).
    SENT = "sent"  #: The provider accepted it.
    RECONCILED_SENT = "reconciled_sent"  #: A lookup found the provider already had it: recorded, not resent.
    REQUEUED = "requeued"  #: A lookup found the provider never got it: queued to be sent again.
    RETRY = "retry"  #: A retryable error: it waits as ``retrying`` for its next try on the same provider.
    RECONCILE = "reconcile"  #: The outcome is unknown: it waits, and is looked up before any resend.
    RECONCILE_DEFERRED = "reconcile_deferred"  #: The lookup could not answer yet: asked again later.
    FAILOVER = "failover"  #: Moved on to the next provider of its route.
    FAILED = "failed"  #: Final failure (refused, or retries or age exhausted).
    UNKNOWN = "unknown"  #: Final: nobody can tell whether it was sent.
    DEAD = "dead"  #: Final: claimed too often without finishing (a poison message).
    THROTTLED = "throttled"  #: A rate limit said wait; no retry spent.
    CIRCUIT_OPEN = "circuit_open"  #: Every remaining provider's circuit is open; it waits, no retry spent.
    CANCELLED = "cancelled"  #: Its batch was cancelled before it went out.
    DEFERRED = "deferred"  #: Advertising outside its sending window: it waits for the window, no retry spent.


class AttemptOutcome(StrEnum):
    """The ``outcome`` column of an attempt row: what one provider call (or look-up) established."""

    ACCEPTED = "accepted"  #: The provider accepted the message.
    RETRYABLE = "retryable"  #: A transient refusal (5xx, 429, busy).
    REJECTED = "rejected"  #: A permanent refusal.
    TIMEOUT = "timeout"  #: No answer: the provider may or may not have it.
    RECONCILED_SENT = "reconciled_sent"  #: A look-up after an unknown outcome found it at the provider.
    RECONCILED_MISSING = "reconciled_missing"  #: A look-up after an unknown outcome did not find it.
    CIRCUIT_OPEN = "circuit_open"  #: Skipped without a call: the provider's circuit was open.
