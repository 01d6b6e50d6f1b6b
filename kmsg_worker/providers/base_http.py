"""The HTTP tier between :class:`Provider` and the vendor modules.

It owns the shared ``httpx.Client`` (injected: one per worker process, never one per call), the
timeouts, the User-Agent, JSON decoding with error wrapping, and the translation of transport
failures into the project's taxonomy at the boundary (:func:`map_transport_errors`). A vendor module
only builds requests and parses answers; it overrides :meth:`HttpProvider.raise_for_status` only
for its own codes.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import httpx
import orjson

from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderConnectionError,
    ProviderError,
    ProviderNotAttempted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.logging import get_logger
from kmsg_worker.providers.base import HealthReport, Provider, ProviderConfig, SendOutcome, count_request

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "HttpProvider",
    "halts_batch",
    "held_back",
    "loads_json",
    "encode_multipart",
    "make_http_client",
    "provider_timeout",
    "map_transport_errors",
    "max_in_flight",
    "parse_retry_after",
    "raise_whole",
]

#: Explicit per-phase timeouts: a provider that does not answer in 10 s is treated as down,
#: far below the Celery time limit so the task can still record the attempt.
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=10.0, write=10.0, pool=5.0)
#: Connection pool per worker process.
DEFAULT_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=20, keepalive_expiry=30.0)
USER_AGENT = "kmsg-worker/0.1 (+httpx)"
#: Requests one provider adapter keeps in flight per process when a batch needs several (see
#: :meth:`HttpProvider.send_requests`). Below ``max_keepalive_connections`` so that a window's
#: connections are all reused by the next one, and well below ``max_connections`` so that the other
#: providers of the process still find a free connection. At a provider's usual ~20 ms a window of
#: one-text requests is bounded by how many are in flight, not by CPU: 16 sends about 1.75x what 8
#: did (figures and the command in docs/PERFORMANCE.md).
DEFAULT_MAX_IN_FLIGHT = 16

R = TypeVar("R")

log = get_logger("kmsg.providers")


def make_http_client(
    *, timeout: httpx.Timeout = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """Create the one ``httpx.Client`` a process shares between all providers.

    Args:
        timeout: Per-phase timeouts.
        transport: Injected transport (tests use ``httpx.MockTransport``).
    """
    return httpx.Client(
        timeout=timeout,
        limits=DEFAULT_LIMITS,
        headers={"User-Agent": USER_AGENT},
        transport=transport,
        follow_redirects=False,
    )


def provider_timeout(config: ProviderConfig) -> httpx.Timeout | None:
    """This provider's own timeouts, from ``KMSG_<NAME>_TIMEOUT`` / ``_TIMEOUT_CONNECT`` / ``_TIMEOUT_READ``.

    ``TIMEOUT`` is how long to wait for the provider's answer (read and write); ``TIMEOUT_CONNECT``
    for the TCP/TLS connection; ``TIMEOUT_READ`` overrides ``TIMEOUT`` for the read alone. Unset
    phases keep :data:`DEFAULT_TIMEOUT`.

    Returns:
        ``None`` when none is set: the shared client's timeouts apply.

    Raises:
        ConfigurationError: A value is not a positive number of seconds (names the variable).
    """
    values: dict[str, float] = {}
    for key in ("timeout", "timeout_connect", "timeout_read"):
        raw = config.option(key)
        if raw is None or raw == "":
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = 0.0
        if not 0 < value <= 600:
            variable = f"KMSG_{config.name.upper()}_{key.upper()}"
            raise ConfigurationError(f"{variable} must be a number of seconds in (0, 600]", variable=variable)
        values[key] = value
    if not values:
        return None
    answer = values.get("timeout")
    return httpx.Timeout(
        connect=values.get("timeout_connect", DEFAULT_TIMEOUT.connect),
        read=values.get("timeout_read", answer or DEFAULT_TIMEOUT.read),
        write=answer or DEFAULT_TIMEOUT.write,
        pool=DEFAULT_TIMEOUT.pool,
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds, or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@contextlib.contextmanager
def map_transport_errors(provider: str) -> Iterator[None]:
    """Translate httpx transport exceptions into the project's taxonomy (most specific first).

    A timeout while *reading* means the request may have reached the provider: it becomes
    :class:`ProviderTimeout`, which the pipeline reconciles before any resend. A connect timeout or
    a refused connection never reached it: :class:`ProviderConnectionError`.
    """
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise ProviderConnectionError(
            f"{provider}: connect timeout", provider=provider, code=ErrorCode.NETWORK_ERROR
        ) from exc
    except httpx.PoolTimeout as exc:
        raise ProviderConnectionError(
            f"{provider}: no free connection in the pool", provider=provider, code=ErrorCode.NETWORK_ERROR
        ) from exc
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(
            f"{provider}: no response in time ({type(exc).__name__})",
            provider=provider,
            code=ErrorCode.NETWORK_TIMEOUT,
        ) from exc
    except httpx.RemoteProtocolError as exc:
        # The server closed the connection after we sent the request: the outcome is unknown.
        raise ProviderTimeout(
            f"{provider}: connection dropped before the response",
            provider=provider,
            code=ErrorCode.NETWORK_TIMEOUT,
        ) from exc
    except httpx.ReadError as exc:
        raise ProviderTimeout(
            f"{provider}: connection reset while reading the response",
            provider=provider,
            code=ErrorCode.NETWORK_TIMEOUT,
        ) from exc
    except httpx.TransportError as exc:
        raise ProviderConnectionError(
            f"{provider}: {type(exc).__name__}", provider=provider, code=ErrorCode.NETWORK_ERROR
        ) from exc


#: Characters a multipart header parameter cannot carry as they are (the HTML form-data escapes).
_PARAM_ESCAPES = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A"})


def encode_multipart(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]] | None = None
) -> tuple[bytes, str]:
    """Encode a ``multipart/form-data`` body in one piece; returns ``(body, content_type)``.

    httpx streams a multipart body part by part and httpcore writes every piece with its own
    ``send`` call: a 500-pair Aligo form took about 2,000 system calls per request. Built here as
    one ``bytes``, it leaves in a few writes.

    Args:
        fields: Text fields (name -> value).
        files: File parts (name -> ``(filename, data, content_type)``).
    """
    boundary = os.urandom(16).hex()
    delimiter = f"--{boundary}\r\n".encode("ascii")
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(delimiter)
        parts.append(f'Content-Disposition: form-data; name="{name.translate(_PARAM_ESCAPES)}"\r\n\r\n'.encode())
        parts.append(value.encode("utf-8"))
        parts.append(b"\r\n")
    for name, (filename, data, content_type) in (files or {}).items():
        parts.append(delimiter)
        parts.append(
            (
                f'Content-Disposition: form-data; name="{name.translate(_PARAM_ESCAPES)}"; '
                f'filename="{filename.translate(_PARAM_ESCAPES)}"\r\nContent-Type: {content_type}\r\n\r\n'
            ).encode()
        )
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def max_in_flight(config: ProviderConfig) -> int:
    """``KMSG_<PROVIDER>_MAX_IN_FLIGHT`` (option ``max_in_flight``), or :data:`DEFAULT_MAX_IN_FLIGHT`.

    Raises:
        ConfigurationError: Not an integer from 1 to the connection pool's size.
    """
    raw = config.option("max_in_flight")
    if raw in (None, ""):
        return DEFAULT_MAX_IN_FLIGHT
    var = f"KMSG_{config.name.upper()}_MAX_IN_FLIGHT"
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    limit = DEFAULT_LIMITS.max_connections or 1
    if not 1 <= value <= limit:
        # More would only queue for a pooled connection (and time out as "no free connection").
        raise ConfigurationError(f"{var} must be an integer from 1 to {limit} (the connection pool)", variable=var)
    return value


def _report(finished: queue.SimpleQueue[tuple[int, Future[R]]], index: int, future: Future[R]) -> None:
    finished.put((index, future))


def halts_batch(error: ProviderError) -> bool:
    """Whether a failed request stops the rest of a batch: yes unless it was refused for its own content.

    A refusal blamed on the message (bad template, text too long) says nothing about the other
    requests; anything else (down, throttled, credentials, balance, timeout) would hit them too.
    """
    return not (isinstance(error, ProviderRejected) and error.blame == "message")


def held_back(cause: ProviderError) -> ProviderError:
    """The outcome of a request that was never made because ``cause`` stopped the batch.

    A retryable cause (an outage, a throttle, a timeout) gives :class:`ProviderNotAttempted`: not
    "maybe accepted", and not an attempt spent on that provider. A permanent one (our credentials
    refused, no balance) is the held-back messages' fate too: they fail over or fail with it.
    """
    return ProviderNotAttempted.held_back_by(cause) if cause.retryable else cause


def raise_whole(outcomes: Sequence[SendOutcome], halt: ProviderError) -> bool:
    """Whether ``send_batch`` may raise ``halt`` for the whole batch instead of returning outcomes.

    The caller treats a raised error as every message's outcome (and feeds it to the circuit
    breaker), so it is raised only when nothing was accepted and it means the same for every
    message: after a timeout, only when every message carries that very timeout (one request);
    otherwise only when no message's outcome is unknown (a raised non-timeout error says "not
    sent" for all of them).
    """
    if any(o.accepted for o in outcomes):
        return False
    if isinstance(halt, ProviderTimeout):
        return all(o.error is halt for o in outcomes)
    return not any(isinstance(o.error, ProviderTimeout) for o in outcomes)


def loads_json(response: httpx.Response) -> Any:
    """The response body as JSON (orjson; ``ValueError`` when it is not JSON)."""
    return orjson.loads(response.content)


class HttpProvider(Provider):
    """A provider that speaks HTTP through a shared, injected ``httpx.Client``.

    Args:
        config: This provider's settings (``base_url`` must be set).
        client: The process-wide client; created by the caller (after fork in workers).
    """

    #: Default base URL of the real service; overridden by ``config.base_url``.
    default_base_url: str = ""

    def __init__(self, config: ProviderConfig, client: httpx.Client) -> None:
        super().__init__(config)
        self.client = client
        self.base_url = (config.base_url or self.default_base_url).rstrip("/")
        #: This provider's timeouts (``KMSG_<NAME>_TIMEOUT...``), or ``None``: the client's own.
        self.timeout = provider_timeout(config)
        self.max_in_flight = max_in_flight(config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()

    # -- bounded concurrency ------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        with self._pool_lock:
            if self._pool is None or self._pool_pid != pid:
                # Threads do not survive a fork: a prefork child builds its own pool on first use.
                self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix=f"kmsg-{self.name}")
                self._pool_pid = pid
            return self._pool

    def send_requests(
        self, calls: Sequence[Callable[[], R]], *, halts: Callable[[ProviderError], bool]
    ) -> list[R | ProviderError | None]:
        """Run independent vendor requests with at most :attr:`max_in_flight` of them in flight.

        The requests share the process's one ``httpx.Client`` (its connection pool) through a
        per-adapter thread pool of :attr:`max_in_flight` threads, so the bound holds for the whole
        process even when several tasks send through the same adapter at once. Once a request fails
        with an error for which ``halts`` is true (the provider is down, refuses our credentials or
        throttles us), no further request is started: the ones already in flight finish and keep
        their answers, the rest are never sent.

        Args:
            calls: One callable per request; each returns its parsed answer or raises
                :class:`ProviderError`.
            halts: Whether an error stops the remaining requests from starting.

        Returns:
            One entry per call, in order: its answer, the :class:`ProviderError` it raised, or
            ``None`` for a request that was never started. Any other exception escaping a call
            (a bug while reading an answer) is reported as a :class:`ProviderTimeout` with
            ``PROVIDER_ERROR``: the request may have been accepted, so it is reconciled, never resent.
        """
        results: list[R | ProviderError | None] = [None] * len(calls)
        if len(calls) <= 1 or self.max_in_flight == 1:
            for index, call in enumerate(calls):
                results[index] = outcome = self._call_one(call)
                if isinstance(outcome, ProviderError) and halts(outcome):
                    break
            return results
        pool = self._executor()
        # Each request reports its own completion on one queue: O(1) per request, where
        # ``concurrent.futures.wait`` re-arms a waiter on every pending future each round.
        finished: queue.SimpleQueue[tuple[int, Future[R | ProviderError]]] = queue.SimpleQueue()
        in_flight = started = 0
        halted = False
        while in_flight or (started < len(calls) and not halted):
            while not halted and started < len(calls) and in_flight < self.max_in_flight:
                # In the caller's context, so that the requests are counted where it counts them.
                future = pool.submit(contextvars.copy_context().run, self._call_one, calls[started])
                future.add_done_callback(partial(_report, finished, started))
                started += 1
                in_flight += 1
            index, future = finished.get()
            in_flight -= 1
            results[index] = outcome = future.result()
            if isinstance(outcome, ProviderError) and halts(outcome):
                halted = True
        return results

    def _call_one(self, call: Callable[[], R]) -> R | ProviderError:
        try:
            return call()
        except ProviderError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - reported per request; see send_requests
            log.exception("provider.request_failed_unexpectedly", provider=self.name, error=type(exc).__name__)
            return ProviderTimeout(
                f"{self.name}: unexpected {type(exc).__name__} while sending; the outcome is unknown",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
            )

    def close(self) -> None:
        """Stop this adapter's request threads (the shared HTTP client stays open)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def url(self, path: str, base: str | None = None) -> str:
        """Join ``path`` onto the base URL (or another configured base)."""
        return f"{(base or self.base_url).rstrip('/')}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send one request; transport errors and HTTP errors come out as :class:`ProviderError`.

        ``content`` is a body already encoded (its ``Content-Type`` in ``headers``).
        """
        if json is not None:
            # orjson: a 10,000-message Solapi body encodes ~8x faster than with the stdlib.
            content = orjson.dumps(json, option=orjson.OPT_NON_STR_KEYS)
            if not any(k.lower() == "content-type" for k in headers or {}):
                headers = {**(headers or {}), "Content-Type": "application/json"}
        timeout = self.timeout if self.timeout is not None else httpx.USE_CLIENT_DEFAULT
        count_request()
        with map_transport_errors(self.name):
            response = self.client.request(
                method,
                url,
                headers=headers,
                content=content,
                data=data,
                files=files,
                params=params,
                timeout=timeout,
            )
        self.raise_for_status(response)
        return response

    def decode_json(self, response: httpx.Response) -> Any:
        """Decode a JSON body or raise a transient provider error keeping the status code."""
        try:
            return loads_json(response)
        except ValueError as exc:
            raise ProviderTransientError(
                f"{self.name}: response is not JSON (HTTP {response.status_code})",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
                status_code=response.status_code,
            ) from exc

    def raise_for_status(self, response: httpx.Response) -> None:
        """Map an HTTP error status to the taxonomy. Vendors override to read their own codes."""
        status = response.status_code
        if status < 400:
            return
        raise self.http_error(response)

    def http_error(
        self,
        response: httpx.Response,
        *,
        provider_code: str | None = None,
        provider_message: str | None = None,
    ) -> ProviderError:
        """Build the error for an HTTP failure status (429 and 5xx retryable, other 4xx permanent)."""
        status = response.status_code
        text = provider_message or response.reason_phrase
        common: dict[str, Any] = {
            "provider": self.name,
            "status_code": status,
            "provider_code": provider_code,
            "provider_message": provider_message,
        }
        if status == 429:
            return ProviderRateLimited(
                f"{self.name}: rate limited (HTTP 429)",
                code=ErrorCode.RATE_LIMIT_EXCEEDED,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                **common,
            )
        if status >= 500 or status in (408, 425):
            return ProviderTransientError(
                f"{self.name}: HTTP {status} {text}", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, **common
            )
        if status in (401, 403):
            return ProviderRejected(
                f"{self.name}: authentication failed (HTTP {status}) {text}",
                code=ErrorCode.AUTHENTICATION_FAILED,
                **common,
            )
        return ProviderRejected(f"{self.name}: HTTP {status} {text}", code=ErrorCode.INVALID_REQUEST, **common)

    def health(self) -> HealthReport:
        """Probe the balance API when there is one (authenticated), else only check the settings."""
        if not self.capabilities.balance:
            return HealthReport(ok=bool(self.base_url), detail=f"configured ({self.base_url})")
        started = time.perf_counter()
        try:
            balance = self.balance()
        except ProviderError as exc:
            return HealthReport(ok=False, detail=str(exc))
        return HealthReport(
            ok=True,
            detail=f"authenticated; balance {balance.amount:g} {balance.currency}",
            latency_ms=(time.perf_counter() - started) * 1000,
        )
