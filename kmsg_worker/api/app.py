"""The HTTP API: one more producer on the one engine.

Every request authenticates a key (:mod:`kmsg_worker.api.auth`), acts for the key's tenant only
and calls the same intake as :class:`~kmsg_worker.KMsg`; the API never sends anything itself. A
message or batch of another tenant is ``404``, exactly like a missing one.

Handlers are ``async`` and run the producer's blocking calls (SQLAlchemy, Redis) in the thread
pool; an NDJSON or CSV batch is read chunk by chunk from the event loop by the thread that stores it, so
it is never held whole in memory.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import anyio
import anyio.from_thread
import anyio.to_thread
import orjson
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from kmsg_worker import adrules
from kmsg_worker.api import schemas
from kmsg_worker.api.auth import Authenticator, Principal
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.api.intake import batch_defaults, batch_rows, csv_rows, message_input, ndjson_rows, parse_json
from kmsg_worker.api.problems import PROBLEM_TYPES, Problem, problem_from_domain, problem_response, validation_problem
from kmsg_worker.api.reports import receive_reports
from kmsg_worker.dispatch import Dispatcher
from kmsg_worker.errors import KmsgError, ValidationError
from kmsg_worker.logging import configure_logging, get_logger
from kmsg_worker.message import normalize_phone
from kmsg_worker.producer import KMsg, MessageInfo
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import is_sandbox_content
from kmsg_worker.settings import Settings
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.advertising import count_suppressions
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.tenants import TenantStore
from kmsg_worker.templates import ComposeStep, advertising_step
from kmsg_worker.webhooks import endpoints

__all__ = ["API_VERSION", "create_app"]

API_VERSION = "1.0.0"
log = get_logger("kmsg.api")
_JSON_TYPES = ("application/json",)
_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
_CSV_TYPES = ("text/csv", "application/csv")
_STATUSES = frozenset(s.value for s in MessageStatus)
_PROBLEM_RESPONSE = {"model": schemas.ProblemOut, "content": {"application/problem+json": {}}}
_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {**_PROBLEM_RESPONSE, "description": "Missing, malformed, unknown or revoked key"},
    429: {**_PROBLEM_RESPONSE, "description": "Rate limit of the key; see Retry-After"},
    503: {**_PROBLEM_RESPONSE, "description": "The system of record is unavailable"},
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out = dict(_COMMON_ERRORS)
    for status in statuses:
        out[status] = {**_PROBLEM_RESPONSE, "description": _describe(status)}
    return out


def _describe(status: int) -> str:
    return "; ".join(title for code, title in PROBLEM_TYPES.values() if code == status)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes (never read further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem("payload-too-large", f"the body may be at most {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem("payload-too-large", f"the body may be at most {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _encode_cursor(row: MessageRow) -> str:
    raw = orjson.dumps([row.created_at.isoformat(), row.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, message_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        moment = datetime.fromisoformat(at)
        if moment.tzinfo is None or not isinstance(message_id, str):
            raise ValueError(cursor)
        return moment, message_id
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise ValidationError("cursor", "format", "not a cursor this API returned") from None


def _attempt_out(a: Any) -> dict[str, Any]:
    return {
        "attempt_no": a.attempt_no,
        "provider": a.provider,
        "outcome": a.outcome,
        "error_code": a.error_code,
        "provider_code": a.provider_code,
        "http_status": a.http_status,
        "latency_ms": a.latency_ms,
        "at": a.at,
    }


def _message_out(info: MessageInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "status": info.status,
        "type": info.type,
        "to": info.to,
        "test": info.test,
        "provider": info.provider,
        "provider_message_id": info.provider_message_id,
        "route": info.route,
        "attempts": [_attempt_out(a) for a in info.attempts],
        "error_code": info.error_code,
        "error_message": info.error_message,
        "provider_status_code": info.provider_status_code,
        "provider_status_message": info.provider_status_message,
        "created_at": info.created_at,
        "scheduled_at": info.scheduled_at,
        "sent_at": info.sent_at,
        "delivered_at": info.delivered_at,
        "failed_at": info.failed_at,
        "final_at": info.final_at,
        "parent_id": info.parent_id,
        "children": info.children,
        "batch_id": info.batch_id,
        "warnings": info.warnings,
        "fallback_state": info.fallback_state,
    }


def _summary_out(row: MessageRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": row.status,
        "type": row.type,
        "to": row.recipient,
        "test": is_sandbox_content(row.content or {}),
        "provider": row.provider or (row.route[row.route_index] if row.route else None),
        "batch_id": row.batch_id,
        "error_code": row.error_code,
        "created_at": row.created_at,
        "final_at": row.final_at,
    }


class _Api:
    """The state the handlers share: the producer, the tenant store, the authenticator, the limits."""

    def __init__(self, kmsg: KMsg, config: ApiConfig) -> None:
        self.kmsg = kmsg
        self.config = config
        self.tenants = TenantStore(kmsg.runtime.engine)
        self.auth = Authenticator(
            self.tenants,
            kmsg.runtime.rate_limiter,
            rate=config.rate_limit,
            cache_seconds=config.auth_cache_seconds,
        )
        self.zone = ZoneInfo(kmsg.settings.timezone)

    async def run(self, principal: Principal, work: Callable[..., Any], *args: Any) -> Any:
        """Take the key's request token, then do ``work``: both in one trip to the thread pool.

        The token comes first, so a flood of invalid requests is rate limited like any other.
        """

        def call() -> Any:
            self.auth.take_token(principal.key_id)
            return work(*args)

        return await run_in_threadpool(call)

    # -- blocking helpers, run in the thread pool ------------------------------------------------

    def send_one(self, body: bytes, principal: Principal, idempotency_key: str | None) -> dict[str, Any]:
        data = message_input(parse_json(body), principal, idempotency_key)
        receipt = self.kmsg.send(data)
        return {
            "id": receipt.message_id,
            "status": receipt.status,
            "type": receipt.type,
            "route": list(receipt.route),
            "duplicate": receipt.duplicate,
            "test": principal.test,
        }

    def list_messages(self, principal: Principal, filters: dict[str, Any], limit: int) -> dict[str, Any]:
        rows = self.tenants.messages(principal.tenant, limit=limit + 1, **filters)
        page = rows[:limit]
        return {
            "data": [_summary_out(r) for r in page],
            "next_cursor": _encode_cursor(page[-1]) if len(rows) > limit else None,
        }

    def owned_row(self, message_id: str, principal: Principal) -> MessageRow:
        row = self.kmsg.runtime.store.get(message_id)
        if row is None or row.tenant != principal.tenant:
            raise Problem("not-found", f"no message {message_id!r}")
        return row

    def owned_batch(self, batch_id: str, principal: Principal) -> None:
        if self.tenants.batch_tenant(batch_id) != principal.tenant:
            raise Problem("not-found", f"no batch {batch_id!r}")

    def message(self, message_id: str, principal: Principal) -> dict[str, Any]:
        self.owned_row(message_id, principal)
        return _message_out(self.kmsg.get(message_id))

    def cancel(self, message_id: str, principal: Principal) -> dict[str, Any]:
        self.owned_row(message_id, principal)
        return _message_out(self.kmsg.cancel(message_id))

    def batch(self, batch_id: str, principal: Principal, *, cancel: bool = False) -> dict[str, Any]:
        self.owned_batch(batch_id, principal)
        summary = self.kmsg.cancel_batch(batch_id) if cancel else self.kmsg.batch_summary(batch_id)
        sample = self.tenants.batch_content(batch_id)
        return {
            **asdict(summary),
            "done": summary.done,
            "suppressed": summary.suppressed,
            "deferred": summary.deferred,
            "test": sample is not None and is_sandbox_content(sample),
        }

    def suppressions(self, principal: Principal, numbers: list[str] | None, *, remove: bool = False) -> dict[str, Any]:
        """Change (``numbers`` given) or count the key's tenant's opt-out list."""
        store, settings = self.kmsg.runtime.store, self.kmsg.settings
        given = 0
        changed = 0
        if numbers is not None:
            if principal.test:
                # A test key's requests never reach the real world; the list is the tenant's real one.
                raise Problem("forbidden", "a test key cannot change the tenant's opt-out list; use a live key")
            normalized = [normalize_phone(n, f"numbers[{i}]") for i, n in enumerate(numbers)]
            given = len(normalized)
            if remove:
                changed = adrules.unsuppress(settings, store, principal.tenant, normalized)
            else:
                changed = adrules.suppress(
                    settings, store, principal.tenant, normalized, source="api", now=self.kmsg.runtime.now()
                )
        count = count_suppressions(store, principal.tenant)
        return {"given": given, "changed": changed, "count": count}

    def _preview_steps(self, tenant: str, fields: Mapping[str, Any]) -> list[ComposeStep]:
        """A preview's composition: for advertising, the head and footer an advertising send gets."""
        purpose = fields.get("purpose") or "informational"
        if purpose not in ("informational", "advertising"):
            raise ValidationError("purpose", "enum", "must be one of informational, advertising")
        if purpose == "informational":
            return []
        sender = fields.get("sender")
        number = None if sender is None else normalize_phone(sender, "sender")
        return [advertising_step(adrules.profile_lookup(self.kmsg.runtime.store), tenant, number)]

    def templates(self, principal: Principal, action: str, ref: str | None, body: bytes | None) -> dict[str, Any]:
        """One registry operation for the key's tenant (the request body already size-checked)."""
        registry, tenant, now = self.kmsg.templates, principal.tenant, self.kmsg.runtime.now()
        data = parse_json(body) if body is not None else {}
        if not isinstance(data, dict):
            raise ValidationError("body", "type", "must be a JSON object")
        if action == "list":
            return {"data": [v.as_dict() for v in registry.all(tenant)]}
        assert ref is not None or action == "create"
        if action == "create":
            fields = _template_fields(data, schemas.TemplateRequest, required=("name", "body"))
            name, body_text = fields.pop("name"), fields.pop("body")
            return registry.create(tenant, name, body_text, now=now, **fields).as_dict()
        assert ref is not None
        if action == "show":
            versions = registry.store.versions(tenant, ref)
            if not versions:
                raise Problem("not-found", f"no template {ref!r}")
            return {"data": [v.as_dict() for v in registry.show(tenant, ref)]}
        if action == "edit":
            return registry.edit(tenant, ref, now=now, **_template_fields(data, schemas.TemplateEditRequest)).as_dict()
        if action == "preview":
            fields = _template_fields(data, schemas.TemplatePreviewRequest)
            sample = fields.get("variables") or {}
            if not isinstance(sample, dict):
                raise ValidationError("variables", "type", "must be a JSON object")
            registry.get(tenant, ref)  # an unknown template is said before the advertiser profile is looked up
            return registry.preview(tenant, ref, sample, compose=self._preview_steps(tenant, fields)).as_dict()
        if action == "publish":
            return registry.publish(tenant, ref, now=now).as_dict()
        return registry.archive(tenant, ref, now=now).as_dict()

    def add_webhook(self, body: bytes, principal: Principal) -> dict[str, Any]:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise ValidationError("body", "object", "the body must be a JSON object")
        unknown = sorted(set(data) - {"url", "events", "include_phone"})
        if unknown:
            raise ValidationError(unknown[0], "unknown_field", f"unknown field {unknown[0]!r}")
        url, events, include_phone = data.get("url"), data.get("events"), data.get("include_phone", False)
        if not isinstance(url, str):
            raise ValidationError("url", "required", "url is required (a string)")
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise ValidationError("events", "required", "events is required (a list of event types)")
        if not isinstance(include_phone, bool):
            raise ValidationError("include_phone", "boolean", "include_phone must be true or false")
        return endpoints.add_endpoint(self.kmsg.runtime, principal.tenant, url, events, include_phone=include_phone)

    def aware(self, value: datetime | None) -> datetime | None:
        # Naive times are in the deployment's zone, as for scheduled_at.
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=self.zone)


