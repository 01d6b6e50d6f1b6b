"""The worker side of a single send: claim, admit, call the provider, record, decide what comes next.

Admission happens right before the call: the provider's circuit breaker (:mod:`kmsg_worker.circuit`;
an open provider is skipped for the next one of the route, or the message waits when all are open)
and the global rate limits (:mod:`kmsg_worker.ratelimit`; a throttled message waits as
``retrying`` with a countdown). Neither spends a retry, since nothing was sent.

:func:`deliver` is what the ``kmsg.send_message`` Celery task calls with a message id. It is safe to
run any number of times for the same id (Celery is at-least-once): only the run whose claim
succeeds does anything, and every later state change is conditional on ``sending``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from kmsg_worker import circuit, ratelimit
from kmsg_worker.errors import ErrorCode, ProviderError, ProviderRejected
from kmsg_worker.logging import get_logger
from kmsg_worker.message import Message
from kmsg_worker.providers.base import Provider, SendOutcome
from kmsg_worker.retry import Action, decide
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.repo import Claim
from kmsg_worker.taxonomy import classify

__all__ = ["DeliveryResult", "deliver", "reconcile_lease", "record_outcome"]

S = MessageStatus
log = get_logger("kmsg.pipeline")
#: Wait before checking whether a timed-out request reached the provider (lets it index the message).
RECONCILE_DELAY = 2.0


@dataclass(frozen=True)
class DeliveryResult:
    """What :func:`deliver` did, for the task's log line and the tests."""

    message_id: str
    action: str
    status: str | None = None
    provider: str | None = None


def deliver(rt: Runtime, message_id: str) -> DeliveryResult:
    """Claim ``message_id`` and send it once.

    Returns:
        ``action`` is ``not_claimed`` when another run holds the message or it is not due.
    """
    settings = rt.settings
    now = rt.now()
    claim = rt.store.claim_for_send(message_id, now=now, lease=timedelta(seconds=settings.lease_seconds))
    if claim is None:
        return DeliveryResult(message_id, "not_claimed")
    if claim.deliveries > settings.max_deliveries:
        rt.store.transition(
            message_id,
            S.DEAD,
            now=now,
            expect=[S.SENDING],
            error_code=ErrorCode.POISON_MESSAGE.value,
            error_message=f"claimed {claim.deliveries} times without finishing (limit {settings.max_deliveries})",
        )
        log.error("message.dead", message_id=message_id, deliveries=claim.deliveries)
        return DeliveryResult(message_id, "dead", S.DEAD)
    message = Message.from_content(claim.content)
    provider = rt.provider(claim.provider)
    if claim.outcome_unknown:
        settled = _reconcile(rt, claim, provider, now)
        if isinstance(settled, DeliveryResult):
            return settled
        claim = settled
    admitted = _admit(rt, claim, message, now)
    if isinstance(admitted, DeliveryResult):
        return admitted
    claim = admitted
    provider = rt.provider(claim.provider)
    started = time.perf_counter()
    try:
        outcome = provider.send(message)
    except ProviderError as exc:
        outcome = SendOutcome(message.id, False, error=exc)
    # When the provider answered (sent_at), before our own bookkeeping below.
    answered_at = rt.now()
    latency_ms = (time.perf_counter() - started) * 1000
    circuit.observe(rt, claim.provider, None if outcome.accepted else _error_of(outcome, claim.provider))
    return record_outcome(rt, claim, message, outcome, latency_ms, now=answered_at)


def _error_of(outcome: SendOutcome, provider: str) -> ProviderError:
    return outcome.error or ProviderRejected("refused without a reason", provider=provider)


# -- admission: circuit breakers and rate limits, right before the provider call ------------------


