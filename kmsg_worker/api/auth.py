"""Bearer-key authentication, the per-key request rate limit, and the principal a request acts as."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kmsg_worker.api.problems import Problem
from kmsg_worker.logging import get_logger
from kmsg_worker.ratelimit import RateLimiter
from kmsg_worker.storage.tenants import KeyRecord, ParsedKey, TenantStore, parse_key

__all__ = ["Authenticator", "Principal"]

log = get_logger("kmsg.api")
#: Keys whose state is cached at most (an attacker cycling random ids must not grow it without bound).
_CACHE_MAX = 10_000
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kmsg"'}


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key of a tenant, ``live`` or ``test``."""

    key_id: str
    tenant: str
    kind: str

    @property
    def test(self) -> bool:
        """A test key: its messages only ever reach the simulator."""
        return self.kind == "test"


def _refused(detail: str) -> Problem:
    return Problem("unauthorized", detail, headers=_CHALLENGE)


class Authenticator:
    """Checks ``Authorization: Bearer <key>``; takes one token per request from the key's bucket.

    A key's state (hash, revocation, tenant disabled) is read from the database and kept for
    ``cache_seconds`` at most, so a revoked key or a disabled tenant is refused within that time
    on every API process without a database read per request.

    Args:
        tenants: Where keys are stored.
        limiter: The shared token buckets (Redis when configured).
        rate: Requests per second per key.
        cache_seconds: Longest reuse of a key's state.
        clock: Monotonic seconds (tests).
    """

    def __init__(
        self,
        tenants: TenantStore,
        limiter: RateLimiter,
        *,
        rate: float,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tenants = tenants
        self.limiter = limiter
        self.rate = rate
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._lock = threading.Lock()

    def cached(self, key_id: str) -> tuple[bool, KeyRecord | None]:
        """``(True, state)`` when the key's state was read less than ``cache_seconds`` ago, else ``(False, None)``.

        No I/O: the event loop asks this first and only goes to the thread pool on a miss.
        """
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None and self.clock() - cached[0] < self.cache_seconds:
            return True, cached[1]
        return False, None

    def load(self, key_id: str) -> KeyRecord | None:
        """Read the key's state from the database and cache it (unknown ids too, as ``None``)."""
        now = self.clock()
        record = self.tenants.key_record(key_id)
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record

    @staticmethod
    def parse(authorization: str | None) -> ParsedKey:
        """The key of an ``Authorization`` header.

        Raises:
            Problem: ``unauthorized``: missing, or not ``Bearer <kmsg key>``.
        """
        if not authorization:
            raise _refused("send the key as 'Authorization: Bearer kmsg_live_...'")
        scheme, _, token = authorization.partition(" ")
        parsed = parse_key(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise _refused("the Authorization header is not 'Bearer <kmsg key>'")
        return parsed

    @staticmethod
    def check(parsed: ParsedKey, record: KeyRecord | None) -> Principal:
        """The principal of a parsed key, given its stored state.

        Raises:
            Problem: ``unauthorized``: unknown id, wrong secret or kind, revoked key, disabled tenant.
        """
        # One answer for unknown, wrong, revoked and disabled: the response tells an attacker nothing.
        if record is None or not record.matches(parsed.secret) or record.kind != parsed.kind or not record.usable:
            raise _refused("unknown, revoked or disabled API key")
        return Principal(record.key_id, record.tenant, record.kind)

    def identify(self, authorization: str | None) -> Principal:
        """:meth:`parse`, the cached or loaded state, :meth:`check` (blocking on a cache miss).

        Raises:
            Problem: ``unauthorized`` (401).
        """
        parsed = self.parse(authorization)
        hit, record = self.cached(parsed.key_id)
        return self.check(parsed, record if hit else self.load(parsed.key_id))

    def take_token(self, key_id: str) -> None:
        """Take one request from the key's bucket (blocking: a Redis call when Redis is configured).

        Raises:
            Problem: ``rate-limited`` (429) with ``Retry-After``.
        """
        import redis

        try:
            wait = self.limiter.try_acquire({f"api:{key_id}": (self.rate, 1.0)})
        except redis.RedisError as exc:
            # The bucket is a guard, not the system of record: Redis trouble does not stop the API.
            log.warning("api.ratelimit_unavailable", error=type(exc).__name__)
            return
        if wait > 0:
            raise Problem(
                "rate-limited",
                f"more than {self.rate:g} requests per second with this key",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
