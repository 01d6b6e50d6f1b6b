"""Webhook endpoints: add, list, remove, rotate, test and replay; one implementation for the API and the CLI."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kmsg_worker.errors import MessageNotFoundError, ValidationError
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage import webhooks as outbox
from kmsg_worker.storage.models import WebhookEndpoint
from kmsg_worker.webhooks.dispatch import make_client, post_signed
from kmsg_worker.webhooks.guard import Resolver, check_destination
from kmsg_worker.webhooks.signing import new_secret

__all__ = [
    "add_endpoint",
    "endpoint_out",
    "get_endpoint",
    "list_endpoints",
    "remove_endpoint",
    "replay_events",
    "rotate_secret",
    "test_endpoint",
]

#: Endpoints one tenant may have.
MAX_ENDPOINTS_PER_TENANT = 20


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def endpoint_out(row: WebhookEndpoint, *, secret: str | None = None) -> dict[str, Any]:
    """An endpoint as shown to its tenant; the secret only when it was just made (shown once)."""
    out: dict[str, Any] = {
        "id": row.id,
        "tenant": row.tenant,
        "url": row.url,
        "events": [e for e in row.events.split(",") if e],
        "include_phone": row.include_phone,
        "created_at": _iso(row.created_at),
        "disabled_at": _iso(row.disabled_at),
        "disabled_reason": row.disabled_reason,
        "failures": row.failures,
        "failing_since": _iso(row.failing_since),
        "last_success_at": _iso(row.last_success_at),
        "last_error": row.last_error,
    }
    if secret is not None:
        out["secret"] = secret
    return out


def _check_events(events: Sequence[str]) -> list[str]:
    chosen = sorted({e.strip() for e in events if e.strip()})
    if not chosen:
        raise ValidationError("events", "required", "name at least one event type")
    unknown = [e for e in chosen if e not in outbox.EVENT_TYPES]
    if unknown:
        raise ValidationError(
            "events", "known_type", f"unknown event type {unknown[0]!r}; known: {', '.join(outbox.EVENT_TYPES)}"
        )
    return chosen


def add_endpoint(
    rt: Runtime,
    tenant: str,
    url: str,
    events: Sequence[str],
    *,
    include_phone: bool = False,
    resolve: Resolver | None = None,
) -> dict[str, Any]:
    """Add an endpoint; the answer holds its signing secret, which is never shown again.

    Raises:
        ValidationError: A refused URL (``url``: scheme, private address ...), unknown event types
            (``events``), or too many endpoints (``tenant``).
    """
    chosen = _check_events(events)
    check_destination(url, rt.settings.webhooks, resolve)
    if len(outbox.list_endpoints(rt.store.sessions, tenant)) >= MAX_ENDPOINTS_PER_TENANT:
        raise ValidationError("tenant", "max_endpoints", f"a tenant has at most {MAX_ENDPOINTS_PER_TENANT} endpoints")
    secret = new_secret()
    row = {
        "id": "whe_" + secrets.token_hex(10),
        "tenant": tenant,
        "url": url,
        "events": outbox.subscribed(chosen),
        "include_phone": include_phone,
        "secret": secret,
        "created_at": rt.now(),
        "failures": 0,
    }
    outbox.add_endpoint(rt.store.sessions, row)
    return endpoint_out(WebhookEndpoint(**row), secret=secret)


def list_endpoints(rt: Runtime, tenant: str | None = None) -> list[dict[str, Any]]:
    """A tenant's endpoints (every tenant's with ``None``), secrets left out."""
    return [endpoint_out(r) for r in outbox.list_endpoints(rt.store.sessions, tenant)]


def _owned(rt: Runtime, endpoint_id: str, tenant: str | None) -> WebhookEndpoint:
    row = outbox.get_endpoint(rt.store.sessions, endpoint_id, tenant)
    if row is None:
        raise MessageNotFoundError(f"no webhook endpoint with id {endpoint_id!r}")
    return row


def get_endpoint(rt: Runtime, endpoint_id: str, tenant: str | None = None) -> dict[str, Any]:
    """One endpoint, with its event counts and its last delivery attempts.

    Raises:
        MessageNotFoundError: No such endpoint (of that tenant).
    """
    row = _owned(rt, endpoint_id, tenant)
    out = endpoint_out(row)
    out["events_count"] = outbox.event_counts(rt.store.sessions, row.id)
    out["attempts"] = [
        {
            "at": _iso(a.created_at),
            "events": a.events,
            "ok": a.ok,
            "http_status": a.http_status,
            "error": a.error,
            "latency_ms": a.latency_ms,
        }
        for a in outbox.delivery_attempts(rt.store.sessions, row.id)
    ]
    return out


def remove_endpoint(rt: Runtime, endpoint_id: str, tenant: str | None = None) -> None:
    """Remove an endpoint and its undelivered events.

    Raises:
        MessageNotFoundError: No such endpoint (of that tenant).
    """
    if not outbox.remove_endpoint(rt.store.sessions, endpoint_id, tenant):
        raise MessageNotFoundError(f"no webhook endpoint with id {endpoint_id!r}")


def rotate_secret(rt: Runtime, endpoint_id: str, tenant: str | None = None) -> dict[str, Any]:
    """A new signing secret (shown once); the old one keeps signing for ``KMSG_WEBHOOK_SECRET_OVERLAP_SECONDS``.

    Raises:
        MessageNotFoundError: No such endpoint (of that tenant).
    """
    secret = new_secret()
    keep = rt.now() + timedelta(seconds=rt.settings.webhooks.secret_overlap)
    if not outbox.rotate_secret(rt.store.sessions, endpoint_id, secret, keep_until=keep, tenant=tenant):
        raise MessageNotFoundError(f"no webhook endpoint with id {endpoint_id!r}")
    out = endpoint_out(_owned(rt, endpoint_id, tenant), secret=secret)
    out["previous_secret_valid_until"] = _iso(keep)
    return out


def test_endpoint(
    rt: Runtime, endpoint_id: str, tenant: str | None = None, *, resolve: Resolver | None = None
) -> dict[str, Any]:
    """POST one signed ``webhook.test`` event now (not queued, not retried); returns what the receiver said.

    Raises:
        MessageNotFoundError: No such endpoint (of that tenant).
    """
    row = _owned(rt, endpoint_id, tenant)
    now = rt.now()
    test_id = "evt_test_" + secrets.token_hex(6)
    body = orjson.dumps(
        {
            "type": "events",
            "events": [
                {"id": test_id, "type": "webhook.test", "timestamp": _iso(now), "tenant": row.tenant, "data": {}}
            ],
        }
    )
    policy = rt.settings.webhooks
    with make_client(policy) as client:
        result = post_signed(client, row, "msg_" + test_id, body, policy=policy, now=now, resolve=resolve)
    return {
        "delivered": result.ok,
        "http_status": result.status,
        "error": result.error,
        "latency_ms": round(result.latency_ms, 1),
    }


def replay_events(rt: Runtime, *, since: datetime, endpoint_id: str | None = None, tenant: str | None = None) -> int:
    """Deliver again every event since ``since`` (one endpoint's, or a tenant's, or all); returns how many.

    The events keep their ids, so a receiver that deduplicates by id skips what it already has.

    Raises:
        MessageNotFoundError: ``endpoint_id`` names no endpoint (of that tenant).
    """
    if endpoint_id is not None:
        _owned(rt, endpoint_id, tenant)
    return outbox.replay(rt.store.sessions, since=since, endpoint_id=endpoint_id, tenant=tenant)