def _admit(rt: Runtime, claim: Claim, message: Message, now: datetime) -> Claim | DeliveryResult:
    """Let the call go out, move it to a provider whose circuit is closed, or put it back to wait.

    Returns:
        The claim to send (possibly on a later provider of the route), or what was done instead:
        ``throttled`` (rate limit) or ``circuit_open`` (every remaining provider is open); both
        leave the message ``retrying`` without spending a retry.
    """
    index = claim.route_index
    while not circuit.allow(rt, claim.route[index]):
        if index + 1 >= len(claim.route):
            return _all_open(rt, claim, message, now)
        index += 1
    if index != claim.route_index:
        claim = _skip_open(rt, claim, index, now)
    wait = ratelimit.acquire(rt, claim.provider, message, max_wait=rt.settings.rate_limit_inline_wait)
    if wait > 0:
        # The script's wait, spread a little so throttled messages do not all return together.
        delay = wait * random.uniform(1.0, 1.25)
        _release(rt, claim, message, delay=delay)
        log.info("message.throttled", message_id=claim.id, provider=claim.provider, delay=round(delay, 3))
        return DeliveryResult(claim.id, "throttled", S.RETRYING, claim.provider)
    return claim


def _skip_open(rt: Runtime, claim: Claim, index: int, now: datetime) -> Claim:
    """Fail over past providers whose circuit is open, one attempt row per skipped provider."""
    skipped = claim.route[claim.route_index : index]
    attempts = claim.attempts + len(skipped)
    changed = rt.store.update_fields(
        claim.id, expect=S.SENDING, now=now, route_index=index, provider_attempts=0, attempts=attempts
    )
    if changed:
        for offset, name in enumerate(skipped, start=1):
            rt.store.record_attempt(
                message_id=claim.id,
                attempt_no=claim.attempts + offset,
                provider=name,
                outcome="circuit_open",
                error_code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE.value,
                detail=f"{name}: circuit open, skipped without a call",
                created_at=now,
            )
    log.info("failover.circuit_open", message_id=claim.id, skipped=skipped, to_provider=claim.route[index])
    return replace(claim, route_index=index, provider_attempts=0, attempts=attempts)


def _all_open(rt: Runtime, claim: Claim, message: Message, now: datetime) -> DeliveryResult:
    """Every provider left in the route is open: wait for the first cool-down (or give up when too old)."""
    names = claim.route[claim.route_index :]
    policy = rt.settings.retry_for(message.type.value, message.priority.value)
    if (now - claim.created_at).total_seconds() >= policy.max_age:
        rt.store.transition(
            claim.id,
            S.FAILED,
            now=now,
            expect=[S.SENDING],
            provider=claim.provider,
            attempts=claim.attempts,
            error_code=ErrorCode.RETRIES_EXHAUSTED.value,
            error_message=f"circuit open for {', '.join(names)} until the message's maximum age ({policy.max_age:g} s)",
        )
        log.info("message.failed", message_id=claim.id, provider=claim.provider, error_code="RETRIES_EXHAUSTED")
        return DeliveryResult(claim.id, "failed", S.FAILED, claim.provider)
    # Until the first circuit may half-open; while a probe is out (half-open), a fraction of the
    # cool-down, so waiting messages poll the breaker gently instead of every fraction of a second.
    cooldown = rt.circuits.policy.cooldown
    delay = max(circuit.retry_in(rt, names), cooldown / 4, 0.5) * random.uniform(1.0, 1.5)
    _release(rt, claim, message, delay=delay)
    log.warning("circuit.all_open", message_id=claim.id, providers=names, delay=round(delay, 3))
    return DeliveryResult(claim.id, "circuit_open", S.RETRYING, claim.provider)


def _release(rt: Runtime, claim: Claim, message: Message, *, delay: float) -> None:
    """Give the claim back as ``retrying`` without counting an attempt (nothing was sent).

    Short waits ride a Celery countdown (far below the visibility timeout); longer ones wait in
    ``next_attempt_at`` for the maintenance sweep.
    """
    now = rt.now()
    publish = delay <= rt.settings.retry.max_countdown
    changed = rt.store.transition(
        claim.id,
        S.RETRYING,
        now=now,
        expect=[S.SENDING],
        next_attempt_at=now + timedelta(seconds=delay),
        retry_task_published=publish,
        lease_until=None,
        # Established before admission: either never unknown, or reconciled as "not received".
        outcome_unknown=False,
        attempts=claim.attempts,
        deliveries=0,
    )
    if changed and publish:
        rt.dispatcher.send([claim.id], priority=message.priority, countdown=delay)


