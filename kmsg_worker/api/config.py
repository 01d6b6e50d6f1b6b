"""The HTTP API's own settings (``KMSG_API_*``), read once when the app is built."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kmsg_worker.errors import ConfigurationError

__all__ = ["ApiConfig"]


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number", variable=name) from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum:g}", variable=name)
    return value


@dataclass(frozen=True)
class ApiConfig:
    """Limits and switches of the HTTP API.

    Attributes:
        rate_limit: Requests per second per key (``KMSG_API_RATE_LIMIT``, default 50), shared by every
            API process through the Redis token bucket of :mod:`kmsg_worker.ratelimit`.
        max_body_bytes: Largest single-message body (``KMSG_API_MAX_BODY_BYTES``, 64 KiB).
        max_batch_bytes: Largest JSON batch body (``KMSG_API_MAX_BATCH_BYTES``, 16 MiB); NDJSON bodies
            stream and are not limited as a whole.
        max_line_bytes: Largest NDJSON line (``KMSG_API_MAX_LINE_BYTES``, 64 KiB).
        auth_cache_seconds: How long a key's state may be reused before it is read again
            (``KMSG_API_AUTH_CACHE_SECONDS``, 2 s): a revoked key is refused within that time.
        cors_origins: Origins allowed by CORS (``KMSG_API_CORS_ORIGINS``, comma separated); none
            by default, and then no CORS header is ever sent.
    """

    rate_limit: float = 50.0
    max_body_bytes: int = 64 * 1024
    max_batch_bytes: int = 16 * 1024 * 1024
    max_line_bytes: int = 64 * 1024
    auth_cache_seconds: float = 2.0
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiConfig:
        """Read the ``KMSG_API_*`` variables (default: ``os.environ``).

        Raises:
            ConfigurationError: A value is not a number, or below its minimum.
        """
        env = os.environ if environ is None else environ
        origins = tuple(o.strip() for o in env.get("KMSG_API_CORS_ORIGINS", "").split(",") if o.strip())
        return cls(
            rate_limit=_number(env, "KMSG_API_RATE_LIMIT", cls.rate_limit, minimum=0.1),
            max_body_bytes=int(_number(env, "KMSG_API_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024)),
            max_batch_bytes=int(_number(env, "KMSG_API_MAX_BATCH_BYTES", cls.max_batch_bytes, minimum=1024)),
            max_line_bytes=int(_number(env, "KMSG_API_MAX_LINE_BYTES", cls.max_line_bytes, minimum=1024)),
            auth_cache_seconds=_number(env, "KMSG_API_AUTH_CACHE_SECONDS", cls.auth_cache_seconds, minimum=0),
            cors_origins=origins,
        )