def _app_of(request: Request) -> _Api:
    api: _Api = request.app.state.api
    return api


async def _principal(request: Request) -> Principal:
    auth = _app_of(request).auth
    parsed = auth.parse(request.headers.get("authorization"))
    hit, record = auth.cached(parsed.key_id)
    if not hit:
        record = await run_in_threadpool(auth.load, parsed.key_id)
    principal = auth.check(parsed, record)
    # For the access log (the key's public id only, never the key).
    request.state.key_id = principal.key_id
    return principal


Auth = Annotated[Principal, Depends(_principal)]
MessageId = Annotated[str, Path(max_length=80)]
EndpointId = Annotated[str, Path(max_length=24)]
BatchId = Annotated[str, Path(max_length=40)]
TemplateRef = Annotated[str, Path(max_length=80, description="name, or name@version")]


class _AccessLog:
    """One masked line per request through :mod:`kmsg_worker.logging` (uvicorn's own access log is off).

    The line has the method, the path (ids only; never a query string, which may carry numbers),
    the status, the time taken and the key's public id: never the ``Authorization`` header.
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = scope.get("state") or {}
            log.info(
                "api.request",
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                key_id=state.get("key_id"),
            )


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem_response(exc, request.url.path)

    @app.exception_handler(KmsgError)
    async def _domain(request: Request, exc: KmsgError) -> Response:
        problem = problem_from_domain(exc)
        if problem is None:
            log.error("api.unhandled_domain_error", error=type(exc).__name__)
            problem = Problem("internal")
        return problem_response(problem, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _params(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "request",
                "rule": str(e.get("type", "invalid")),
                "message": str(e.get("msg", "invalid")),
            }
            for e in exc.errors()
        ]
        return problem_response(validation_problem(errors, "invalid request parameters"), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        return problem_response(Problem(slug), request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # The type only: a message or traceback may quote the body (numbers, text).
        log.error("api.internal_error", error=type(exc).__name__, path=request.url.path)
        return problem_response(Problem("internal"), request.url.path)


def _routes(app: FastAPI) -> None:  # noqa: C901 - one nested function per endpoint
    @app.get("/livez", tags=["health"], summary="The process answers")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database and the broker answer")
    async def readyz(request: Request) -> Response:
        api = _app_of(request)
        checks = await run_in_threadpool(_readiness, api)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    @app.post(
        "/v1/messages",
        status_code=202,
        response_model=schemas.MessageReceiptOut,
        tags=["messages"],
        summary="Send one message",
        openapi_extra={"requestBody": _body("MessageRequest")},
        responses=_errors(400, 409, 413, 415, 422),
    )
    async def post_message(
        request: Request,
        principal: Auth,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> dict[str, Any]:
        api = _app_of(request)
        if _media_type(request) not in _JSON_TYPES:
            raise Problem("unsupported-media-type", "send the message as application/json")
        body = await _read_body(request, api.config.max_body_bytes)
        result: dict[str, Any] = await api.run(principal, api.send_one, body, principal, idempotency_key)
        return result

    @app.get(
        "/v1/messages",
        response_model=schemas.MessageListOut,
        tags=["messages"],
        summary="List messages, newest first",
        responses=_errors(422),
    )
    async def list_messages(
        request: Request,
        principal: Auth,
        status: Annotated[str | None, Query(description="Comma-separated statuses", max_length=200)] = None,
        batch_id: Annotated[str | None, Query(max_length=40)] = None,
        since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(description="Created before (ISO 8601)")] = None,
        cursor: Annotated[str | None, Query(max_length=400)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        api = _app_of(request)
        statuses = [s.strip() for s in (status or "").split(",") if s.strip()]
        unknown = [s for s in statuses if s not in _STATUSES]
        if unknown:
            raise ValidationError("status", "enum", f"unknown status; one of {', '.join(sorted(_STATUSES))}")
        filters = {
            "statuses": statuses,
            "batch_id": batch_id,
            "since": api.aware(since),
            "until": api.aware(until),
            "before": _decode_cursor(cursor) if cursor else None,
        }
        result: dict[str, Any] = await api.run(principal, api.list_messages, principal, filters, limit)
        return result

    @app.get(
        "/v1/messages/{message_id}",
        response_model=schemas.MessageOut,
        tags=["messages"],
        summary="A message, its attempts and its fallback children",
        responses=_errors(404),
    )
    async def get_message(request: Request, principal: Auth, message_id: MessageId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, api.message, message_id, principal)
        return result

    @app.post(
        "/v1/messages/{message_id}/cancel",
        response_model=schemas.MessageOut,
        tags=["messages"],
        summary="Cancel a message not yet sent",
        responses=_errors(404, 409),
    )
    async def cancel_message(request: Request, principal: Auth, message_id: MessageId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, api.cancel, message_id, principal)
        return result

    @app.post(
        "/v1/batches",
        status_code=202,
        response_model=schemas.BatchReceiptOut,
        tags=["batches"],
        summary="Send a batch (JSON, or NDJSON or CSV streamed row by row)",
        openapi_extra={"requestBody": _batch_body()},
        responses=_errors(400, 409, 413, 415, 422),
    )
    async def post_batch(
        request: Request,
        principal: Auth,
        on_invalid: Annotated[str | None, Query(pattern="^(reject|skip)$", description="NDJSON and CSV bodies")] = None,
        defaults: Annotated[str | None, Query(description="NDJSON and CSV bodies: the defaults as JSON text")] = None,
        defaults_header: Annotated[str | None, Header(alias="Kmsg-Defaults", include_in_schema=False)] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> dict[str, Any]:
        api = _app_of(request)
        media = _media_type(request)
        if media in _JSON_TYPES:
            if on_invalid is not None or defaults is not None or defaults_header is not None:
                raise ValidationError("query", "forbidden", "a JSON batch carries defaults and on_invalid in its body")
            return await _json_batch(api, request, principal, idempotency_key)
        if media in _NDJSON_TYPES or media in _CSV_TYPES:
            if defaults is not None and defaults_header is not None:
                raise ValidationError("defaults", "duplicate_field", "give the defaults in the query or the header")
            raw_defaults = defaults if defaults is not None else defaults_header
            shared = parse_json(raw_defaults.encode()) if raw_defaults else None
            parse = ndjson_rows if media in _NDJSON_TYPES else csv_rows
            return await _streamed_batch(
                api, request, principal, parse, shared, on_invalid or "reject", idempotency_key
            )
        raise Problem("unsupported-media-type", "send a batch as application/json, application/x-ndjson or text/csv")

    @app.get(
        "/v1/batches/{batch_id}",
        response_model=schemas.BatchSummaryOut,
        tags=["batches"],
        summary="A batch's counts by status, provider, type and error",
        responses=_errors(404),
    )
    async def get_batch(request: Request, principal: Auth, batch_id: BatchId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, api.batch, batch_id, principal)
        return result

    @app.get(
        "/v1/suppressions",
        response_model=schemas.SuppressionCountOut,
        tags=["advertising"],
        summary="How many numbers the tenant's advertising opt-out list holds",
    )
    async def count_suppressions_(request: Request, principal: Auth) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, api.suppressions, principal, None)
        return {"count": result["count"]}

    @app.post(
        "/v1/suppressions",
        response_model=schemas.SuppressionsOut,
        tags=["advertising"],
        summary="Add numbers to the tenant's advertising opt-out list",
        responses=_errors(403, 422),
    )
    async def add_suppressions(request: Request, principal: Auth, body: schemas.SuppressionsIn) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, api.suppressions, principal, body.numbers)
        return result

    @app.post(
        "/v1/suppressions/remove",
        response_model=schemas.SuppressionsOut,
        tags=["advertising"],
        summary="Remove numbers from the tenant's advertising opt-out list",
        responses=_errors(403, 422),
    )
    async def remove_suppressions(request: Request, principal: Auth, body: schemas.SuppressionsIn) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(
            principal, lambda: api.suppressions(principal, body.numbers, remove=True)
        )
        return result

    @app.post(
        "/v1/batches/{batch_id}/cancel",
        response_model=schemas.BatchSummaryOut,
        tags=["batches"],
        summary="Stop a batch: what is not sent yet is cancelled",
        responses=_errors(404),
    )
    async def cancel_batch(request: Request, principal: Auth, batch_id: BatchId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(principal, lambda: api.batch(batch_id, principal, cancel=True))
        return result


def _template_fields(data: dict[str, Any], model: type[Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The body's fields, checked against ``model``'s names; the registry checks their values."""
    known = set(model.model_fields)
    for key in data:
        if key not in known:
            raise ValidationError(key, "unknown_field", f"unknown field; known fields: {', '.join(sorted(known))}")
    for key in required:
        if data.get(key) is None:
            raise ValidationError(key, "required", "is required")
    return {key: data.get(key) for key in known if key in data or key not in required}


