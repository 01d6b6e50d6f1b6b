"""Circuit breakers per provider, shared by every worker process through Redis.

::

    closed ──(error rate >= error_rate over the window, with >= min_requests calls;
    │          or consecutive_failures timeouts/5xx/connection errors in a row)──> open
    open ──(cooldown elapsed: the next allow() becomes a probe)──> half_open
    half_open ──(a probe succeeds)──> closed      (window and counters cleared)
    half_open ──(a probe fails)──> open           (a fresh cooldown)

While a provider's circuit is open the pipeline does not call it: the message moves at once to the
next provider of its route whose circuit lets it through (no attempt on the open provider is
spent), and when every remaining provider is open it waits in ``retrying`` until the earliest
cool-down ends. ``half_open`` lets ``half_open_probes`` calls through per cool-down; a probe whose
answer never comes back (worker killed, message throttled) stops counting after one cool-down.

What counts (:func:`health`): an accepted message, and a refusal blamed on the *message* (the
provider answered properly), are successes; timeouts, connection errors and 5xx are failures that
also extend the consecutive run; other provider-blamed refusals (authentication, balance) are
failures; a 429 is neither (the provider is healthy, we are too fast: that is the rate limiter's
business).

:class:`RedisCircuitBreaker` keeps each provider's state in two hashes, changed only by Lua scripts
(atomic across workers) that read the time from Redis (``TIME``), so host clocks never disagree.
:class:`LocalCircuitBreaker` is the in-process twin used when no Redis is configured (the embedded
default): same interface, same transitions, state per process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kmsg_worker.errors import (
    ErrorCode,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
)
from kmsg_worker.logging import get_logger

# The policy is a settings value (``KMSG_CIRCUIT_*``), defined with the other settings so that
# settings never import this module; re-exported here, where the breakers that follow it live.
from kmsg_worker.settings import CircuitPolicy, Settings

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "CircuitBreaker",
    "CircuitPolicy",
    "CircuitState",
    "LocalCircuitBreaker",
    "RedisCircuitBreaker",
    "allow",
    "health",
    "make_breaker",
    "observe",
    "record",
    "retry_in",
    "shared_states",
    "states",
]

log = get_logger("kmsg.circuit")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
#: Buckets of the sliding window (the window slides in steps of ``window / _BUCKETS``).
_BUCKETS = 10
#: Keys live this long after their last change (an idle provider's circuit is closed anyway).
_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class CircuitState:
    """A snapshot of one provider's circuit (``kmsg circuits``).

    Attributes:
        provider: Provider name.
        state: ``closed``, ``open`` or ``half_open``.
        requests: Calls recorded in the current window (closed only).
        failures: Failures among them.
        consecutive: Timeouts/5xx in a row.
        opened_at: Epoch seconds when it last opened (``None`` if never, or since cleared).
        retry_in: Seconds until an open circuit lets a probe through (0 otherwise).
    """

    provider: str
    state: str
    requests: int = 0
    failures: int = 0
    consecutive: int = 0
    opened_at: float | None = None
    retry_in: float = 0.0


class CircuitBreaker(Protocol):
    """What the pipeline and the CLI need from a breaker (Redis-backed or in-process)."""

    policy: CircuitPolicy

    def allow(self, name: str) -> bool:
        """Whether a call to ``name`` may go out now (in half-open, takes a probe permit)."""

    def record(self, name: str, *, ok: bool, timeout: bool = False) -> tuple[str, bool]:
        """Record one call's outcome; returns the state afterwards and whether this call changed it."""

    def snapshot(self, name: str) -> CircuitState:
        """The current state, read-only."""

    def reset(self, name: str) -> None:
        """Forget everything about ``name`` (closed)."""


# -- in-process ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    state: str = CLOSED
    opened_at: float | None = None
    half_open_at: float = 0.0
    probes: int = 0
    consecutive: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)


