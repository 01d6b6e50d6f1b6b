"""The webhook dispatcher: delivers the outbox's events, at least once, in signed batches.

One run (:func:`dispatch_webhooks`, beat's ``kmsg-webhooks`` entry on the ``kmsg.webhooks`` queue):

1. leases every enabled endpoint that has pending events and whose next try is due (a conditional
   UPDATE: two runs never send one endpoint's events at once, so they go out in order);
2. gives up events older than ``KMSG_WEBHOOK_MAX_AGE_SECONDS`` (24 h);
3. POSTs the oldest pending events, up to ``KMSG_WEBHOOK_BATCH_SIZE`` per request, signed per
   Standard Webhooks, and records the attempt. A 2xx marks them delivered and the next batch
   follows; anything else (an error status, a redirect, a timeout, a refused destination) leaves
   them pending and puts the endpoint's next try off by exponential backoff with jitter, or by
   the receiver's ``Retry-After``. An endpoint failing for ``KMSG_WEBHOOK_DISABLE_AFTER_SECONDS``
   is disabled (``webhooks.endpoint_disabled``; ``kmsg doctor`` lists it).

A receiver may see an event twice (a crash after its POST, before the commit that marks it):
every event carries its stable ``id`` for that.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from kmsg_worker.errors import ValidationError
from kmsg_worker.logging import get_logger
from kmsg_worker.pii import mask_phone
from kmsg_worker.retry import backoff_delay
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import RetryPolicy, WebhookPolicy
from kmsg_worker.storage import webhooks as outbox
from kmsg_worker.storage.models import WebhookEndpoint
from kmsg_worker.webhooks.guard import Resolver, check_destination
from kmsg_worker.webhooks.signing import signature_header

__all__ = ["DispatchReport", "PostResult", "backoff_seconds", "dispatch_webhooks", "event_payload", "post_signed"]

log = get_logger("kmsg.webhooks")

#: Endpoints one run leases at most.
MAX_ENDPOINTS = 50
#: How long a run may keep sending before it gives its endpoints back.
RUN_SECONDS = 30.0


@dataclass
class DispatchReport:
    """What one dispatcher run did."""

    endpoints: int = 0
    requests: int = 0
    delivered: int = 0
    failed_requests: int = 0
    expired: int = 0
    disabled: int = 0
    batches_completed: int = 0


@dataclass(frozen=True)
class PostResult:
    """The answer to one signed POST."""

    ok: bool
    status: int | None
    error: str | None
    retry_after: float | None
    latency_ms: float


def backoff_seconds(policy: WebhookPolicy, failures: int, retry_after: float | None = None) -> float:
    """Wait before the next try after ``failures`` consecutive failures (counting this one).

    The sends' own backoff (:func:`kmsg_worker.retry.backoff_delay`: exponential, bounded jitter,
    ``Retry-After`` as a floor) on the webhook knobs, capped at ``backoff_max``: a receiver may ask
    for a longer wait, never for one past the cap.
    """
    knobs = RetryPolicy(base_delay=policy.backoff_base, max_delay=policy.backoff_max, jitter=policy.jitter)
    return min(policy.backoff_max, backoff_delay(failures, knobs, retry_after=retry_after))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_payload(event: outbox.PendingEvent, recipient: str | None, include_phone: bool) -> dict[str, Any]:
    """One event as the receiver gets it: no message text; the number masked unless the tenant opted in."""
    to = recipient if include_phone or recipient is None else mask_phone(recipient)
    return {
        "id": f"evt_{event.id}",
        "type": event.type,
        "timestamp": _iso(event.created_at),
        "tenant": event.tenant,
        "data": {
            "message_id": event.message_id,
            "batch_id": event.batch_id,
            "status": event.status,
            "provider": event.provider,
            "provider_code": event.provider_code,
            "provider_text": event.provider_text,
            "error_code": event.error_code,
            "parent_id": event.parent_id,
            "child_id": event.child_id,
            "to": to,
        },
    }


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the rotated-out one during its overlap."""
    keys = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_expires_at and endpoint.previous_expires_at > now:
        keys.append(endpoint.previous_secret)
    return keys


def make_client(policy: WebhookPolicy) -> httpx.Client:
    """The dispatcher's HTTP client: short timeouts, redirects never followed."""
    return httpx.Client(
        timeout=httpx.Timeout(policy.timeout, connect=min(policy.timeout, 3.0)),
        follow_redirects=False,
        headers={"user-agent": "kmsg-worker-webhooks"},
        trust_env=False,  # a proxy from the environment would hide the destination the guard checked
    )


def post_signed(
    client: httpx.Client,
    endpoint: WebhookEndpoint,
    msg_id: str,
    body: bytes,
    *,
    policy: WebhookPolicy,
    now: datetime,
    resolve: Resolver | None = None,
) -> PostResult:
    """Sign ``body`` and POST it to the endpoint, after the destination check; never raises for the network."""
    started = time.perf_counter()
    try:
        address = check_destination(endpoint.url, policy, resolve)
    except ValidationError as exc:
        return PostResult(False, None, f"destination refused: {exc.detail}", None, 0.0)
    # Connect to the address just checked, not to whatever the host resolves to a moment later
    # (DNS rebinding); the host name still goes in the Host header and is the TLS server name, so
    # the certificate is verified against it.
    url = httpx.URL(endpoint.url)
    pinned = url.copy_with(host=address)
    stamp = int(time.time())  # the receiver compares it with its own clock
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature_header(signing_secrets(endpoint, now), msg_id, stamp, body),
    }
    try:
        with client.stream(
            "POST",
            pinned,
            content=body,
            headers={**headers, "host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": url.host},
        ) as response:
            read = 0
            # Bounded: a receiver's answer is not ours to store, only its start is read.
            for part in response.iter_bytes():
                read += len(part)
                if read >= policy.max_response_bytes:
                    break
            status = response.status_code
            retry_after = _retry_after(response.headers.get("retry-after"))
    except httpx.HTTPError as exc:
        latency = (time.perf_counter() - started) * 1000
        return PostResult(False, None, f"{type(exc).__name__}: {exc}"[:300], None, latency)
    latency = (time.perf_counter() - started) * 1000
    ok = 200 <= status < 300
    error = None if ok else (f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else ""))
    return PostResult(ok, status, error, retry_after if not ok else None, latency)