def _reconcile(rt: Runtime, claim: Claim, provider: Provider, now: datetime) -> DeliveryResult | Claim:
    """Before resending after a timeout: did the provider take it? A :class:`Claim` means "no, send now"."""
    if not provider.capabilities.lookup_by_reference:
        rt.store.transition(
            claim.id,
            S.UNKNOWN,
            now=now,
            expect=[S.SENDING],
            error_code=ErrorCode.OUTCOME_UNKNOWN.value,
            error_message=f"{provider.name} timed out and cannot be asked whether it took the message",
        )
        return DeliveryResult(claim.id, "unknown", S.UNKNOWN, provider.name)
    try:
        found = provider.lookup([claim.id])
    except ProviderError as exc:
        # Cannot tell yet: release the message for a later reconciliation instead of resending.
        _schedule_retry(rt, claim, delay=RECONCILE_DELAY * 2, now=now, error=exc, outcome_unknown=True)
        return DeliveryResult(claim.id, "reconcile_deferred", S.RETRYING, provider.name)
    hit = found.get(claim.id)
    if hit is None:
        rt.store.record_attempt(
            message_id=claim.id,
            attempt_no=claim.attempts + 1,
            provider=provider.name,
            outcome="reconciled_missing",
            detail="provider never received it; sending",
            created_at=now,
        )
        return Claim(**{**claim.__dict__, "attempts": claim.attempts + 1})
    _mark_sent(rt, claim, hit, now, latency_ms=None, attempt_outcome="reconciled_sent")
    return DeliveryResult(claim.id, "reconciled_sent", S.SENT, provider.name)


def _first_check(rt: Runtime, claim: Claim, now: datetime) -> datetime:
    scheduled = claim.scheduled_at
    first = now + timedelta(seconds=rt.settings.tracking.first_check)
    if scheduled is not None and scheduled > now:
        # Provider-side scheduled sends are checked after their time (+120 s grace, as k-msg does).
        first = max(first, scheduled + timedelta(seconds=120))
    return first


def _mark_sent(
    rt: Runtime,
    claim: Claim,
    outcome: SendOutcome,
    now: datetime,
    *,
    latency_ms: float | None,
    attempt_outcome: str = "accepted",
) -> None:
    warnings = [{"code": w.code, "message": w.message, "details": dict(w.details)} for w in outcome.warnings]
    rt.store.mark_sent(
        claim.id,
        now=now,
        provider=claim.provider,
        provider_message_id=outcome.provider_message_id,
        attempt_no=claim.attempts + 1,
        provider_attempts=claim.provider_attempts + 1,
        next_check_at=_first_check(rt, claim, now),
        native_fallback=outcome.native_fallback,
        warnings=warnings or None,
        attempt_outcome=attempt_outcome,
        latency_ms=latency_ms,
    )
    log.info(
        "message.sent",
        message_id=claim.id,
        provider=claim.provider,
        attempt=claim.attempts + 1,
        type=claim.content.get("type"),
        tenant=claim.content.get("tenant"),
        latency_ms=None if latency_ms is None else round(latency_ms, 2),
    )


