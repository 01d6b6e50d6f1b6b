"""One typed, frozen settings object, read from the environment once.

Every variable starts with ``KMSG_``. Order of precedence: an explicit argument to
:meth:`Settings.from_env` (``overrides``) -> the environment -> the default. A missing or invalid
value raises :class:`~kmsg_worker.errors.ConfigurationError` naming the variable, so a worker stops
at start instead of failing at its first send.

Provider settings are ``KMSG_<PROVIDER>_<KEY>``: keys the provider class declares in
``credential_keys`` are secrets (never logged or shown in a repr); every other key is an option
(``KMSG_SOLAPI_BASE_URL``, ``KMSG_SOLAPI_DEFAULT_FROM``, ``KMSG_IWINV_BATCH_LIMIT`` ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.message import ValidationLimits
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.registry import provider_class

__all__ = ["RetryPolicy", "Settings", "TrackingPolicy"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry knobs for sends.

    Attributes:
        max_attempts: Attempts on one provider before failing over or failing.
        base_delay: First backoff delay in seconds (doubles each attempt).
        max_delay: Backoff ceiling in seconds.
        jitter: Bounded jitter as a fraction of the delay (0.1 = +-10 %).
        max_countdown: Longest wait kept as a Celery countdown; longer waits go through
            ``next_attempt_at`` and the maintenance sweep (far below the visibility timeout).
        max_age: Give up on a message this many seconds after it was accepted.
    """

    max_attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 600.0
    jitter: float = 0.1
    max_countdown: float = 60.0
    max_age: float = 6 * 3600.0


@dataclass(frozen=True)
class TrackingPolicy:
    """Delivery-status polling knobs.

    Attributes:
        backoff: Seconds between checks (the last value repeats).
        first_check: Seconds after the send before the first check.
        max_duration: Give up as ``unknown`` after this many seconds.
        no_status_api: What to do for a provider without a status API: ``"wait"`` until the
            timeout, or ``"unknown"`` at once.
    """

    backoff: tuple[float, ...] = (30.0, 120.0, 600.0, 1800.0, 7200.0)
    first_check: float = 30.0
    max_duration: float = 86400.0
    no_status_api: str = "unknown"


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else None


