"""The API's documented shapes (OpenAPI components).

Request bodies are *validated by the domain* (:func:`kmsg_worker.message.normalize`, the same
rules as :class:`~kmsg_worker.KMsg`), not by these models: the request models only document the
fields, and a test checks that they list exactly the fields the domain accepts. Responses are
built from these models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kmsg_worker.message import MessageType, Priority

__all__ = [
    "AttemptOut",
    "BatchReceiptOut",
    "BatchRequest",
    "BatchSummaryOut",
    "MessageListOut",
    "MessageOut",
    "MessageReceiptOut",
    "MessageRequest",
    "MessageSummaryOut",
    "ProblemOut",
    "ReportReceiptOut",
    "RowErrorOut",
    "TemplateEditRequest",
    "TemplateListOut",
    "TemplateOut",
    "TemplatePreviewOut",
    "TemplatePreviewRequest",
    "TemplateRequest",
    "WebhookCreatedOut",
    "WebhookListOut",
    "WebhookOut",
    "WebhookRequest",
    "WebhookTestOut",
]


class MessageRequest(BaseModel):
    """One message. Unknown fields are refused; ``tenant`` comes from the key, never from the body."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(description="Recipient, e.g. 010-1234-5678 or +821012345678")
    type: MessageType | None = Field(None, description="Omitted: SMS, LMS or MMS from the text and media")
    id: str | None = Field(None, description="Your own message id (1-64 of A-Z a-z 0-9 _ . : -)")
    sender: str | None = None
    text: str | None = Field(None, description="Text; #{name} is replaced from variables")
    subject: str | None = None
    template_id: str | None = Field(None, description="AlimTalk: the provider's template code")
    template: str | None = Field(
        None, description="A registry template: its name (latest published version) or name@version; with variables"
    )
    variables: dict[str, Any] | None = None
    media: dict[str, Any] | None = None
    image_url: str | None = None
    buttons: list[dict[str, Any]] | None = None
    kakao: dict[str, Any] | None = None
    naver: dict[str, Any] | None = None
    voice: dict[str, Any] | None = None
    fax: dict[str, Any] | None = None
    rcs: dict[str, Any] | None = None
    failover: dict[str, Any] | None = None
    provider_id: str | None = None
    provider_options: dict[str, Any] | None = None
    scheduled_at: str | None = Field(None, description="ISO 8601; naive times are in the server's zone")
    country: str | None = None
    custom_fields: dict[str, Any] | None = None
    priority: Priority | None = None
    idempotency_key: str | None = Field(None, description="Same as the Idempotency-Key header")
    purpose: Literal["informational", "advertising"] | None = Field(
        None, description="advertising: the (광고) format, the night window and the suppression list apply"
    )
    compose: Literal["auto", "check"] | None = Field(
        None, description="advertising only: auto adds the (광고) head and opt-out footer; check refuses without them"
    )
    night_consent: bool | None = Field(None, description="the recipient consented to advertising at night")


class BatchRequest(BaseModel):
    """A JSON batch (an NDJSON body sends the same rows, one object per line)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] = Field(description="Rows, each merged over defaults")
    defaults: dict[str, Any] | None = Field(None, description="Fields shared by every row")
    on_invalid: Literal["reject", "skip"] = "reject"


class RowErrorOut(BaseModel):
    """One invalid row (``row`` counts from 1)."""

    row: int
    field: str
    rule: str
    message: str


class MessageReceiptOut(BaseModel):
    """A message was stored and will be sent."""

    id: str
    status: str
    type: str
    route: list[str]
    duplicate: bool
    test: bool


class BatchReceiptOut(BaseModel):
    """A batch was stored; follow it with GET /v1/batches/{id}."""

    batch_id: str
    accepted: int
    message_ids: list[str] | None = Field(None, description="Ids in input order (JSON batches only)")
    invalid: list[RowErrorOut]
    duplicate: bool
    test: bool


class AttemptOut(BaseModel):
    """One provider call."""

    attempt_no: int
    provider: str
    outcome: str
    error_code: str | None
    provider_code: str | None
    http_status: int | None
    latency_ms: float | None
    at: datetime


class MessageOut(BaseModel):
    """A message as the system of record knows it."""

    id: str
    status: str
    type: str
    to: str
    test: bool
    provider: str | None
    provider_message_id: str | None
    route: list[str]
    attempts: list[AttemptOut]
    error_code: str | None
    error_message: str | None
    provider_status_code: str | None
    provider_status_message: str | None
    created_at: datetime
    scheduled_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    failed_at: datetime | None
    final_at: datetime | None
    parent_id: str | None
    children: list[str]
    batch_id: str | None
    warnings: list[dict[str, Any]]
    fallback_state: str | None


class MessageSummaryOut(BaseModel):
    """A message in a list."""

    id: str
    status: str
    type: str
    to: str
    test: bool
    provider: str | None
    batch_id: str | None
    error_code: str | None
    created_at: datetime
    final_at: datetime | None


class MessageListOut(BaseModel):
    """A page of messages, newest first."""

    data: list[MessageSummaryOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page")


class BatchSummaryOut(BaseModel):
    """A batch's counts, from its messages."""

    batch_id: str
    status: str
    total: int
    invalid: int
    done: bool
    test: bool = Field(description="Sent with a test key (every message of a batch is of the same kind)")
    by_status: dict[str, int]
    by_provider: dict[str, int]
    by_type: dict[str, int]
    by_error_code: dict[str, int]
    suppressed: int = Field(0, description="Advertising rows not sent: the number is on the tenant's opt-out list")
    deferred: int = Field(0, description="Advertising rows waiting for the sending window (21:00-08:00 Seoul time)")
    cost_estimate_krw: float
    created_at: datetime | None
    first_sent_at: datetime | None
    last_sent_at: datetime | None
    finished_at: datetime | None
    cancelled_at: datetime | None
    throughput_per_s: float | None


