"""One typed, frozen settings object, read from the environment once.

Every variable starts with ``KMSG_``. Order of precedence: an explicit argument to
:meth:`Settings.from_env` (``overrides``) -> the environment -> the default. A missing or invalid
value raises :class:`~kmsg_worker.errors.ConfigurationError` naming the variable, so a worker stops
at start instead of failing at its first send.

Provider settings are ``KMSG_<PROVIDER>_<KEY>``: keys the provider class declares in
``credential_keys`` are secrets (never logged or shown in a repr); every other key is an option
(``KMSG_SOLAPI_BASE_URL``, ``KMSG_SOLAPI_DEFAULT_FROM``, ``KMSG_IWINV_BATCH_LIMIT`` ...).
``KMSG_<PROVIDER>_MAX_IN_FLIGHT`` bounds the requests an HTTP adapter runs at once for one batch
(default 16, at most the connection pool's 32; checked when the adapter is built).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.message import MessageType, Priority, ValidationLimits
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.base_http import HttpProvider, max_in_flight, provider_timeout
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.ratelimit import parse_rate_limits
from kmsg_worker.routing import validate_routing
from kmsg_worker.taxonomy import ErrorPolicy, parse_error_policy

__all__ = [
    "CircuitPolicy",
    "RetryOverride",
    "RetryPolicy",
    "Settings",
    "TrackingPolicy",
    "WebhookPolicy",
    "mask_url",
    "stop_unless_sendable",
]

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
class CircuitPolicy:
    """Circuit breaker knobs (``KMSG_CIRCUIT_*``).

    Attributes:
        enabled: ``KMSG_CIRCUIT_ENABLED``.
        window: Seconds of the sliding error-rate window (``KMSG_CIRCUIT_WINDOW_SECONDS``).
        min_requests: Calls in the window before the error rate counts (``KMSG_CIRCUIT_MIN_REQUESTS``).
        error_rate: Failure share that opens the circuit, in (0, 1] (``KMSG_CIRCUIT_ERROR_RATE``).
        consecutive_failures: Timeouts/5xx in a row that open it (``KMSG_CIRCUIT_CONSECUTIVE_FAILURES``).
        cooldown: Seconds open before probes go through (``KMSG_CIRCUIT_COOLDOWN_SECONDS``).
        half_open_probes: Calls let through per cool-down while half-open (``KMSG_CIRCUIT_HALF_OPEN_PROBES``).
    """

    enabled: bool = True
    window: float = 30.0
    # Defaults chosen so that a degraded but working provider (a third of its calls failing) does
    # not flap open on chance runs, while a dead one opens after ten calls: with a single provider
    # an open circuit only delays messages, so opening on noise costs more than it saves.
    min_requests: int = 20
    error_rate: float = 0.5
    consecutive_failures: int = 10
    # Short: while open, messages with no other provider wait for it.
    cooldown: float = 10.0
    half_open_probes: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CircuitPolicy:
        """Read ``KMSG_CIRCUIT_*``.

        Raises:
            ConfigurationError: A value is not a number in its range; the message names the variable.
        """
        default = cls()

        def read(name: str, fallback: float, kind: Callable[[str], Any], low: float, high: float) -> Any:
            raw = env.get(name)
            if raw in (None, ""):
                return fallback
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not low <= value <= high:
                raise ConfigurationError(f"{name}={raw!r} must be a number in [{low:g}, {high:g}]", variable=name)
            return value

        enabled_raw = (env.get("KMSG_CIRCUIT_ENABLED") or "true").strip().lower()
        if enabled_raw not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise ConfigurationError("KMSG_CIRCUIT_ENABLED must be true or false", variable="KMSG_CIRCUIT_ENABLED")
        return cls(
            enabled=enabled_raw in {"1", "true", "yes", "on"},
            window=read("KMSG_CIRCUIT_WINDOW_SECONDS", default.window, float, 0.1, 86400),
            min_requests=read("KMSG_CIRCUIT_MIN_REQUESTS", default.min_requests, int, 1, 1_000_000),
            error_rate=read("KMSG_CIRCUIT_ERROR_RATE", default.error_rate, float, 0.01, 1.0),
            consecutive_failures=read(
                "KMSG_CIRCUIT_CONSECUTIVE_FAILURES", default.consecutive_failures, int, 1, 1_000_000
            ),
            cooldown=read("KMSG_CIRCUIT_COOLDOWN_SECONDS", default.cooldown, float, 0.05, 86400),
            half_open_probes=read("KMSG_CIRCUIT_HALF_OPEN_PROBES", default.half_open_probes, int, 1, 1000),
        )


@dataclass(frozen=True)
class TrackingPolicy:
    """Delivery-status polling knobs.

    Attributes:
        backoff: Seconds between checks (the last value repeats).
        first_check: Seconds after the send before the first check.
        max_duration: Give up as ``unknown`` after this many seconds.
        no_status_api: What to do for a provider without a status API: ``"wait"`` until the
            timeout, or ``"unknown"`` at once.
        claim_seconds: How long a sweep holds the rows it claimed; it stops querying at 3/4 of
            it and releases what it did not reach, so two sweeps never poll the same row.
        fallback_codes: Extra provider status codes that mean "not a KakaoTalk user" (the
            SMS/LMS fallback trigger), on top of Solapi 3104/3107 and Kakao 3018/3019/3020.
        fallback_texts: Extra substrings of a status text with the same meaning.
    """

    backoff: tuple[float, ...] = (30.0, 120.0, 600.0, 1800.0, 7200.0)
    first_check: float = 30.0
    max_duration: float = 86400.0
    no_status_api: str = "unknown"
    claim_seconds: float = 120.0
    fallback_codes: frozenset[str] = frozenset()
    fallback_texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebhookPolicy:
    """Outgoing webhooks and incoming delivery reports.

    Attributes:
        batch_size: Events per POST at most (``KMSG_WEBHOOK_BATCH_SIZE``).
        interval: Seconds between dispatcher runs (beat, ``KMSG_WEBHOOK_INTERVAL_SECONDS``).
        backoff_base: First wait after a failed delivery, doubling per failure.
        backoff_max: Longest wait between tries.
        jitter: Bounded jitter as a fraction of the wait.
        max_age: An event not delivered after this many seconds is given up (24 h).
        disable_after: An endpoint failing for this long is disabled.
        timeout: Seconds for one POST (connect and each read).
        max_response_bytes: Response bytes read at most (the rest is not read).
        allow_http_loopback: Plain ``http://`` is accepted for loopback destinations only.
        allow_private: Destinations that resolve to private, loopback or link-local addresses are
            accepted (an internal deployment); refused by default.
        secret_overlap: Seconds a rotated-out secret keeps signing.
        report_secret: Shared secret that incoming provider delivery reports must carry
            (``KMSG_REPORT_SECRET``); ``None`` refuses every report.
        report_max_age: Seconds a signed report's timestamp may be off (stale reports are refused).
    """

    batch_size: int = 500
    interval: float = 1.0
    backoff_base: float = 5.0
    backoff_max: float = 3600.0
    jitter: float = 0.2
    max_age: float = 86400.0
    disable_after: float = 6 * 3600.0
    timeout: float = 5.0
    max_response_bytes: int = 65536
    allow_http_loopback: bool = False
    allow_private: bool = False
    secret_overlap: float = 86400.0
    report_secret: str | None = field(default=None, repr=False)
    report_max_age: float = 300.0


@dataclass(frozen=True)
class RetryOverride:
    """Per message type or priority limits over :class:`RetryPolicy` (``None`` = keep the default).

    Attributes:
        max_attempts: Attempts on one provider before failing over or failing.
        max_age: Give up this many seconds after the message was accepted.
    """

    max_attempts: int | None = None
    max_age: float | None = None


#: An OTP is useless after a few minutes: high priority gives up (or fails over) fast.
DEFAULT_RETRY_BY_PRIORITY: Mapping[str, RetryOverride] = {"high": RetryOverride(max_attempts=3, max_age=300.0)}


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


_NO_WORDS: tuple[str, ...] = ()


def _registered_senders(raw: str) -> dict[str, frozenset[str]]:
    """``provider=number number;provider=number`` -> the numbers (digits only) per provider."""
    out: dict[str, frozenset[str]] = {}
    for part in raw.split(";"):
        if not part.strip():
            continue
        name, sep, numbers = part.partition("=")
        if not sep or not name.strip():
            raise ValueError("expected provider=number number;provider=number")
        digits = {"".join(c for c in n if c.isdigit()) for n in numbers.replace(",", " ").split()}
        out[name.strip().lower()] = frozenset(d for d in digits if d)
    return out


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also refuses nan
        raise ValueError("must be 0 or more")
    return value


def _niceness(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 19:
        raise ValueError("must be 0 to 19")
    return value


def _words(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


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
    #: Prefix of every broker key in Redis, so several environments can share one Redis.
    broker_key_prefix: str = ""
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
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)
    #: Operator overrides of the retry classification (``KMSG_RETRY_POLICY``).
    error_policy: ErrorPolicy = field(default_factory=ErrorPolicy)
    #: Limits per message type (``KMSG_RETRY_BY_TYPE``) and per priority (``KMSG_RETRY_BY_PRIORITY``).
    retry_by_type: Mapping[str, RetryOverride] = field(default_factory=dict)
    retry_by_priority: Mapping[str, RetryOverride] = field(default_factory=lambda: dict(DEFAULT_RETRY_BY_PRIORITY))
    #: Circuit breaker knobs (``KMSG_CIRCUIT_*``).
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    #: Token-bucket rates per second: provider, ``sender:<number>``, ``tenant:<name>`` (``KMSG_RATE_LIMITS``).
    rate_limits: Mapping[str, float] = field(default_factory=dict)
    #: A throttled send waits this long in the worker before it is re-enqueued with a countdown.
    rate_limit_inline_wait: float = 0.25
    idempotency_ttl: timedelta = timedelta(hours=24)
    lease_seconds: float = 120.0
    stale_queued_seconds: float = 60.0
    max_deliveries: int = 5
    #: Look-ups after an unknown outcome that may come back undecided before the message ends
    #: ``unknown`` (``OUTCOME_UNDECIDED``): never resent, never looping.
    reconcile_max_checks: int = 8
    #: First-generation threshold of Python's cyclic GC in workers and during bulk intake (0: leave
    #: Python's default of 700). A 10,000-row chunk allocates ~200,000 objects; at 700 the collector
    #: ran hundreds of times per chunk and cost a third of the worker's CPU.
    gc_threshold: int = 50_000
    #: Rows per bulk chunk (one task, one provider request) when ``send_many`` is not given one; the
    #: provider's batch limit caps it. 5,000 rather than Solapi's 10,000: a chunk's peak is what a
    #: worker process keeps resident afterwards (1,000,000 messages: +16 MB per process at 5,000,
    #: +30 MB at 10,000, same throughput), and one failed request holds back half as many recipients.
    bulk_chunk_size: int = 5_000
    #: Niceness (0-19) a worker consuming only the bulk queue gives itself and its pool at start, so
    #: the scheduler hands the cores to single sends first whenever both want them (0: unchanged).
    bulk_worker_nice: int = 10
    visibility_timeout: int = 3600
    sweep_interval: float = 5.0
    #: Beat period of the scheduled-send dispatch (shorter than the sweep: scheduled sends are on time).
    schedule_interval: float = 1.0
    sweep_batch: int = 1000
    #: AlimTalk check before queueing against the synced provider templates (``KMSG_ALIMTALK_PREFLIGHT``):
    #: ``auto`` checks with the providers whose templates were synced, ``required`` refuses a send
    #: to a provider never synced, ``off`` sends on trust.
    alimtalk_preflight: str = "auto"
    #: Beat period of the AlimTalk template sync (``KMSG_TEMPLATE_SYNC_SECONDS``; 0: no beat entry).
    template_sync_interval: float = 3600.0
    log_level: str = "INFO"
    log_json: bool = True
    #: Port of the worker's Prometheus endpoint (``KMSG_METRICS_PORT``); 0 = not served by the worker.
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    #: KRW per message type for ``kmsg report`` cost estimates, over the built-in table (``KMSG_UNIT_PRICES``).
    unit_prices: Mapping[str, float] = field(default_factory=dict)
    #: Key of the suppression list's hashes (``KMSG_SUPPRESSION_KEY``); a secret, never shown. Unset on
    #: the embedded default, a key file under ``var_dir`` is made; PostgreSQL deployments must set it.
    suppression_key: str | None = field(default=None, repr=False)
    #: Registered sender numbers of providers without a sender-number API (``KMSG_REGISTERED_SENDERS``:
    #: ``iwinv=0212345678 0311112222;aligo=...``); a provider not named here is not checked.
    registered_senders: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: How long a provider's registered sender numbers are trusted before asked again.
    sender_cache_ttl: float = 600.0

    @property
    def embedded(self) -> bool:
        """True when running on the embedded broker and SQLite (no server at all)."""
        return not self.broker_url.startswith(("redis", "rediss", "amqp", "sentinel"))

    def __repr__(self) -> str:
        # URLs may carry passwords (postgresql://user:secret@..., redis://:secret@...): never show them.
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        for name in ("broker_url", "database_url", "redis_url"):
            shown[name] = mask_url(shown[name])
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def provider_config(self, name: str) -> ProviderConfig:
        """Return the configuration of provider ``name`` (an empty one if nothing is set)."""
        return self.provider_configs.get(name) or ProviderConfig(name=name)

    def retry_for(self, mtype: str, priority: str) -> RetryPolicy:
        """The retry policy of a message of type ``mtype`` and ``priority``.

        An override replaces the global default; where a type and a priority override both set a
        limit, the stricter one wins (an OTP sent as LMS still gives up like an OTP).
        """
        by_type = self.retry_by_type.get(mtype)
        by_priority = self.retry_by_priority.get(priority)
        if by_type is None and by_priority is None:
            return self.retry
        attempts = [o.max_attempts for o in (by_type, by_priority) if o is not None and o.max_attempts is not None]
        ages = [o.max_age for o in (by_type, by_priority) if o is not None and o.max_age is not None]
        return replace(
            self.retry,
            max_attempts=min(attempts) if attempts else self.retry.max_attempts,
            max_age=min(ages) if ages else self.retry.max_age,
        )

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
        # transport here, `python -m bench.embedded_transports`); see docs/PERFORMANCE.md.
        broker_url = _env(env, "KMSG_BROKER_URL") or "filesystem://"
        database_url = _env(env, "KMSG_DATABASE_URL") or f"sqlite:///{var_dir / 'kmsg.sqlite'}"
        for name, url in (("KMSG_DATABASE_URL", database_url),):
            if not url.startswith(("sqlite", "postgresql")):
                raise ConfigurationError(
                    f"{name}={mask_url(url)!r} is not supported: use sqlite:///path or postgresql+psycopg://...",
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

        # Unset: the mock (the embedded try-out sends nowhere). Set but empty, as the compose file
        # passes it when .env names none: no provider at all, which a worker refuses at start.
        providers_raw = env.get("KMSG_PROVIDERS")
        providers = tuple(p.strip().lower() for p in (providers_raw or "").split(",") if p.strip())
        if providers_raw is None:
            providers = ("mock",)
        # The mock provider is configured even when it is not enabled: test messages
        # (kmsg_worker.sandbox) reach it whatever KMSG_PROVIDERS says.
        configs = {name: _provider_config(env, name) for name in (*providers, "mock")}
        if not configs["mock"].option("call_log"):
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
        validate_routing(routing, providers)
        rate_limits = parse_rate_limits(_env(env, "KMSG_RATE_LIMITS"), providers)
        retry_values: dict[str, Any] = {
            "error_policy": parse_error_policy(_parse(env, "KMSG_RETRY_POLICY", {}, json.loads)),
            "retry_by_type": _retry_overrides(env, "KMSG_RETRY_BY_TYPE", {}),
            "retry_by_priority": _retry_overrides(env, "KMSG_RETRY_BY_PRIORITY", DEFAULT_RETRY_BY_PRIORITY),
            "circuit": CircuitPolicy.from_env(env),
            "rate_limits": rate_limits,
            "rate_limit_inline_wait": _parse(env, "KMSG_RATE_LIMIT_INLINE_WAIT_SECONDS", 0.25, float),
        }
        tracking = TrackingPolicy(
            backoff=_parse(env, "KMSG_TRACKING_BACKOFF", (30.0, 120.0, 600.0, 1800.0, 7200.0), _floats),
            first_check=_parse(env, "KMSG_TRACKING_FIRST_CHECK_SECONDS", 30.0, _positive(float)),
            max_duration=_parse(env, "KMSG_TRACKING_MAX_SECONDS", 86400.0, _positive(float)),
            no_status_api=_parse(env, "KMSG_TRACKING_NO_STATUS_API", "unknown", _choice("wait", "unknown")),
            claim_seconds=_parse(env, "KMSG_TRACKING_CLAIM_SECONDS", 120.0, _positive(float)),
            fallback_codes=frozenset(_parse(env, "KMSG_FALLBACK_CODES", _NO_WORDS, _words)),
            fallback_texts=_parse(env, "KMSG_FALLBACK_TEXTS", _NO_WORDS, _words),
        )
        webhooks = WebhookPolicy(
            batch_size=_parse(env, "KMSG_WEBHOOK_BATCH_SIZE", 500, _positive(int)),
            interval=_parse(env, "KMSG_WEBHOOK_INTERVAL_SECONDS", 1.0, _positive(float)),
            backoff_base=_parse(env, "KMSG_WEBHOOK_BACKOFF_BASE_SECONDS", 5.0, _positive(float)),
            backoff_max=_parse(env, "KMSG_WEBHOOK_BACKOFF_MAX_SECONDS", 3600.0, _positive(float)),
            max_age=_parse(env, "KMSG_WEBHOOK_MAX_AGE_SECONDS", 86400.0, _positive(float)),
            disable_after=_parse(env, "KMSG_WEBHOOK_DISABLE_AFTER_SECONDS", 6 * 3600.0, _positive(float)),
            timeout=_parse(env, "KMSG_WEBHOOK_TIMEOUT_SECONDS", 5.0, _positive(float)),
            allow_http_loopback=_parse(env, "KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK", False, _bool),
            allow_private=_parse(env, "KMSG_WEBHOOK_ALLOW_PRIVATE", False, _bool),
            secret_overlap=_parse(env, "KMSG_WEBHOOK_SECRET_OVERLAP_SECONDS", 86400.0, float),
            report_secret=_env(env, "KMSG_REPORT_SECRET"),
            report_max_age=_parse(env, "KMSG_REPORT_MAX_AGE_SECONDS", 300.0, _positive(float)),
        )
        visibility_timeout = _parse(env, "KMSG_VISIBILITY_TIMEOUT", 3600, _positive(int))
        lease = _parse(env, "KMSG_LEASE_SECONDS", 120.0, _positive(float))
        if lease >= visibility_timeout:
            raise ConfigurationError(
                "KMSG_LEASE_SECONDS must be below KMSG_VISIBILITY_TIMEOUT", variable="KMSG_LEASE_SECONDS"
            )
        if retry.max_countdown * 10 > visibility_timeout:
            # A countdown near the visibility timeout is redelivered while still waiting: longer
            # waits belong in next_attempt_at. See Celery's Redis "Visibility timeout" caveat:
            # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
            raise ConfigurationError(
                "KMSG_RETRY_MAX_COUNTDOWN_SECONDS must be at most a tenth of KMSG_VISIBILITY_TIMEOUT",
                variable="KMSG_RETRY_MAX_COUNTDOWN_SECONDS",
            )
        values: dict[str, Any] = {
            "var_dir": var_dir,
            "broker_url": broker_url,
            "broker_key_prefix": _env(env, "KMSG_BROKER_KEY_PREFIX") or "",
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
            "webhooks": webhooks,
            **retry_values,
            "idempotency_ttl": timedelta(seconds=_parse(env, "KMSG_IDEMPOTENCY_TTL_SECONDS", 86400, _positive(int))),
            "lease_seconds": lease,
            "stale_queued_seconds": _parse(env, "KMSG_STALE_QUEUED_SECONDS", 60.0, _positive(float)),
            "max_deliveries": _parse(env, "KMSG_MAX_DELIVERIES", 5, _positive(int)),
            "reconcile_max_checks": _parse(env, "KMSG_RECONCILE_MAX_CHECKS", 8, _positive(int)),
            "gc_threshold": _parse(env, "KMSG_GC_THRESHOLD", 50_000, _non_negative_int),
            "bulk_chunk_size": _parse(env, "KMSG_BULK_CHUNK_SIZE", 5_000, _positive(int)),
            "bulk_worker_nice": _parse(env, "KMSG_BULK_WORKER_NICE", 10, _niceness),
            "visibility_timeout": visibility_timeout,
            "sweep_interval": _parse(env, "KMSG_SWEEP_INTERVAL_SECONDS", 5.0, _positive(float)),
            "schedule_interval": _parse(env, "KMSG_SCHEDULE_INTERVAL_SECONDS", 1.0, _positive(float)),
            "sweep_batch": _parse(env, "KMSG_SWEEP_BATCH", 1000, _positive(int)),
            "alimtalk_preflight": _parse(env, "KMSG_ALIMTALK_PREFLIGHT", "auto", _choice("auto", "required", "off")),
            "template_sync_interval": _parse(env, "KMSG_TEMPLATE_SYNC_SECONDS", 3600.0, _non_negative_float),
            "log_level": (_env(env, "KMSG_LOG_LEVEL") or "INFO").upper(),
            "log_json": _parse(env, "KMSG_LOG_JSON", True, _bool),
            "metrics_port": _parse(env, "KMSG_METRICS_PORT", 0, _port),
            "metrics_addr": _env(env, "KMSG_METRICS_ADDR") or "127.0.0.1",
            "unit_prices": _parse(env, "KMSG_UNIT_PRICES", dict[str, float](), _prices),
            "suppression_key": _env(env, "KMSG_SUPPRESSION_KEY"),
            "registered_senders": _parse(
                env, "KMSG_REGISTERED_SENDERS", dict[str, frozenset[str]](), _registered_senders
            ),
            "sender_cache_ttl": _parse(env, "KMSG_SENDER_CACHE_TTL_SECONDS", 600.0, _positive(float)),
        }
        values.update(overrides)
        return cls(**values)

    def check_providers(self) -> None:
        """Fail fast when no provider is named or one lacks a required credential (at worker start).

        Raises:
            ConfigurationError: Naming what is missing: ``KMSG_PROVIDERS``, or a provider's credential
                (``KMSG_SOLAPI_API_KEY`` ...).
        """
        if not self.providers:
            raise ConfigurationError(
                "KMSG_PROVIDERS names no provider: set it to the providers this worker sends through "
                "(solapi, iwinv, aligo) and set their credentials (KMSG_SOLAPI_API_KEY ...); "
                "'mock' sends nothing and is for try-outs",
                variable="KMSG_PROVIDERS",
            )
        for name in self.providers:
            cls = provider_class(name)
            config = self.provider_config(name)
            for key in sorted(cls.required_credentials):
                config.secret(key)
            if issubclass(cls, HttpProvider):
                provider_timeout(config)  # an invalid KMSG_<NAME>_TIMEOUT... stops the worker here


def stop_unless_sendable(settings: Settings) -> None:
    """Stop a starting worker that could not send, naming what is missing (``KMSG_PROVIDERS``, a key).

    Called from Celery's ``worker_init``. Celery logs an exception raised by a signal handler and
    starts the worker anyway, so the :class:`ConfigurationError` alone would leave a worker
    consuming messages it can only fail: the reason goes to stderr as one line and
    ``SystemExit(2)``, which Celery does not catch, ends the process.
    """
    try:
        settings.check_providers()
    except ConfigurationError as exc:
        print(f"kmsg worker: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return raw

    return parse


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0 = off)")
    return value


def _prices(raw: str) -> dict[str, float]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError('must be a JSON object like {"SMS": 9.9, "LMS": 30}')
    prices = {str(k).upper(): float(v) for k, v in data.items()}
    if any(v < 0 for v in prices.values()):
        raise ValueError("prices must not be negative")
    return prices


def _retry_overrides(
    env: Mapping[str, str], name: str, default: Mapping[str, RetryOverride]
) -> Mapping[str, RetryOverride]:
    """Parse ``{"ALIMTALK": {"max_attempts": 2, "max_age_seconds": 60}}`` (keys: types or priorities)."""
    raw: Any = _parse(env, name, None, json.loads)
    if raw is None:
        return dict(default)

    allowed = {t.value for t in MessageType} if name.endswith("TYPE") else {p.value for p in Priority}
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{name} must be a JSON object", variable=name)
    result: dict[str, RetryOverride] = {}
    for key, value in raw.items():
        norm = str(key).upper() if name.endswith("TYPE") else str(key).lower()
        if norm not in allowed:
            raise ConfigurationError(
                f"{name}: unknown key {key!r}; use one of {', '.join(sorted(allowed))}", variable=name
            )
        if not isinstance(value, dict) or not value or set(value) - {"max_attempts", "max_age_seconds"}:
            raise ConfigurationError(
                f"{name}.{key} must be an object with max_attempts and/or max_age_seconds", variable=name
            )
        attempts, age = value.get("max_attempts"), value.get("max_age_seconds")
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1):
            raise ConfigurationError(f"{name}.{key}.max_attempts must be an integer >= 1", variable=name)
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or age <= 0):
            raise ConfigurationError(f"{name}.{key}.max_age_seconds must be a number > 0", variable=name)
        result[norm] = RetryOverride(attempts, float(age) if age is not None else None)
    return result


_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*")


def mask_url(url: str | None) -> str | None:
    """``url`` with its password, if any, replaced by ``***``: the one form a URL is ever shown in.

    Works on any text, parsable or not (an unsupported or mistyped URL is shown in the error that
    refuses it): everything between the ``//`` and the last ``@`` after the first ``:`` is the
    password, and a ``password=`` query parameter (libpq accepts one) is masked too.

    Args:
        url: A broker, database or Redis URL (``None`` passes through).

    Returns:
        The URL safe to print or log.
    """
    if not url:
        return url
    masked = _QUERY_PASSWORD.sub(r"\1***", url)
    if "@" not in masked:
        return masked
    head, _, host = masked.rpartition("@")
    scheme, sep, userinfo = head.partition("//")
    if not sep:
        scheme, userinfo = "", head
    if ":" not in userinfo:
        return masked
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


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
    config = ProviderConfig(name=name, base_url=base_url, credentials=credentials, options=options)
    if issubclass(cls, HttpProvider):
        max_in_flight(config)  # a bad KMSG_<P>_MAX_IN_FLIGHT stops the process at start
    return config
