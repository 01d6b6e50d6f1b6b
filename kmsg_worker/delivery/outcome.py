"""The outcome step: provider answers in, decisions out. Pure: no database, no broker, no clock of its own.

:func:`decide_outcomes` turns the rows of one provider call and the provider's per-recipient answers
into one :class:`Decision` each, applying, in this order:

1. the adapter's classification of the error (the error taxonomy),
2. the operator's overrides (``KMSG_RETRY_POLICY``: a code made retryable or permanent, a fixed
   ``Retry-After``),
3. the retry policy of the message's type and priority (``KMSG_RETRY_BY_TYPE``,
   ``KMSG_RETRY_BY_PRIORITY`` over ``KMSG_RETRY_*``): attempts per provider, maximum age, backoff.

A single send and a bulk chunk both call it; what they differ in is only how the decisions are
written (one row under its own lease, or many under the chunk's) and how the next run is woken.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from kmsg_worker.errors import ErrorCode, ProviderError, ProviderNotAttempted, ProviderRateLimited, ProviderRejected
from kmsg_worker.message.advertising import reopens
from kmsg_worker.providers.base import SendOutcome
from kmsg_worker.retry import Action, decide
from kmsg_worker.settings import RetryPolicy, Settings
from kmsg_worker.status import AttemptOutcome, DeliveryAction, MessageStatus
from kmsg_worker.storage.rows import SendRow
from kmsg_worker.taxonomy import classify

__all__ = [
    "RECONCILE_DELAY",
    "Decision",
    "decide_outcomes",
    "error_text",
    "first_check_at",
    "refusal",
    "wakes_by_countdown",
]

S = MessageStatus
A = DeliveryAction

#: Wait before checking whether a timed-out request reached the provider (lets it index the message).
RECONCILE_DELAY = 2.0

#: The state each decided action leaves a message in.
STATUS_OF: Mapping[DeliveryAction, MessageStatus] = {
    A.SENT: S.SENT,
    A.RETRY: S.RETRYING,
    A.RECONCILE: S.RETRYING,
    A.FAILOVER: S.QUEUED,
    A.FAILED: S.FAILED,
    A.UNKNOWN: S.UNKNOWN,
    A.DEFERRED: S.RETRYING,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one row after one provider call.

    Attributes:
        message_id: The row.
        action: ``retry``, ``reconcile``, ``failover``, ``failed`` or ``unknown``.
        attempt: The attempt row's outcome.
        error: The classified error.
        delay: Seconds until the next try (``retry`` and ``reconcile``).
        reason: Why, in words (logs).
        spent: Whether the call counts against the message's attempts on this provider: not when
            the provider only throttled us (429) or the request was never made (held back behind a
            failed one). Those wait and retry, bounded by the message's maximum age; a provider
            that is really down is the circuit breaker's to skip.
    """

    message_id: str
    action: DeliveryAction
    attempt: AttemptOutcome
    error: ProviderError
    delay: float = 0.0
    reason: str = ""
    spent: bool = True

    @property
    def status(self) -> MessageStatus:
        """The state the decision leaves the message in."""
        return STATUS_OF[self.action]

    @property
    def error_code(self) -> str:
        """Our error code, as stored on the message (its attempt row keeps the call's own)."""
        if self.action is A.UNKNOWN:
            return ErrorCode.OUTCOME_UNKNOWN.value
        return self.error.code.value


def refusal(outcome: SendOutcome, provider: str) -> ProviderError:
    """The error of a refused outcome (an adapter that gave none refused "without a reason")."""
    return outcome.error or ProviderRejected("refused without a reason", provider=provider)


