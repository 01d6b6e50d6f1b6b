"""IWINV adapter: Kakao AlimTalk and SMS v2 (SMS, LMS, MMS) on two hosts of one account.

The wire contract follows the API guide IWINV gives its customers in its console (it publishes no
public API reference). Choices made here:

* both base URLs are configurable: ``base_url`` (``KMSG_IWINV_BASE_URL``)
  addresses the AlimTalk host, and both hosts when ``sms_base_url`` is not set, which is how the
  fake server (one port for both APIs) is addressed;
* IWINV's paid SMS re-send (``reSend``) is only switched on when the message asks for failover,
  never just because a sender number is configured;
* every date sent to IWINV is formatted in Asia/Seoul explicitly, whatever the process's zone.

Batching: SMS v2 takes up to 1,000 numbers in ``to`` for one text, and AlimTalk's ``list`` takes
several recipients of one template, so messages that share everything but the recipient go out in
one request. A request never carries the same number twice (IWINV might collapse duplicates and we
would report a message as accepted that was never sent). MMS goes one recipient per request (the
multipart ``to`` field is a single number).

Partial failures: a refusal that IWINV blames on the content (bad template parameters, text too
long) comes back as ``accepted=False`` outcomes for that request's messages only; an AlimTalk list
refused for a per-recipient reason is split in halves and re-sent (nothing of a refused request
was accepted) so that one bad recipient does not sink the rest. Once a request fails on the
provider's side (auth, balance, 5xx, timeout), the remaining requests of the batch are not sent
and their messages carry the same error (a fresh retryable error after a timeout, so that only the
timed-out request is reconciled). :meth:`IwinvProvider.send_batch` raises only when no message was
accepted.

Status: in-progress rows map to ``PENDING`` (still at IWINV: AlimTalk without a past
``sendDate``, SMS ``00``/대기, or scheduled for later) or ``SENT`` (handed over: AlimTalk
전송중 with a past ``sendDate``, SMS ``01``/처리중).

Options (``KMSG_IWINV_<KEY>``): ``alimtalk_base_url``, ``sms_base_url``, ``sender_number``,
``sms_sender_number``, ``sms_company_id`` (needed by the SMS history API), ``send_endpoint``
(AlimTalk send path), ``x_forwarded_for``, ``batch_limit``. Secrets: ``api_key`` (AlimTalk,
required), ``sms_api_key`` and ``sms_auth_key`` (SMS v2).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

import httpx

from kmsg_worker.errors import (
    Blame,
    ErrorCode,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, MessageType, count_bytes
from kmsg_worker.pii import mask_phone
from kmsg_worker.providers.base import (
    Balance,
    Capabilities,
    DeliveryState,
    ProviderConfig,
    SendOutcome,
    SendWarning,
    StatusQuery,
    StatusReport,
    alimtalk_template,
)
from kmsg_worker.providers.base_http import (
    HttpProvider,
    encode_multipart,
    halts_batch,
    held_back,
    loads_json,
    parse_retry_after,
    raise_whole,
)

__all__ = [
    "ALIMTALK_ERRORS",
    "ALIMTALK_MESSAGES",
    "DEFAULT_ALIMTALK_BASE_URL",
    "DEFAULT_SMS_BASE_URL",
    "MMS_MAX_BYTES",
    "SMS_ERRORS",
    "SMS_MESSAGES",
    "ErrorRule",
    "IwinvProvider",
    "alimtalk_report_state",
    "image_filename",
    "seoul_datetime",
    "sms_report_state",
]

SEOUL = ZoneInfo("Asia/Seoul")
DEFAULT_ALIMTALK_BASE_URL = "https://alimtalk.bizservice.iwinv.kr"
DEFAULT_SMS_BASE_URL = "https://sms.bizservice.iwinv.kr"
DEFAULT_SEND_ENDPOINT = "/api/v2/send/"
SMS_SEND_PATH = "/api/v2/send/"
HISTORY_PATH = "/api/history/"
CHARGE_PATH = "/api/charge/"
TEMPLATE_PATH = "/api/template/"
#: IWINV's template buttons, field by field, onto the message's button fields.
_IWINV_BUTTON_KEYS = {
    "type": "type",
    "name": "name",
    "url_mobile": "url_mobile",
    "url_pc": "url_pc",
    "scheme_ios": "scheme_ios",
    "scheme_android": "scheme_android",
    "linkMo": "url_mobile",
    "linkPc": "url_pc",
    "linkIos": "scheme_ios",
    "linkAnd": "scheme_android",
}
#: IWINV refuses larger MMS images (SMS resultCode 31).
MMS_MAX_BYTES = 100 * 1024
#: SMS v2 ``to`` takes at most this many numbers (resultCode 44 beyond).
SMS_MAX_RECIPIENTS = 1000
#: The SMS history API refuses ranges longer than this.
HISTORY_MAX_DAYS = 90
#: A schedule closer than this is sent at once: a reservation for "now" may be refused as a past
#: time (SMS 42) by the time IWINV reads it, which would fail the message for nothing.
RESERVE_MIN_LEAD = timedelta(seconds=60)

_JSON = "application/json;charset=UTF-8"
_DATETIME = "%Y-%m-%d %H:%M:%S"
_SMS_TYPES = frozenset({MessageType.SMS, MessageType.LMS, MessageType.MMS})
_NON_DIGITS = re.compile(r"\D")
_PHONE_LIKE = re.compile(r"\+?\d[\d\-\s]{7,}\d")
_TITLE_MAX_CHARS = 20
_TITLE_MAX_BYTES = 40

Api = Literal["alimtalk", "sms"]


@dataclass(frozen=True)
class ErrorRule:
    """How one IWINV error code maps onto the taxonomy.

    Attributes:
        code: Normalised error code.
        blame: ``"message"`` (another provider would refuse it too) or ``"provider"``.
        kind: ``"rejected"`` (permanent), ``"transient"`` (retry later) or ``"rate_limited"``.
        label: Short English description used in the error text.
    """

    code: ErrorCode
    blame: Blame
    kind: Literal["rejected", "transient", "rate_limited"] = "rejected"
    label: str = ""


_AUTH = ErrorRule(ErrorCode.AUTHENTICATION_FAILED, "provider", label="authentication failed")
_BAD_REQUEST = ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="invalid request")
_TRANSIENT = ErrorRule(ErrorCode.PROVIDER_ERROR, "provider", "transient", label="provider error")

#: AlimTalk ``code`` -> taxonomy. 200 is success; codes absent here: >= 500 transient, else
#: refused as INVALID_REQUEST blamed on the provider (unknown meaning: let another provider try).
ALIMTALK_ERRORS: dict[int, ErrorRule] = {
    201: _AUTH,
    206: _AUTH,
    401: _AUTH,
    403: _AUTH,
    429: ErrorRule(ErrorCode.RATE_LIMIT_EXCEEDED, "provider", "rate_limited", label="rate limited"),
    519: ErrorRule(ErrorCode.INSUFFICIENT_BALANCE, "provider", label="insufficient balance"),
    404: ErrorRule(ErrorCode.TEMPLATE_NOT_FOUND, "message", label="template not found"),
    501: ErrorRule(ErrorCode.TEMPLATE_NOT_FOUND, "message", label="template not found"),
    505: ErrorRule(ErrorCode.SENDER_NOT_REGISTERED, "provider", label="sender number not registered"),
    **{c: _BAD_REQUEST for c in range(502, 518) if c != 505},
    540: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="blocked keyword"),
    518: _TRANSIENT,
}

#: Built-in AlimTalk texts, used when the answer carries none.
ALIMTALK_MESSAGES: dict[int, str] = {
    200: "발송 요청 성공",
    206: "허용되지 않은 IP",
    401: "인증 실패",
    501: "템플릿 코드 오류",
    505: "등록되지 않은 발신번호",
    508: "템플릿 변수(templateParam) 필요",
    519: "잔액 부족",
    540: "차단 키워드 포함",
}

#: SMS v2 ``resultCode`` -> taxonomy. 0 is success; codes absent here are transient.
SMS_ERRORS: dict[int, ErrorRule] = {
    11: ErrorRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, "provider", "transient", label="service not running"),
    12: ErrorRule(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, "provider", "transient", label="account recharging"),
    13: ErrorRule(ErrorCode.SENDER_NOT_REGISTERED, "provider", label="sender number not registered"),
    14: _AUTH,
    15: _AUTH,
    202: _AUTH,
    206: _AUTH,
    21: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="text too long"),
    22: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="invalid title characters"),
    23: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="title too long"),
    31: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="image too large"),
    32: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="image type not allowed"),
    33: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="image upload failed"),
    41: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="recipient missing"),
    42: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="invalid reservation time"),
    43: ErrorRule(ErrorCode.INVALID_REQUEST, "message", label="invalid date format"),
    # Too many recipients in one request: our batching is wrong, not the message.
    44: ErrorRule(ErrorCode.INVALID_REQUEST, "provider", label="too many recipients"),
    50: ErrorRule(ErrorCode.INSUFFICIENT_BALANCE, "provider", label="insufficient balance"),
}

#: Built-in SMS v2 texts, used when the answer carries none.
SMS_MESSAGES: dict[int, str] = {
    0: "전송 성공",
    1: "미발송",
    11: "서비스 운영 중이 아님",
    12: "충전 처리 중",
    13: "등록되지 않은 발신번호",
    14: "인증 정보 오류",
    15: "등록되지 않은 IP",
    21: "LMS 본문은 2000바이트 이하",
    22: "제목에 사용할 수 없는 문자",
    23: "제목은 40바이트 이하",
    31: "첨부 파일은 100KB 이하",
    32: "허용되지 않는 파일 확장자",
    33: "파일 업로드 실패",
    41: "수신번호 없음",
    42: "예약 시간 오류",
    43: "날짜 형식 오류",
    44: "1회 최대 1000건까지 발송 가능",
    50: "자동 충전 한도 초과",
    202: "SMS 인증 또는 권한 오류",
    206: "허용되지 않은 IP",
}

#: AlimTalk codes that can concern a single recipient (its ``templateParam``): a multi-recipient
#: request refused with one of them is split to find the culprit instead of failing everyone.
_ALIMTALK_PER_RECIPIENT = frozenset({*range(502, 518), 540} - {505})
#: Kakao agent codes meaning "cannot receive AlimTalk" (Kakao's AlimTalk result codes), should IWINV pass
#: them through; IWINV's own history says it in words (카카오 ... 미사용).
_KAKAO_NO_USER_CODES = frozenset({"3018", "3019", "3020"})
_PENDING_WORDS = ("대기", "처리중", "처리 중", "전송중", "전송 중", "발송중", "발송 중", "접수")

_EXT_BY_TYPE = {"image/png": ".png", "image/gif": ".gif", "image/webp": ".webp", "image/jpeg": ".jpg"}
_TYPE_BY_EXT = {
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}


# -- small helpers ------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _sms_secret(credentials: Mapping[str, str]) -> str | None:
    api, auth, main = (
        credentials.get("sms_api_key"),
        credentials.get("sms_auth_key"),
        credentials.get("api_key"),
    )
    if api and auth:
        return _b64(f"{api}&{auth}")
    if (auth or api) and main:
        # Legacy accounts: the AlimTalk key stands in for the missing SMS API key.
        return _b64(f"{main}&{auth or api}")
    return None


def _aware(value: datetime) -> datetime:
    """Naive datetimes are Asia/Seoul (the project's zone for naive input)."""
    return value.replace(tzinfo=SEOUL) if value.tzinfo is None else value


def seoul_datetime(value: datetime) -> str:
    """Format ``value`` as IWINV's ``yyyy-MM-dd HH:mm:ss`` in Asia/Seoul."""
    return _aware(value).astimezone(SEOUL).strftime(_DATETIME)


def _seoul_date(value: datetime) -> date:
    return _aware(value).astimezone(SEOUL).date()


def _parse_seoul(value: object) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return datetime.strptime(value.strip()[:19], _DATETIME).replace(tzinfo=SEOUL).astimezone(UTC)
    except ValueError:
        return None


def _wire_phone(number: object) -> str:
    """IWINV wants domestic digits only: ``+82 10-1234-5678`` -> ``01012345678``."""
    if not isinstance(number, str):
        return ""
    text = number.strip()
    if text.startswith("+82"):
        return "0" + _NON_DIGITS.sub("", text[3:]).lstrip("0")
    return _NON_DIGITS.sub("", text)


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
    return None


def _id_text(value: object) -> str | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    return str(value)


def _mask(text: str) -> str:
    """Vendor texts may quote a number; errors must never carry one unmasked."""
    return _PHONE_LIKE.sub(lambda m: mask_phone(_NON_DIGITS.sub("", m.group(0))), text)


def _yes_no(value: object, name: str) -> str:
    if value is True or value is False:
        return "Y" if value else "N"
    if isinstance(value, str) and value.strip().upper() in ("Y", "N"):
        return value.strip().upper()
    raise _refusal(f"provider_options.{name} must be 'Y' or 'N'")


def _refusal(text: str, *, code: ErrorCode = ErrorCode.INVALID_REQUEST, blame: Blame = "message") -> ProviderRejected:
    return ProviderRejected(f"iwinv: {text}", provider="iwinv", code=code, blame=blame)


def _title(subject: str | None, text: str) -> str:
    """LMS/MMS title: the subject, else the start of the first line (at most 20 chars, 40 bytes)."""
    if subject and subject.strip():
        return subject.strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    title = ""
    for ch in first[:_TITLE_MAX_CHARS]:
        if count_bytes(title + ch) > _TITLE_MAX_BYTES:
            break
        title += ch
    return title


def _sniff_extension(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    return None


def image_filename(filename: str | None, content_type: str | None, data: bytes) -> tuple[str, str]:
    """Return ``(filename, content_type)`` for an MMS image part.

    A name without an extension gets one from the bytes themselves, else from the declared
    content type, else ``.jpg``; the content type is the declared one, else derived from the
    extension, else ``application/octet-stream``.
    """
    name = (filename or "").strip() or "image"
    ext = os.path.splitext(name)[1].lower()
    if not ext:
        ext = _sniff_extension(data) or _EXT_BY_TYPE.get((content_type or "").lower()) or ".jpg"
        name += ext
    return name, content_type or _TYPE_BY_EXT.get(ext, "application/octet-stream")


def _pick(items: object, key: str, wanted: str, phone: str) -> Mapping[str, Any] | None:
    """Choose the history row of our message: same id and number, never another message's row."""
    if not isinstance(items, list):
        return None
    rows = [r for r in items if isinstance(r, Mapping)]
    if any(r.get(key) is not None for r in rows):
        rows = [r for r in rows if str(r.get(key)) == wanted]
    if phone and any(r.get("phone") for r in rows):
        rows = [r for r in rows if _same_phone(r.get("phone"), phone)]
    return rows[0] if rows else None


def _same_phone(listed: object, phone: str) -> bool:
    if not isinstance(listed, str):
        return False
    if "*" in listed:
        # History may mask the middle digits; the id already matched, the tail decides.
        return _NON_DIGITS.sub("", listed)[-4:] == phone[-4:]
    return _wire_phone(listed) == phone


def _in_progress(scheduled_at: datetime | None, now: datetime, handed_over: bool) -> DeliveryState:
    if scheduled_at is not None and _aware(scheduled_at) > now:
        return DeliveryState.PENDING
    return DeliveryState.SENT if handed_over else DeliveryState.PENDING


def alimtalk_report_state(item: Mapping[str, Any], now: datetime) -> DeliveryState:
    """Map one AlimTalk history row to a state.

    ``statusCode == "OK"`` or a name containing 성공 is DELIVERED. A name saying it is waiting or
    in progress is SENT once ``sendDate`` has passed, PENDING before. Otherwise a past
    ``sendDate`` means IWINV processed it without success: FAILED. No (or a future) ``sendDate``:
    PENDING (not yet handed to Kakao).
    """
    code = str(item.get("statusCode") or "").strip()
    name = str(item.get("statusCodeName") or "").strip()
    sent = _parse_seoul(item.get("sendDate"))
    if code.upper() == "OK" or "성공" in name:
        return DeliveryState.DELIVERED
    passed = sent is not None and sent <= now
    if any(word in name for word in _PENDING_WORDS):
        return DeliveryState.SENT if passed else DeliveryState.PENDING
    return DeliveryState.FAILED if passed else DeliveryState.PENDING


def sms_report_state(item: Mapping[str, Any]) -> DeliveryState:
    """Map one SMS v2 history row to a state.

    ``06``/``1000`` or 전송 성공: DELIVERED. 대기 or ``00``: PENDING (waiting at IWINV). 처리중
    or ``01``: SENT (with the carrier, no report yet). No code and no text: UNKNOWN. Anything
    else: FAILED.
    """
    code = str(item.get("sendStatusCode") or "").strip()
    text = str(item.get("sendStatusMsg") or item.get("sendStatus") or "").strip()
    if code in ("06", "1000") or "전송 성공" in text:
        return DeliveryState.DELIVERED
    if "대기" in text or code == "00":
        return DeliveryState.PENDING
    if "처리중" in text or "처리 중" in text or code == "01":
        return DeliveryState.SENT
    if not code and not text:
        return DeliveryState.UNKNOWN
    return DeliveryState.FAILED


def _not_kakao_user(code: str, text: str) -> bool:
    joined = f"{code} {text}"
    return ("카카오" in joined and "미사용" in joined) or code in _KAKAO_NO_USER_CODES


@dataclass
class _Job:
    """One HTTP request to make: shared fields plus the recipients (message index, wire entry)."""

    api: Api
    common: dict[str, Any]
    items: list[tuple[int, Any]] = field(default_factory=list)
    phones: set[str] = field(default_factory=set)
    image: tuple[str, bytes, str] | None = None
    reserved: bool = False
    native_fallback: bool = False

    def halves(self) -> tuple[_Job, _Job]:
        mid = len(self.items) // 2
        return replace(self, items=self.items[:mid]), replace(self, items=self.items[mid:])


def _outcome_for_error(message_id: str, error: ProviderError) -> SendOutcome:
    state = DeliveryState.UNKNOWN if isinstance(error, ProviderTimeout) else DeliveryState.FAILED
    return SendOutcome(message_id, False, state=state, error=error)


class IwinvProvider(HttpProvider):
    """IWINV AlimTalk + SMS v2 adapter.

    Args:
        config: Settings; ``credentials['api_key']`` is required, the SMS keys enable SMS types.
        client: The process-wide ``httpx.Client``.
        clock: Current time (aware); tests pass a fixed one.

    Raises:
        ConfigurationError: ``api_key`` is missing.
    """

    name: ClassVar[str] = "iwinv"
    default_base_url = DEFAULT_ALIMTALK_BASE_URL
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset(_SMS_TYPES | {MessageType.ALIMTALK}),
        bulk_limit=SMS_MAX_RECIPIENTS,
        # No send_batch_limit, although requests run through the window: personalised SMS and MMS
        # are one request per message here, so a call larger than one request's 1,000 would
        # multiply the requests a chunk waits for (and its time under the chunk task's limit)
        # while those requests, not the per-chunk work, bound the rate.
        status_query=True,
        bulk_status=False,
        alimtalk_fallback="full",
        balance=True,
        templates=True,
        file_upload=False,
        lookup_by_reference=False,
    )
    credential_keys: ClassVar[frozenset[str]] = frozenset({"api_key", "sms_api_key", "sms_auth_key"})
    required_credentials: ClassVar[frozenset[str]] = frozenset({"api_key"})

    def __init__(
        self, config: ProviderConfig, client: httpx.Client, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        super().__init__(config, client)
        self.alimtalk_base_url = str(
            config.base_url or config.option("alimtalk_base_url") or DEFAULT_ALIMTALK_BASE_URL
        ).rstrip("/")
        self.sms_base_url = str(config.option("sms_base_url") or config.base_url or DEFAULT_SMS_BASE_URL).rstrip("/")
        self.base_url = self.alimtalk_base_url
        self.send_endpoint = str(config.option("send_endpoint") or DEFAULT_SEND_ENDPOINT)
        self._clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        extra: dict[str, str] = {}
        forwarded = config.option("x_forwarded_for")
        if forwarded:
            extra["X-Forwarded-For"] = str(forwarded)
        self._alimtalk_headers = {"AUTH": _b64(config.secret("api_key")), "Content-Type": _JSON, **extra}
        secret = _sms_secret(config.credentials)
        self._sms_form_headers: dict[str, str] | None = {"secret": secret, **extra} if secret else None
        self._sms_json_headers: dict[str, str] | None = (
            {**self._sms_form_headers, "Content-Type": _JSON} if self._sms_form_headers else None
        )

    def __repr__(self) -> str:
        return f"<IwinvProvider name={self.name!r} alimtalk={self.alimtalk_base_url!r} sms={self.sms_base_url!r}>"

    # -- capability ---------------------------------------------------------------------------------

    @property
    def sms_enabled(self) -> bool:
        """Whether the SMS v2 secret can be built (both SMS keys, or the legacy one-key form)."""
        return self._sms_json_headers is not None

    def supports(self, mtype: MessageType) -> bool:
        """SMS, LMS and MMS only when the SMS v2 keys are configured; AlimTalk always."""
        if mtype in _SMS_TYPES and not self.sms_enabled:
            return False
        return super().supports(mtype)

    def send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        """Send up to :attr:`send_batch_limit` messages in as few requests as IWINV allows.

        Raises:
            ProviderRejected: An SMS type without the SMS v2 keys configured (``UNSUPPORTED``).
            ProviderError: Every request failed; no message is known to be accepted.
        """
        if not self.sms_enabled and any(m.type in _SMS_TYPES for m in messages):
            raise ProviderRejected(
                "iwinv: SMS, LMS and MMS need the SMS v2 keys; set KMSG_IWINV_SMS_API_KEY and "
                "KMSG_IWINV_SMS_AUTH_KEY (only AlimTalk is configured)",
                provider=self.name,
                code=ErrorCode.UNSUPPORTED,
                blame="provider",
            )
        return super().send_batch(messages)

    # -- sending -----------------------------------------------------------------------------------

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        outcomes: list[SendOutcome | None] = [None] * len(messages)
        jobs = self._plan(messages, outcomes)
        # Independent requests (one per SMS text, per MMS, per AlimTalk template): up to
        # max_in_flight at once; each writes only its own messages' outcomes.
        calls = [partial(self._run, job, messages, outcomes) for job in jobs]
        results = self.send_requests(calls, halts=halts_batch)
        failure: ProviderError | None = None
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, ProviderError):
                self._settle(job, messages, outcomes, result)
                if failure is None and halts_batch(result):
                    failure = result
        if failure is not None:
            # Not started after it: never left, so neither "maybe accepted" nor an attempt spent.
            never_left = held_back(failure)
            for job, result in zip(jobs, results, strict=True):
                if result is None:
                    self._settle(job, messages, outcomes, never_left)
        final = [o for o in outcomes if o is not None]
        if failure is not None and raise_whole(final, failure):
            raise failure
        return final

    @staticmethod
    def _settle(
        job: _Job, messages: Sequence[Message], outcomes: list[SendOutcome | None], error: ProviderError
    ) -> None:
        for index, _ in job.items:
            if outcomes[index] is None:
                outcomes[index] = _outcome_for_error(messages[index].id, error)

    def _plan(self, messages: Sequence[Message], outcomes: list[SendOutcome | None]) -> list[_Job]:
        now = self._clock()
        limit = self.batch_limit
        open_jobs: dict[tuple[Any, ...], _Job] = {}
        # Bulk sends repeat one text thousands of times: build its shared fields once.
        shared: dict[tuple[Any, ...], tuple[tuple[Any, ...], _Job]] = {}
        jobs: list[_Job] = []
        for index, message in enumerate(messages):
            entry: Any
            try:
                if message.type is MessageType.MMS:
                    jobs.append(self._mms_job(index, message, now))
                    continue
                phone = entry = self._recipient_phone(message)
                if message.type is MessageType.ALIMTALK:
                    template, entry = self._alimtalk_job(message, phone, now)
                    key = ("alimtalk", *sorted(template.common.items()))
                else:
                    key, template = self._sms_template(message, now, shared)
            except ProviderRejected as exc:
                outcomes[index] = _outcome_for_error(message.id, exc)
                continue
            current = open_jobs.get(key)
            if current is None or len(current.items) >= limit or phone in current.phones:
                current = replace(template, items=[], phones=set())
                open_jobs[key] = current
                jobs.append(current)
            current.items.append((index, entry))
            current.phones.add(phone)
        return jobs

    def _recipient_phone(self, message: Message) -> str:
        phone = _wire_phone(message.to)
        if not phone:
            raise _refusal("the recipient number is empty", code=ErrorCode.INVALID_RECIPIENT)
        return phone

    def _reserve_at(self, message: Message, now: datetime) -> datetime | None:
        if message.scheduled_at is None:
            return None
        when = _aware(message.scheduled_at)
        return when if when > now + RESERVE_MIN_LEAD else None

    def _alimtalk_job(self, message: Message, phone: str, now: datetime) -> tuple[_Job, dict[str, Any]]:
        if not message.template_id:
            raise _refusal("ALIMTALK needs a template code (template_id)")
        resend, native = self._resend_fields(message)
        common: dict[str, Any] = {"templateCode": message.template_id, **resend}
        when = self._reserve_at(message, now)
        if when is not None:
            common.update(reserve="Y", sendDate=seoul_datetime(when))
        else:
            common["reserve"] = "N"
        entry = {"phone": phone, "templateParam": self._template_params(message)}
        return _Job("alimtalk", common, reserved=when is not None, native_fallback=native), entry

    @staticmethod
    def _template_params(message: Message) -> list[str]:
        given = message.provider_options.get("templateParam")
        if given is None:
            # Variables keep the caller's insertion order, which is the template's order.
            return ["" if v is None else str(v) for v in message.variables.values()]
        if not isinstance(given, (list, tuple)):
            raise _refusal("provider_options.templateParam must be a list of strings in template order")
        return ["" if v is None else str(v) for v in given]

    def _resend_fields(self, message: Message) -> tuple[dict[str, Any], bool]:
        options = message.provider_options
        failover = message.failover
        if options.get("reSend") is not None:
            resend = _yes_no(options["reSend"], "reSend")
        else:
            # Only on request: IWINV's re-send is a paid SMS (turning it on whenever a sender
            # number exists would bill an SMS for every failed AlimTalk).
            resend = "Y" if failover is not None and failover.enabled else "N"
        if resend == "N":
            return {"reSend": "N"}, False
        callback = (
            _wire_phone(options.get("resendCallback"))
            or _wire_phone(message.sender)
            or _wire_phone(self.config.option("sender_number"))
            or _wire_phone(self.config.option("sms_sender_number"))
        )
        if not callback:
            raise _refusal(
                "reSend is 'Y' but there is no callback number: give the message a sender or "
                "provider_options.resendCallback, or set KMSG_IWINV_SENDER_NUMBER"
            )
        content = options.get("resendContent") or (failover.content if failover and failover.content else None)
        title = options.get("resendTitle") or (failover.title if failover and failover.title else None)
        fields: dict[str, Any] = {"reSend": "Y", "resendCallback": callback}
        if options.get("resendType") is not None:
            fields["resendType"] = _yes_no(options["resendType"], "resendType")
        else:
            # IWINV's meaning: Y re-sends the AlimTalk text itself, N sends resendContent.
            fields["resendType"] = "N" if content and str(content).strip() else "Y"
        if fields["resendType"] == "N" and not (content and str(content).strip()):
            raise _refusal("resendType 'N' needs a fallback text (failover.content or resendContent)")
        if content and str(content).strip():
            fields["resendContent"] = str(content).strip()
        if title and str(title).strip():
            fields["resendTitle"] = str(title).strip()
        return fields, True

    def _sms_sender(self, message: Message) -> str:
        sender = (
            _wire_phone(message.sender)
            or _wire_phone(self.config.option("sms_sender_number"))
            or _wire_phone(self.config.option("sender_number"))
        )
        if not sender:
            raise _refusal(
                "no sender number: give the message a sender or set KMSG_IWINV_SMS_SENDER_NUMBER",
                blame="provider",
            )
        return sender

    def _text_fields(self, message: Message, now: datetime) -> tuple[dict[str, Any], bool]:
        text = message.text or ""
        if not text.strip():
            raise _refusal(f"{message.type.value} needs a non-empty text")
        common: dict[str, Any] = {"version": "1.0", "from": self._sms_sender(message), "text": text}
        if message.type is MessageType.SMS:
            common["msgType"] = str(message.provider_options.get("msgType") or "SMS")
        else:
            common["title"] = _title(message.subject, text)
        when = self._reserve_at(message, now)
        if when is not None:
            common["date"] = seoul_datetime(when)
        return common, when is not None

    def _sms_template(
        self, message: Message, now: datetime, shared: dict[tuple[Any, ...], tuple[tuple[Any, ...], _Job]]
    ) -> tuple[tuple[Any, ...], _Job]:
        signature = (
            message.type,
            message.sender,
            message.text,
            message.subject,
            str(message.provider_options.get("msgType")),
            message.scheduled_at,
        )
        found = shared.get(signature)
        if found is None:
            common, reserved = self._text_fields(message, now)
            found = shared[signature] = (
                ("sms", *sorted(common.items())),
                _Job("sms", common, reserved=reserved),
            )
        return found

    def _mms_job(self, index: int, message: Message, now: datetime) -> _Job:
        phone = self._recipient_phone(message)
        media = message.media
        if media is None:
            raise _refusal("MMS needs an image")
        if not media.data_b64:
            raise _refusal(
                "IWINV uploads MMS images as bytes only and does not fetch URLs; give media bytes "
                "(data_b64) or route this MMS to a provider that accepts image URLs",
                code=ErrorCode.UNSUPPORTED,
                blame="provider",
            )
        try:
            data = base64.b64decode(media.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise _refusal("media.data_b64 is not valid base64") from None
        if not data:
            raise _refusal("the MMS image is empty")
        if len(data) > MMS_MAX_BYTES:
            raise _refusal(f"MMS image is {len(data)} bytes; IWINV takes at most {MMS_MAX_BYTES} (100 KB)")
        common, reserved = self._text_fields(message, now)
        filename, content_type = image_filename(media.filename, media.content_type, data)
        return _Job("sms", common, [(index, phone)], {phone}, (filename, data, content_type), reserved)

    def _run(self, job: _Job, messages: Sequence[Message], outcomes: list[SendOutcome | None]) -> bool:
        try:
            body = self._post_job(job)
        except ProviderRejected as exc:
            if not self._worth_splitting(job, exc):
                raise
            # Nothing of a refused request was accepted, so its halves can be retried safely.
            for half in job.halves():
                try:
                    self._run(half, messages, outcomes)
                except ProviderRejected as inner:
                    if inner.blame != "message":
                        raise
                    self._settle(half, messages, outcomes, inner)
            return True
        self._accept(job, body, messages, outcomes)
        return True

    @staticmethod
    def _worth_splitting(job: _Job, exc: ProviderRejected) -> bool:
        if job.api != "alimtalk" or len(job.items) < 2 or exc.blame != "message":
            return False
        if _as_int(exc.provider_code) not in _ALIMTALK_PER_RECIPIENT:
            return False
        return len({tuple(entry["templateParam"]) for _, entry in job.items}) > 1

    def _post_job(self, job: _Job) -> dict[str, Any]:
        if job.api == "alimtalk":
            payload = {**job.common, "list": [entry for _, entry in job.items]}
            return self._call("alimtalk", self.url(self.send_endpoint, self.alimtalk_base_url), json=payload, send=True)
        url = self.url(SMS_SEND_PATH, self.sms_base_url)
        if job.image is not None:
            form = {**job.common, "to": job.items[0][1]}
            fields = {name: str(value) for name, value in form.items()}
            return self._call("sms", url, form=encode_multipart(fields, {"image": job.image}), send=True)
        return self._call("sms", url, json={**job.common, "to": [phone for _, phone in job.items]}, send=True)

    def _accept(
        self,
        job: _Job,
        body: Mapping[str, Any],
        messages: Sequence[Message],
        outcomes: list[SendOutcome | None],
    ) -> None:
        warnings: list[SendWarning] = []
        if job.api == "alimtalk":
            pmid = _id_text(body.get("seqNo"))
            total, fail, success = (
                len(job.items),
                _as_int(body.get("fail")) or 0,
                _as_int(body.get("success")),
            )
            if fail >= total and not success:
                error = ProviderRejected(
                    f"iwinv alimtalk: IWINV took the request but refused its {total} recipient(s)",
                    provider=self.name,
                    code=ErrorCode.INVALID_RECIPIENT,
                    provider_code="200",
                    provider_message=_mask(str(body.get("message") or "")) or None,
                    blame="message",
                )
                self._settle(job, messages, outcomes, error)
                return
            if fail:
                # The answer only counts failures; history will tell which recipient it was.
                warnings.append(
                    SendWarning(
                        "IWINV_PARTIAL_ACCEPTANCE",
                        f"IWINV refused {fail} of {total} recipients of this request; tracking will show which",
                        {"success": success, "fail": fail, "seqNo": pmid},
                    )
                )
        else:
            pmid = _id_text(body.get("requestNo")) or _id_text(body.get("msgid"))
        state = DeliveryState.PENDING if job.reserved else DeliveryState.SENT
        for index, _ in job.items:
            outcomes[index] = SendOutcome(
                messages[index].id,
                True,
                pmid,
                state,
                warnings=list(warnings),
                native_fallback=job.native_fallback,
                raw=body,
            )

    # -- HTTP and answers ----------------------------------------------------------------------------

    def raise_for_status(self, response: httpx.Response) -> None:
        """Raise only for 429 and 5xx here; any other status is judged by IWINV's code in the body."""
        status = response.status_code
        if status == 429 or status >= 500 or status in (408, 425):
            raise self.http_error(response)

    def _call(
        self,
        api: Api,
        url: str,
        *,
        json: Any = None,
        form: tuple[bytes, str] | None = None,
        send: bool = False,
    ) -> dict[str, Any]:
        if api == "alimtalk":
            headers: dict[str, str] | None = self._alimtalk_headers
        else:
            headers = self._sms_form_headers if form else self._sms_json_headers
        if headers is None:
            raise ProviderRejected(
                "iwinv: the SMS v2 API needs KMSG_IWINV_SMS_API_KEY and KMSG_IWINV_SMS_AUTH_KEY",
                provider=self.name,
                code=ErrorCode.UNSUPPORTED,
            )
        content: bytes | None = None
        if form is not None:
            # A multipart body encoded in one piece (encode_multipart): a few writes, not one per part.
            content, content_type = form
            headers = {**headers, "Content-Type": content_type}
        response = self.request("POST", url, headers=headers, json=json, content=content)
        code, body = self._vendor_code(api, response)
        ok = 200 if api == "alimtalk" else 0
        if code == ok and response.status_code < 300:
            return body
        if code is None or code == ok:
            if response.status_code >= 400:
                raise self.http_error(response)
            text = f"iwinv {api}: unreadable answer (HTTP {response.status_code})"
            if send:
                # IWINV got the request and may have accepted it: reconcile before any resend.
                raise ProviderTimeout(
                    f"{text}; the outcome is unknown",
                    provider=self.name,
                    code=ErrorCode.PROVIDER_ERROR,
                    status_code=response.status_code,
                )
            raise ProviderTransientError(
                text, provider=self.name, code=ErrorCode.PROVIDER_ERROR, status_code=response.status_code
            )
        raise self.vendor_error(api, code, body.get("message") or body.get("messgae"), response)

    @staticmethod
    def _vendor_code(api: Api, response: httpx.Response) -> tuple[int | None, dict[str, Any]]:
        """IWINV's own code: JSON ``code`` / ``resultCode``, or a bare number such as ``501``."""
        try:
            decoded = loads_json(response)
        except ValueError:
            return _as_int(response.text), {}
        if isinstance(decoded, Mapping):
            body = dict(decoded)
            keys = ("code",) if api == "alimtalk" else ("resultCode", "code")
            for key in keys:
                code = _as_int(body.get(key))
                if code is not None:
                    return code, body
            return None, body
        return _as_int(decoded), {}

    def vendor_error(self, api: Api, code: int, text: object, response: httpx.Response | None = None) -> ProviderError:
        """Build the error for IWINV code ``code`` of ``api`` (``"alimtalk"`` or ``"sms"``).

        Args:
            api: Which API answered.
            code: The ``code`` (AlimTalk) or ``resultCode`` (SMS v2).
            text: IWINV's message, if any (the built-in Korean table fills in otherwise).
            response: The HTTP response, for the status and ``Retry-After``.
        """
        if api == "alimtalk":
            rule = ALIMTALK_ERRORS.get(code) or (
                _TRANSIENT if code >= 500 else ErrorRule(ErrorCode.INVALID_REQUEST, "provider", label="refused")
            )
            fallback = ALIMTALK_MESSAGES.get(code, "")
        else:
            rule = SMS_ERRORS.get(code, _TRANSIENT)
            fallback = SMS_MESSAGES.get(code, "")
        vendor_text = _mask(str(text).strip()) if isinstance(text, str) and text.strip() else fallback
        message = f"iwinv {api}: {rule.label} (code {code}{': ' + vendor_text if vendor_text else ''})"
        common: dict[str, Any] = {
            "provider": self.name,
            "code": rule.code,
            "provider_code": str(code),
            "provider_message": vendor_text or None,
            "status_code": response.status_code if response is not None else None,
            "blame": rule.blame,
        }
        if rule.kind == "rate_limited":
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            return ProviderRateLimited(message, retry_after=retry_after, **common)
        if rule.kind == "transient":
            return ProviderTransientError(message, **common)
        return ProviderRejected(message, **common)

    # -- status ------------------------------------------------------------------------------------

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        reports: list[StatusReport] = []
        first_error: ProviderError | None = None
        answered = 0
        for query in queries:
            try:
                if query.type is MessageType.ALIMTALK:
                    report = self._alimtalk_status(query)
                else:
                    report = self._sms_status(query)
            except ProviderRejected as exc:
                first_error = first_error or exc
                continue
            except ProviderError as exc:
                # Down or throttling: stop here, the rest stay "not known yet" until next sweep.
                first_error = first_error or exc
                break
            answered += 1
            if report is not None:
                reports.append(report)
        if first_error is not None and answered == 0:
            raise first_error
        return reports

    def _alimtalk_status(self, query: StatusQuery) -> StatusReport | None:
        now = self._clock()
        phone = _wire_phone(query.to)
        payload: dict[str, Any] = {
            "pageNum": 1,
            "pageSize": 15,
            "phone": phone,
            "startDate": seoul_datetime(_aware(query.requested_at) - timedelta(days=1)),
            "endDate": seoul_datetime(now),
        }
        seq = _as_int(query.provider_message_id)
        if seq is not None:
            payload["seqNo"] = seq
        if query.scheduled_at is not None:
            payload["reserve"] = "Y"
        body = self._call("alimtalk", self.url(HISTORY_PATH, self.alimtalk_base_url), json=payload)
        item = _pick(body.get("list"), "seqNo", query.provider_message_id, phone)
        if item is None:
            return None
        state = alimtalk_report_state(item, now)
        code = str(item.get("statusCode") or "").strip()
        name = str(item.get("statusCodeName") or "").strip()
        sent = _parse_seoul(item.get("sendDate"))
        received = _parse_seoul(item.get("receiveDate")) or sent
        return StatusReport(
            query.message_id,
            state,
            code=code or None,
            description=name or None,
            sent_at=sent if state is not DeliveryState.PENDING else None,
            delivered_at=received if state is DeliveryState.DELIVERED else None,
            failed_at=received if state is DeliveryState.FAILED else None,
            not_kakao_user=state is DeliveryState.FAILED and _not_kakao_user(code, name),
            raw=item,
        )

    def _sms_status(self, query: StatusQuery) -> StatusReport | None:
        company = self.config.option("sms_company_id")
        if not company:
            raise ProviderRejected(
                "iwinv: the SMS history API needs the company id; set KMSG_IWINV_SMS_COMPANY_ID",
                provider=self.name,
                code=ErrorCode.UNSUPPORTED,
            )
        now = self._clock()
        start = _seoul_date(_aware(query.requested_at) - timedelta(days=1))
        end = _seoul_date(now)
        if (end - start).days > HISTORY_MAX_DAYS:
            raise ProviderRejected(
                f"iwinv sms: history covers at most {HISTORY_MAX_DAYS} days; this message is older",
                provider=self.name,
                code=ErrorCode.INVALID_REQUEST,
            )
        phone = _wire_phone(query.to)
        payload = {
            "version": "1.0",
            "companyid": str(company),
            "startDate": start.isoformat(),
            "endDate": end.isoformat(),
            "requestNo": query.provider_message_id,
            "pageNum": 1,
            "pageSize": 15,
            "phone": phone,
        }
        body = self._call("sms", self.url(HISTORY_PATH, self.sms_base_url), json=payload)
        item = _pick(body.get("list"), "requestNo", query.provider_message_id, phone)
        if item is None:
            return None
        state = sms_report_state(item)
        if state in (DeliveryState.PENDING, DeliveryState.SENT):
            state = _in_progress(query.scheduled_at, now, handed_over=state is DeliveryState.SENT)
        code = str(item.get("sendStatusCode") or "").strip()
        text = str(item.get("sendStatusMsg") or item.get("sendStatus") or "").strip()
        sent = _parse_seoul(item.get("sendDate"))
        received = _parse_seoul(item.get("receiveDate")) or sent
        return StatusReport(
            query.message_id,
            state,
            code=code or None,
            description=text or None,
            sent_at=sent,
            delivered_at=received if state is DeliveryState.DELIVERED else None,
            failed_at=received if state is DeliveryState.FAILED else None,
            raw=item,
        )

    # -- balance and templates ---------------------------------------------------------------------

    def _balance(self) -> Balance:
        body = self._call("alimtalk", self.url(CHARGE_PATH, self.alimtalk_base_url), json={})
        return Balance(amount=self._amount(body), raw=body)

    def sms_balance(self) -> Balance:
        """Return the SMS v2 charge (IWINV bills AlimTalk and SMS separately).

        Raises:
            ProviderRejected: The SMS v2 keys are not configured, or IWINV refused.
        """
        body = self._call("sms", self.url(CHARGE_PATH, self.sms_base_url), json={"version": "1.0"})
        return Balance(amount=self._amount(body), raw=body)

    def _amount(self, body: Mapping[str, Any]) -> float:
        raw = body.get("charge")
        if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
            try:
                return float(str(raw).replace(",", ""))
            except ValueError:
                pass
        raise ProviderTransientError("iwinv: the charge answer has no amount", provider=self.name)

    def templates(
        self, *, template_code: str | None = None, status: str | None = None, limit: int = 15
    ) -> list[dict[str, Any]]:
        """List AlimTalk templates (first page).

        Args:
            template_code: Only this template.
            status: ``"Y"`` approved, ``"I"`` in inspection, ``"R"`` rejected.
            limit: Page size.

        Returns:
            IWINV's template rows (``templateCode``, ``templateName``, ``templateContent``,
            ``status``, ``createDate``, ``buttons``).
        """
        # This API takes its numbers as strings.
        payload: dict[str, Any] = {"pageNum": "1", "pageSize": str(limit)}
        if template_code:
            payload["templateCode"] = template_code
        if status:
            payload["templateStatus"] = status
        body = self._call("alimtalk", self.url(TEMPLATE_PATH, self.alimtalk_base_url), json=payload)
        rows = body.get("list")
        return [dict(r) for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []

    def alimtalk_templates(self) -> list[dict[str, Any]]:
        """Every AlimTalk template of the account, for ``kmsg templates sync``.

        Read page by page from ``POST /api/template/`` (the same API as :meth:`templates`);
        ``status`` ``Y`` is approved, ``I`` in inspection, ``R`` rejected. IWINV has one Kakao
        channel per account: the templates carry no channel.
        """
        rows: list[dict[str, Any]] = []
        page, size = 1, 100
        while True:
            payload = {"pageNum": str(page), "pageSize": str(size)}
            body = self._call("alimtalk", self.url(TEMPLATE_PATH, self.alimtalk_base_url), json=payload)
            batch = body.get("list")
            found = [dict(r) for r in batch if isinstance(r, Mapping)] if isinstance(batch, list) else []
            rows.extend(found)
            if len(found) < size or page >= 1000:
                break
            page += 1
        approval = {"Y": "approved", "I": "inspecting", "R": "rejected"}
        return [
            alimtalk_template(
                code=row.get("templateCode"),
                body=row.get("templateContent"),
                name=row.get("templateName"),
                approval=approval.get(str(row.get("status")), "inspecting"),
                provider_status=row.get("status"),
                buttons=row.get("buttons"),
                keys=_IWINV_BUTTON_KEYS,
            )
            for row in rows
            if row.get("templateCode")
        ]

    def template(self, template_code: str) -> dict[str, Any]:
        """Return one AlimTalk template.

        Raises:
            ProviderRejected: ``TEMPLATE_NOT_FOUND`` when IWINV does not know it.
        """
        for row in self.templates(template_code=template_code):
            if row.get("templateCode") == template_code:
                return row
        raise ProviderRejected(
            f"iwinv: template {template_code!r} not found",
            provider=self.name,
            code=ErrorCode.TEMPLATE_NOT_FOUND,
            blame="message",
        )