def _template_routes(app: FastAPI) -> None:
    """``/v1/templates``: the key's tenant's template registry (see :mod:`kmsg_worker.templates`)."""

    async def run(request: Request, principal: Principal, action: str, ref: str | None) -> dict[str, Any]:
        api = _app_of(request)
        body: bytes | None = None
        if request.method == "POST" and action in ("create", "edit", "preview"):
            if _media_type(request) not in _JSON_TYPES:
                raise Problem("unsupported-media-type", "send the template as application/json")
            body = await _read_body(request, api.config.max_body_bytes)
        result: dict[str, Any] = await api.run(principal, api.templates, principal, action, ref, body)
        return result

    @app.get("/v1/templates", response_model=schemas.TemplateListOut, tags=["templates"], summary="Every template")
    async def list_templates(request: Request, principal: Auth) -> dict[str, Any]:
        return await run(request, principal, "list", None)

    @app.post(
        "/v1/templates",
        status_code=201,
        response_model=schemas.TemplateOut,
        tags=["templates"],
        summary="Create a template (version 1, a draft)",
        openapi_extra={"requestBody": _body("TemplateRequest")},
        responses=_errors(413, 415, 422),
    )
    async def create_template(request: Request, principal: Auth) -> dict[str, Any]:
        return await run(request, principal, "create", None)

    @app.get(
        "/v1/templates/{name}",
        response_model=schemas.TemplateListOut,
        tags=["templates"],
        summary="Every version of a template",
        responses=_errors(404),
    )
    async def show_template(request: Request, principal: Auth, name: TemplateRef) -> dict[str, Any]:
        return await run(request, principal, "show", name)

    @app.post(
        "/v1/templates/{name}/edit",
        response_model=schemas.TemplateOut,
        tags=["templates"],
        summary="Edit the draft, or start the next version as a draft",
        openapi_extra={"requestBody": _body("TemplateEditRequest")},
        responses=_errors(409, 413, 415, 422),
    )
    async def edit_template(request: Request, principal: Auth, name: TemplateRef) -> dict[str, Any]:
        return await run(request, principal, "edit", name)

    @app.post(
        "/v1/templates/{ref}/preview",
        response_model=schemas.TemplatePreviewOut,
        tags=["templates"],
        summary="Render a version with sample variables: text, bytes, SMS or LMS",
        openapi_extra={"requestBody": _body("TemplatePreviewRequest")},
        responses=_errors(413, 415, 422),
    )
    async def preview_template(request: Request, principal: Auth, ref: TemplateRef) -> dict[str, Any]:
        return await run(request, principal, "preview", ref)

    @app.post(
        "/v1/templates/{ref}/publish",
        response_model=schemas.TemplateOut,
        tags=["templates"],
        summary="Publish a draft (by name: the draft)",
        responses=_errors(409, 422),
    )
    async def publish_template(request: Request, principal: Auth, ref: TemplateRef) -> dict[str, Any]:
        return await run(request, principal, "publish", ref)

    @app.post(
        "/v1/templates/{ref}/archive",
        response_model=schemas.TemplateOut,
        tags=["templates"],
        summary="Archive a version (by name: the latest published one)",
        responses=_errors(409, 422),
    )
    async def archive_template(request: Request, principal: Auth, ref: TemplateRef) -> dict[str, Any]:
        return await run(request, principal, "archive", ref)


