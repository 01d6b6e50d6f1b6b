"""Global rate limits: a token bucket per provider, per sender number and per tenant.

Celery's ``rate_limit`` is per worker, so N workers would send N times the rate
(https://docs.celeryq.dev/en/stable/userguide/tasks.html#Task.rate_limit). These buckets live in
Redis and every worker takes from the same ones::

    KMSG_RATE_LIMITS='{"solapi": 100, "iwinv": 50, "sender:0212345678": 10, "tenant:shop-a": 20}'

Rates are units per second, and a message costs :attr:`~kmsg_worker.message.Message.parts` units
(an LMS/MMS costs more than an SMS). A send takes from every bucket that applies to it (its
provider, its sender number, its tenant) in **one** Lua script, all or nothing, so a message refused
by its sender's bucket does not use up provider capacity:

* the time is Redis' own (``TIME`` inside the script), so workers on hosts with skewed clocks agree;
* a bucket holds at most one second of capacity, so an idle provider never gets a burst larger
  than its rate on the next second;
* a cost larger than a whole bucket (a big bulk chunk) goes through when the bucket is full and
  leaves it in debt, so the long-run rate still holds and nothing waits forever;
* a refusal takes nothing and returns the seconds until the tokens will be there.

What the pipeline does with a refusal (:func:`kmsg_worker.delivery.deliver`): it waits in the
worker when the wait is short (``KMSG_RATE_LIMIT_INLINE_WAIT_SECONDS``), otherwise it puts the
message back to ``retrying`` with ``next_attempt_at`` = now + wait and re-enqueues it with that
countdown. No attempt is recorded and no retry is used up: a throttled message was never sent.

Without Redis (the embedded default) :class:`LocalRateLimiter` applies the same buckets per
process.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.logging import get_logger
from kmsg_worker.message import Message

__all__ = [
    "LocalRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "acquire",
    "buckets_for",
    "make_limiter",
    "parse_rate_limits",
]

log = get_logger("kmsg.ratelimit")

#: Bucket name -> (rate per second, cost of this request).
Demands = Mapping[str, tuple[float, float]]
#: Upper bound of in-worker waits per acquire, whatever the budget (keeps every loop bounded).
_MAX_INLINE_TRIES = 20
#: Refills are float arithmetic: 0.1 s at 10/s may come to 0.99999... of a token.
_EPSILON = 1e-9


def parse_rate_limits(
    raw: str | None, providers: Sequence[str], variable: str = "KMSG_RATE_LIMITS"
) -> dict[str, float]:
    """Validate ``KMSG_RATE_LIMITS``.

    Args:
        raw: The JSON text (``None`` = no limits).
        providers: Enabled providers (a bare key must be one of them).
        variable: Named in error messages.

    Raises:
        ConfigurationError: Not a JSON object, an unknown provider, an empty sender/tenant, or a
            rate that is not a positive number.
    """
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{variable} is not valid JSON: {exc}", variable=variable) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f'{variable} must be a JSON object like {{"solapi": 100}}', variable=variable)
    limits: dict[str, float] = {}
    for key, value in data.items():
        name = str(key).strip()
        kind, _, rest = name.partition(":")
        if rest or kind in ("sender", "tenant"):
            if kind not in ("sender", "tenant") or not rest:
                raise ConfigurationError(
                    f"{variable}: {name!r} is not a provider name, sender:<number> or tenant:<name>", variable=variable
                )
        elif name not in providers:
            raise ConfigurationError(
                f"{variable}: {name!r} is not an enabled provider (KMSG_PROVIDERS={','.join(providers)})",
                variable=variable,
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(
                f"{variable}: rate of {name!r} must be a number > 0 (per second)", variable=variable
            )
        limits[name] = float(value)
    return limits


def buckets_for(
    limits: Mapping[str, float], provider: str, messages: Sequence[Message], default_sender: str | None
) -> dict[str, tuple[float, float]]:
    """The buckets ``messages`` sent through ``provider`` take from, with their total cost."""
    if not limits:
        return {}
    cost: dict[str, float] = {}
    for message in messages:
        parts = float(message.parts)
        sender = message.sender or default_sender
        for name in (provider, f"sender:{sender}" if sender else None, f"tenant:{message.tenant}"):
            if name is not None and name in limits:
                cost[name] = cost.get(name, 0.0) + parts
    return {name: (limits[name], units) for name, units in cost.items()}


class RateLimiter(Protocol):
    """Takes tokens from several buckets at once."""

    def try_acquire(self, demands: Demands) -> float:
        """Take every cost from every bucket, or nothing.

        Returns:
            0 when taken; otherwise the seconds until all the tokens will be there.
        """

    def reset(self, names: Sequence[str]) -> None:
        """Forget buckets (tests, operators)."""


class LocalRateLimiter:
    """Token buckets in this process (no Redis configured; per process only).

    Args:
        clock: Monotonic time source in seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def try_acquire(self, demands: Demands) -> float:
        """See :meth:`RateLimiter.try_acquire`."""
        with self._lock:
            now = self.clock()
            levels: dict[str, float] = {}
            wait = 0.0
            for name, (rate, cost) in demands.items():
                tokens, stamp = self._buckets.get(name, (rate, now))
                tokens = min(rate, tokens + max(0.0, now - stamp) * rate)
                levels[name] = tokens
                need = min(cost, rate)
                if tokens + _EPSILON < need:
                    wait = max(wait, (need - tokens) / rate)
            if wait > 0:
                return wait
            for name, (_, cost) in demands.items():
                self._buckets[name] = (levels[name] - cost, now)
            return 0.0

    def reset(self, names: Sequence[str]) -> None:
        """See :meth:`RateLimiter.reset`."""
        with self._lock:
            for name in names:
                self._buckets.pop(name, None)