class LocalCircuitBreaker:
    """Circuit breakers held in this process (no Redis configured).

    Args:
        policy: Thresholds.
        clock: Time source in seconds (tests pass a controllable one).
    """

    def __init__(self, policy: CircuitPolicy, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def allow(self, name: str) -> bool:
        """See :meth:`CircuitBreaker.allow`."""
        p = self.policy
        with self._lock:
            now = self.clock()
            e = self._entries.setdefault(name, _Entry())
            if e.state == CLOSED:
                return True
            if e.state == OPEN:
                if now < (e.opened_at or 0.0) + p.cooldown:
                    return False
                e.state, e.half_open_at, e.probes = HALF_OPEN, now, 1
                return True
            if now >= e.half_open_at + p.cooldown:
                e.half_open_at, e.probes = now, 1
                return True
            if e.probes < p.half_open_probes:
                e.probes += 1
                return True
            return False

    def record(self, name: str, *, ok: bool, timeout: bool = False) -> tuple[str, bool]:
        """See :meth:`CircuitBreaker.record`."""
        p = self.policy
        with self._lock:
            now = self.clock()
            e = self._entries.setdefault(name, _Entry())
            if e.state == OPEN:
                return OPEN, False
            if e.state == HALF_OPEN:
                if ok:
                    self._entries[name] = _Entry(opened_at=e.opened_at)
                    return CLOSED, True
                e.state, e.opened_at, e.probes = OPEN, now, 0
                return OPEN, True
            width = p.window / _BUCKETS
            bucket = int(now // width)
            counts = e.buckets.setdefault(bucket, [0, 0])
            counts[0] += 1
            if not ok:
                counts[1] += 1
            if ok:
                e.consecutive = 0
            elif timeout:
                e.consecutive += 1
            for old in [b for b in e.buckets if b <= bucket - _BUCKETS]:
                del e.buckets[old]
            total = sum(c[0] for c in e.buckets.values())
            failures = sum(c[1] for c in e.buckets.values())
            if e.consecutive >= p.consecutive_failures or (
                total >= p.min_requests and failures >= p.error_rate * total
            ):
                self._entries[name] = _Entry(state=OPEN, opened_at=now)
                return OPEN, True
            return CLOSED, False

    def snapshot(self, name: str) -> CircuitState:
        """See :meth:`CircuitBreaker.snapshot`."""
        with self._lock:
            now = self.clock()
            e = self._entries.get(name) or _Entry()
            low = int(now // (self.policy.window / _BUCKETS)) - _BUCKETS
            live = [c for b, c in e.buckets.items() if b > low]
            return _state(name, e.state, e.opened_at, e.consecutive, live, now, self.policy)

    def reset(self, name: str) -> None:
        """See :meth:`CircuitBreaker.reset`."""
        with self._lock:
            self._entries.pop(name, None)


def _state(
    name: str,
    state: str,
    opened_at: float | None,
    consecutive: int,
    buckets: Sequence[Sequence[int]],
    now: float,
    policy: CircuitPolicy,
) -> CircuitState:
    retry = max(0.0, (opened_at or 0.0) + policy.cooldown - now) if state == OPEN else 0.0
    return CircuitState(
        provider=name,
        state=state,
        requests=sum(b[0] for b in buckets),
        failures=sum(b[1] for b in buckets),
        consecutive=consecutive,
        opened_at=opened_at,
        retry_in=retry,
    )


# -- Redis --------------------------------------------------------------------------------------

_CLOCK = """
local function clock(v)
  if v ~= '' then return tonumber(v) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

#: KEYS: state hash. ARGV: now ('' = Redis TIME), cooldown, half-open probes, ttl ms.
_ALLOW = (
    _CLOCK
    + """
local now = clock(ARGV[1])
local cooldown, max_probes, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'half_open_at', 'probes')
local state = st[1] or 'closed'
if state == 'closed' then return 1 end
if state == 'open' then
  if now < (tonumber(st[2]) or 0) + cooldown then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'half_open_at', tostring(now), 'probes', 1)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
if now >= (tonumber(st[3]) or 0) + cooldown then
  redis.call('HSET', KEYS[1], 'half_open_at', tostring(now), 'probes', 1)
  return 1
end
if (tonumber(st[4]) or 0) < max_probes then
  redis.call('HINCRBY', KEYS[1], 'probes', 1)
  return 1
end
return 0
"""
)

#: KEYS: state hash, window hash. ARGV: now, ok, timeout, window, buckets, min requests, error rate,
#: consecutive limit, ttl ms.
_RECORD = (
    _CLOCK
    + """
local now = clock(ARGV[1])
local ok, timeout = ARGV[2] == '1', ARGV[3] == '1'
local window, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
local min_requests, rate, limit, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'open' then return {'open', 0} end
if state == 'half_open' then
  redis.call('DEL', KEYS[2])
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', 0, 'probes', 0)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {'closed', 1}
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now), 'probes', 0)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'open', 1}
end
local bucket = math.floor(now / (window / nb))
redis.call('HINCRBY', KEYS[2], bucket .. ':n', 1)
if not ok then redis.call('HINCRBY', KEYS[2], bucket .. ':f', 1) end
local consecutive = tonumber(redis.call('HGET', KEYS[1], 'consecutive') or '0') or 0
if ok then consecutive = 0 elseif timeout then consecutive = consecutive + 1 end
local total, failures = 0, 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local b, kind = string.match(fields[i], '^(-?%d+):(%a)$')
  if b == nil or tonumber(b) <= bucket - nb then
    redis.call('HDEL', KEYS[2], fields[i])
  elseif kind == 'n' then
    total = total + tonumber(fields[i + 1])
  else
    failures = failures + tonumber(fields[i + 1])
  end
