"""Writing the engine's decisions: one path for a single send and a chunk's rows.

:func:`apply_decisions` records what :func:`~kmsg_worker.delivery.outcome.decide_outcomes`
decided; :func:`hold` gives rows back to wait without spending a retry (rate limit, open circuits,
an undecided look-up). Both return :class:`Applied`: how many rows took each action and which must be
woken when (a single send publishes its task with a countdown, a chunk re-publishes itself).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kmsg_worker import adrules
from kmsg_worker.delivery.outcome import Decision, error_text, first_check_at, wakes_by_countdown
from kmsg_worker.errors import ErrorCode, ProviderError
from kmsg_worker.logging import get_logger
from kmsg_worker.providers.base import SendOutcome
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import event_mark
from kmsg_worker.status import DeliveryAction, MessageStatus
from kmsg_worker.storage.messages import Transition, attempt_row, record_sent, record_transitions
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.rows import SendRow

__all__ = ["Applied", "apply_decisions", "hold"]

S = MessageStatus
A = DeliveryAction
log = get_logger("kmsg.delivery")


@dataclass
class Applied:
    """What one recording step did."""

    #: Rows per action.
    counts: Counter[DeliveryAction] = field(default_factory=Counter)
    #: ``(ids, countdown)``: rows to wake after ``countdown`` seconds (0 = now).
    wakes: list[tuple[list[str], float]] = field(default_factory=list)
    #: The decisions recorded for refused rows, in the order of the rows.
    decisions: list[Decision] = field(default_factory=list)

    def merge(self, other: Applied) -> None:
        """Add ``other``'s counts, wake-ups and decisions to these."""
        self.counts.update(other.counts)
        self.wakes.extend(other.wakes)
        self.decisions.extend(other.decisions)


def apply_decisions(
    rt: Runtime,
    rows: Sequence[SendRow],
    outcomes: Mapping[str, SendOutcome],
    decisions: Sequence[Decision],
    *,
    now: datetime,
    latency_ms: float | None,
    expect: Sequence[MessageStatus],
    chunk: tuple[str, int] | None = None,
    per_message_events: bool = True,
) -> Applied:
    """Record one provider call: accepted rows ``sent``, the refused ones by their decision.

    Failed rows are written one UPDATE per distinct decision (action, error, provider), not one per
    row; rows retried together wait for the longest of their delays, since they go out together in
    the next request anyway. Attempt rows go in the same transaction as the status changes.

    Args:
        rt: The runtime (store, settings).
        rows: The rows of the call, as claimed.
        outcomes: The provider's answers by message id.
        decisions: One per refused row, from :func:`~kmsg_worker.delivery.outcome.decide_outcomes`.
        now: When the provider answered.
        latency_ms: The call's latency.
        expect: The states the rows are held in (``sending``, or a chunk's ``queued``/``retrying``).
        chunk: The ``(batch_id, chunk)`` the rows belong to.
        per_message_events: Log one event per message (single sends); a chunk logs one per request.
    """
    applied = Applied(decisions=list(decisions))
    sent = [r for r in rows if outcomes[r.id].accepted]
    if sent:
        scheduled = max((r.scheduled_at for r in sent if r.scheduled_at is not None), default=None)
        record_sent(
            rt.store,
            sent,
            outcomes,
            now=now,
            next_check_at=first_check_at(rt.settings, now, scheduled),
            latency_ms=latency_ms,
            expect=expect,
            chunk=chunk,
        )
        applied.counts[A.SENT] += len(sent)
        if per_message_events:
            for row in sent:
                _log_sent(row, latency_ms)
    if decisions:
        by_id = {r.id: r for r in rows}
        _apply_failures(rt, by_id, decisions, now, latency_ms, expect, applied, per_message_events)
    return applied


def _log_sent(row: SendRow, latency_ms: float | None) -> None:
    log.info(
        "message.sent",
        message_id=row.id,
        provider=row.provider,
        attempt=row.attempts + 1,
        type=row.message.type.value,
        tenant=row.message.tenant,
        latency_ms=None if latency_ms is None else round(latency_ms, 2),
        **event_mark(row.message),
    )


