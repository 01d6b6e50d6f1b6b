"""Backoff and the decision after a failed provider call: retry, fail over, or fail.

:func:`decide` is a pure function of the error, the attempt counts and the route, so the whole
retry/failover policy is unit-tested without Celery or a database.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from kmsg_worker.errors import ProviderError, ProviderTimeout
from kmsg_worker.settings import RetryPolicy

__all__ = ["Action", "Decision", "backoff_delay", "decide"]


def backoff_delay(
    attempt: int, policy: RetryPolicy, *, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Delay before try ``attempt + 1`` (``attempt`` counts from 1).

    Exponential (``base * 2**(attempt-1)``), capped at ``max_delay``, with *bounded* jitter
    (+-``jitter`` of the delay) so retries spread out but never collapse to zero — Celery's own
    full jitter can pick 0
    (https://docs.celeryq.dev/en/stable/userguide/tasks.html#Task.retry_jitter). A provider's
    ``Retry-After`` is a floor.

    Returns:
        Seconds, always > 0.
    """
    rng = rng or random.Random()
    raw = min(policy.base_delay * (2 ** max(0, attempt - 1)), policy.max_delay)
    jittered = raw * (1 + rng.uniform(-policy.jitter, policy.jitter))
    delay = max(jittered, policy.base_delay * (1 - policy.jitter), 0.05)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return float(delay)


class Action(StrEnum):
    """What to do after a failed call."""

    RETRY = "retry"  #: Same provider, after ``delay``.
    FAILOVER = "failover"  #: Next provider of the route, now.
    FAIL = "fail"  #: Final failure.
    RECONCILE = "reconcile"  #: Outcome unknown: find out whether the provider took it before any resend.


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`."""

    action: Action
    delay: float = 0.0
    reason: str = ""


def decide(
    error: ProviderError,
    *,
    provider_attempts: int,
    age_seconds: float,
    has_next_provider: bool,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Decision:
    """Choose retry, failover or failure for ``error``.

    Args:
        error: The classified provider error.
        provider_attempts: Calls made to the current provider, this one included.
        age_seconds: Seconds since the message was accepted.
        has_next_provider: Whether the route has another provider.
        policy: Retry knobs.

    Returns:
        The decision. Message-caused permanent errors never fail over (another provider would
        refuse the same message); provider-caused ones do. A message older than ``max_age``
        neither retries nor fails over: it is stale everywhere (an OTP after five minutes).
    """
    if isinstance(error, ProviderTimeout):
        return Decision(Action.RECONCILE, reason="outcome unknown after a timeout")
    if age_seconds >= policy.max_age:
        return Decision(Action.FAIL, reason=f"older than the maximum age ({policy.max_age:g} s)")
    if error.retryable:
        if provider_attempts < policy.max_attempts:
            delay = backoff_delay(provider_attempts, policy, retry_after=error.retry_after, rng=rng)
            return Decision(Action.RETRY, delay=delay, reason=error.code.value)
        if has_next_provider:
            return Decision(Action.FAILOVER, reason=f"retries exhausted on {error.provider}")
        return Decision(Action.FAIL, reason="retries exhausted")
    if error.blame == "provider" and has_next_provider:
        return Decision(Action.FAILOVER, reason=f"{error.provider} refused: {error.code.value}")
    return Decision(Action.FAIL, reason=error.code.value)
