"""The per-process bundle of resources: settings, engine, store, HTTP client, providers, router.

One :class:`Runtime` per process. In Celery workers it is built in ``worker_process_init`` (after the
fork), so every child has its own database connections and its own ``httpx.Client``; nothing is
created per task.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from kmsg_worker.adrules import SenderRegistry
from kmsg_worker.circuit import CircuitBreaker, make_breaker
from kmsg_worker.dispatch import Dispatcher, NullDispatcher
from kmsg_worker.providers.base import Provider
from kmsg_worker.providers.base_http import HttpProvider, make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.ratelimit import RateLimiter, make_limiter
from kmsg_worker.routing import Router
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import create_schema, dispose_after_fork, make_engine
from kmsg_worker.storage.repo import Store

__all__ = ["Runtime"]

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Runtime:
    """Resources shared by everything in one process.

    Args:
        settings: The settings.
        dispatcher: Where tasks are published (default: nothing; the sweeps still recover rows).
        clock: Time source (tests pass a controllable one).
        create_tables: Create missing tables (the embedded default; PostgreSQL uses Alembic, but
            creating missing tables is harmless there too and keeps tests simple).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        dispatcher: Dispatcher | None = None,
        clock: Clock = _utcnow,
        create_tables: bool = True,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher: Dispatcher = dispatcher or NullDispatcher()
        self.now = clock
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.database_url)
        if create_tables:
            create_schema(self.engine)
        self.store = Store(self.engine)
        self._http = http_client
        self._providers: dict[str, Provider] = {}
        self._lock = threading.Lock()
        # Shared-state clients (Redis, circuits, rate limits): created on first use, forgotten after fork.
        self._redis: Any = None
        self._circuits: CircuitBreaker | None = None
        self._limiter: RateLimiter | None = None
        self._senders: SenderRegistry | None = None
        self.router = Router(
            settings.providers,
            settings.routing,
            settings.default_provider,
            counter=self._counter(),
            provider_configs=settings.provider_configs,
        )
        self.extras: dict[str, Any] = {}

    def _counter(self) -> Callable[[str], int] | None:
        if not self.settings.redis_url:
            return None
        # Imported here: redis costs ~380 ms to import and the embedded default never needs it.
        import redis

        fallback = itertools.count()

        def incr(key: str) -> int:
            # Shared across every worker process and machine: round robin holds globally. Redis
            # trouble must not refuse a message the outbox could still accept.
            try:
                return int(self.redis.incr(self.redis_key(key))) - 1
            except redis.RedisError:
                return next(fallback)

        return incr

    def redis_key(self, name: str) -> str:
        """The Redis key of shared state ``name``, in the deployment's namespace.

        The broker's key prefix (``KMSG_BROKER_KEY_PREFIX``) applies here too: deployments (or
        test sessions) sharing one Redis never share circuits, buckets or routing counters.
        """
        return f"{self.settings.broker_key_prefix}kmsg:{name}"

    @property
    def redis(self) -> Any:
        """The process's ``redis.Redis`` client for shared state, or ``None`` without ``KMSG_REDIS_URL``."""
        if self._redis is None and self.settings.redis_url:
            import redis  # here, not at the top: see _counter

            with self._lock:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(
                        self.settings.redis_url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
                    )
        return self._redis

    @property
    def circuits(self) -> CircuitBreaker:
        """The providers' circuit breakers: in Redis when configured, else in this process."""
        if self._circuits is None:
            self._circuits = make_breaker(self.settings.circuit, self.redis, prefix=self.redis_key("cb:"))
        return self._circuits

    @property
    def rate_limiter(self) -> RateLimiter:
        """The global token buckets: in Redis when configured, else in this process."""
        if self._limiter is None:
            self._limiter = make_limiter(self.redis, prefix=self.redis_key("rl:"))
        return self._limiter

    @property
    def senders(self) -> SenderRegistry:
        """The providers' registered sender numbers, cached for ``KMSG_SENDER_CACHE_TTL_SECONDS``."""
        if self._senders is None:
            self._senders = SenderRegistry(self.settings, lambda name: self.provider(name).registered_senders())
        return self._senders

    @property
    def http(self) -> httpx.Client:
        """The process's one ``httpx.Client`` (created on first use)."""
        if self._http is None:
            self._http = make_http_client()
        return self._http

    def provider(self, name: str) -> Provider:
        """The provider instance for ``name`` (one per process)."""
        with self._lock:
            existing = self._providers.get(name)
            if existing is not None:
                return existing
            cls = provider_class(name)
            config = self.settings.provider_config(name)
            instance: Provider
            if issubclass(cls, HttpProvider):
                instance = cls(config, self.http)
            else:
                instance = cls(config)
            self._providers[name] = instance
            return instance

    def set_provider(self, name: str, provider: Provider) -> None:
        """Replace a provider instance (tests)."""
        with self._lock:
            self._providers[name] = provider

    def after_fork(self) -> None:
        """Forget inherited connections and clients; they are rebuilt on first use in the child."""
        dispose_after_fork(self.engine)
        self._http = None
        self._providers.clear()
        self._redis = self._circuits = self._limiter = None

    def close(self) -> None:
        """Close the HTTP client and the engine's pool."""
        if self._http is not None:
            self._http.close()
            self._http = None
        for provider in self._providers.values():
            provider.close()
        self._providers.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self.engine.dispose()
