"""Aligo: SMS/LMS/MMS through its SMS API, AlimTalk/FriendTalk through its Kakao API.

Aligo's SMS API is documented at https://smartsms.aligo.in/admin/api/spec.html (send, send_mass,
list, sms_list, remain, cancel); its Kakao API answers in the shapes handled below. What the vendor
makes us do, and the choices made here:

* **Two hosts.** SMS calls go to ``https://apis.aligo.in`` and Kakao calls to
  ``https://kakaoapi.aligo.in``; options ``sms_base_url`` / ``kakao_base_url`` override each, and a
  bare ``base_url`` (how a fake server is addressed) sends both to one host.
* **Every call is a multipart/form-data POST** with the credentials in the form body: ``key`` +
  ``user_id`` for the SMS API, ``apikey`` + ``userid`` + ``senderkey`` for the Kakao API.
* **Errors arrive with HTTP 200** and a negative ``result_code`` (or ``code``). Known codes are mapped
  through :data:`ERROR_CODES` / :data:`ERROR_BLAME`; any other failure code is treated as a transient
  ``PROVIDER_ERROR``. HTTP failures (5xx, 429) go through the base ``http_error``.
* **Success shapes.** The SMS endpoints succeed with ``result_code`` 1; the Kakao endpoints with
  ``result_code`` 0 or ``{code: 0, info: {mid, scnt, fcnt}}``. Codes are accepted as strings or
  numbers.
* **Batching.** ``/send/`` takes one text for up to 1,000 comma-separated receivers; ``/send_mass/``
  takes up to 500 receiver/text pairs (``rec_N`` / ``msg_N``, their count in ``cnt``) sharing the
  sender, ``msg_type``, title, schedule and image. A text shared by at least
  :data:`SHARED_TEXT_MIN` receivers of a batch goes through ``/send/`` (one text, up to 1,000
  receivers); every other SMS/LMS/MMS (a personalised campaign) is packed 500 to a ``/send_mass/``
  request. The Kakao endpoints take ``receiver_1..receiver_N`` with a per-recipient ``message_N``,
  up to 500 per request. A request never carries the same receiver twice, so a receiver names one
  message of a request in the delivery results.
* **Concurrency.** The requests of one batch are independent, so they run with at most
  ``max_in_flight`` (``KMSG_ALIGO_MAX_IN_FLIGHT``) in flight (:meth:`HttpProvider.send_requests`).
  That is why one batch (a bulk chunk) may hold several requests' worth of messages
  (:data:`SEND_BATCH_LIMIT`, bounded by the window).
* **Ids.** Aligo returns one ``msg_id`` per request, so each recipient's provider message id is
  ``"<msg_id>:<n>"`` with ``n`` its 1-based position in that request (never the phone number).
* **Delivery results** (SMS/LMS/MMS): ``POST /sms_list/`` lists the receivers of one ``mid`` with
  their ``sms_state`` text, read page by page; :meth:`AligoProvider.sent_list` reads ``POST /list/``
  (the requests sent, by date). Kakao messages are not answered there: their statuses stay
  "not known yet".
* **Balance** comes from ``POST /remain/`` and is the remaining *SMS count* (``SMS_CNT``), so
  :class:`Balance` carries ``currency="SMS_CNT"``, not KRW.
* **Dates** (``rdate``/``rtime``, ``reserve_date``/``reserve_time``) are Asia/Seoul wall-clock time
  whatever the process time zone, rounded *up* to the minute so a message never leaves early.
* **Images.** A URL (``media.ref``) goes as the form field ``image``; bytes (``media.data_b64``) go
  as the file part ``image1`` (``image1..3``, JPEG/PNG/GIF). FriendTalk takes an image URL only
  (``image_N``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import httpx

from kmsg_worker.errors import (
    Blame,
    ConfigurationError,
    ErrorCode,
    ProviderError,
    ProviderRejected,
    ProviderTransientError,
    ValidationError,
)
from kmsg_worker.message import Message, MessageType, count_bytes, interpolate, normalize_phone_sender
from kmsg_worker.pii import mask_text
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
from kmsg_worker.providers.base_http import HttpProvider, encode_multipart, halts_batch, held_back, raise_whole

__all__ = [
    "DEFAULT_KAKAO_BASE_URL",
    "DEFAULT_SMS_BASE_URL",
    "ERROR_BLAME",
    "ERROR_CODES",
    "KAKAO_BATCH_LIMIT",
    "MASS_BATCH_LIMIT",
    "SEND_BATCH_LIMIT",
    "SHARED_TEXT_MIN",
    "SMS_BATCH_LIMIT",
    "AligoProvider",
    "sms_state",
]

DEFAULT_SMS_BASE_URL = "https://apis.aligo.in"
DEFAULT_KAKAO_BASE_URL = "https://kakaoapi.aligo.in"
SEND_PATH = "/send/"
SEND_MASS_PATH = "/send_mass/"
LIST_PATH = "/list/"
SMS_LIST_PATH = "/sms_list/"
REMAIN_PATH = "/remain/"
ALIMTALK_PATH = "/akv10/alimtalk/send/"
TEMPLATE_LIST_PATH = "/akv10/template/list/"
#: Aligo's template buttons, field by field, onto the message's button fields.
_ALIGO_BUTTON_KEYS = {
    "linkType": "type",
    "name": "name",
    "linkMo": "url_mobile",
    "linkM": "url_mobile",
    "linkPc": "url_pc",
    "linkP": "url_pc",
    "linkIos": "scheme_ios",
    "linkI": "scheme_ios",
    "linkAnd": "scheme_android",
    "linkA": "scheme_android",
}
DEFAULT_FRIENDTALK_PATH = "/akv10/friendtalk/send/"

#: Receivers in one ``/send/`` request (comma-separated, identical text).
SMS_BATCH_LIMIT = 1000
#: Receiver/text pairs in one ``/send_mass/`` request (``rec_1``/``msg_1`` .. ``rec_500``/``msg_500``).
MASS_BATCH_LIMIT = 500
#: A text shared by this many receivers of a batch goes through ``/send/`` (one text, 1,000
#: receivers per request); fewer share a ``/send_mass/`` request with other texts. From half a
#: ``/send_mass/`` request up, ``/send/`` never takes more requests than packing them would.
SHARED_TEXT_MIN = MASS_BATCH_LIMIT // 2
#: Rows per ``/sms_list/`` page (Aligo takes 30-500).
SMS_LIST_PAGE_SIZE = 500
#: Pages read for one ``mid`` per status query (a ``/send/`` request has at most 1,000 receivers).
SMS_LIST_MAX_PAGES = 4
#: Recipients in one Kakao request (``receiver_1`` .. ``receiver_500``).
KAKAO_BATCH_LIMIT = 500
#: Most messages one ``send_batch`` call takes (a bulk chunk): the call is split into the requests
#: above and they run through the in-flight window, so a chunk is not held to one request's 1,000.
#: The window bounds it (1,000 x ``max_in_flight``; see
#: :attr:`~kmsg_worker.providers.base.Provider.send_batch_limit`) and so does this cap from 10 in
#: flight on (the default window is 16): 10,000 personalised texts, 500 to a ``/send_mass/``
#: request, are 20 requests, two rounds of a 16-request window at most.
SEND_BATCH_LIMIT = 10_000
#: ``msg`` is 1-2,000 bytes and ``title`` 1-44 bytes (Aligo SMS API spec).
MAX_MSG_BYTES = 2000
MAX_TITLE_BYTES = 44

#: Aligo failure codes we can classify; anything else -> PROVIDER_ERROR.
ERROR_CODES: dict[str, ErrorCode] = {
    "-100": ErrorCode.AUTHENTICATION_FAILED,
    "-101": ErrorCode.AUTHENTICATION_FAILED,
    "-102": ErrorCode.INSUFFICIENT_BALANCE,
    "-201": ErrorCode.INSUFFICIENT_BALANCE,
    "-103": ErrorCode.INVALID_REQUEST,
    "-105": ErrorCode.INVALID_REQUEST,
    "-501": ErrorCode.TEMPLATE_NOT_FOUND,
}
#: Whose fault each mapped code is: another provider would refuse a ``"message"`` error too.
ERROR_BLAME: dict[str, Blame] = {
    "-100": "provider",
    "-101": "provider",
    "-102": "provider",
    "-201": "provider",
    "-103": "message",
    "-105": "message",
    "-501": "message",
}

_SEOUL = ZoneInfo("Asia/Seoul")
_SMS_TYPES = frozenset({MessageType.SMS, MessageType.LMS, MessageType.MMS})
_IMAGE_TYPES = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif"}
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"))
# Kakao's Korean names for button link types, sent as ``linkTypeName`` in Aligo's button JSON.
_LINK_TYPE_NAMES = {
    "WL": "웹링크",
    "AL": "앱링크",
    "DS": "배송조회",
    "BK": "봇키워드",
    "MD": "메시지전달",
    "BC": "상담톡전환",
    "BT": "봇전환",
    "AC": "채널 추가",
}
_YES = frozenset({"y", "yes", "true", "1", "on"})
_NO = frozenset({"n", "no", "false", "0", "off", ""})

_File = tuple[str, bytes, str]
_GroupKey = tuple[Any, ...]


@dataclass
class _Item:
    """One recipient of a vendor request."""

    index: int  # position in the batch given to send_batch
    receiver: str
    fields: dict[str, str] = field(default_factory=dict)  # per-recipient fields, without "_N"
    warnings: list[SendWarning] = field(default_factory=list)
    native_fallback: bool = False


@dataclass
class _Group:
    """Messages that can share requests: same endpoint and same request-level fields."""

    kind: str  # "sms" (/send/), "mass" (/send_mass/) or "kakao"
    url: str
    common: dict[str, str]
    files: dict[str, _File]
    limit: int
    items: list[_Item] = field(default_factory=list)


class _Refused(Exception):
    """A message this adapter refuses before any request (becomes a per-message outcome)."""

    def __init__(self, error: ProviderRejected) -> None:
        super().__init__(str(error))
        self.error = error


def _as_code(value: Any) -> str | None:
    """Aligo sends codes as strings or numbers ("1", 1, "-101", -101)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def sms_state(text: object) -> DeliveryState:
    """Map an ``/sms_list/`` ``sms_state`` text to a state.

    Aligo reports a receiver's result in words: ``발송완료`` (or a text saying 성공) is delivered;
    waiting or reserved (대기, 예약) is still at Aligo; ``전송중`` / 발송중 / 처리중 is with the
    carrier; no text is unknown; any other text is a failure (``전송실패`` and the reasons Aligo
    gives, e.g. a number that does not exist).
    """
    word = str(text or "").strip()
    if not word:
        return DeliveryState.UNKNOWN
    if "완료" in word or "성공" in word:
        return DeliveryState.DELIVERED
    if "대기" in word or "예약" in word:
        return DeliveryState.PENDING
    if any(w in word for w in ("전송중", "전송 중", "발송중", "발송 중", "처리중", "처리 중")):
        return DeliveryState.SENT
    return DeliveryState.FAILED