end
if consecutive >= limit or (total >= min_requests and failures >= rate * total) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now), 'consecutive', 0, 'probes', 0)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'open', 1}
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', consecutive)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {'closed', 0}
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCircuitBreaker:
    """Circuit breakers shared by every process through Redis.

    Args:
        client: A ``redis.Redis`` client (one per process).
        policy: Thresholds.
        prefix: Key prefix (tests use their own).
        clock: ``None`` (production) reads the time from Redis inside the scripts; tests pass a
            controllable clock in seconds.
    """

    def __init__(
        self,
        client: Any,
        policy: CircuitPolicy,
        *,
        prefix: str = "kmsg:cb:",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.prefix = prefix
        self.clock = clock
        self._allow = client.register_script(_ALLOW)
        self._record = client.register_script(_RECORD)

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    def _keys(self, name: str) -> list[str]:
        return [f"{self.prefix}{name}", f"{self.prefix}{name}:window"]

    def allow(self, name: str) -> bool:
        """See :meth:`CircuitBreaker.allow`."""
        p = self.policy
        result = self._allow(keys=self._keys(name)[:1], args=[self._now(), p.cooldown, p.half_open_probes, _TTL_MS])
        return bool(int(result))

    def record(self, name: str, *, ok: bool, timeout: bool = False) -> tuple[str, bool]:
        """See :meth:`CircuitBreaker.record`."""
        p = self.policy
        args = [
            self._now(),
            "1" if ok else "0",
            "1" if timeout else "0",
            p.window,
            _BUCKETS,
            p.min_requests,
            p.error_rate,
            p.consecutive_failures,
            _TTL_MS,
        ]
        state, changed = self._record(keys=self._keys(name), args=args)
        return _text(state), bool(int(changed))

    def snapshot(self, name: str) -> CircuitState:
        """See :meth:`CircuitBreaker.snapshot`."""
        state_key, window_key = self._keys(name)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(state_key)
        pipe.hgetall(window_key)
        pipe.time()
        raw_state, raw_window, (secs, micros) = pipe.execute()
        now = self.clock() if self.clock is not None else secs + micros / 1_000_000
        values = {_text(k): _text(v) for k, v in raw_state.items()}
        low = int(now // (self.policy.window / _BUCKETS)) - _BUCKETS
        buckets: dict[int, list[int]] = {}
        for key, count in raw_window.items():
            bucket, _, kind = _text(key).partition(":")
            if int(bucket) > low:
                buckets.setdefault(int(bucket), [0, 0])[0 if kind == "n" else 1] += int(count)
        state = values.get("state", CLOSED)
        opened = float(values["opened_at"]) if "opened_at" in values else None
        consecutive = int(values.get("consecutive", "0"))
        return _state(name, state, opened, consecutive, list(buckets.values()), now, self.policy)

    def reset(self, name: str) -> None:
        """See :meth:`CircuitBreaker.reset`."""
        self.client.delete(*self._keys(name))


def make_breaker(policy: CircuitPolicy, client: Any | None, *, prefix: str = "kmsg:cb:") -> CircuitBreaker:
    """The Redis-backed breaker when there is a client, else the in-process one."""
    if client is None:
        return LocalCircuitBreaker(policy)
    return RedisCircuitBreaker(client, policy, prefix=prefix)


# -- what the pipeline calls ----------------------------------------------------------------------


def _redis_errors() -> tuple[type[BaseException], ...]:
    # Imported here, a real cost: redis takes ~380 ms to import (python -X importtime) and a process
    # on the embedded default (no KMSG_REDIS_URL) never loads it.
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return ()
    return (redis.RedisError,)


def health(error: ProviderError | None) -> tuple[bool, bool] | None:
    """How a call's outcome counts for the provider's circuit.

    Returns:
        ``(ok, timeout)``, or ``None`` when it does not count (429: the provider is healthy).
    """
    if error is None:
        return True, False
    if isinstance(error, ProviderRateLimited):
        return None
    if error.blame == "message" and not error.retryable:
        return True, False
    status = error.status_code
    down = (
        isinstance(error, (ProviderTimeout, ProviderConnectionError))
        or (status is not None and status >= 500)
        or error.code is ErrorCode.NETWORK_SERVICE_UNAVAILABLE
    )
    return False, down


class Runtime(Protocol):
    """What the functions below need of a process's runtime (:class:`kmsg_worker.runtime.Runtime` is one).

    Structural, so this module never imports the runtime that builds its breakers (no import cycle).
    """

    @property
    def circuits(self) -> CircuitBreaker:
        """The process's breakers (shared through Redis or in-process)."""

    @property
    def settings(self) -> Settings:
        """The settings (the enabled providers)."""


def allow(rt: Runtime, name: str) -> bool:
    """Whether the pipeline may call provider ``name`` now (see :meth:`CircuitBreaker.allow`).

    Redis trouble never stops sending: the breaker is a protection, so it fails open.
    """
    if not rt.circuits.policy.enabled:
        return True
    try:
        return rt.circuits.allow(name)
    except _redis_errors() as exc:
        log.warning("circuit.unavailable", provider=name, error=type(exc).__name__)
        return True


def record(rt: Runtime, name: str, ok: bool, timeout: bool = False) -> str | None:
    """Record one call to ``name``; returns the state afterwards (``None`` if not recorded)."""
    if not rt.circuits.policy.enabled:
        return None
    try:
        after, changed = rt.circuits.record(name, ok=ok, timeout=timeout)
    except _redis_errors() as exc:
        log.warning("circuit.unavailable", provider=name, error=type(exc).__name__)
        return None
    if changed:
        # One line per transition, from whichever worker made it: the operator's timeline.
        log.warning("circuit.opened" if after == OPEN else "circuit.closed", provider=name, timeout=timeout)
    return after


def observe(rt: Runtime, name: str, error: ProviderError | None) -> str | None:
    """Record a call's outcome as :func:`health` counts it (``error`` is ``None`` on success)."""
    counted = health(error)
    if counted is None:
        return None
    return record(rt, name, counted[0], counted[1])


def retry_in(rt: Runtime, names: Sequence[str]) -> float:
    """Seconds until the first of ``names`` lets a probe through (0 if one already would)."""
    try:
        waits = [rt.circuits.snapshot(n).retry_in for n in names]
    except _redis_errors():
        return 0.0
    return min(waits, default=0.0)


def states(rt: Runtime, names: Sequence[str] | None = None) -> list[CircuitState]:
    """Snapshots of every enabled provider's circuit (``kmsg circuits``)."""
    return [rt.circuits.snapshot(n) for n in (names or rt.settings.providers)]


def shared_states(settings: Settings) -> list[CircuitState] | None:
    """Every enabled provider's circuit as the workers share it in Redis (``kmsg circuits``).

    Returns:
        ``None`` without ``KMSG_REDIS_URL``: each worker process then keeps its own circuits in
        memory, and there is nothing shared to read.
    """
    if not settings.redis_url:
        return None
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        shared = RedisCircuitBreaker(client, settings.circuit, prefix=f"{settings.broker_key_prefix}kmsg:cb:")
        return [shared.snapshot(name) for name in settings.providers]
    finally:
        client.close()