def decide_outcomes(
    rows: Sequence[SendRow],
    outcomes: Mapping[str, SendOutcome],
    *,
    settings: Settings,
    now: datetime,
    can_lookup: bool,
    rng: random.Random | None = None,
) -> list[Decision]:
    """One decision per refused row of one provider call (an accepted row is simply ``sent``).

    Args:
        rows: The rows sent, each with the counters it had before the call.
        outcomes: The provider's answer per message id (every row has one).
        settings: The error policy and the retry policies.
        now: When the provider answered (a message's age is measured to it).
        can_lookup: Whether the provider can be asked later if it got a message; without it a
            timeout ends ``unknown`` at once rather than risk a duplicate.
        rng: Jitter source (tests pass a seeded one).

    Returns:
        The decisions of the refused rows, in the order of ``rows``. Accepted rows get none: a bulk
        call accepts thousands, and building an object for each would cost more than deciding.
    """
    decisions: list[Decision] = []
    policies: dict[tuple[str, str], RetryPolicy] = {}
    for row in rows:
        outcome = outcomes[row.id]
        if outcome.accepted:
            continue
        message = row.message
        key = (message.type.value, message.priority.value)
        policy = policies.get(key)
        if policy is None:
            policy = policies[key] = settings.retry_for(*key)
        raw = refusal(outcome, row.provider)
        error = classify(raw, settings.error_policy)
        if error.code is ErrorCode.OUTSIDE_SEND_WINDOW:
            # Nothing wrong with the message: it waits for the window, without spending a retry.
            delay = (reopens(now, message.type) - now).total_seconds()
            reason = "the provider refused it outside its sending window"
            decisions.append(Decision(row.id, A.DEFERRED, AttemptOutcome.REJECTED, error, delay, reason, spent=False))
            continue
        spent = not (error.retryable and isinstance(raw, (ProviderRateLimited, ProviderNotAttempted)))
        decided = decide(
            error,
            provider_attempts=row.provider_attempts + int(spent),
            age_seconds=(now - row.created_at).total_seconds(),
            has_next_provider=row.route_index + 1 < len(row.route),
            policy=policy,
            rng=rng,
        )
        kind = AttemptOutcome.RETRYABLE if error.retryable else AttemptOutcome.REJECTED
        if decided.action is Action.RECONCILE:
            action = A.RECONCILE if can_lookup else A.UNKNOWN
            decisions.append(Decision(row.id, action, AttemptOutcome.TIMEOUT, error, RECONCILE_DELAY, decided.reason))
        elif decided.action is Action.RETRY:
            decisions.append(
                Decision(row.id, A.RETRY, AttemptOutcome.RETRYABLE, error, decided.delay, decided.reason, spent)
            )
        elif decided.action is Action.FAILOVER:
            decisions.append(Decision(row.id, A.FAILOVER, kind, error, 0.0, decided.reason))
        else:
            decisions.append(Decision(row.id, A.FAILED, kind, error, 0.0, decided.reason))
    return decisions


def error_text(error: ProviderError) -> str:
    """The ``error_message`` stored on a message: our text, the provider's code and its own words."""
    parts = [str(error)]
    if error.provider_code:
        parts.append(f"provider code {error.provider_code}")
    if error.provider_message and error.provider_message not in parts[0]:
        parts.append(error.provider_message)
    return "; ".join(parts)[:1000]


def first_check_at(settings: Settings, now: datetime, scheduled_at: datetime | None = None) -> datetime:
    """When tracking first asks the provider about a message it accepted at ``now``."""
    first = now + timedelta(seconds=settings.tracking.first_check)
    if scheduled_at is not None and scheduled_at > now:
        # Provider-side scheduled sends are checked after their time, with two minutes' grace.
        first = max(first, scheduled_at + timedelta(seconds=120))
    return first


def wakes_by_countdown(settings: Settings, delay: float) -> bool:
    """Whether a wait of ``delay`` seconds rides a Celery countdown, or waits in the database.

    Short waits are published with a countdown, far below the broker's visibility timeout (a long
    countdown sits in a worker's memory and is redelivered when the timeout passes); longer ones
    wait in ``next_attempt_at`` for the maintenance sweep.
    """
    return delay <= settings.retry.max_countdown