def _seoul_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return datetime.strptime(value.strip()[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=_SEOUL).astimezone(UTC)
    except ValueError:
        return None


def _as_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _seoul_minute(at: datetime) -> datetime:
    """Asia/Seoul wall-clock time, rounded up to the minute (Aligo schedules by the minute)."""
    local = (at if at.tzinfo else at.replace(tzinfo=_SEOUL)).astimezone(_SEOUL)
    if local.second or local.microsecond:
        local = local.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return local


def _receiver(number: str) -> str:
    # Aligo is a domestic gateway: give it the domestic form of a +82 number.
    if number.startswith("+82"):
        return "0" + number[3:].lstrip("0")
    return number


def _image_type(data: bytes) -> str | None:
    for magic, content_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return content_type
    return None


def _aligo_buttons(buttons: Sequence[Mapping[str, Any]]) -> str:
    """Serialise buttons as Aligo's ``{"button": [{name, linkType, linkMo, linkPc, ...}]}`` JSON."""
    converted = []
    for button in buttons:
        kind = str(button.get("type", ""))
        entry = {
            "name": button.get("name"),
            "linkType": kind,
            "linkTypeName": _LINK_TYPE_NAMES.get(kind),
            "linkMo": button.get("url_mobile"),
            "linkPc": button.get("url_pc"),
            "linkIos": button.get("scheme_ios"),
            "linkAnd": button.get("scheme_android"),
        }
        converted.append({k: v for k, v in entry.items() if v})
    return json.dumps({"button": converted}, ensure_ascii=False, separators=(",", ":"))


def _alimtalk_text(message: Message) -> str:
    """The full rendered AlimTalk text Aligo wants in ``message_N`` (the template with its values filled in)."""
    variables = message.variables
    if variables.get("_full_text"):
        return variables["_full_text"]
    template = message.provider_options.get("templateContent") or message.provider_options.get("template_content")
    if isinstance(template, str) and template:
        return interpolate(template, variables)
    if message.text:
        return message.text
    return "\n".join(value for key, value in variables.items() if not key.startswith("_"))


class AligoProvider(HttpProvider):
    """Adapter for Aligo's SMS and Kakao (AlimTalk/FriendTalk) APIs.

    Settings (``KMSG_ALIGO_<KEY>``): the secret ``api_key``; the options ``user_id`` (required),
    ``sender`` (default sender number), ``sender_key`` (default Kakao sender profile key),
    ``test_mode`` (``Y``/``N``, default ``N``: Aligo validates but does not send),
    ``sms_base_url``, ``kakao_base_url``, ``friendtalk_endpoint`` and ``batch_limit``.

    Args:
        config: This provider's settings.
        client: The process-wide ``httpx.Client``.
        clock: Current time (tests); decides whether ``scheduled_at`` is still ahead.

    Raises:
        ConfigurationError: ``api_key`` or ``user_id`` is missing, or an option is invalid.
    """

    name: ClassVar[str] = "aligo"
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset(
            {MessageType.SMS, MessageType.LMS, MessageType.MMS, MessageType.ALIMTALK, MessageType.FRIENDTALK}
        ),
        bulk_limit=SMS_BATCH_LIMIT,
        send_batch_limit=SEND_BATCH_LIMIT,
        status_query=True,
        bulk_status=True,
        alimtalk_fallback="partial",
        balance=True,
        templates=False,
        file_upload=False,
        lookup_by_reference=False,
    )
    credential_keys: ClassVar[frozenset[str]] = frozenset({"api_key"})
    required_credentials: ClassVar[frozenset[str]] = frozenset({"api_key"})
    kakao_channel_option: ClassVar[str | None] = "sender_key"
    default_base_url = DEFAULT_SMS_BASE_URL

    def __init__(
        self, config: ProviderConfig, client: httpx.Client, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        super().__init__(config, client)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._api_key = config.secret("api_key")
        self._user_id = self._required_option("user_id")
        self._sender = self._sender_option()
        self._sender_key = self._text_option("sender_key")
        self._test_mode = self._yes_no_option("test_mode")
        self.sms_base_url = (self._text_option("sms_base_url") or config.base_url or DEFAULT_SMS_BASE_URL).rstrip("/")
        self.kakao_base_url = (self._text_option("kakao_base_url") or config.base_url or DEFAULT_KAKAO_BASE_URL).rstrip(
            "/"
        )
        self.friendtalk_path = self._text_option("friendtalk_endpoint") or DEFAULT_FRIENDTALK_PATH
        self._sms_url = self.url(SEND_PATH, self.sms_base_url)
        self._mass_url = self.url(SEND_MASS_PATH, self.sms_base_url)
        self._alimtalk_url = self.url(ALIMTALK_PATH, self.kakao_base_url)
        self._friendtalk_url = self.url(self.friendtalk_path, self.kakao_base_url)
        self._check_batch_limit()

    # -- configuration ----------------------------------------------------------------------------

    def _variable(self, key: str) -> str:
        return f"KMSG_{self.config.name.upper()}_{key.upper()}"

    def _text_option(self, key: str) -> str | None:
        value = self.config.option(key)
        if value is None:
            return None
        text = str(value).strip()
        return text or None

    def _required_option(self, key: str) -> str:
        value = self._text_option(key)
        if value is None:
            var = self._variable(key)
            raise ConfigurationError(f"{var} is not set (needed by provider {self.config.name!r})", variable=var)
        return value

    def _sender_option(self) -> str | None:
        value = self._text_option("sender")
        if value is None:
            return None
        try:
            return normalize_phone_sender(value)
        except ValidationError:
            var = self._variable("sender")
            raise ConfigurationError(f"{var} is not a valid sender number", variable=var) from None

    def _yes_no_option(self, key: str) -> str:
        value = self.config.option(key)
        if isinstance(value, bool):
            return "Y" if value else "N"
        text = "" if value is None else str(value).strip().lower()
        if text in _YES:
            return "Y"
        if text in _NO:
            return "N"
        var = self._variable(key)
        raise ConfigurationError(f"{var} must be Y or N", variable=var)

    def _check_batch_limit(self) -> None:
        configured = self.config.option("batch_limit")
        if configured in (None, ""):
            return
        try:
            ok = int(configured) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            var = self._variable("batch_limit")
            raise ConfigurationError(f"{var} must be a positive integer", variable=var)

    # -- errors -----------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Vendor text goes into stored errors: keep identifiers and phone numbers out of it."""
        for value in (self._api_key, self._user_id, self._sender_key):
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return mask_text(text)

    def _vendor_error(self, code: str | None, body: Mapping[str, Any], status: int) -> ProviderError:
        vendor_text = self._scrub(str(body.get("message") or body.get("msg") or "no message"))
        if code is None:
            return ProviderTransientError(
                f"{self.name}: unexpected response without a result code ({vendor_text})",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
                provider_message=vendor_text,
                status_code=status,
            )
        text = f"{self.name}: {vendor_text} (code: {code})"
        common: dict[str, Any] = {
            "provider": self.name,
            "provider_code": code,
            "provider_message": vendor_text,
            "status_code": status,
        }
        mapped = ERROR_CODES.get(code)
        if mapped is None:
            return ProviderTransientError(text, code=ErrorCode.PROVIDER_ERROR, blame="provider", **common)
        return ProviderRejected(text, code=mapped, blame=ERROR_BLAME[code], **common)

    def _refuse(self, text: str, code: ErrorCode = ErrorCode.INVALID_REQUEST, blame: Blame = "message") -> _Refused:
        return _Refused(ProviderRejected(f"{self.name}: {text}", provider=self.name, code=code, blame=blame))

    # -- planning: messages -> groups of requests -------------------------------------------------

    def _sender_for(self, message: Message) -> str:
        sender = message.sender or self._sender
        if not sender:
            raise self._refuse(f"a sender number is required: set the message's sender or {self._variable('sender')}")
        return sender

    def _sender_key_for(self, message: Message) -> str:
        profile = next((message.kakao[k] for k in self.kakao_channel_keys if message.kakao.get(k)), self._sender_key)
        if not profile:
            # Blamed on the provider: another provider configured with a Kakao channel can send it.
            raise self._refuse(
                f"a Kakao sender key is required: set kakao.profile_id or {self._variable('sender_key')}",
                blame="provider",
            )
        return str(profile)

    def _reservation(self, message: Message) -> datetime | None:
        """The Seoul minute to reserve, or None when the message is due (the pipeline dispatches due rows)."""
        at = message.scheduled_at
        if at is None:
            return None
        local = _seoul_minute(at)
        return local if local > self._clock() else None

    def _byte_len(self, text: str, cache: dict[str, int]) -> int:
        size = cache.get(text)
        if size is None:
            size = cache[text] = count_bytes(text)
        return size

    def _image_file(self, data_b64: str, message: Message, cache: dict[str, _File]) -> _File:
        cached = cache.get(data_b64)
        if cached is not None:
            return cached
        try:
            data = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise self._refuse("media.image is not valid base64") from None
        media = message.media
        content_type = (media.content_type if media else None) or _image_type(data)
        if content_type not in _IMAGE_TYPES:
            raise self._refuse("MMS images must be JPEG, PNG or GIF")
        filename = (media.filename if media else None) or f"image1{_IMAGE_TYPES[content_type]}"
        cache[data_b64] = file = (filename, data, content_type)
        return file

    def _plan_sms(
        self, message: Message, sizes: dict[str, int], images: dict[str, _File]
    ) -> tuple[_GroupKey, dict[str, str], dict[str, _File]]:
        sender = self._sender_for(message)
        text = message.text or ""
        if not 1 <= self._byte_len(text, sizes) <= MAX_MSG_BYTES:
            raise self._refuse(f"the text must be 1-{MAX_MSG_BYTES} bytes")
        common = {"sender": sender, "msg": text, "msg_type": message.type.value}
        if message.subject and message.type is not MessageType.SMS:
            if self._byte_len(message.subject, sizes) > MAX_TITLE_BYTES:
                raise self._refuse(f"the subject must be at most {MAX_TITLE_BYTES} bytes")
            common["title"] = message.subject
        common["testmode_yn"] = self._test_mode
        reserve = self._reservation(message)
        if reserve is not None:
            common["rdate"] = reserve.strftime("%Y%m%d")
            common["rtime"] = reserve.strftime("%H%M")
        files: dict[str, _File] = {}
        image_key: str | None = None
        if message.type is MessageType.MMS:
            media = message.media
            if media is not None and media.ref:
                common["image"] = media.ref
            elif media is not None and media.data_b64:
                files["image1"] = self._image_file(media.data_b64, message, images)
                image_key = media.data_b64
            else:
                raise self._refuse("MMS needs an image (media.ref URL or media bytes)")
        return ("sms", tuple(common.items()), image_key), common, files

    def _kakao_common(self, message: Message, sender_key: str) -> dict[str, str]:
        common = {"senderkey": sender_key}
        if message.type is MessageType.ALIMTALK:
            if not message.template_id:
                raise self._refuse("ALIMTALK needs a template code (template_id)")
            common["tpl_code"] = message.template_id
        common["sender"] = self._sender_for(message)
        common["testMode"] = self._test_mode
        reserve = self._reservation(message)
        if reserve is not None:
            # reserve/reserve_date/reserve_time and Aligo's documented `senddate` (YYYYMMDDHHMMSS)
            # name the same Seoul minute; the API ignores fields it does not know.
            common["reserve"] = "Y"
            common["reserve_date"] = reserve.strftime("%Y%m%d")
            common["reserve_time"] = reserve.strftime("%H%M")
            common["senddate"] = reserve.strftime("%Y%m%d%H%M%S")
        return common

    def _buttons_json(self, message: Message) -> str | None:
        if message.buttons:
            return _aligo_buttons(message.buttons)
        raw = message.kakao.get("buttons")
        if raw:
            # Already in Aligo's own format (e.g. copied from its console): pass it through.
            return raw if isinstance(raw, str) else json.dumps(raw if isinstance(raw, Mapping) else {"button": raw})
        return None

    def _plan_alimtalk(self, message: Message, item: _Item) -> dict[str, str]:
        common = self._kakao_common(message, self._sender_key_for(message))
        text = _alimtalk_text(message)
        if not text.strip():
            raise self._refuse("ALIMTALK needs the rendered text (variables._full_text, templateContent or text)")
        options = message.provider_options
        subject = options.get("subject")
        item.fields["subject"] = subject if isinstance(subject, str) and subject else "알림톡"
        item.fields["message"] = text
        buttons = self._buttons_json(message)
        if buttons:
            item.fields["button"] = buttons
        failover = message.failover
        explicit = options.get("failover")
        if isinstance(explicit, str) and explicit.strip():
            enabled = explicit.strip().upper() == "Y"
        else:
            enabled = failover is not None and failover.enabled
        common["failover"] = "Y" if enabled else "N"
        if enabled:
            self._plan_fallback(message, text, item)
        return common

    def _plan_fallback(self, message: Message, text: str, item: _Item) -> None:
        options, failover = message.provider_options, message.failover
        title = options.get("fsubject_1") or (failover.title if failover else None)
        content = options.get("fmessage_1") or (failover.content if failover else None)
        if not content:
            content = text
            item.warnings.append(
                SendWarning("FALLBACK_CONTENT_MISSING", "no failover.content: the AlimTalk text is the fallback text")
            )
        if title:
            item.fields["fsubject"] = str(title)
        item.fields["fmessage"] = str(content)
        item.native_fallback = True
        item.warnings.append(
            SendWarning(
                "FAILOVER_PARTIAL_PROVIDER",
                "aligo falls back through failover/fsubject_N/fmessage_N and picks SMS or LMS itself",
                {"mappedFields": ["failover", "fsubject_N", "fmessage_N"], "unsupportedFields": ["channel"]},
            )
        )

    def _plan_friendtalk(self, message: Message, item: _Item) -> dict[str, str]:
        common = self._kakao_common(message, self._sender_key_for(message))
        subject = message.provider_options.get("subject")
        item.fields["subject"] = subject if isinstance(subject, str) and subject else "친구톡"
        item.fields["message"] = message.text or ""
        media = message.media
        if media is not None:
            if not media.ref:
                raise self._refuse(
                    "aligo FriendTalk takes an image URL (media.ref), not bytes",
                    ErrorCode.UNSUPPORTED,
                    "provider",
                )
            item.fields["image"] = media.ref
        buttons = self._buttons_json(message)
        if buttons:
            item.fields["button"] = buttons
        return common

    def _plan(self, messages: Sequence[Message]) -> tuple[list[_Group], dict[int, SendOutcome]]:
        groups: dict[_GroupKey, _Group] = {}
        refused: dict[int, SendOutcome] = {}
        sizes: dict[str, int] = {}
        images: dict[str, _File] = {}
        sms_limit = min(SMS_BATCH_LIMIT, self.batch_limit)
        kakao_limit = min(KAKAO_BATCH_LIMIT, self.batch_limit)
        for index, message in enumerate(messages):
            item = _Item(index, _receiver(message.to))
            try:
                if message.type in _SMS_TYPES:
                    key, common, files = self._plan_sms(message, sizes, images)
                    url, kind, limit = self._sms_url, "sms", sms_limit
                else:
                    if message.type is MessageType.ALIMTALK:
                        common, url = self._plan_alimtalk(message, item), self._alimtalk_url
                    else:
                        common, url = self._plan_friendtalk(message, item), self._friendtalk_url
                    kind, limit, files = "kakao", kakao_limit, {}
                    key = (url, tuple(common.items()))
            except _Refused as refusal:
                refused[index] = SendOutcome(message.id, False, state=DeliveryState.FAILED, error=refusal.error)
                continue
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(kind, url, common, files, limit)
            group.items.append(item)
        return self._pack_personalised(groups), refused

    def _pack_personalised(self, groups: Mapping[_GroupKey, _Group]) -> list[_Group]:
        """Pack SMS texts shared by few receivers into ``/send_mass/`` groups (a text per receiver).

        A text with no other text to share a request with stays on ``/send/`` (one message, or one
        small same-text group, is one request either way).
        """
        planned: list[_Group] = []
        packable: dict[_GroupKey, list[tuple[_GroupKey, _Group]]] = {}
        for key, group in groups.items():
            if group.kind != "sms" or len(group.items) >= SHARED_TEXT_MIN:
                planned.append(group)
                continue
            shared = tuple((name, value) for name, value in group.common.items() if name != "msg")
            packable.setdefault(("mass", shared, key[2]), []).append((key, group))
        mass_limit = min(MASS_BATCH_LIMIT, self.batch_limit)
        for texts in packable.values():
            if len(texts) == 1:
                planned.append(texts[0][1])
                continue
            first = texts[0][1]
            shared_fields = {name: value for name, value in first.common.items() if name != "msg"}
            mass = _Group("mass", self._mass_url, shared_fields, first.files, mass_limit)
            for _, group in texts:
                text = group.common["msg"]
                for item in group.items:
                    item.fields["msg"] = text
                    mass.items.append(item)
            planned.append(mass)
        return planned

    # -- requests ---------------------------------------------------------------------------------

    def _post(self, url: str, fields: Mapping[str, str], files: Mapping[str, _File]) -> tuple[dict[str, Any], int]:
        # Every call is multipart/form-data as Aligo documents, with or without an attachment.
        body_bytes, content_type = encode_multipart(fields, files)
        response = self.request("POST", url, headers={"Content-Type": content_type}, content=body_bytes)
        body = self.decode_json(response)
        if not isinstance(body, dict):
            raise ProviderTransientError(
                f"{self.name}: unexpected response shape ({type(body).__name__})",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
                status_code=response.status_code,
            )
        return body, response.status_code

    def _chunks(self, groups: Sequence[_Group]) -> Iterator[tuple[_Group, list[_Item]]]:
        for group in groups:
            # No receiver twice in one request: the delivery results name a message by receiver.
            requests: list[tuple[list[_Item], set[str]]] = []
            first_open = 0
            for item in group.items:
                for position in range(first_open, len(requests)):
                    items, receivers = requests[position]
                    if len(items) < group.limit and item.receiver not in receivers:
                        break
                else:
                    items, receivers = [], set()
                    requests.append((items, receivers))
                items.append(item)
                receivers.add(item.receiver)
                while first_open < len(requests) and len(requests[first_open][0]) >= group.limit:
                    first_open += 1
            for items, _ in requests:
                yield group, items

    def _fields(self, group: _Group, items: Sequence[_Item]) -> dict[str, str]:
        if group.kind == "sms":
            receivers = ",".join(item.receiver for item in items)
            return {"key": self._api_key, "user_id": self._user_id, "receiver": receivers, **group.common}
        if group.kind == "mass":
            fields = {"key": self._api_key, "user_id": self._user_id, **group.common, "cnt": str(len(items))}
            for n, item in enumerate(items, 1):
                fields[f"rec_{n}"] = item.receiver
                fields[f"msg_{n}"] = item.fields["msg"]
            return fields
        fields = {"apikey": self._api_key, "userid": self._user_id, **group.common}
        for n, item in enumerate(items, 1):
            fields[f"receiver_{n}"] = item.receiver
            for name, value in item.fields.items():
                fields[f"{name}_{n}"] = value
        return fields

    def _send_chunk(self, messages: Sequence[Message], group: _Group, items: Sequence[_Item]) -> list[SendOutcome]:
        body, status = self._post(group.url, self._fields(group, items), group.files)
        if group.kind != "kakao":
            code = _as_code(body.get("result_code", body.get("code")))
            success_code, info = "1", {}
        else:
            code = _as_code(body.get("code", body.get("result_code")))
            raw_info = body.get("info")
            success_code, info = "0", (raw_info if isinstance(raw_info, dict) else {})
        if code != success_code:
            raise self._vendor_error(code, body, status)
        msg_id = _as_code(body.get("msg_id", info.get("mid")))
        success = _as_int(body.get("success_cnt", info.get("scnt")))
        failed = _as_int(body.get("error_cnt", info.get("fcnt"))) or 0
        if failed and success == 0:
            error = ProviderRejected(
                f"{self.name}: every recipient of the request was refused ({failed})",
                provider=self.name,
                code=ErrorCode.INVALID_RECIPIENT,
                provider_code=code,
                status_code=status,
                blame="message",
            )
            return [
                SendOutcome(messages[i.index].id, False, state=DeliveryState.FAILED, error=error, raw=body)
                for i in items
            ]
        shared: list[SendWarning] = []
        if failed:
            # Aligo only counts refusals; it does not say which receivers they were. Re-sending the
            # request would duplicate the accepted ones, so all are reported accepted, with a warning.
            shared.append(
                SendWarning(
                    "PARTIAL_ACCEPTANCE",
                    f"aligo accepted {success} of {len(items)} recipients and does not say which",
                    {"success_cnt": success, "error_cnt": failed},
                )
            )
        return [
            SendOutcome(
                messages[item.index].id,
                True,
                f"{msg_id}:{n}" if msg_id else None,
                DeliveryState.PENDING,
                warnings=[*item.warnings, *shared],
                native_fallback=item.native_fallback,
                raw=body,
            )
            for n, item in enumerate(items, 1)
        ]

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        groups, refused = self._plan(messages)
        outcomes: list[SendOutcome | None] = [refused.get(i) for i in range(len(messages))]
        chunks = list(self._chunks(groups))
        calls = [partial(self._send_chunk, messages, group, items) for group, items in chunks]
        results = self.send_requests(calls, halts=halts_batch)
        halt: ProviderError | None = None
        unsent: list[list[_Item]] = []
        for (_, items), result in zip(chunks, results, strict=True):
            if result is None:
                unsent.append(items)
            elif isinstance(result, ProviderError):
                self._fail(messages, outcomes, items, result)
                if halt is None and halts_batch(result):
                    halt = result
            else:
                for item, outcome in zip(items, result, strict=True):
                    outcomes[item.index] = outcome
        if halt is not None:
            # Never sent because an earlier request failed: not "maybe accepted", even after a timeout,
            # and not an attempt spent.
            never_left = held_back(halt)
            for items in unsent:
                self._fail(messages, outcomes, items, never_left)
        final = [o for o in outcomes if o is not None]
        if halt is not None and raise_whole(final, halt):
            raise halt
        return final

    def _fail(
        self,
        messages: Sequence[Message],
        outcomes: list[SendOutcome | None],
        items: Sequence[_Item],
        error: ProviderError,
    ) -> None:
        for item in items:
            outcomes[item.index] = SendOutcome(messages[item.index].id, False, state=DeliveryState.FAILED, error=error)

    # -- delivery results ---------------------------------------------------------------------------

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        # Ids are "<mid>:<n>"; a request never has a receiver twice, so (mid, receiver) is one message.
        by_mid: dict[str, dict[str, list[StatusQuery]]] = {}
        for query in queries:
            mid = query.provider_message_id.partition(":")[0].strip()
            if query.type in _SMS_TYPES and mid:
                by_mid.setdefault(mid, {}).setdefault(_receiver(query.to), []).append(query)
        if not by_mid:
            return []
        mids = list(by_mid)
        calls = [partial(self._mid_results, mid, by_mid[mid]) for mid in mids]
        results = self.send_requests(calls, halts=lambda _: True)
        reports: list[StatusReport] = []
        first_error: ProviderError | None = None
        for result in results:
            if isinstance(result, ProviderError):
                first_error = first_error or result
            elif result is not None:
                reports.extend(result)
        if first_error is not None and not reports:
            # Nothing answered: tracking backs the provider off with this error.
            raise first_error
        return reports

    def _mid_results(self, mid: str, wanted: Mapping[str, list[StatusQuery]]) -> list[StatusReport]:
        """Read ``/sms_list/`` for one ``mid`` until every wanted receiver is found or the pages end."""
        reports: list[StatusReport] = []
        missing = set(wanted)
        for page in range(1, SMS_LIST_MAX_PAGES + 1):
            fields = {
                "key": self._api_key,
                "user_id": self._user_id,
                "mid": mid,
                "page": str(page),
                "page_size": str(SMS_LIST_PAGE_SIZE),
            }
            body = self._sms_api(SMS_LIST_PATH, fields)
            rows = body.get("list")
            rows = [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []
            for row in rows:
                receiver = str(row.get("receiver") or "").strip()
                if receiver not in missing:
                    continue
                missing.discard(receiver)
                reports.extend(self._report(query, row) for query in wanted[receiver])
            if not missing or not rows or str(body.get("next_yn") or "N").upper() != "Y":
                break
        return reports

    @staticmethod
    def _report(query: StatusQuery, row: Mapping[str, Any]) -> StatusReport:
        text = str(row.get("sms_state") or "").strip()
        state = sms_state(text)
        sent = _seoul_time(row.get("send_date"))
        return StatusReport(
            query.message_id,
            state,
            code=text or None,
            description=text or None,
            sent_at=sent if state is not DeliveryState.PENDING else None,
            delivered_at=sent if state is DeliveryState.DELIVERED else None,
            failed_at=sent if state is DeliveryState.FAILED else None,
            raw=row,
        )

    def sent_list(self, *, start_date: datetime | None = None, days: int = 7, page: int = 1) -> list[dict[str, Any]]:
        """The SMS-API requests sent, newest first, from Aligo's ``POST /list/``.

        Args:
            start_date: The day to read back from (Asia/Seoul), default today.
            days: How many days back from ``start_date`` (``limit_day``).
            page: Page number (from 1; 500 requests per page).

        Returns:
            Aligo's rows (``mid``, ``type``, ``sender``, ``sms_count``, ``fail_count``,
            ``reserve_state``, ``reg_date`` ...).
        """
        day = (start_date or self._clock()).astimezone(_SEOUL)
        fields = {
            "key": self._api_key,
            "user_id": self._user_id,
            "page": str(page),
            "page_size": "500",
            "start_date": day.strftime("%Y%m%d"),
            "limit_day": str(days),
        }
        rows = self._sms_api(LIST_PATH, fields).get("list")
        return [dict(r) for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []

    def _sms_api(self, path: str, fields: Mapping[str, str]) -> dict[str, Any]:
        body, status = self._post(self.url(path, self.sms_base_url), fields, {})
        code = _as_code(body.get("result_code", body.get("code")))
        if code != "1":
            raise self._vendor_error(code, body, status)
        return body

    # -- AlimTalk templates -------------------------------------------------------------------------

    def alimtalk_templates(self) -> list[dict[str, Any]]:
        """The AlimTalk templates of the configured sender key, for ``kmsg templates sync``.

        ``POST /akv10/template/list/`` with ``apikey``, ``userid`` and ``senderkey`` (Aligo's
        AlimTalk API, https://smartsms.aligo.in/alimapi.html). ``inspStatus`` ``APR`` is approved,
        ``REJ`` rejected, ``REG``/``REQ`` registered or in inspection.
        """
        if not self._sender_key:
            raise self._refuse(
                f"listing AlimTalk templates needs a Kakao sender key: set {self._variable('sender_key')}",
                blame="provider",
            )
        fields = {"apikey": self._api_key, "userid": self._user_id, "senderkey": self._sender_key}
        body, status = self._post(self.url(TEMPLATE_LIST_PATH, self.kakao_base_url), fields, {})
        code = _as_code(body.get("code"))
        if code != "0":
            raise self._vendor_error(code, body, status)
        rows = body.get("list")
        approval = {"APR": "approved", "REJ": "rejected"}
        return [
            alimtalk_template(
                code=row.get("templtCode"),
                body=row.get("templtContent"),
                name=row.get("templtName"),
                channel=self._sender_key,
                approval=approval.get(str(row.get("inspStatus")), "inspecting"),
                provider_status=row.get("inspStatus"),
                buttons=row.get("buttons"),
                keys=_ALIGO_BUTTON_KEYS,
            )
            for row in (rows if isinstance(rows, list) else [])
            if isinstance(row, Mapping) and row.get("templtCode")
        ]

    # -- balance ----------------------------------------------------------------------------------

    def _balance(self) -> Balance:
        body = self._sms_api(REMAIN_PATH, {"key": self._api_key, "user_id": self._user_id})
        try:
            amount = float(body["SMS_CNT"])
        except (KeyError, TypeError, ValueError):
            raise ProviderTransientError(
                f"{self.name}: /remain/ answered without a numeric SMS_CNT",
                provider=self.name,
                code=ErrorCode.PROVIDER_ERROR,
            ) from None
        return Balance(amount=amount, currency="SMS_CNT", raw=body)