#: KEYS: bucket hashes. ARGV: rate_1, cost_1, rate_2, cost_2, ...
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local levels = {}
for i, key in ipairs(KEYS) do
  local rate, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(st[1]), tonumber(st[2])
  if tokens == nil or ts == nil then tokens, ts = rate, now end
  if now > ts then tokens = math.min(rate, tokens + (now - ts) * rate) end
  levels[i] = tokens
  local need = math.min(cost, rate)
  if tokens + 1e-9 < need and (need - tokens) / rate > wait then wait = (need - tokens) / rate end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local rate, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local left = levels[i] - cost
  redis.call('HSET', key, 'tokens', tostring(left), 'ts', tostring(now))
  -- Outlive the debt: an expired bucket would start full again and forgive it.
  redis.call('PEXPIRE', key, math.ceil(((rate - left) / rate + 60) * 1000))
end
return '0'
"""


class RedisRateLimiter:
    """Token buckets shared by every worker through one Lua script.

    Args:
        client: A ``redis.Redis`` client (one per process).
        prefix: Key prefix (tests use their own).
    """

    def __init__(self, client: Any, *, prefix: str = "kmsg:rl:") -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)

    def try_acquire(self, demands: Demands) -> float:
        """See :meth:`RateLimiter.try_acquire`."""
        if not demands:
            return 0.0
        keys = [f"{self.prefix}{name}" for name in demands]
        args: list[float] = []
        for rate, cost in demands.values():
            args.extend((rate, cost))
        raw = self._acquire(keys=keys, args=args)
        return float(raw.decode() if isinstance(raw, bytes) else raw)

    def reset(self, names: Sequence[str]) -> None:
        """See :meth:`RateLimiter.reset`."""
        if names:
            self.client.delete(*(f"{self.prefix}{n}" for n in names))


def make_limiter(client: Any | None, *, prefix: str = "kmsg:rl:") -> RateLimiter:
    """The Redis-backed limiter when there is a client, else the in-process one."""
    if client is None:
        return LocalRateLimiter()
    return RedisRateLimiter(client, prefix=prefix)


def _redis_errors() -> tuple[type[BaseException], ...]:
    # Imported here: redis costs ~380 ms to import and the embedded default never needs it.
    import redis

    return (redis.RedisError,)


class _LimitSettings(Protocol):
    @property
    def rate_limits(self) -> Mapping[str, float]: ...

    @property
    def default_sender(self) -> str | None: ...


class Runtime(Protocol):
    """What :func:`acquire` needs of a process's runtime (:class:`kmsg_worker.runtime.Runtime` is one).

    Structural, so this module never imports the runtime that builds its limiter (no import cycle).
    """

    @property
    def settings(self) -> _LimitSettings:
        """The settings (the limits and the default sender)."""

    @property
    def rate_limiter(self) -> RateLimiter:
        """The process's token buckets."""


def acquire(
    rt: Runtime,
    provider_name: str,
    message: Message | Sequence[Message],
    *,
    max_wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Take the tokens ``message`` (or a chunk of messages) needs to go to ``provider_name``.

    Args:
        rt: The process's runtime (its limiter and settings).
        provider_name: The provider about to be called.
        message: One message, or every message of one bulk call.
        max_wait: Seconds this call may sleep in the worker for tokens before giving up.
        sleep: Sleep function (tests).

    Returns:
        0 when the tokens were taken (send now); otherwise the seconds to wait, nothing taken:
        re-enqueue the work with that countdown. Redis trouble never stops sending (0).
    """
    messages = [message] if isinstance(message, Message) else list(message)
    needed = buckets_for(rt.settings.rate_limits, provider_name, messages, rt.settings.default_sender)
    if not needed:
        return 0.0
    deadline = time.monotonic() + max_wait
    wait = 0.0
    for _ in range(_MAX_INLINE_TRIES):
        try:
            wait = rt.rate_limiter.try_acquire(needed)
        except _redis_errors() as exc:
            log.warning("ratelimit.unavailable", provider=provider_name, error=type(exc).__name__)
            return 0.0
        if wait <= 0:
            return 0.0
        # A little jitter: workers refused at the same moment must not all come back together.
        pause = wait * random.uniform(1.0, 1.2)
        if time.monotonic() + pause > deadline:
            return wait
        sleep(pause)
    return wait