def _webhook_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/webhooks",
        status_code=201,
        response_model=schemas.WebhookCreatedOut,
        tags=["webhooks"],
        summary="Add a webhook endpoint; its signing secret is in this answer only",
        openapi_extra={"requestBody": _body("WebhookRequest")},
        responses=_errors(400, 422),
    )
    async def post_webhook(request: Request, principal: Auth) -> dict[str, Any]:
        api = _app_of(request)
        body = await _read_body(request, api.config.max_body_bytes)
        result: dict[str, Any] = await api.run(principal, api.add_webhook, body, principal)
        return result

    @app.get("/v1/webhooks", response_model=schemas.WebhookListOut, tags=["webhooks"], summary="The tenant's endpoints")
    async def list_webhooks(request: Request, principal: Auth) -> dict[str, Any]:
        api = _app_of(request)
        rows = await api.run(principal, endpoints.list_endpoints, api.kmsg.runtime, principal.tenant)
        return {"data": rows}

    @app.delete(
        "/v1/webhooks/{endpoint_id}",
        status_code=204,
        tags=["webhooks"],
        summary="Remove an endpoint (its undelivered events go with it)",
        responses=_errors(404),
    )
    async def delete_webhook(request: Request, principal: Auth, endpoint_id: EndpointId) -> Response:
        api = _app_of(request)
        await api.run(principal, endpoints.remove_endpoint, api.kmsg.runtime, endpoint_id, principal.tenant)
        return Response(status_code=204)

    @app.post(
        "/v1/webhooks/{endpoint_id}/rotate",
        response_model=schemas.WebhookCreatedOut,
        tags=["webhooks"],
        summary="A new signing secret; the old one keeps signing for the configured overlap",
        responses=_errors(404),
    )
    async def rotate_webhook(request: Request, principal: Auth, endpoint_id: EndpointId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(
            principal, endpoints.rotate_secret, api.kmsg.runtime, endpoint_id, principal.tenant
        )
        return result

    @app.post(
        "/v1/webhooks/{endpoint_id}/test",
        response_model=schemas.WebhookTestOut,
        tags=["webhooks"],
        summary="Send one signed webhook.test event now and report the answer",
        responses=_errors(404),
    )
    async def test_webhook(request: Request, principal: Auth, endpoint_id: EndpointId) -> dict[str, Any]:
        api = _app_of(request)
        result: dict[str, Any] = await api.run(
            principal, endpoints.test_endpoint, api.kmsg.runtime, endpoint_id, principal.tenant
        )
        return result


def _report_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/providers/{provider}/reports",
        response_model=schemas.ReportReceiptOut,
        tags=["reports"],
        summary="A provider's delivery-report webhook (authenticated by KMSG_REPORT_SECRET, not by an API key)",
        # Providers hold no API key of ours: the report is checked by its signature or token instead.
        openapi_extra={"security": []},
        responses=_errors(400, 401, 404, 413, 503),
    )
    async def post_reports(
        request: Request,
        provider: Annotated[str, Path(max_length=32)],
        token: Annotated[
            str | None, Query(max_length=200, description="The shared secret, for a URL-only sender")
        ] = None,
    ) -> dict[str, Any]:
        api = _app_of(request)
        body = await _read_body(request, api.config.max_batch_bytes)
        result: dict[str, Any] = await run_in_threadpool(
            receive_reports, api.kmsg.runtime, provider, dict(request.headers), token, body
        )
        return result