def _schedule_retry(
    rt: Runtime,
    claim: Claim,
    *,
    delay: float,
    now: datetime,
    error: ProviderError,
    outcome_unknown: bool = False,
) -> None:
    publish = delay <= rt.settings.retry.max_countdown
    changed = rt.store.transition(
        claim.id,
        S.RETRYING,
        now=now,
        expect=[S.SENDING],
        next_attempt_at=now + timedelta(seconds=delay),
        retry_task_published=publish,
        outcome_unknown=outcome_unknown,
        lease_until=None,
        # This claim finished normally: the poison guard counts only claims that never finish.
        deliveries=0,
        error_code=error.code.value,
        error_message=str(error)[:500],
    )
    if changed and publish:
        # Short waits ride a Celery countdown, far below the broker's visibility timeout; longer
        # ones wait in the database for the maintenance sweep (celery-production.md B1).
        priority = Message.from_content(claim.content).priority
        rt.dispatcher.send([claim.id], priority=priority, countdown=delay)


def record_outcome(
    rt: Runtime,
    claim: Claim,
    message: Message,
    outcome: SendOutcome,
    latency_ms: float | None,
    *,
    now: datetime | None = None,
) -> DeliveryResult:
    """Record one provider answer for a claimed message and act on it (sent, retry, failover, fail).

    ``now``: when the provider answered (default: the runtime's clock now).
    """
    now = now or rt.now()
    if outcome.accepted:
        _mark_sent(rt, claim, outcome, now, latency_ms=latency_ms)
        return DeliveryResult(claim.id, "sent", S.SENT, claim.provider)
    # The operator's overrides (KMSG_RETRY_POLICY) over the adapter's classification.
    error = classify(_error_of(outcome, claim.provider), rt.settings.error_policy)
    attempt_no = claim.attempts + 1
    has_next = claim.route_index + 1 < len(claim.route)
    decision = decide(
        error,
        provider_attempts=claim.provider_attempts + 1,
        age_seconds=(now - claim.created_at).total_seconds(),
        has_next_provider=has_next,
        policy=rt.settings.retry_for(message.type.value, message.priority.value),
    )
    kind = {
        Action.RETRY: "retryable",
        Action.RECONCILE: "timeout",
        Action.FAILOVER: "retryable" if error.retryable else "rejected",
        Action.FAIL: "retryable" if error.retryable else "rejected",
    }[decision.action]
    rt.store.record_attempt(
        message_id=claim.id,
        attempt_no=attempt_no,
        provider=claim.provider,
        outcome=kind,
        error_code=error.code.value,
        provider_code=error.provider_code,
        http_status=error.status_code,
        latency_ms=latency_ms,
        detail=str(error)[:500],
        created_at=now,
    )
    common: dict[str, Any] = {
        "attempts": attempt_no,
        "error_code": error.code.value,
        "error_message": _error_text(error),
    }
    log.info(
        "message.attempt_failed",
        message_id=claim.id,
        provider=claim.provider,
        attempt=attempt_no,
        error_code=error.code.value,
        provider_code=error.provider_code,
        action=decision.action.value,
    )
    if decision.action is Action.RETRY or decision.action is Action.RECONCILE:
        unknown = decision.action is Action.RECONCILE
        if unknown and not rt.provider(claim.provider).capabilities.lookup_by_reference:
            rt.store.transition(
                claim.id,
                S.UNKNOWN,
                now=now,
                expect=[S.SENDING],
                **{**common, "error_code": ErrorCode.OUTCOME_UNKNOWN.value},
            )
            return DeliveryResult(claim.id, "unknown", S.UNKNOWN, claim.provider)
        rt.store.update_fields(
            claim.id,
            expect=S.SENDING,
            now=now,
            attempts=attempt_no,
            provider_attempts=claim.provider_attempts + 1,
        )
        delay = RECONCILE_DELAY if unknown else decision.delay
        _schedule_retry(rt, claim, delay=delay, now=now, error=error, outcome_unknown=unknown)
        log.info(
            "message.retry_scheduled",
            message_id=claim.id,
            provider=claim.provider,
            delay=round(delay, 3),
            attempt=attempt_no,
        )
        return DeliveryResult(claim.id, "retry", S.RETRYING, claim.provider)
    if decision.action is Action.FAILOVER:
        changed = rt.store.transition(
            claim.id,
            S.QUEUED,
            now=now,
            expect=[S.SENDING],
            route_index=claim.route_index + 1,
            provider_attempts=0,
            queued_at=now,
            lease_until=None,
            deliveries=0,
            **common,
        )
        if changed:
            log.info(
                "failover.triggered",
                message_id=claim.id,
                from_provider=claim.provider,
                to_provider=claim.route[claim.route_index + 1],
                reason=decision.reason,
            )
            rt.dispatcher.send([claim.id], priority=message.priority)
        return DeliveryResult(claim.id, "failover", S.QUEUED, claim.route[claim.route_index + 1])
    rt.store.transition(claim.id, S.FAILED, now=now, expect=[S.SENDING], provider=claim.provider, **common)
    log.info(
        "message.failed",
        message_id=claim.id,
        provider=claim.provider,
        error_code=error.code.value,
        type=message.type.value,
        tenant=message.tenant,
    )
    return DeliveryResult(claim.id, "failed", S.FAILED, claim.provider)


