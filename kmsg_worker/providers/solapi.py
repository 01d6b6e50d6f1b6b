"""Solapi (API v4) adapter: SMS/LMS/MMS, AlimTalk, FriendTalk, Naver smart alarm, voice, fax and RCS.

Wire contract (https://docs.solapi.com, the ``solapi`` SDKs):

* every request carries ``Authorization: HMAC-SHA256 apiKey=<key>, date=<ISO 8601>, salt=<32 chars>,
  signature=<hex HMAC-SHA256(secret, date + salt)>`` with a fresh date and salt, so a retried request
  is never refused as a replay (``DuplicatedSignature``);
* sends go through ``POST /messages/v4/send-many/detail`` (up to 10,000 messages per request); every
  message carries our id in ``customFields.kmsgId`` and results are matched back by it, never by
  phone number (one batch may hold several messages to the same number);
* images and fax documents are uploaded first (``POST /storage/v1/files``) and referenced by id;
* delivery statuses come from ``GET /messages/v4/list``: ``messageId=<id>`` for one message,
  ``messageIds=<id>&messageIds=<id>...`` (the SDK's repeated-key form) for many;
* :meth:`SolapiProvider.lookup` finds messages by *our* id (``customFields.kmsgId``), which the
  list API cannot filter on (https://docs.solapi.com/api-reference/messages/getmessagelist). It lists
  what can only be that message instead: with :class:`~kmsg_worker.providers.base.LookupHint` s, one
  query per recipient (``to``, ``from``, ``type``, ``startDate``/``endDate`` around the attempt) or,
  for many recipients, one scan of the attempts' time window; without hints, the last
  ``lookup_window_seconds``. Every search is bounded by ``lookup_max_pages``; one that reaches the
  bound raises :class:`~kmsg_worker.providers.base.ProviderLookupUndecided` instead of reporting the
  rest as never received.

Choices made here: status codes other than 2000/3000/4000 map to FAILED (they are failures, not
unknowns); phone numbers are normalised; the base URL is configurable; image bytes can be uploaded
through Solapi's storage API; AlimTalk's own SMS replacement
(``disableSms: false``) is only switched on when a failover is requested.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, NamedTuple
from urllib.parse import unquote, urlsplit

import httpx

from kmsg_worker.errors import (
    Blame,
    ErrorCode,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Media, Message, MessageType
from kmsg_worker.providers.base import (
    Balance,
    Capabilities,
    DeliveryState,
    LookupHint,
    ProviderLookupUndecided,
    SendOutcome,
    SendWarning,
    StatusQuery,
    StatusReport,
    alimtalk_template,
)
from kmsg_worker.providers.base_http import HttpProvider, loads_json, map_transport_errors

__all__ = [
    "SOLAPI_CODES",
    "SOLAPI_ERROR_CODES",
    "CodeRule",
    "SolapiProvider",
    "authorization_header",
    "map_status_code",
]

#: Solapi answers and expects dates in Korean time.
KST = timezone(timedelta(hours=9), "KST")
#: Key of our message id inside ``customFields`` (Solapi: at most 30 characters per name).
REFERENCE_FIELD = "kmsgId"
SEND_PATH = "/messages/v4/send-many/detail"
LIST_PATH = "/messages/v4/list"
UPLOAD_PATH = "/storage/v1/files"
BALANCE_PATH = "/cash/v1/balance"
#: The account's sender numbers and their state (Solapi, formerly CoolSMS: "발신번호 목록 조회").
SENDERS_PATH = "/senderid/v1/numbers"
#: Message ids per status request: keeps the query string well under common 8 KB URL limits.
STATUS_CHUNK = 100
LIST_PAGE_LIMIT = 500
#: Longest wait before asking a lookup page again (a Retry-After above it is cut to it).
_LOOKUP_PAGE_MAX_WAIT = 2.0
_SALT_ALPHABET = string.ascii_letters + string.digits
_STATUS_FAILED = re.compile(r"^[123]\d{3}$")
_NOT_KAKAO_CODES = frozenset({"3104", "3107"})
_NOT_KAKAO_TEXT = "미사용자"


class CodeRule(NamedTuple):
    """How a Solapi code maps onto the project's taxonomy."""

    code: ErrorCode
    blame: Blame
    retryable: bool = False


_M: Blame = "message"
_P: Blame = "provider"

#: Solapi message status codes (docs ``api-reference/message-status-codes.md``): 1xxx intake errors,
#: 2xxx platform errors, 3xxx carrier/Kakao errors. Used for ``failedMessageList`` entries, for
#: numeric ``errorCode`` values of HTTP errors and for failed registrations found by ``lookup``.
SOLAPI_CODES: dict[str, CodeRule] = {
    "1010": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # required value missing
    "1011": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # format error
    "1013": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # subject on an SMS
    "1014": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # subject over 40 bytes
    "1020": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "1023": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # image not found
    "1024": CodeRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, _P, retryable=True),
    "1025": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # unknown message type
    "1026": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # duplicate recipient (allowDuplicates false)
    "1027": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1028": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1029": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # character outside EUC-KR
    "1030": CodeRule(ErrorCode.INSUFFICIENT_BALANCE, _P),
    "1031": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # length limits
    "1032": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # invalid custom field
    "1033": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1034": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # imageId does not exist
    "1041": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),  # invalid Kakao channel (pfId)
    "1042": CodeRule(ErrorCode.TEMPLATE_NOT_FOUND, _M),
    "1043": CodeRule(ErrorCode.TEMPLATE_MISMATCH, _M),
    "1044": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1045": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1046": CodeRule(ErrorCode.TEMPLATE_MISMATCH, _M),
    "1047": CodeRule(ErrorCode.TEMPLATE_MISMATCH, _M),
    "1048": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1049": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1050": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # at most 5 buttons
    "1051": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # unknown FriendTalk image
    "1052": CodeRule(ErrorCode.TEMPLATE_MISMATCH, _M),
    "1053": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "1058": CodeRule(ErrorCode.PROVIDER_ERROR, _P),  # no route
    "1060": CodeRule(ErrorCode.RECIPIENT_BLOCKED, _M),
    "1061": CodeRule(ErrorCode.AD_OPTED_OUT, _M),  # 080 opt-out
    "1062": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),
    "1064": CodeRule(ErrorCode.RECIPIENT_BLOCKED, _M),  # KISA block
    "2011": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "2024": CodeRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, _P, retryable=True),
    "2060": CodeRule(ErrorCode.RECIPIENT_BLOCKED, _M),
    "2061": CodeRule(ErrorCode.AD_OPTED_OUT, _M),  # 080 opt-out
    "2062": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),
    "2063": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),  # account blocked
    "2064": CodeRule(ErrorCode.RECIPIENT_BLOCKED, _M),
    "2230": CodeRule(ErrorCode.INSUFFICIENT_BALANCE, _P),
    "2254": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # platform spam filter
    "3010": CodeRule(ErrorCode.INVALID_RECIPIENT, _M),
    "3012": CodeRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, _P, retryable=True),
    "3013": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),
    "3024": CodeRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, _P, retryable=True),
    "3032": CodeRule(ErrorCode.INVALID_RECIPIENT, _M),  # not a subscriber
    "3054": CodeRule(ErrorCode.INVALID_REQUEST, _M),  # spam
    "3055": CodeRule(ErrorCode.INVALID_REQUEST, _M),
    "3059": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),  # spoofed sender number
    "3101": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),  # invalid sender profile key
    "3102": CodeRule(ErrorCode.INVALID_RECIPIENT, _M),  # not a channel friend (FriendTalk)
    "3103": CodeRule(ErrorCode.TEMPLATE_MISMATCH, _M),
    "3104": CodeRule(ErrorCode.NOT_KAKAO_USER, _M),
    "3105": CodeRule(ErrorCode.TEMPLATE_NOT_FOUND, _M),
    "3106": CodeRule(ErrorCode.SENDER_NOT_REGISTERED, _P),
    "3107": CodeRule(ErrorCode.NOT_KAKAO_USER, _M),
    "3108": CodeRule(ErrorCode.OUTSIDE_SEND_WINDOW, _M),  # outside the 08:00-20:00 window
}
for _code in ("3040", "3041", "3042", "3043", "3044", "3045", "3046", "3047", "3050", "3051", "3056", "3057"):
    SOLAPI_CODES[_code] = CodeRule(ErrorCode.DELIVERY_FAILED, _M)