def _body(model: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}


def _batch_body() -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
            "application/x-ndjson": {
                "schema": {"type": "string", "description": "One message object per line, merged over defaults"}
            },
            "text/csv": {
                "schema": {
                    "type": "string",
                    "description": "A header line, then one message per line: the columns to, id, text, type, "
                    "subject, sender, from, template_id, scheduled_at are message fields, every other column "
                    "a #{variable}; merged over defaults",
                }
            },
        },
    }


def _receipt(receipt: Any, principal: Principal, ids: bool) -> dict[str, Any]:
    return {
        "batch_id": receipt.batch_id,
        "accepted": len(receipt.message_ids),
        "message_ids": list(receipt.message_ids) if ids else None,
        "invalid": [{"row": e.row, "field": e.field, "rule": e.rule, "message": e.message} for e in receipt.invalid],
        "duplicate": receipt.duplicate,
        "test": principal.test,
    }


async def _json_batch(api: _Api, request: Request, principal: Principal, key: str | None) -> dict[str, Any]:
    raw = await _read_body(request, api.config.max_batch_bytes)
    result: dict[str, Any] = await api.run(principal, _store_json_batch, api, raw, principal, key)
    return result


def _store_json_batch(api: _Api, raw: bytes, principal: Principal, key: str | None) -> dict[str, Any]:
    # In the thread pool: parsing up to KMSG_API_MAX_BATCH_BYTES of JSON must not stall the event loop.
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ValidationError("body", "type", "must be a JSON object {defaults, messages, on_invalid}")
    for name in body:
        if name not in ("defaults", "messages", "on_invalid"):
            raise ValidationError(name, "unknown_field", "unknown field; known fields: defaults, messages, on_invalid")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValidationError("messages", "required", "must be a list of message objects")
    on_invalid = body.get("on_invalid", "reject")
    if on_invalid not in ("reject", "skip"):
        raise ValidationError("on_invalid", "enum", "must be reject or skip")
    shared = batch_defaults(body.get("defaults"), principal)
    receipt = api.kmsg.send_many(
        batch_rows(messages, shared, principal),
        defaults=shared,
        on_invalid=on_invalid,
        idempotency_key=key,
        tenant=principal.tenant,
    )
    return _receipt(receipt, principal, ids=True)