def _apply_failures(
    rt: Runtime,
    by_id: Mapping[str, SendRow],
    decisions: Sequence[Decision],
    now: datetime,
    latency_ms: float | None,
    expect: Sequence[MessageStatus],
    applied: Applied,
    per_message_events: bool,
) -> None:
    attempts: list[dict[str, Any]] = []
    groups: dict[tuple[DeliveryAction, str, str, str, bool], tuple[list[str], list[float]]] = defaultdict(
        lambda: ([], [])
    )
    for d in decisions:
        row = by_id[d.message_id]
        error = d.error
        attempts.append(
            attempt_row(
                row,
                d.attempt,
                now,
                error_code=error.code.value,
                provider_code=error.provider_code,
                http_status=error.status_code,
                latency_ms=latency_ms,
                detail=str(error)[:500],
            )
        )
        ids, waits = groups[(d.action, d.error_code, error_text(error), row.provider, d.spent)]
        ids.append(row.id)
        waits.append(d.delay)
        if per_message_events:
            _log_failure(row, d, error)
    transitions: list[Transition] = []
    for (action, code, message, provider, spent), (ids, waits) in groups.items():
        common: dict[str, Any] = {
            "attempts": MessageRow.attempts + 1,
            "error_code": code,
            "error_message": message,
            "lease_until": None,
            # A run that finished normally: the poison guard counts only claims that never finish.
            "deliveries": 0,
        }
        if action is A.RETRY or action is A.RECONCILE or action is A.DEFERRED:
            # A deferral (waiting for the sending window) is a retry that spends no attempt.
            wait = max(waits)
            publish = wakes_by_countdown(rt.settings, wait)
            common.update(
                provider_attempts=MessageRow.provider_attempts + int(spent),
                next_attempt_at=now + timedelta(seconds=wait),
                retry_task_published=publish,
                outcome_unknown=action is A.RECONCILE,
            )
            transitions.append(Transition(ids, S.RETRYING, common))
            if publish:
                applied.wakes.append((ids, wait))
        elif action is A.FAILOVER:
            common.update(route_index=MessageRow.route_index + 1, provider_attempts=0, queued_at=now)
            transitions.append(Transition(ids, S.QUEUED, common))
            applied.wakes.append((ids, 0.0))
        else:
            transitions.append(
                Transition(ids, S.UNKNOWN if action is A.UNKNOWN else S.FAILED, {**common, "provider": provider})
            )
        applied.counts[action] += len(ids)
    record_transitions(rt.store, transitions, attempts, now=now, expect=expect)
    _suppress_refusers(rt, by_id, decisions, now)


def _suppress_refusers(rt: Runtime, by_id: Mapping[str, SendRow], decisions: Sequence[Decision], now: datetime) -> None:
    """Numbers whose provider said they refused the sender go on their tenant's suppression list.

    One write per (tenant, provider, code) of the call, not one per refused row of a chunk.
    """
    groups: dict[tuple[str, str, str | None], list[SendRow]] = defaultdict(list)
    for d in decisions:
        if d.error.code is ErrorCode.AD_OPTED_OUT:
            row = by_id[d.message_id]
            groups[(row.message.tenant, row.provider, d.error.provider_code)].append(row)
    for (tenant, provider, provider_code), rows in groups.items():
        adrules.suppress_refuser(
            rt.settings,
            rt.store,
            tenant=tenant,
            numbers=[r.message.to for r in rows],
            provider=provider,
            provider_code=provider_code,
            message_ids=[r.id for r in rows],
            now=now,
        )


def _log_failure(row: SendRow, d: Decision, error: ProviderError) -> None:
    log.info(
        "message.attempt_failed",
        message_id=row.id,
        provider=row.provider,
        attempt=row.attempts + 1,
        error_code=error.code.value,
        provider_code=error.provider_code,
        action=d.action.value,
    )
    if d.action is A.RETRY or d.action is A.RECONCILE:
        log.info(
            "message.retry_scheduled",
            message_id=row.id,
            provider=row.provider,
            delay=round(d.delay, 3),
            attempt=row.attempts + 1,
        )
    elif d.action is A.FAILOVER:
        log.info(
            "failover.triggered",
            message_id=row.id,
            from_provider=row.provider,
            to_provider=row.route[row.route_index + 1],
            reason=d.reason,
        )
    elif d.action is A.FAILED:
        log_final("message.failed", row, error.code.value)


def log_final(event: str, row: SendRow, error_code: str) -> None:
    """The event of a message that ended ``failed`` or ``unknown`` here, labelled for the metrics.

    ``message.unknown`` is a warning (nobody can say whether the recipient got it); the rest info.
    """
    emit = log.warning if event == "message.unknown" else log.info
    emit(
        event,
        message_id=row.id,
        provider=row.provider,
        error_code=error_code,
        type=row.message.type.value,
        tenant=row.message.tenant,
        **event_mark(row.message),
    )


def hold(
    rt: Runtime,
    rows: Sequence[SendRow],
    *,
    delay: float,
    now: datetime,
    expect: Sequence[MessageStatus],
    action: DeliveryAction,
    outcome_unknown: bool = False,
    error: ProviderError | None = None,
    reason: tuple[str, str] | None = None,
) -> Applied:
    """Give rows back as ``retrying`` for ``delay`` seconds without spending a retry (nothing was sent).

    ``outcome_unknown``: the rows must still be looked up before they are sent (an undecided look-up).
    ``reason``: ``(error_code, error_message)`` to store while they wait (when there is no ``error``).
    """
    applied = Applied()
    if not rows:
        return applied
    publish = wakes_by_countdown(rt.settings, delay)
    values: dict[str, Any] = {
        "next_attempt_at": now + timedelta(seconds=delay),
        "retry_task_published": publish,
        "lease_until": None,
        "outcome_unknown": outcome_unknown,
        "deliveries": 0,
    }
    if error is not None:
        values.update(error_code=error.code.value, error_message=error_text(error))
    elif reason is not None:
        values.update(error_code=reason[0], error_message=reason[1])
    ids = [r.id for r in rows]
    record_transitions(rt.store, [Transition(ids, S.RETRYING, values)], [], now=now, expect=expect)
    applied.counts[action] += len(ids)
    if publish:
        applied.wakes.append((ids, delay))
    return applied