#: ``errorCode`` strings of HTTP 4xx bodies (``{errorCode, errorMessage}``).
SOLAPI_ERROR_CODES: dict[str, CodeRule] = {
    "InvalidAPIKey": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "InvalidAuthType": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "SignatureDoesNotMatch": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "RequestTimeTooSkewed": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "DuplicatedSignature": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "Unauthorized": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "Forbidden": CodeRule(ErrorCode.AUTHENTICATION_FAILED, _P),
    "NotEnoughBalance": CodeRule(ErrorCode.INSUFFICIENT_BALANCE, _P),
    "InsufficientBalance": CodeRule(ErrorCode.INSUFFICIENT_BALANCE, _P),
    # A malformed whole request is an adapter problem, not the message's: another provider may succeed.
    "ValidationError": CodeRule(ErrorCode.INVALID_REQUEST, _P),
    "BadRequest": CodeRule(ErrorCode.INVALID_REQUEST, _P),
    "RecipientsTooMany": CodeRule(ErrorCode.INVALID_REQUEST, _P),
    "TooManyRequests": CodeRule(ErrorCode.RATE_LIMIT_EXCEEDED, _P, retryable=True),
}

_TYPE_MAP: dict[MessageType, str] = {
    MessageType.SMS: "SMS",
    MessageType.LMS: "LMS",
    MessageType.MMS: "MMS",
    MessageType.ALIMTALK: "ATA",
    MessageType.FRIENDTALK: "CTA",
    MessageType.NSA: "NSA",
    MessageType.VOICE: "VOICE",
    MessageType.FAX: "FAX",
    MessageType.RCS_SMS: "RCS_SMS",
    MessageType.RCS_LMS: "RCS_LMS",
    MessageType.RCS_MMS: "RCS_MMS",
    MessageType.RCS_TPL: "RCS_TPL",
    MessageType.RCS_ITPL: "RCS_ITPL",
    MessageType.RCS_LTPL: "RCS_LTPL",
}
_RCS_TYPES = frozenset(t for t in MessageType if t.value.startswith("RCS_"))
_RCS_TEMPLATE_TYPES = frozenset({MessageType.RCS_TPL, MessageType.RCS_ITPL, MessageType.RCS_LTPL})
_NEEDS_FROM = frozenset({MessageType.SMS, MessageType.LMS, MessageType.MMS, MessageType.VOICE, MessageType.FAX})
_NEEDS_FROM |= _RCS_TYPES
_PLAIN_TYPES = frozenset({MessageType.SMS, MessageType.LMS})
_SUBJECT_TYPES = frozenset({MessageType.LMS, MessageType.MMS, MessageType.RCS_LMS, MessageType.RCS_MMS})
_TEXT_TYPES = frozenset({MessageType.SMS, MessageType.LMS, MessageType.MMS, MessageType.VOICE}) | (
    _RCS_TYPES - _RCS_TEMPLATE_TYPES
)
_BUTTON_KEYS = {
    "name": "buttonName",
    "type": "buttonType",
    "url_mobile": "linkMo",
    "url_pc": "linkPc",
    "scheme_android": "linkAnd",
    "scheme_ios": "linkIos",
    "chat_extra": "chatExtra",
    "chat_event": "chatEvent",
}


# -- authentication -------------------------------------------------------------------------------


def authorization_header(api_key: str, api_secret: str, *, date: str | None = None, salt: str | None = None) -> str:
    """Build Solapi's ``Authorization`` header value.

    Args:
        api_key: The API key (sent in clear as ``apiKey``).
        api_secret: The API secret (only used as the HMAC key, never sent).
        date: ISO 8601 time with offset; defaults to now in Korean time.
        salt: Random text; defaults to 32 fresh characters from ``[0-9a-zA-Z]``.

    Returns:
        ``HMAC-SHA256 apiKey=..., date=..., salt=..., signature=...``.
    """
    date = date or datetime.now(KST).isoformat(timespec="seconds")
    salt = salt or "".join(secrets.choice(_SALT_ALPHABET) for _ in range(32))
    signature = hmac.new(api_secret.encode("utf-8"), (date + salt).encode("utf-8"), hashlib.sha256).hexdigest()
    return f"HMAC-SHA256 apiKey={api_key}, date={date}, salt={salt}, signature={signature}"


# -- status ----------------------------------------------------------------------------------------


def map_status_code(code: object) -> DeliveryState:
    """Map a Solapi ``statusCode`` onto :class:`DeliveryState`.

    ``2000`` accepted, ``3000`` with the carrier, ``4000`` received; any other ``1xxx``/``2xxx``/``3xxx``
    is a failure; a missing or unrecognised code is UNKNOWN.
    """
    if code is None or code == "":
        return DeliveryState.UNKNOWN
    text = str(code).strip()
    if text == "2000":
        return DeliveryState.PENDING
    if text == "3000":
        return DeliveryState.SENT
    if text == "4000":
        return DeliveryState.DELIVERED
    if _STATUS_FAILED.match(text):
        return DeliveryState.FAILED
    return DeliveryState.UNKNOWN