async def _streamed_batch(
    api: _Api,
    request: Request,
    principal: Principal,
    parse: Callable[[Iterable[bytes], int], Iterator[Any]],
    defaults: Any,
    on_invalid: str,
    key: str | None,
) -> dict[str, Any]:
    shared = batch_defaults(defaults, principal)
    stream: AsyncIterator[bytes] = request.stream().__aiter__()

    async def pull() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    def chunks() -> Iterator[bytes]:
        # Runs in the storing thread: each chunk is fetched from the event loop when the rows need it.
        while (chunk := anyio.from_thread.run(pull)) is not None:
            if chunk:
                yield chunk

    def store() -> Any:
        api.auth.take_token(principal.key_id)
        rows = batch_rows(parse(chunks(), api.config.max_line_bytes), shared, principal)
        return api.kmsg.send_many(
            rows, defaults=shared, on_invalid=on_invalid, idempotency_key=key, tenant=principal.tenant
        )

    receipt = await anyio.to_thread.run_sync(store)
    return _receipt(receipt, principal, ids=False)


def _readiness(api: _Api) -> dict[str, str]:
    from kmsg_worker.doctor import DoctorReport, _check_broker

    checks: dict[str, str] = {}
    try:
        api.tenants.touch()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any driver error means "not ready"
        checks["database"] = type(exc).__name__
    report = DoctorReport()
    checks["broker"] = "ok" if _check_broker(api.kmsg.settings, report, 2.0) else "unreachable"
    return checks


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (schemas.MessageRequest, schemas.BatchRequest, schemas.WebhookRequest):
                components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "kmsg_live_... or kmsg_test_..."}
            }
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    dispatcher: Dispatcher | None = None,
    config: ApiConfig | None = None,
) -> FastAPI:
    """Build the ASGI app.

    Args:
        settings: Defaults to :meth:`Settings.from_env` (ignored when ``runtime`` is given).
        runtime: An existing runtime to share (tests); the app then does not close it.
        dispatcher: Where to publish tasks (default: the Celery app, as for :class:`~kmsg_worker.KMsg`).
        config: The API's limits; defaults to :meth:`ApiConfig.from_env`.

    Returns:
        The FastAPI application (``uvicorn --factory kmsg_worker.api:create_app`` serves it).
    """
    owned = runtime is None
    kmsg = KMsg(settings, runtime=runtime, dispatcher=dispatcher)
    if owned:
        # The server's own process (uvicorn --factory): structured logs with phone numbers masked.
        configure_logging(kmsg.settings.log_level, json_output=kmsg.settings.log_json, counters=False)
    api = _Api(kmsg, config or ApiConfig.from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            kmsg.close()

    app = FastAPI(
        title="kmsg-worker API",
        version=API_VERSION,
        description="Send and follow Korean SMS/LMS/MMS and Kakao messages. Errors are RFC 9457 problem details.",
        # No docs page: the default ones load their scripts from a CDN. The schema is at /openapi.json.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.api = api
    _install_handlers(app)
    _routes(app)
    _template_routes(app)
    _webhook_routes(app)
    _report_routes(app)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    if api.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(api.config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Kmsg-Defaults"],
        )
    app.add_middleware(_AccessLog)
    return app