def _parse(environ: Mapping[str, str], name: str, default: T, parser: Callable[[str], T]) -> T:
    raw = _env(environ, name)
    if raw is None:
        return default
    try:
        return parser(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{name}={raw!r} is invalid: {exc}", variable=name) from None


def _positive(parser: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = parser(raw)
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError("must be greater than 0")
        return value

    return parse


def _floats(raw: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in raw.split(",") if part.strip())
    if not values or any(v <= 0 for v in values):
        raise ValueError("must be a comma-separated list of positive numbers")
    return values


@dataclass(frozen=True)
class Settings:
    """Everything the library, the workers and beat are configured with.

    Build it with :meth:`from_env`; it never changes afterwards.
    """

    var_dir: Path = Path("var")
    broker_url: str = ""
    database_url: str = ""
    redis_url: str | None = None
    timezone: str = "Asia/Seoul"
    providers: tuple[str, ...] = ("mock",)
    default_provider: str | None = None
    routing: Mapping[str, Any] = field(default_factory=dict)
    provider_configs: Mapping[str, ProviderConfig] = field(default_factory=dict)
    default_sender: str | None = None
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tracking: TrackingPolicy = field(default_factory=TrackingPolicy)
    idempotency_ttl: timedelta = timedelta(hours=24)
    lease_seconds: float = 120.0
    stale_queued_seconds: float = 60.0
    max_deliveries: int = 5
    visibility_timeout: int = 3600
    sweep_interval: float = 5.0
    sweep_batch: int = 1000
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def embedded(self) -> bool:
        """True when running on the embedded broker and SQLite (no server at all)."""
        return not self.broker_url.startswith(("redis", "rediss", "amqp", "sentinel"))

    def provider_config(self, name: str) -> ProviderConfig:
        """Return the configuration of provider ``name`` (an empty one if nothing is set)."""
        return self.provider_configs.get(name) or ProviderConfig(name=name)

    def with_overrides(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed (tests, the demo)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the settings from ``environ`` (default: ``os.environ``).

        Args:
            environ: Environment mapping.
            **overrides: Field values that win over the environment.

        Raises:
            ConfigurationError: A value is missing or invalid; the message names the variable.
        """
        env = os.environ if environ is None else environ
        var_dir = Path(_env(env, "KMSG_VAR_DIR") or "var").resolve()
        # The embedded default: kombu's filesystem transport (measured 5x faster than its SQLite
        # transport here, `python -m bench.embedded_transports`); see the README.
        broker_url = _env(env, "KMSG_BROKER_URL") or "filesystem://"
        database_url = _env(env, "KMSG_DATABASE_URL") or f"sqlite:///{var_dir / 'kmsg.sqlite'}"
        for name, url in (("KMSG_DATABASE_URL", database_url),):
            if not url.startswith(("sqlite", "postgresql")):
                raise ConfigurationError(
                    f"{name}={url!r} is not supported: use sqlite:///path or postgresql+psycopg://...",
                    variable=name,
                )
        redis_url = _env(env, "KMSG_REDIS_URL")
        if redis_url is None and broker_url.startswith("redis"):
            redis_url = broker_url
        timezone = _env(env, "KMSG_TIMEZONE") or "Asia/Seoul"
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(
                f"KMSG_TIMEZONE={timezone!r} is not a known time zone", variable="KMSG_TIMEZONE"
            ) from exc

        providers = tuple(p.strip().lower() for p in (_env(env, "KMSG_PROVIDERS") or "mock").split(",") if p.strip())
        configs = {name: _provider_config(env, name) for name in providers}
        if "mock" in configs and not configs["mock"].option("call_log"):
            # Scripted mock outcomes and reconciliation must see calls made by every worker process.
            mock = configs["mock"]
            configs["mock"] = ProviderConfig(
                name="mock", options={**mock.options, "call_log": str(var_dir / "mock-calls.jsonl")}
            )
        default_provider = _env(env, "KMSG_DEFAULT_PROVIDER")
        if default_provider and default_provider not in providers:
            raise ConfigurationError(
                f"KMSG_DEFAULT_PROVIDER={default_provider!r} is not in KMSG_PROVIDERS ({', '.join(providers)})",
                variable="KMSG_DEFAULT_PROVIDER",
            )
        routing: Any = _parse(env, "KMSG_ROUTING", {}, json.loads)
        if not isinstance(routing, dict):
            raise ConfigurationError("KMSG_ROUTING must be a JSON object", variable="KMSG_ROUTING")

        limits = ValidationLimits(
            auto_lms_bytes=_parse(env, "KMSG_AUTO_LMS_BYTES", 90, _positive(int)),
            sms_max_bytes=_parse(env, "KMSG_SMS_MAX_BYTES", 90, _positive(int)),
            lms_max_bytes=_parse(env, "KMSG_LMS_MAX_BYTES", 2000, _positive(int)),
            subject_max_bytes=_parse(env, "KMSG_SUBJECT_MAX_BYTES", 40, _positive(int)),
            timezone=timezone,
        )
        retry = RetryPolicy(
            max_attempts=_parse(env, "KMSG_RETRY_MAX_ATTEMPTS", 5, _positive(int)),
            base_delay=_parse(env, "KMSG_RETRY_BASE_SECONDS", 2.0, _positive(float)),
            max_delay=_parse(env, "KMSG_RETRY_MAX_SECONDS", 600.0, _positive(float)),
            jitter=_parse(env, "KMSG_RETRY_JITTER", 0.1, float),
            max_countdown=_parse(env, "KMSG_RETRY_MAX_COUNTDOWN_SECONDS", 60.0, _positive(float)),
            max_age=_parse(env, "KMSG_RETRY_MAX_AGE_SECONDS", 6 * 3600.0, _positive(float)),
        )
        if not 0 <= retry.jitter < 1:
            raise ConfigurationError("KMSG_RETRY_JITTER must be in [0, 1)", variable="KMSG_RETRY_JITTER")
        tracking = TrackingPolicy(
            backoff=_parse(env, "KMSG_TRACKING_BACKOFF", (30.0, 120.0, 600.0, 1800.0, 7200.0), _floats),
            first_check=_parse(env, "KMSG_TRACKING_FIRST_CHECK_SECONDS", 30.0, _positive(float)),
            max_duration=_parse(env, "KMSG_TRACKING_MAX_SECONDS", 86400.0, _positive(float)),
            no_status_api=_parse(env, "KMSG_TRACKING_NO_STATUS_API", "unknown", _choice("wait", "unknown")),
        )
        visibility_timeout = _parse(env, "KMSG_VISIBILITY_TIMEOUT", 3600, _positive(int))
        lease = _parse(env, "KMSG_LEASE_SECONDS", 120.0, _positive(float))
        if lease >= visibility_timeout:
            raise ConfigurationError(
                "KMSG_LEASE_SECONDS must be below KMSG_VISIBILITY_TIMEOUT", variable="KMSG_LEASE_SECONDS"
            )
        values: dict[str, Any] = {
            "var_dir": var_dir,
            "broker_url": broker_url,
            "database_url": database_url,
            "redis_url": redis_url,
            "timezone": timezone,
            "providers": providers,
            "default_provider": default_provider,
            "routing": routing,
            "provider_configs": configs,
            "default_sender": _env(env, "KMSG_DEFAULT_SENDER"),
            "limits": limits,
            "retry": retry,
            "tracking": tracking,
            "idempotency_ttl": timedelta(seconds=_parse(env, "KMSG_IDEMPOTENCY_TTL_SECONDS", 86400, _positive(int))),
            "lease_seconds": lease,
            "stale_queued_seconds": _parse(env, "KMSG_STALE_QUEUED_SECONDS", 60.0, _positive(float)),
            "max_deliveries": _parse(env, "KMSG_MAX_DELIVERIES", 5, _positive(int)),
            "visibility_timeout": visibility_timeout,
            "sweep_interval": _parse(env, "KMSG_SWEEP_INTERVAL_SECONDS", 5.0, _positive(float)),
            "sweep_batch": _parse(env, "KMSG_SWEEP_BATCH", 1000, _positive(int)),
            "log_level": (_env(env, "KMSG_LOG_LEVEL") or "INFO").upper(),
            "log_json": _parse(env, "KMSG_LOG_JSON", True, _bool),
        }
        values.update(overrides)
        return cls(**values)

    def check_providers(self) -> None:
        """Fail fast when an enabled provider lacks a required credential (called at worker start)."""
        for name in self.providers:
            cls = provider_class(name)
            config = self.provider_config(name)
            for key in sorted(cls.required_credentials):
                config.secret(key)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return raw

    return parse


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _provider_config(env: Mapping[str, str], name: str) -> ProviderConfig:
    cls = provider_class(name)
    prefix = f"KMSG_{name.upper()}_"
    credentials: dict[str, str] = {}
    options: dict[str, Any] = {}
    base_url = None
    for key, value in env.items():
        if not key.startswith(prefix) or value == "":
            continue
        short = key[len(prefix) :].lower()
        if short == "base_url":
            base_url = value
        elif short in cls.credential_keys:
            credentials[short] = value
        else:
            options[short] = value
    return ProviderConfig(name=name, base_url=base_url, credentials=credentials, options=options)