def _error_text(error: ProviderError) -> str:
    parts = [str(error)]
    if error.provider_code:
        parts.append(f"provider code {error.provider_code}")
    if error.provider_message and error.provider_message not in parts[0]:
        parts.append(error.provider_message)
    return "; ".join(parts)[:1000]


def reconcile_lease(rt: Runtime, message_id: str) -> DeliveryResult:
    """Settle a message whose worker died while it was ``sending`` (its lease expired).

    The outcome of the interrupted call is unknown, so the provider is asked first; the message is
    sent again only if the provider never got it. A provider that cannot be asked leaves the
    message ``unknown`` rather than risking a duplicate.
    """
    now = rt.now()
    row = rt.store.get(message_id)
    if row is None or row.status != S.SENDING:
        return DeliveryResult(message_id, "skipped")
    provider = rt.provider(row.route[row.route_index])
    if not provider.capabilities.lookup_by_reference:
        rt.store.transition(
            message_id,
            S.UNKNOWN,
            now=now,
            expect=[S.SENDING],
            error_code=ErrorCode.OUTCOME_UNKNOWN.value,
            error_message="worker lost while sending; provider cannot be asked",
        )
        return DeliveryResult(message_id, "unknown", S.UNKNOWN, provider.name)
    try:
        found = provider.lookup([message_id])
    except ProviderError:
        log.warning("lease.reconcile_deferred", message_id=message_id, provider=provider.name)
        return DeliveryResult(message_id, "deferred")
    hit = found.get(message_id)
    claim = Claim(
        id=row.id,
        content=row.content,
        route=row.route,
        route_index=row.route_index,
        attempts=row.attempts,
        provider_attempts=row.provider_attempts,
        deliveries=row.deliveries,
        created_at=row.created_at,
        outcome_unknown=row.outcome_unknown,
        scheduled_at=row.scheduled_at,
    )
    if hit is not None:
        _mark_sent(rt, claim, hit, now, latency_ms=None, attempt_outcome="reconciled_sent")
        return DeliveryResult(message_id, "reconciled_sent", S.SENT, provider.name)
    with rt.store.sessions.begin() as s:
        changed = rt.store.transition(
            message_id,
            S.QUEUED,
            now=now,
            expect=[S.SENDING],
            session=s,
            queued_at=now,
            lease_until=None,
            attempts=row.attempts + 1,
        )
        if changed:
            rt.store.record_attempt(
                s,
                message_id=message_id,
                attempt_no=row.attempts + 1,
                provider=provider.name,
                outcome="reconciled_missing",
                detail="worker lost while sending; provider never received it; re-queued",
                created_at=now,
            )
    if changed:
        log.warning("lease.requeued", message_id=message_id, provider=provider.name, deliveries=row.deliveries)
        rt.dispatcher.send([message_id], priority=row.priority)
    return DeliveryResult(message_id, "requeued", S.QUEUED, provider.name)