def _body(rt: Runtime, endpoint: WebhookEndpoint, events: Sequence[outbox.PendingEvent]) -> bytes:
    numbers = outbox.recipients(rt.store.sessions, [e.message_id for e in events if e.message_id])
    payloads = [event_payload(e, numbers.get(e.message_id or ""), endpoint.include_phone) for e in events]
    return orjson.dumps({"type": "events", "events": payloads})


def _deliver_endpoint(
    rt: Runtime,
    client: httpx.Client,
    endpoint: WebhookEndpoint,
    *,
    deadline: float,
    out: DispatchReport,
    resolve: Resolver | None,
) -> None:
    policy = rt.settings.webhooks
    sessions = rt.store.sessions
    now = rt.now()
    out.expired += outbox.expire_events(
        sessions, endpoint.id, older_than=now - timedelta(seconds=policy.max_age), now=now
    )
    while True:
        events = outbox.pending_events(sessions, endpoint.id, policy.batch_size)
        if not events or time.monotonic() > deadline:
            outbox.release_endpoint(sessions, endpoint.id)
            return
        now = rt.now()
        # Stable for the same events: a retried batch is recognisable as such.
        msg_id = f"msg_{endpoint.id}_{events[0].id}_{events[-1].id}"
        result = post_signed(
            client, endpoint, msg_id, _body(rt, endpoint, events), policy=policy, now=now, resolve=resolve
        )
        out.requests += 1
        if result.ok:
            outbox.record_delivery(
                sessions,
                endpoint,
                events,
                ok=True,
                now=now,
                http_status=result.status,
                error=None,
                latency_ms=result.latency_ms,
                next_attempt_at=None,
                release=False,
            )
            out.delivered += len(events)
            endpoint.failures, endpoint.failing_since = 0, None
            continue
        out.failed_requests += 1
        failures = endpoint.failures + 1
        since = endpoint.failing_since or now
        disable = (now - since).total_seconds() >= policy.disable_after
        wait = backoff_seconds(policy, failures, result.retry_after)
        reason = f"failing since {_iso(since)}: {result.error}" if disable else None
        outbox.record_delivery(
            sessions,
            endpoint,
            events,
            ok=False,
            now=now,
            http_status=result.status,
            error=result.error,
            latency_ms=result.latency_ms,
            next_attempt_at=now + timedelta(seconds=wait),
            disable_reason=reason,
        )
        log.warning(
            "webhooks.delivery_failed",
            endpoint_id=endpoint.id,
            tenant=endpoint.tenant,
            events=len(events),
            http_status=result.status,
            error=(result.error or "")[:200],
            failures=failures,
            retry_in_seconds=round(wait, 1),
        )
        if disable:
            out.disabled += 1
            log.error(
                "webhooks.endpoint_disabled",
                endpoint_id=endpoint.id,
                tenant=endpoint.tenant,
                failing_seconds=round((now - since).total_seconds()),
                error=(result.error or "")[:200],
            )
        return


def dispatch_webhooks(
    rt: Runtime, *, client: httpx.Client | None = None, resolve: Resolver | None = None
) -> DispatchReport:
    """Run the dispatcher once: deliver what is due to every endpoint (see the module docstring).

    Safe to run any number of times at once: an endpoint is leased by one run.

    Args:
        rt: The process's runtime.
        client: The HTTP client (default: one for this run, see :func:`make_client`).
        resolve: Host resolution for the destination check (tests).
    """
    policy = rt.settings.webhooks
    out = DispatchReport()
    now = rt.now()
    out.batches_completed = outbox.record_completed_batches(
        rt.store.sessions, now=now, since=now - timedelta(seconds=policy.max_age), is_postgres=rt.store.is_postgres
    )
    lease = timedelta(seconds=RUN_SECONDS + 2 * policy.timeout)
    endpoints = outbox.claim_due_endpoints(
        rt.store.sessions, now=now, lease=lease, limit=MAX_ENDPOINTS, is_postgres=rt.store.is_postgres
    )
    if not endpoints:
        return out
    out.endpoints = len(endpoints)
    deadline = time.monotonic() + RUN_SECONDS
    own = client is None
    http = client or make_client(policy)
    try:
        for endpoint in endpoints:
            _deliver_endpoint(rt, http, endpoint, deadline=deadline, out=out, resolve=resolve)
    finally:
        if own:
            http.close()
    log.info(
        "webhooks.dispatched",
        endpoints=out.endpoints,
        requests=out.requests,
        delivered=out.delivered,
        failed_requests=out.failed_requests,
        expired=out.expired,
        disabled=out.disabled,
        batches_completed=out.batches_completed,
    )
    return out