class SuppressionsIn(BaseModel):
    """Numbers to add to (or remove from) the tenant's advertising opt-out list."""

    model_config = ConfigDict(extra="forbid")

    numbers: list[str] = Field(min_length=1, max_length=10_000, description="Korean phone numbers, 1-10,000")


class SuppressionsOut(BaseModel):
    """What a change of the opt-out list did (numbers are stored as keyed hashes, never shown)."""

    given: int
    changed: int = Field(description="Numbers added (already listed ones are left) or removed (listed ones)")
    count: int = Field(description="Numbers on the tenant's list afterwards")


class SuppressionCountOut(BaseModel):
    """The size of the tenant's advertising opt-out list."""

    count: int


class ProblemOut(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="urn:kmsg:problem:<slug>, stable per kind of error")
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = Field(
        None, description="Validation: {field, rule, message}; batch rows: {row, field, rule, message}"
    )


class TemplateRequest(BaseModel):
    """A new template: version 1, a draft."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 of A-Z a-z 0-9 _ . -")
    body: str = Field(description="The text; #{name} marks a variable")
    type: Literal["SMS", "LMS", "MMS", "FRIENDTALK"] | None = Field(
        None, description="Omitted: SMS or LMS by the rendered text's bytes"
    )
    subject: str | None = Field(None, description="LMS/MMS subject (fixed text)")


class TemplateEditRequest(BaseModel):
    """Changes to a template: its draft, or the next version as a draft. Omitted fields are kept."""

    model_config = ConfigDict(extra="forbid")

    body: str | None = None
    type: Literal["SMS", "LMS", "MMS", "FRIENDTALK"] | None = None
    subject: str | None = None


class TemplateOut(BaseModel):
    """One version of a template."""

    name: str
    version: int
    ref: str = Field(description="name@version: what a message sent with it records")
    state: Literal["draft", "published", "archived"]
    type: str | None
    body: str
    subject: str | None
    variables: list[str] = Field(description="The body's #{name} variables, in order")
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None
    archived_at: datetime | None


class TemplateListOut(BaseModel):
    """Templates (or one template's versions)."""

    data: list[TemplateOut]


class TemplatePreviewRequest(BaseModel):
    """Sample variables for a preview; for advertising, the text as it would be composed."""

    model_config = ConfigDict(extra="forbid")

    variables: dict[str, Any] = Field(default_factory=dict)
    purpose: Literal["informational", "advertising"] = Field(
        "informational", description="advertising: compose the (광고) head and the opt-out footer"
    )
    sender: str | None = Field(None, description="The sender number whose advertiser profile composes the text")


class TemplatePreviewOut(BaseModel):
    """A version rendered with sample variables."""

    ref: str
    text: str
    subject: str | None
    bytes: int = Field(description="Bytes as Korean carriers count them (Hangul 2)")
    type: str = Field(description="SMS or LMS for this text (or the template's own type)")
    missing: list[str] = Field(description="Variables not given (their #{name} stays in the text)")
    unknown: list[str] = Field(description="Given variables the template does not have")
    steps: list[str] = Field(description="Composing steps applied after rendering")


class WebhookRequest(BaseModel):
    """A webhook endpoint to add for the key's tenant."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="https URL; private, loopback and link-local destinations are refused")
    events: list[str] = Field(
        description="message.sent, message.delivered, message.failed, message.unknown, message.cancelled, "
        "message.fallback_created, batch.completed"
    )
    include_phone: bool = Field(False, description="Full recipient numbers in events (masked otherwise)")


class WebhookOut(BaseModel):
    """A webhook endpoint (its secret is never shown again after it was made)."""

    id: str
    tenant: str
    url: str
    events: list[str]
    include_phone: bool
    created_at: datetime | None
    disabled_at: datetime | None
    disabled_reason: str | None
    failures: int = Field(description="Consecutive failed deliveries")
    failing_since: datetime | None
    last_success_at: datetime | None
    last_error: str | None


class WebhookCreatedOut(WebhookOut):
    """A new endpoint, or one whose secret was just rotated: the signing secret, shown this once."""

    secret: str = Field(description="whsec_...: verify signatures with it (Standard Webhooks)")
    previous_secret_valid_until: datetime | None = Field(
        None, description="After a rotation: the old secret also signs until then"
    )


class WebhookListOut(BaseModel):
    """The tenant's endpoints."""

    data: list[WebhookOut]


class WebhookTestOut(BaseModel):
    """What the endpoint answered to one signed ``webhook.test`` event."""

    delivered: bool
    http_status: int | None
    error: str | None
    latency_ms: float


class ReportReceiptOut(BaseModel):
    """What a provider's delivery report changed."""

    received: int = Field(description="Reports in the body")
    matched: int = Field(description="Of them, messages found still sent (others were settled already or unknown)")
    delivered: int
    failed: int
    fallbacks: int = Field(description="SMS/LMS fallbacks created for AlimTalks that failed")