def _parse_date(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Solapi's ISO dates carry "Z"; a bare local time is Korean time.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=KST)


def _pick(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = data.get(key)
        if value is not None:
            return value
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _stringify(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


#: Solapi's template buttons, field by field, onto the message's button fields.
_SOLAPI_BUTTON_KEYS = {
    "buttonType": "type",
    "buttonName": "name",
    "linkMo": "url_mobile",
    "linkPc": "url_pc",
    "linkIos": "scheme_ios",
    "linkAnd": "scheme_android",
}
#: The AlimTalk template list.
TEMPLATES_PATH = "/kakao/v2/templates"


def _template_variables(variables: Mapping[str, Any]) -> dict[str, str]:
    # Solapi wants template variables keyed as they appear in the template: "#{name}".
    out: dict[str, str] = {}
    for key, value in variables.items():
        wire_key = key if key.startswith("#{") and key.endswith("}") else f"#{{{key}}}"
        out[wire_key] = _stringify(value)
    return out


def _convert_buttons(buttons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for button in buttons:
        converted.append({_BUTTON_KEYS.get(k, k): v for k, v in button.items() if v is not None})
    return converted


@dataclass
class _Prepared:
    """One message in wire form, waiting for its send request."""

    index: int
    body: dict[str, Any]
    scheduled: str | None = None
    warnings: list[SendWarning] = field(default_factory=list)
    native_fallback: bool = False


_Uploads = dict[tuple[str, str, str | None], str | ProviderError]


@dataclass
class _Batch:
    """Per-call state: option values read once, upload results and normalised senders reused."""

    default_from: str | None
    default_country: str | None
    not_before: datetime
    uploads: _Uploads = field(default_factory=dict)
    senders: dict[str, str] = field(default_factory=dict)


class _MessageRejected(Exception):
    """Raised while building one message: that message fails, the rest of the batch goes on."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error


class SolapiProvider(HttpProvider):
    """Solapi API v4.

    Credentials: ``api_key``, ``api_secret`` (``KMSG_SOLAPI_API_KEY``/``KMSG_SOLAPI_API_SECRET``).
    Options: ``default_from`` (sender number), ``kakao_pf_id`` (Kakao channel id), ``rcs_brand_id``,
    ``naver_talk_id``, ``app_id`` (sent as ``agent.appId``), ``default_country`` (country code for
    numbers given without ``+``), ``batch_limit``, ``allow_duplicates`` (default true: a batch may
    legitimately hold two messages to one number), ``max_file_bytes`` (downloads for upload;
    default 5 MB) and the lookup bounds: ``lookup_max_pages`` (default 40 pages of 500 per search),
    ``lookup_slack_seconds`` (default 30, added to both ends of an attempt's window),
    ``lookup_max_recipient_queries`` (default 50: more recipients are searched with one window
    scan), ``lookup_window_seconds`` (default 900, only for ids looked up without a hint) and
    ``lookup_page_tries`` (default 3: a page is asked again after a retryable error).

    Args:
        config: This provider's settings.
        client: The process-wide ``httpx.Client``.
    """

    name: ClassVar[str] = "solapi"
    default_base_url = "https://api.solapi.com"
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset(_TYPE_MAP),
        bulk_limit=10_000,
        status_query=True,
        bulk_status=True,
        alimtalk_fallback="partial",
        balance=True,
        templates=False,
        file_upload=True,
        lookup_by_reference=True,
    )
    credential_keys: ClassVar[frozenset[str]] = frozenset({"api_key", "api_secret"})
    required_credentials: ClassVar[frozenset[str]] = frozenset({"api_key", "api_secret"})
    kakao_channel_option: ClassVar[str | None] = "kakao_pf_id"
    kakao_channel_keys: ClassVar[tuple[str, ...]] = ("profile_id", "profileId", "pf_id", "pfId")

    # -- HTTP ------------------------------------------------------------------------------------

    def _authorization(self) -> str:
        return authorization_header(self.config.secret("api_key"), self.config.secret("api_secret"))

    def _call(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        # A fresh date and salt for every request: Solapi refuses a reused signature for 15 minutes.
        response = self.request(
            method, self.url(path), headers={"Authorization": self._authorization()}, json=json, params=params
        )
        return self.decode_json(response)

    def alimtalk_templates(self) -> list[dict[str, Any]]:
        """Every AlimTalk template of the account, for ``kmsg templates sync``.

        ``GET /kakao/v2/templates`` (https://developers.solapi.com/references/kakao/templates/getTemplates),
        followed by ``startKey`` while the answer gives a ``nextKey``. ``status`` ``APPROVED`` is
        approved, ``REJECTED`` rejected, anything else (``PENDING``, ``INSPECTING``) in inspection.
        The channel is the template's ``channelId`` (``pfId`` in older answers).
        """
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 500}
        for _ in range(1000):  # bounded: a provider answering the same nextKey forever is a bug
            body = self._call("GET", TEMPLATES_PATH, params=params)
            found = body.get("templateList") if isinstance(body, Mapping) else None
            if isinstance(found, list):
                rows.extend(dict(r) for r in found if isinstance(r, Mapping))
            next_key = body.get("nextKey") if isinstance(body, Mapping) else None
            if not next_key or not found:
                break
            params = {"limit": 500, "startKey": next_key}
        approval = {"APPROVED": "approved", "REJECTED": "rejected"}
        return [
            alimtalk_template(
                code=row.get("templateId"),
                body=row.get("content"),
                name=row.get("name"),
                channel=row.get("channelId") or row.get("pfId") or "",
                approval=approval.get(str(row.get("status")), "inspecting"),
                provider_status=row.get("status"),
                buttons=row.get("buttons"),
                keys=_SOLAPI_BUTTON_KEYS,
            )
            for row in rows
            if row.get("templateId")
        ]

    def raise_for_status(self, response: httpx.Response) -> None:
        """Map Solapi's ``{errorCode, errorMessage}`` error bodies onto the taxonomy."""
        status = response.status_code
        if status < 400:
            return
        code: str | None = None
        text: str | None = None
        try:
            body = loads_json(response)
        except ValueError:
            body = None
        if isinstance(body, Mapping):
            code = str(body["errorCode"]) if body.get("errorCode") is not None else None
            raw_text = body.get("errorMessage") or body.get("message")
            text = str(raw_text) if raw_text is not None else None
        rule = SOLAPI_ERROR_CODES.get(code or "") or SOLAPI_CODES.get(code or "")
        if rule is None or status == 429 or status >= 500:
            raise self.http_error(response, provider_code=code, provider_message=text)
        raise self._error(rule, code, text, status_code=status)

    def _error(
        self, rule: CodeRule | None, code: str | None, text: str | None, *, status_code: int | None = None
    ) -> ProviderError:
        if rule is None:
            rule = CodeRule(ErrorCode.PROVIDER_ERROR, _P)
        cls = ProviderTransientError if rule.retryable else ProviderRejected
        where = f" (HTTP {status_code})" if status_code else ""
        return cls(
            f"{self.name}: {rule.code.value} [{code or 'no code'}]{where}",
            provider=self.name,
            code=rule.code,
            provider_code=code,
            provider_message=text,
            status_code=status_code,
            blame=rule.blame,
        )

    def _code_error(self, code: object, text: object) -> ProviderError:
        code_text = str(code) if code not in (None, "") else None
        return self._error(SOLAPI_CODES.get(code_text or ""), code_text, str(text) if text is not None else None)

    def _reject(self, text: str, *, blame: Blame = "message") -> _MessageRejected:
        return _MessageRejected(
            ProviderRejected(f"{self.name}: {text}", provider=self.name, code=ErrorCode.INVALID_REQUEST, blame=blame)
        )

    # -- send ------------------------------------------------------------------------------------

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        outcomes: list[SendOutcome | None] = [None] * len(messages)
        default_from = self.config.option("default_from")
        default_country = self.config.option("default_country")
        batch_ctx = _Batch(
            default_from=str(default_from) if default_from else None,
            default_country=str(default_country) if default_country else None,
            not_before=datetime.now(UTC) + timedelta(seconds=5),
        )
        groups: dict[str | None, list[_Prepared]] = {}
        for index, message in enumerate(messages):
            try:
                prepared = self._prepare(index, message, batch_ctx)
            except _MessageRejected as rejected:
                outcomes[index] = SendOutcome(message.id, False, state=DeliveryState.FAILED, error=rejected.error)
                continue
            groups.setdefault(prepared.scheduled, []).append(prepared)

        sent_any = False
        for scheduled, batch in groups.items():
            try:
                data = self._post_batch(batch, scheduled)
            except ProviderError as exc:
                if not sent_any:
                    raise
                # An earlier request of this batch was accepted: never fail the whole batch (that would
                # resend the accepted part); only this request's messages carry the error.
                state = DeliveryState.UNKNOWN if isinstance(exc, ProviderTimeout) else DeliveryState.FAILED
                for prepared in batch:
                    outcomes[prepared.index] = SendOutcome(messages[prepared.index].id, False, state=state, error=exc)
                continue
            sent_any = True
            self._apply_response(data, batch, messages, outcomes)
        return [o for o in outcomes if o is not None]

    def _post_batch(self, batch: Sequence[_Prepared], scheduled: str | None) -> Mapping[str, Any]:
        body: dict[str, Any] = {
            "messages": [p.body for p in batch],
            "allowDuplicates": self._allow_duplicates(),
            "showMessageList": True,
        }
        if scheduled:
            body["scheduledDate"] = scheduled
        app_id = self.config.option("app_id")
        if app_id:
            body["agent"] = {"appId": str(app_id)}
        response = self.request(
            "POST", self.url(SEND_PATH), headers={"Authorization": self._authorization()}, json=body
        )
        try:
            data = loads_json(response)
        except ValueError:
            data = None
        if not isinstance(data, Mapping):
            # The request was answered 2xx: Solapi may have accepted the messages. Reconcile, never resend.
            raise ProviderTimeout(
                f"{self.name}: unreadable send response (HTTP {response.status_code}); outcome unknown",
                provider=self.name,
                code=ErrorCode.OUTCOME_UNKNOWN,
                status_code=response.status_code,
            )
        return data

    def _allow_duplicates(self) -> bool:
        raw = self.config.option("allow_duplicates", True)
        if isinstance(raw, str):
            return raw.strip().lower() not in {"0", "false", "no", "off"}
        return bool(raw)

    def _apply_response(
        self,
        data: Mapping[str, Any],
        batch: Sequence[_Prepared],
        messages: Sequence[Message],
        outcomes: list[SendOutcome | None],
    ) -> None:
        info = data.get("groupInfo")
        group_id = info.get("groupId") if isinstance(info, Mapping) else None
        # Our id -> its prepared message; a second message with the same id (should not happen, but a
        # batch is never trusted to be unique) waits in ``extra``.
        pending: dict[str, _Prepared] = {}
        extra: dict[str, list[_Prepared]] = {}
        for prepared in batch:
            key = messages[prepared.index].id
            if key in pending:
                extra.setdefault(key, []).append(prepared)
            else:
                pending[key] = prepared
        unmatched: list[tuple[Mapping[str, Any], bool]] = []
        for accepted, entries in ((True, data.get("messageList")), (False, data.get("failedMessageList"))):
            for entry in entries or ():
                if not isinstance(entry, Mapping):
                    continue
                custom = entry.get("customFields")
                reference = custom.get(REFERENCE_FIELD) if isinstance(custom, Mapping) else None
                prepared_or_none = pending.pop(reference, None) if isinstance(reference, str) else None
                if prepared_or_none is None and reference in extra and extra[reference]:
                    prepared_or_none = extra[reference].pop(0)
                if prepared_or_none is None:
                    unmatched.append((entry, accepted))
                    continue
                outcomes[prepared_or_none.index] = self._outcome(
                    messages[prepared_or_none.index].id, prepared_or_none, entry, accepted, group_id
                )
        remaining = list(pending.values()) + [p for queue in extra.values() for p in queue]
        if len(remaining) == 1 and len(unmatched) == 1:
            # Only one candidate each way: safe to pair even without the echoed customFields.
            entry, accepted = unmatched[0]
            prepared = remaining[0]
            outcomes[prepared.index] = self._outcome(messages[prepared.index].id, prepared, entry, accepted, group_id)
            return
        for prepared in remaining:
            error = ProviderTimeout(
                f"{self.name}: the send response does not mention this message; outcome unknown",
                provider=self.name,
                code=ErrorCode.OUTCOME_UNKNOWN,
            )
            outcomes[prepared.index] = SendOutcome(
                messages[prepared.index].id, False, state=DeliveryState.UNKNOWN, error=error
            )

    def _outcome(
        self, message_id: str, prepared: _Prepared, entry: Mapping[str, Any], accepted: bool, group_id: object
    ) -> SendOutcome:
        provider_id = entry.get("messageId")
        raw = {
            "messageId": provider_id,
            "groupId": group_id,
            "statusCode": entry.get("statusCode"),
            "statusMessage": entry.get("statusMessage"),
        }
        if accepted:
            return SendOutcome(
                message_id,
                True,
                str(provider_id) if provider_id else None,
                DeliveryState.PENDING,
                None,
                prepared.warnings,
                prepared.native_fallback,
                raw,
            )
        error = self._code_error(entry.get("statusCode"), entry.get("statusMessage"))
        return SendOutcome(
            message_id, False, state=DeliveryState.FAILED, error=error, warnings=prepared.warnings, raw=raw
        )

    # -- building one message --------------------------------------------------------------------

    def _prepare(self, index: int, message: Message, ctx: _Batch) -> _Prepared:
        mtype = message.type
        to, country = self._recipient(message, ctx.default_country)
        body: dict[str, Any] = {"to": to, "type": _TYPE_MAP[mtype]}
        sender = message.sender or ctx.default_from
        if sender:
            wire_sender = ctx.senders.get(sender)
            if wire_sender is None:
                wire_sender = ctx.senders[sender] = self._local_number(sender)
            body["from"] = wire_sender
        elif mtype in _NEEDS_FROM:
            raise self._reject(f"{mtype.value} needs a sender: set 'sender' or KMSG_SOLAPI_DEFAULT_FROM")
        if country:
            body["country"] = country
        if message.text is not None and mtype in _TEXT_TYPES:
            body["text"] = message.text
        if message.subject and mtype in _SUBJECT_TYPES:
            body["subject"] = message.subject
        custom = message.custom_fields
        body["customFields"] = {**custom, REFERENCE_FIELD: message.id} if custom else {REFERENCE_FIELD: message.id}
        scheduled = message.scheduled_at
        prepared = _Prepared(index, body)
        if scheduled is not None and scheduled > ctx.not_before:
            # Our scheduler dispatches at the due time; only a time still ahead is worth handing to Solapi.
            prepared.scheduled = scheduled.astimezone(KST).isoformat(timespec="seconds")
        if mtype not in _PLAIN_TYPES:
            self._type_options(message, prepared, ctx.uploads)
        return prepared

    def _type_options(self, message: Message, prepared: _Prepared, uploads: _Uploads) -> None:
        mtype = message.type
        body = prepared.body
        if mtype is MessageType.MMS:
            assert message.media is not None  # normalize() guarantees it
            body["imageId"] = self._file_id(message.media, "MMS", None, uploads)
        elif mtype is MessageType.ALIMTALK:
            self._alimtalk(message, prepared)
        elif mtype is MessageType.FRIENDTALK:
            self._friendtalk(message, body, uploads)
        elif mtype is MessageType.NSA:
            self._naver(message, body)
        elif mtype is MessageType.VOICE:
            self._voice(message, body)
        elif mtype is MessageType.FAX:
            self._fax(message, body, uploads)
        else:
            self._rcs(message, body, uploads)

    def _recipient(self, message: Message, default_country: str | None) -> tuple[str, str | None]:
        country = message.country or default_country
        to = message.to
        if not to.startswith("+"):
            return to, str(country) if country else None
        if to.startswith("+82"):
            return _wire_recipient(to) or to, "82" if country else None
        # Solapi takes the national number plus a separate country code.
        digits = to[1:]
        if country and digits.startswith(str(country)):
            return digits[len(str(country)) :], str(country)
        raise self._reject("an international number needs 'country' (its calling code, e.g. '81')")

    @staticmethod
    def _local_number(number: str) -> str:
        number = number.strip()
        if number.startswith("+82"):
            return "0" + number[3:].lstrip("0")
        return re.sub(r"\D", "", number)

    def _kakao_pf_id(self, message: Message) -> str:
        pf_id = _pick(message.kakao, *self.kakao_channel_keys) or self.config.option("kakao_pf_id")
        if not pf_id:
            raise self._reject(
                f"{message.type.value} needs a Kakao channel: set kakao.profile_id or KMSG_SOLAPI_KAKAO_PF_ID"
            )
        return str(pf_id)

    def _kakao_buttons(self, message: Message) -> list[dict[str, Any]] | None:
        raw = message.kakao.get("buttons")
        if isinstance(raw, list) and raw:
            return list(raw)
        if message.buttons:
            return _convert_buttons(message.buttons)
        return None

    def _alimtalk(self, message: Message, prepared: _Prepared) -> None:
        body = prepared.body
        kakao = message.kakao
        options: dict[str, Any] = {"pfId": self._kakao_pf_id(message), "templateId": message.template_id}
        if message.variables:
            options["variables"] = _template_variables(message.variables)
        explicit = _pick(kakao, "disable_sms", "disableSms")
        failover = message.failover
        # Solapi's own SMS replacement costs money: on only when the caller asked for a failover.
        disable_sms = bool(explicit) if explicit is not None else True
        if failover is not None:
            disable_sms = not failover.enabled
        options["disableSms"] = disable_sms
        buttons = self._kakao_buttons(message)
        if buttons:
            options["buttons"] = buttons
        for src, dst in (("ad_flag", "adFlag"), ("image_id", "imageId")):
            value = _pick(kakao, src, dst)
            if value is not None:
                options[dst] = value
        body["kakaoOptions"] = options

        content = failover.content.strip() if failover and failover.enabled and failover.content else None
        if content:
            body["text"] = content
        elif message.text and not message.variables:
            # No variables: Solapi compares this text with the approved template itself.
            body["text"] = message.text
        if failover and failover.enabled and failover.title and failover.title.strip():
            body["subject"] = failover.title.strip()
        # Solapi replaces a failed AlimTalk by SMS/LMS itself whenever disableSms is false.
        prepared.native_fallback = not disable_sms
        if failover is not None and failover.enabled:
            mapped = ["kakao.disableSms"] + (["text"] if content else []) + (["subject"] if "subject" in body else [])
            prepared.warnings.append(
                SendWarning(
                    "FAILOVER_PARTIAL_PROVIDER",
                    "solapi sends the SMS/LMS replacement itself; it chooses SMS or LMS by length",
                    {"mappedFields": mapped, "unsupportedFields": ["fallbackChannel"]},
                )
            )

    def _friendtalk(
        self,
        message: Message,
        body: dict[str, Any],
        uploads: _Uploads,
    ) -> None:
        kakao = message.kakao
        if not (message.text and message.text.strip()):
            raise self._reject("FRIENDTALK needs a text")
        body["text"] = message.text
        options: dict[str, Any] = {"pfId": self._kakao_pf_id(message)}
        buttons = self._kakao_buttons(message)
        if buttons:
            options["buttons"] = buttons
        ad_flag = _pick(kakao, "ad_flag", "adFlag")
        if ad_flag is not None:
            options["adFlag"] = bool(ad_flag)
        image_id = _pick(kakao, "image_id", "imageId")
        if message.media is not None or image_id:
            body["type"] = "CTI"
            if image_id:
                options["imageId"] = str(image_id)
            else:
                assert message.media is not None
                link = _pick(kakao, "image_link", "imageLink")
                if link is None and buttons:
                    link = buttons[0].get("linkMo")
                needs_upload = bool(message.media.data_b64) or _is_url(message.media.ref or "")
                if needs_upload and not link:
                    # Kakao images are uploaded with the page they open; Solapi refuses them without it.
                    raise self._reject("a FRIENDTALK image needs kakao.image_link or a button with url_mobile")
                options["imageId"] = self._file_id(message.media, "KAKAO", link, uploads)
        body["kakaoOptions"] = options

    def _naver(self, message: Message, body: dict[str, Any]) -> None:
        naver = message.naver
        talk_id = _pick(naver, "talk_id", "talkId") or self.config.option("naver_talk_id")
        if not talk_id:
            raise self._reject("NSA needs a Naver talk id: set naver.talk_id or KMSG_SOLAPI_NAVER_TALK_ID")
        variables = {**message.variables, **_mapping(_pick(naver, "variables"))}
        options: dict[str, Any] = {
            "talkId": str(talk_id),
            "templateId": _pick(naver, "template_id", "templateId") or message.template_id,
        }
        if variables:
            options["variables"] = _template_variables(variables)
        disable_sms = _pick(naver, "disable_sms", "disableSms")
        options["disableSms"] = True if disable_sms is None else bool(disable_sms)
        buttons = _pick(naver, "buttons") or (_convert_buttons(message.buttons) if message.buttons else None)
        if buttons:
            options["buttons"] = buttons
        body["naverOptions"] = options

    @staticmethod
    def _voice(message: Message, body: dict[str, Any]) -> None:
        voice = message.voice
        options: dict[str, Any] = {"voiceType": _pick(voice, "voice_type", "voiceType") or "FEMALE"}
        for src, dst in (
            ("header_message", "headerMessage"),
            ("tail_message", "tailMessage"),
            ("reply_range", "replyRange"),
            ("counselor_number", "counselorNumber"),
        ):
            value = _pick(voice, src, dst)
            if value is not None:
                options[dst] = value
        body["voiceOptions"] = options

    def _fax(
        self,
        message: Message,
        body: dict[str, Any],
        uploads: _Uploads,
    ) -> None:
        fax = message.fax
        ids = [str(i) for i in (_pick(fax, "file_ids", "fileIds") or [])]
        for url in _pick(fax, "file_urls", "fileUrls") or []:
            ids.append(self._file_id(Media(ref=str(url)), "FAX", None, uploads))
        if not ids:
            raise self._reject("FAX needs fax.file_ids or fax.file_urls")
        body["faxOptions"] = {"fileIds": ids}

    def _rcs(
        self,
        message: Message,
        body: dict[str, Any],
        uploads: _Uploads,
    ) -> None:
        rcs = message.rcs
        brand_id = _pick(rcs, "brand_id", "brandId") or self.config.option("rcs_brand_id")
        if not brand_id:
            raise self._reject(f"{message.type.value} needs an RCS brand: set rcs.brand_id or KMSG_SOLAPI_RCS_BRAND_ID")
        options: dict[str, Any] = {"brandId": str(brand_id)}
        for src, dst in (
            ("copy_allowed", "copyAllowed"),
            ("mms_type", "mmsType"),
            ("commercial_type", "commercialType"),
            ("disable_sms", "disableSms"),
            ("buttons", "buttons"),
        ):
            value = _pick(rcs, src, dst)
            if value is not None:
                options[dst] = value
        options.setdefault("disableSms", True)
        variables = {**message.variables, **_mapping(_pick(rcs, "variables"))}
        if variables:
            options["variables"] = _template_variables(variables)
        if message.type in _RCS_TEMPLATE_TYPES:
            options["templateId"] = _pick(rcs, "template_id", "templateId") or message.template_id
        image_id: str | None = None
        if message.media is not None:
            image_id = self._file_id(message.media, "RCS", None, uploads)
            body["imageId"] = image_id
        extra = _pick(rcs, "additional_body", "additionalBody")
        if isinstance(extra, Mapping) or image_id:
            extra = extra if isinstance(extra, Mapping) else {}
            additional: dict[str, Any] = {
                "title": extra.get("title") or message.subject or "RCS",
                "description": extra.get("description") or message.text or "",
            }
            # Solapi's wire name really is misspelled "imaggeId" (SDK and API agree).
            extra_image = _pick(extra, "imaggeId", "image_id", "imageId") or image_id
            if extra_image:
                additional["imaggeId"] = extra_image
            if extra.get("buttons"):
                additional["buttons"] = extra["buttons"]
            options["additionalBody"] = additional
        body["rcsOptions"] = options

    # -- uploads ---------------------------------------------------------------------------------

    def _file_id(
        self,
        media: Media,
        kind: str,
        link: str | None,
        uploads: _Uploads,
    ) -> str:
        """Return a Solapi file id for ``media``, uploading it once per batch."""
        if media.ref and not _is_url(media.ref):
            return media.ref  # already a Solapi file id
        key = (kind, media.ref or f"b64:{hashlib.sha256((media.data_b64 or '').encode()).hexdigest()}", link)
        cached = uploads.get(key)
        if isinstance(cached, str):
            return cached
        if isinstance(cached, ProviderError):
            raise _MessageRejected(cached)
        try:
            file_id = self._upload(media, kind, link)
        except ProviderError as exc:
            error = exc
            if isinstance(exc, ProviderTimeout):
                # Nothing was sent: a lost upload answer needs no reconciliation, just a retry.
                error = ProviderTransientError(str(exc), provider=self.name, code=exc.code, status_code=exc.status_code)
            uploads[key] = error
            raise _MessageRejected(error) from exc
        uploads[key] = file_id
        return file_id

    def _upload(self, media: Media, kind: str, link: str | None) -> str:
        if media.data_b64:
            data_b64 = media.data_b64
            name = media.filename or _default_name(media.content_type)
        else:
            assert media.ref is not None
            data_b64 = self._download(media.ref)
            name = media.filename or unquote(urlsplit(media.ref).path.rsplit("/", 1)[-1]) or _default_name(None)
        body: dict[str, Any] = {"file": data_b64, "type": kind, "name": name}
        if link:
            body["link"] = link
        data = self._call("POST", UPLOAD_PATH, json=body)
        file_id = data.get("fileId") if isinstance(data, Mapping) else None
        if not file_id:
            raise ProviderTransientError(
                f"{self.name}: upload answered without a fileId",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
            )
        return str(file_id)

    def _download(self, url: str) -> str:
        import base64

        limit = int(self.config.option("max_file_bytes", 5 * 1024 * 1024))
        with map_transport_errors(self.name):
            # Image hosts and CDNs redirect; the shared client does not follow redirects by default.
            response = self.client.get(url, follow_redirects=True)
        if response.status_code >= 400:
            raise ProviderRejected(
                f"{self.name}: the file to upload could not be fetched (HTTP {response.status_code})",
                provider=self.name,
                code=ErrorCode.INVALID_REQUEST,
                blame="message",
            )
        if len(response.content) > limit:
            raise ProviderRejected(
                f"{self.name}: the file to upload is larger than {limit} bytes",
                provider=self.name,
                code=ErrorCode.INVALID_REQUEST,
                blame="message",
            )
        return base64.b64encode(response.content).decode("ascii")

    # -- status ----------------------------------------------------------------------------------

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        by_pmid: dict[str, list[StatusQuery]] = {}
        for query in queries:
            if query.provider_message_id:
                by_pmid.setdefault(query.provider_message_id, []).append(query)
        ids = list(by_pmid)
        reports: list[StatusReport] = []
        for start in range(0, len(ids), STATUS_CHUNK):
            chunk = ids[start : start + STATUS_CHUNK]
            params: dict[str, Any] = {"limit": len(chunk), "dateType": "CREATED"}
            if len(chunk) == 1:
                params["messageId"] = chunk[0]
            else:
                params["messageIds"] = chunk
            try:
                entries = self._list(params, wanted=len(chunk))
            except ProviderError:
                if start == 0:
                    raise
                # Keep what the earlier requests answered: the rest are "not known yet" and come
                # back in a later sweep, instead of the whole poll (up to ten requests) starting
                # over. Not asked again here: tracking backs a failing status API off on purpose.
                break
            for entry in entries:
                for query in by_pmid.get(str(entry.get("messageId")), ()):
                    reports.append(self._report(query.message_id, entry))
        return reports

    def _list_page(self, params: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], str | None]:
        """Read one page of ``/messages/v4/list``; returns its entries and the ``nextKey``."""
        data = self._call("GET", LIST_PATH, params=params)
        if not isinstance(data, Mapping):
            raise ProviderTransientError(
                f"{self.name}: list answer is not an object",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
            )
        # The list is an object keyed by message id; accept a plain array as well.
        listing = data.get("messageList") or {}
        values = listing.values() if isinstance(listing, Mapping) else listing
        next_key = data.get("nextKey")
        return [e for e in values if isinstance(e, Mapping)], str(next_key) if next_key else None

    def _list(self, params: Mapping[str, Any], *, wanted: int) -> list[Mapping[str, Any]]:
        """Read pages (``startKey`` <- ``nextKey``) until the list ends or ``wanted`` entries are read."""
        entries: list[Mapping[str, Any]] = []
        start_key: str | None = None
        for _ in range(wanted + 1):
            page, start_key = self._list_page({**params, "startKey": start_key} if start_key else params)
            entries.extend(page)
            if not start_key or len(entries) >= wanted or not page:
                break
        return entries

    def delivery_reports(self, payload: Any) -> list[tuple[str, StatusReport]]:
        """Solapi's message-report webhook: message objects as ``GET /messages/v4/list`` has them.

        Solapi posts the messages whose status changed (https://docs.solapi.com, "웹훅"): a JSON
        array of message objects (``messageId``, ``statusCode``, ``statusMessage``, ``dateSent``,
        ``dateCompleted`` ...); one object, or ``{"messageList": ...}`` as the list API answers, is
        taken as well. Each is read exactly as a status query's answer is (:meth:`_report`).
        """
        if isinstance(payload, Mapping) and "messageList" in payload:
            listing = payload["messageList"]
            payload = list(listing.values()) if isinstance(listing, Mapping) else listing
        entries = [payload] if isinstance(payload, Mapping) else payload
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and e.get("messageId") for e in entries):
            raise ProviderRejected(
                f"{self.name}: a delivery report is a list of message objects with a messageId",
                provider=self.name,
                code=ErrorCode.INVALID_REQUEST,
            )
        # Our own id travels in customFields: it tells a report that overtook our record of the send.
        return [(str(e["messageId"]), self._report(_reference(e), e)) for e in entries]

    def _report(self, message_id: str, entry: Mapping[str, Any]) -> StatusReport:
        code = entry.get("statusCode")
        code_text = str(code) if code not in (None, "") else None
        text = entry.get("statusMessage")
        state = map_status_code(code_text)
        completed = _parse_date(entry.get("dateCompleted") or entry.get("dateReceived"))
        not_kakao = state is DeliveryState.FAILED and (
            code_text in _NOT_KAKAO_CODES or (isinstance(text, str) and _NOT_KAKAO_TEXT in text)
        )
        raw = {k: v for k, v in entry.items() if k not in ("to", "from", "text", "subject")}
        return StatusReport(
            message_id,
            state,
            code=code_text,
            description=str(text) if text is not None else None,
            sent_at=_parse_date(entry.get("dateSent")),
            delivered_at=completed if state is DeliveryState.DELIVERED else None,
            failed_at=completed if state is DeliveryState.FAILED else None,
            not_kakao_user=not_kakao,
            raw=raw,
            opted_out=state is DeliveryState.FAILED
            and code_text is not None
            and code_text in SOLAPI_CODES
            and SOLAPI_CODES[code_text].code is ErrorCode.AD_OPTED_OUT,
        )

    # -- lookup by our id ------------------------------------------------------------------------

    def _lookup(self, message_ids: Sequence[str], hints: Mapping[str, LookupHint]) -> dict[str, SendOutcome]:
        wanted = list(dict.fromkeys(message_ids))
        if not wanted:
            return {}
        found: dict[str, SendOutcome] = {}
        undecided: list[str] = []
        max_pages = max(1, int(self.config.option("lookup_max_pages", 40)))
        tries = max(1, int(self.config.option("lookup_page_tries", 3)))
        for params, ids in self._lookup_searches(wanted, hints):
            pages = max_pages
            if "endDate" in params and "to" not in params:
                # A window scan for a bulk chunk reads the chunk's own messages too: they get their
                # pages on top of the bound (which is for everybody else's messages in the window).
                pages += -(-len(ids) // LIST_PAGE_LIMIT)
            if not self._lookup_scan(params, ids, found, pages, tries):
                undecided.extend(i for i in ids if i not in found)
        if undecided:
            raise ProviderLookupUndecided(
                f"{self.name}: lookup reached lookup_max_pages ({max_pages}) before the end of its search "
                f"for {len(undecided)} message(s); outcome still unknown",
                provider=self.name,
                found=found,
                undecided=undecided,
            )
        return found

    def _lookup_searches(
        self, wanted: Sequence[str], hints: Mapping[str, LookupHint]
    ) -> list[tuple[dict[str, Any], frozenset[str]]]:
        """Split a lookup into list queries, each as narrow as the hints allow.

        The list API filters on ``to``, ``from``, ``type`` and ``startDate``/``endDate`` but not
        on ``customFields`` (https://docs.solapi.com/api-reference/messages/getmessagelist and the
        SDK's ``GetMessagesRequest``). So: one query per recipient (a recipient gets a handful of
        messages in a few minutes: one page) while there are few recipients; one scan of the
        attempts' time window when there are many (a bulk chunk: about as many pages as the chunk
        has messages / 500); and for ids without a time, the old scan of the last
        ``lookup_window_seconds``.
        """
        now = datetime.now(UTC)
        slack = timedelta(seconds=float(self.config.option("lookup_slack_seconds", 30)))
        timed = [i for i in wanted if (h := hints.get(i)) is not None and h.attempted_at is not None]
        untimed = [i for i in wanted if i not in set(timed)]
        searches: list[tuple[dict[str, Any], frozenset[str]]] = []
        by_recipient: dict[tuple[str, str | None, str | None], list[str]] = {}
        windowed: list[str] = []
        for message_id in timed:
            hint = hints[message_id]
            to = _wire_recipient(hint.to)
            if to is None:
                windowed.append(message_id)
                continue
            key = (to, self._local_number(hint.sender) if hint.sender else None, _wire_type(hint.type))
            by_recipient.setdefault(key, []).append(message_id)
        max_recipients = int(self.config.option("lookup_max_recipient_queries", 50))
        if len(by_recipient) > max_recipients:
            windowed.extend(i for ids in by_recipient.values() for i in ids)
            by_recipient = {}
        for (to, sender, mtype), ids in by_recipient.items():
            params = self._window_params([hints[i] for i in ids], now, slack)
            params["to"] = to
            if sender:
                params["from"] = sender
            if mtype:
                params["type"] = mtype
            searches.append((params, frozenset(ids)))
        if windowed:
            group = [hints[i] for i in windowed]
            params = self._window_params(group, now, slack)
            senders = {self._local_number(h.sender) if h.sender else None for h in group}
            types = {_wire_type(h.type) for h in group}
            if len(senders) == 1 and None not in senders:
                params["from"] = senders.pop()
            if len(types) == 1 and None not in types:
                params["type"] = types.pop()
            searches.append((params, frozenset(windowed)))
        if untimed:
            window = float(self.config.option("lookup_window_seconds", 900))
            since = now - timedelta(seconds=window)
            params = {"dateType": "CREATED", "startDate": _kst(since), "limit": LIST_PAGE_LIMIT}
            searches.append((params, frozenset(untimed)))
        return searches

    @staticmethod
    def _window_params(hints: Sequence[LookupHint], now: datetime, slack: timedelta) -> dict[str, Any]:
        """``dateType=CREATED`` between the earliest start and the latest end of these attempts.

        ``slack`` on both sides covers the clock difference between us and Solapi and Solapi's own
        processing time; the end is never later than ``now + slack``.
        """
        starts = [h.attempted_at for h in hints if h.attempted_at is not None]
        ends = [min(h.attempt_ended_at or now, now) for h in hints]
        start = min(starts) - slack
        end = max([*ends, *starts]) + slack
        return {
            "dateType": "CREATED",
            "startDate": _kst(start),
            "endDate": _kst(end + timedelta(seconds=1)),
            "limit": LIST_PAGE_LIMIT,
        }

    def _lookup_scan(
        self,
        params: Mapping[str, Any],
        wanted: frozenset[str],
        found: dict[str, SendOutcome],
        max_pages: int,
        tries: int,
    ) -> bool:
        """Read pages of one search into ``found``; ``False`` when ``max_pages`` ran out first."""
        start_key: str | None = None
        for _ in range(max_pages):
            entries, start_key = self._lookup_page({**params, "startKey": start_key} if start_key else params, tries)
            for entry in entries:
                if entry.get("replacement") is True:
                    # Solapi's own SMS replacement of a failed AlimTalk: not a message we sent.
                    continue
                custom = entry.get("customFields")
                reference = custom.get(REFERENCE_FIELD) if isinstance(custom, Mapping) else None
                if reference in wanted and not (reference in found and found[str(reference)].accepted):
                    # A message sent twice shows up twice: an accepted copy wins over a refused one.
                    found[str(reference)] = self._lookup_outcome(str(reference), entry)
            if not start_key or not entries or wanted.issubset(found):
                return True
        return False

    def _lookup_page(self, params: Mapping[str, Any], tries: int) -> tuple[list[Mapping[str, Any]], str | None]:
        """One page of a lookup scan, asked again (up to ``tries`` times) after a retryable error.

        A scan reads every page of the window (thousands of messages after a large batch) and an
        error on any page costs the whole scan. Against a provider failing 40 % of requests, five
        pages all succeeded 8 % of the time and a bulk chunk's reconciliation went minutes without
        finishing; retrying the page keeps the pages already read.
        """
        for attempt in range(1, tries):
            try:
                return self._list_page(params)
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                # Retry-After when the provider gave one, a short backoff otherwise; never long
                # (the caller is a worker task).
                time.sleep(min(exc.retry_after or 0.2 * 2 ** (attempt - 1), _LOOKUP_PAGE_MAX_WAIT))
        return self._list_page(params)

    def _lookup_outcome(self, message_id: str, entry: Mapping[str, Any]) -> SendOutcome:
        code = entry.get("statusCode")
        state = map_status_code(code)
        raw = {k: entry.get(k) for k in ("messageId", "groupId", "statusCode", "statusMessage")}
        if str(code).startswith("1"):
            # Solapi keeps failed registrations in the list: they were refused, never sent.
            return SendOutcome(
                message_id,
                False,
                state=DeliveryState.FAILED,
                error=self._code_error(code, entry.get("statusMessage")),
                raw=raw,
            )
        return SendOutcome(message_id, True, provider_message_id=str(entry.get("messageId")), state=state, raw=raw)

    # -- registered senders ----------------------------------------------------------------------

    def registered_senders(self) -> frozenset[str] | None:
        """The account's sender numbers whose state is ``ACTIVE`` (``GET /senderid/v1/numbers``)."""
        data = self._call("GET", SENDERS_PATH)
        # Seen answered as a list, as {"senderIds": [...]} and as {"senderIdList": {id: {...}}}.
        items: Any = data
        if isinstance(data, Mapping):
            items = data.get("senderIds", data.get("senderIdList", []))
            if isinstance(items, Mapping):
                items = list(items.values())
        if not isinstance(items, list):
            raise ProviderTransientError(
                f"{self.name}: sender number list is not a list", provider=self.name, code=ErrorCode.PROVIDER_ERROR
            )
        numbers = set()
        for item in items:
            number = item.get("phoneNumber") if isinstance(item, Mapping) else item
            status = item.get("status", "ACTIVE") if isinstance(item, Mapping) else "ACTIVE"
            if isinstance(number, str) and str(status).upper() == "ACTIVE":
                numbers.add(re.sub(r"\D", "", number))
        return frozenset(numbers)

    # -- balance ---------------------------------------------------------------------------------

    def _balance(self) -> Balance:
        data = self._call("GET", BALANCE_PATH)
        if not isinstance(data, Mapping):
            raise ProviderTransientError(
                f"{self.name}: balance answer is not an object",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
            )
        for key in ("balance", "point"):
            value = data.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return Balance(amount=float(value), currency="KRW", raw=dict(data))
        raise ProviderTransientError(
            f"{self.name}: balance answer has no numeric balance",
            provider=self.name,
            code=ErrorCode.PROVIDER_ERROR,
        )


def _kst(moment: datetime) -> str:
    return moment.astimezone(KST).isoformat(timespec="seconds")


def _wire_recipient(to: str | None) -> str | None:
    """The ``to`` Solapi stores for a Korean number, or ``None`` when it cannot be derived."""
    if not to:
        return None
    to = to.strip()
    if to.startswith("+82"):
        return "0" + re.sub(r"\D", "", to[3:]).lstrip("0")
    if to.startswith("+"):
        # An international number is stored without its calling code, which the hint does not carry.
        return None
    return re.sub(r"\D", "", to) or None


def _wire_type(mtype: MessageType | None) -> str | None:
    return _TYPE_MAP.get(mtype) if mtype is not None else None


def _default_name(content_type: str | None) -> str:
    ext = {"image/png": "png", "image/gif": "gif", "application/pdf": "pdf"}.get(content_type or "", "jpg")
    return f"file.{ext}"


def _reference(entry: Mapping[str, Any]) -> str:
    """Our message id in a Solapi message object (``customFields.kmsgId``), or ``""``."""
    custom = entry.get("customFields")
    return str(custom.get(REFERENCE_FIELD) or "") if isinstance(custom, Mapping) else ""
