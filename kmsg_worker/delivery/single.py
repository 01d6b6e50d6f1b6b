"""A single send: claim one message, settle an unknown outcome, admit, call, record.

:func:`deliver` is what the ``kmsg.send_message`` Celery task calls with a message id. It is safe to
run any number of times for the same id (Celery is at-least-once): only the run whose claim
succeeds does anything, and every later state change is conditional on ``sending``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from kmsg_worker.delivery.admission import admit_circuits, admit_window
from kmsg_worker.delivery.call import call_provider
from kmsg_worker.delivery.outcome import STATUS_OF
from kmsg_worker.delivery.record import Applied
from kmsg_worker.delivery.recovery import reconcile
from kmsg_worker.errors import ErrorCode
from kmsg_worker.logging import get_logger
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import DeliveryAction, MessageStatus
from kmsg_worker.storage.rows import SendRow

__all__ = ["DeliveryResult", "deliver"]

S = MessageStatus
A = DeliveryAction
log = get_logger("kmsg.delivery")
_HELD = (S.SENDING,)

#: The state a run that ended with an action (other than a decided outcome) leaves the message in.
_STATUS_AFTER: dict[DeliveryAction, MessageStatus] = {
    **STATUS_OF,
    A.RECONCILED_SENT: S.SENT,
    A.REQUEUED: S.QUEUED,
    A.RECONCILE_DEFERRED: S.RETRYING,
    A.THROTTLED: S.RETRYING,
    A.CIRCUIT_OPEN: S.RETRYING,
    A.DEFERRED: S.RETRYING,
    A.DEAD: S.DEAD,
}


@dataclass(frozen=True)
class DeliveryResult:
    """What :func:`deliver` did, for the task's log line and the tests."""

    message_id: str
    action: DeliveryAction
    status: MessageStatus | None = None
    provider: str | None = None


def deliver(rt: Runtime, message_id: str) -> DeliveryResult:
    """Claim ``message_id`` and send it once.

    Returns:
        ``action`` is ``not_claimed`` when another run holds the message or it is not due.
    """
    settings = rt.settings
    now = rt.now()
    row = rt.store.claim_for_send(message_id, now=now, lease=timedelta(seconds=settings.lease_seconds))
    if row is None:
        return DeliveryResult(message_id, A.NOT_CLAIMED)
    if row.deliveries > settings.max_deliveries:
        rt.store.transition(
            message_id,
            S.DEAD,
            now=now,
            expect=_HELD,
            error_code=ErrorCode.POISON_MESSAGE.value,
            error_message=f"claimed {row.deliveries} times without finishing (limit {settings.max_deliveries})",
        )
        log.error("message.dead", message_id=message_id, deliveries=row.deliveries)
        return DeliveryResult(message_id, A.DEAD, S.DEAD)
    if row.outcome_unknown:
        settled = reconcile(rt, [row], now=now, expect=_HELD)
        if not settled.missing:
            return _finish(rt, row, settled.applied)
    window = admit_window(rt, [row], now=now, expect=_HELD)
    if not window.ready:
        return _finish(rt, row, window.applied)
    admitted = admit_circuits(rt, [row], now=now, expect=_HELD)
    if not admitted.ready:
        return _finish(rt, row, admitted.applied)
    called = call_provider(rt, row.provider, [row], expect=_HELD)
    return _finish(rt, row, called)


def _finish(rt: Runtime, row: SendRow, applied: Applied) -> DeliveryResult:
    """Publish the wake-up the run decided on and say what it did."""
    for ids, delay in applied.wakes:
        rt.dispatcher.send(ids, priority=row.message.priority, countdown=delay or None)
    action = next(iter(applied.counts), A.SKIPPED)
    provider = row.provider
    if action is A.FAILOVER:
        provider = row.route[row.route_index + 1]
    return DeliveryResult(row.id, action, _STATUS_AFTER.get(action), provider)
