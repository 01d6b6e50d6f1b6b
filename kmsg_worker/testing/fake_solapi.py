"""A fake Solapi API v4 server: real HTTP on loopback, Solapi's auth, shapes and codes.

Endpoints (as documented at https://docs.solapi.com):

* ``POST /messages/v4/send-many/detail`` — validates the body like Solapi (400 ``ValidationError``,
  400 ``RecipientsTooMany`` above 10,000 messages), checks every message (refusals go to
  ``failedMessageList`` with Solapi's intake codes, see :data:`INTAKE_CODES`) and records the
  accepted ones in the :class:`~kmsg_worker.testing.fakeserver.Ledger` with ``customFields.kmsgId``
  as the reference, all in one ``Ledger.accept`` call;
* ``GET /messages/v4/list`` — ``messageId``, repeated ``messageIds``, ``groupId``, ``to``, ``from``,
  ``type``, ``statusCode``, ``criteria/cond/value`` (``eq``), ``dateType/startDate/endDate``,
  ``limit`` (at most 500) and ``startKey``/``nextKey`` paging. Statuses progress by the ledger's
  rules: PENDING -> ``2000``, SENT -> ``3000``, DELIVERED -> ``4000``, FAILED -> the rule's code;
* ``POST /storage/v1/files`` — ``{file: base64, type, name?, link?}`` -> ``{fileId, ...}``;
* ``GET /cash/v1/balance`` — ``{balance, point, ...}`` from :attr:`FakeSolapiServer.balance`;
* ``GET /senderid/v1/numbers`` — ``{senderIds: [{phoneNumber, status: "ACTIVE"}]}`` from
  :attr:`FakeSolapiServer.senders` (404 when no list is configured);
* ``GET /_files/<name>`` — files published with :meth:`FakeSolapiServer.host_file` (no auth), so
  tests can exercise "upload from a URL" without the internet.

Authentication is checked the way Solapi does: a missing header is 401, everything else 403 with
``InvalidAPIKey`` (malformed header, unknown key), ``SignatureDoesNotMatch``,
``RequestTimeTooSkewed`` (date more than 15 minutes off) or ``DuplicatedSignature`` (the same
signature seen within 15 minutes).

Solapi's own SMS/LMS replacement of a failed AlimTalk is simulated: Solapi sends the AlimTalk's
text as SMS (LMS above 90 bytes) when the AlimTalk fails, unless ``kakaoOptions.disableSms`` is
true (Solapi's answer in https://github.com/solapi/community/discussions/109; the list API's
``replacement`` flag, https://docs.solapi.com/api-reference/messages/getmessagelist). When an
accepted ``ATA`` message with ``disableSms`` not true, a text and a sender gets a FAILED rule, the
fake also creates its replacement: a message of its own (``replacement: true``, same group,
recipient, sender, text and ``customFields``), created when the AlimTalk fails and progressing by
the rule that matches *it* (a rule for ``type="SMS"`` or ``"LMS"``); the AlimTalk's own record lists
it under ``replacements``. A replacement is not an acceptance of our message: it is counted in
:attr:`FakeSolapiServer.replacements` and ``/_fake/stats`` ``replacements``, never in
``per_reference``/``per_message``.

Not simulated: billing (``balance`` is not decremented; set it to 0 to get ``1030`` refusals),
scheduled-group freezing.
"""

from __future__ import annotations

import base64
import binascii
import collections
import gc
import hashlib
import hmac
import itertools
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from kmsg_worker.testing.fake_templates import FakeTemplate, refusal, template_map
from kmsg_worker.testing.fakeserver import (
    Clock,
    DeliveryRule,
    FakeProviderServer,
    FakeRequest,
    FakeResponse,
    LedgerEntry,
)

__all__ = ["INTAKE_CODES", "STATUS_MESSAGES", "FakeSolapiServer"]

_KST = timezone(timedelta(hours=9), "KST")
MAX_MESSAGES = 10_000
SIGNATURE_WINDOW = 15 * 60.0
_AUTH = re.compile(r"^(HMAC-SHA256|HMAC-MD5) (.+)$")
_TO = re.compile(r"^\d{8,16}$")
_DIGESTS: dict[str, Callable[[], Any]] = {"HMAC-SHA256": hashlib.sha256, "HMAC-MD5": hashlib.md5}
_TOP_LEVEL = frozenset({"messages", "allowDuplicates", "showMessageList", "scheduledDate", "agent", "strict"})
_FILE_TYPES = frozenset({"MMS", "KAKAO", "RCS", "FAX", "DOCUMENT"})
_TYPES = frozenset(
    {"SMS", "LMS", "MMS", "ATA", "CTA", "CTI", "NSA", "VOICE", "FAX"}
    | {"RCS_SMS", "RCS_LMS", "RCS_MMS", "RCS_TPL", "RCS_ITPL", "RCS_LTPL"}
)
_NEEDS_FROM = frozenset({"SMS", "LMS", "MMS", "VOICE", "FAX"} | {t for t in _TYPES if t.startswith("RCS_")})
_NEEDS_TEXT = frozenset({"SMS", "LMS", "MMS", "CTA", "CTI", "VOICE", "RCS_SMS", "RCS_LMS", "RCS_MMS"})
_KAKAO = frozenset({"ATA", "CTA", "CTI"})
_SEARCHABLE = {"messageId", "groupId", "to", "from", "type", "statusCode"}

#: Status texts the fake answers with (Solapi's own wording).
STATUS_MESSAGES: dict[str, str] = {
    "1010": "필수 입력 값 미입력",
    "1011": "Format Error",
    "1013": "제목은 문자 타입이 'SMS'일 경우 사용이 불가능합니다.",
    "1014": "제목은 40byte까지 사용 가능합니다.",
    "1025": "잘못된 메시지 타입",
    "1026": "중복 수신번호",
    "1030": "잔액 부족",
    "1031": "SMS 90byte, LMS/MMS 2000byte, ATA/CTA 1000자, CTI 400자까지 사용 가능합니다.",
    "1032": "유효한 커스텀 필드 값이 아닙니다.",
    "1033": "kakaoOptions은 메시지가 ATA 나 CTA인 경우에만 사용가능합니다.",
    "1034": "imageId가 존재하지 않습니다.",
    "1041": "유효한 플러스 친구 값이 아닙니다.",
    "1042": "유효한 템플릿 아이디가 아닙니다.",
    "1050": "버튼은 최대 5개까지 사용 가능합니다.",
    "1051": "등록되지 않은 친구톡 이미지 아이디입니다.",
    "1060": "차단된 수신번호",
    "1062": "발신번호 미등록",
    "2000": "정상 접수(이통사로 접수 예정) ",
    "3000": "이통사로 접수(리포트를 기다리는 중)",
    "3040": "전송시간 초과",
    "3059": "변작된 발신번호.",
    "3104": "카카오톡 미사용자",
    "3105": "미등록 템플릿",
    "3107": "72시간 이내 카카오톡 미사용자, 알림톡 차단한 사용자",
    "4000": "수신 완료",
}
#: Intake checks and the code each failure gets in ``failedMessageList``.
INTAKE_CODES: dict[str, str] = {
    "required value missing (to, from, text, pfId, templateId, imageId, ...)": "1010",
    "malformed value (recipient number, voiceType, additionalBody.imageId spelled right)": "1011",
    "subject on an SMS": "1013",
    "subject over 40 bytes": "1014",
    "unknown message type": "1025",
    "same recipient twice in one request with allowDuplicates false": "1026",
    "balance <= 0": "1030",
    "text too long (SMS 90 bytes, LMS/MMS 2000 bytes, ATA/CTA 1000 chars, CTI 400 chars)": "1031",
    "customFields not {str(<=30): str(<=100)}": "1032",
    "kakaoOptions on a non-Kakao type": "1033",
    "imageId / fileId not uploaded": "1034",
    "pfId not in pf_ids (when configured)": "1041",
    "templateId not in templates (when configured)": "1042",
    "more than 5 buttons": "1050",
    "CTI imageId not uploaded": "1051",
    "recipient in blocked": "1060",
    "sender not in senders (when configured)": "1062",
}
_DEFAULT_FAILED_CODE = "3040"


_BYTES_CACHE: dict[str, int] = {}


def _carrier_bytes(text: str) -> int:
    # Korean carriers bill 1 byte per ASCII UTF-16 unit and 2 per other unit; done in C, not per char,
    # and remembered: a campaign sends the same text to thousands of recipients.
    if text.isascii():
        return len(text)
    cached = _BYTES_CACHE.get(text)
    if cached is None:
        if len(_BYTES_CACHE) > 4096:
            _BYTES_CACHE.clear()
        units = len(text.encode("utf-16-le")) // 2
        cached = _BYTES_CACHE[text] = 2 * units - len(text.encode("ascii", "ignore"))
    return cached


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: str) -> float | None:
    try:
        parsed = datetime.fromisoformat(value.strip().replace(" ", "T", 1))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _json(body: Any, status: int = 200) -> FakeResponse:
    # orjson: the fake shares the two cores with the workers in benchmarks, and a 10,000-entry
    # messageList encodes ~10x faster than with the stdlib encoder.
    return FakeResponse(
        status,
        raw=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


def _error(status: int, code: str, text: str) -> FakeResponse:
    return FakeResponse(status, {"errorCode": code, "errorMessage": text})


class FakeSolapiServer(FakeProviderServer):
    """Fake Solapi API v4 (see the module docstring for the endpoints and codes).

    Args:
        host: Loopback address.
        port: 0 picks a free port.
        clock: Time source for status progression (auth skew uses the wall clock).
        api_key: The only API key accepted.
        api_secret: Its secret.
        balance: Cash balance reported by ``/cash/v1/balance``; 0 or less refuses messages with 1030.
        senders: Registered sender numbers; ``None`` accepts any sender.
        pf_ids: Registered Kakao channel ids; ``None`` accepts any.
        templates: Known AlimTalk template ids; ``None`` accepts any.
        alimtalk_templates: AlimTalk templates with bodies and approval states (listed and enforced).
        non_kakao_suffix: AlimTalk to numbers ending with this fails with ``3104`` (see
            :meth:`fail_alimtalk_for`).
        freeze_gc_every: Call :func:`gc.freeze` each time this many more messages are in the ledger
            (``None`` never does): the ledger only grows, and garbage collections that re-walk it cost
            more than the requests themselves at volume. Freezing is process-wide.
    """

    name = "solapi"
    type_names = {
        "ALIMTALK": frozenset({"ATA"}),
        "FRIENDTALK": frozenset({"CTA", "CTI"}),
        "SMS": frozenset({"SMS"}),
        "LMS": frozenset({"LMS"}),
        "MMS": frozenset({"MMS"}),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Clock = time.time,
        api_key: str = "fake-solapi-key",
        api_secret: str = "fake-solapi-secret",
        balance: float = 1_000_000.0,
        senders: Iterable[str] | None = None,
        pf_ids: Iterable[str] | None = None,
        templates: Iterable[str] | None = None,
        alimtalk_templates: Iterable[FakeTemplate] | None = None,
        non_kakao_suffix: str | None = None,
        freeze_gc_every: int | None = 50_000,
    ) -> None:
        super().__init__(host, port, clock=clock)
        self.api_key = api_key
        self._api_secret = api_secret.encode("utf-8")
        self.balance = balance
        self.point = 0.0
        self.senders = set(senders) if senders is not None else None
        self.pf_ids = set(pf_ids) if pf_ids is not None else None
        self.templates = set(templates) if templates is not None else None
        #: AlimTalk templates with approval states (``GET /kakao/v2/templates``); when set, an ATA
        #: of an unknown or unapproved template is refused with 1042, one whose text or variables
        #: do not render the approved body with 1043.
        self.alimtalk_templates = template_map(alimtalk_templates)
        #: Recipients refused at intake with 1060.
        self.blocked: set[str] = set()
        #: Uploaded files: fileId -> {type, name, size, link}.
        self.files: dict[str, dict[str, Any]] = {}
        #: Refused registrations (Solapi keeps them in the list too): messageId -> record.
        self.failed: dict[str, dict[str, Any]] = {}
        #: Groups: groupId -> {created, count, scheduledDate}.
        self.groups: dict[str, dict[str, Any]] = {}
        #: Solapi's own SMS/LMS replacements of failed AlimTalks: original messageId -> replacement.
        self.replacements: dict[str, LedgerEntry] = {}
        self._replacement_ids: dict[str, LedgerEntry] = {}
        #: The last vendor requests, newest last (headers and bodies for wire tests).
        self.recorded: collections.deque[FakeRequest] = collections.deque(maxlen=200)
        self._hosted: dict[str, tuple[bytes, str]] = {}
        self._signatures: dict[str, float] = {}
        self._sig_lock = threading.Lock()
        self._next_prune = 0.0
        self._tag = "".join(secrets.choice(string.ascii_uppercase) for _ in range(4))
        self._counter = itertools.count(1)
        self._freeze_every = freeze_gc_every
        self._next_freeze = freeze_gc_every or 0
        #: Messages whose final status was pushed to a report URL (:meth:`push_reports`).
        self.reports_pushed = 0
        self._push_stop = threading.Event()
        self._pusher: threading.Thread | None = None
        if non_kakao_suffix:
            self.fail_alimtalk_for(suffix=non_kakao_suffix)

    # -- helpers for tests -------------------------------------------------------------------------

    def fail_alimtalk_for(self, numbers: Iterable[str] = (), *, suffix: str | None = None, code: str = "3104") -> None:
        """Make AlimTalk (``ATA``) to these numbers, or to numbers ending in ``suffix``, fail with ``code``.

        ``3104`` is "not a KakaoTalk user", ``3107`` "no KakaoTalk use lately or AlimTalk blocked":
        both are the non-Kakao-user failures that trigger the SMS/LMS fallback.
        """
        rule = DeliveryRule(final="FAILED", code=code, message=STATUS_MESSAGES.get(code))
        for number in numbers:
            self.ledger.add_rule(rule, to=number, type="ALIMTALK")
        if suffix is not None:
            self.ledger.add_rule(rule, suffix=suffix, type="ALIMTALK")

    def host_file(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        """Publish ``data`` at ``<url>/_files/<name>`` (no auth) and return that URL."""
        self._hosted[name] = (data, content_type)
        return f"{self.url}/_files/{name}"

    def add_file(self, file_type: str = "MMS", name: str = "file.jpg", size: int = 1024) -> str:
        """Register an already uploaded file and return its ``fileId``."""
        file_id = self._new_id("ST01FZ", self.ledger.clock())
        self.files[file_id] = {"type": file_type, "name": name, "size": size, "link": None}
        return file_id

    def reset(self) -> None:
        """Forget messages, files, groups, signatures and rules (``POST /_fake/reset`` calls this)."""
        self.ledger.reset()
        self.failed.clear()
        self.groups.clear()
        self.replacements.clear()
        self._replacement_ids.clear()
        self.files.clear()
        self.recorded.clear()
        with self._sig_lock:
            self._signatures.clear()

    def _control(self, request: FakeRequest) -> FakeResponse:
        if request.path == "/_fake/reset" and request.method == "POST":
            self.reset()
        answer = super()._control(request)
        if request.path == "/_fake/stats" and isinstance(answer.body, dict):
            # the common stats (ledger, peak in flight) plus Solapi's own SMS replacements
            answer.body["replacements"] = len(self.replacements)
        return answer

    # -- delivery reports pushed to a webhook --------------------------------------------------------

    def push_reports(self, url: str, secret: str, *, interval: float = 0.2, batch: int = 500) -> None:
        """Push every message's final status to ``url``, as Solapi's message-report webhook does.

        A background thread posts, every ``interval`` seconds, the messages that reached a final
        status since the last push: a JSON array of message objects shaped as the list API's, at
        most ``batch`` per request, signed with ``secret`` (a ``whsec_`` secret) in Standard
        Webhooks headers. A push the receiver does not answer with a 2xx is tried again next time.
        :attr:`reports_pushed` counts the messages it took. Stopped by :meth:`stop`.
        """
        self._push_stop.clear()
        thread = threading.Thread(
            target=self._push_loop, args=(url, secret, interval, batch), name="fake-solapi-reports", daemon=True
        )
        thread.start()
        self._pusher = thread

    def _push_loop(self, url: str, secret: str, interval: float, batch: int) -> None:
        # Imported here: the fake is usable without the webhook package loaded otherwise.
        import httpx

        from kmsg_worker.webhooks.signing import sign

        reported: set[str] = set()
        counter = itertools.count(1)
        with httpx.Client(timeout=10.0) as client:
            while not self._push_stop.wait(interval):
                now = self.ledger.clock()
                with self.ledger._lock:
                    entries = list(self.ledger.entries.values())
                due = [
                    e
                    for e in entries
                    if e.provider_message_id not in reported and e.state(now)[0] in ("DELIVERED", "FAILED")
                ]
                for start in range(0, len(due), batch):
                    part = due[start : start + batch]
                    body = orjson.dumps([self._record(e, now) for e in part])
                    msg_id = f"rpt_{self._tag}_{next(counter)}"
                    stamp = int(time.time())
                    headers = {
                        "content-type": "application/json",
                        "webhook-id": msg_id,
                        "webhook-timestamp": str(stamp),
                        "webhook-signature": sign(secret, msg_id, stamp, body),
                    }
                    try:
                        answer = client.post(url, content=body, headers=headers)
                    except httpx.HTTPError:
                        break
                    if not answer.is_success:
                        break
                    reported.update(e.provider_message_id for e in part)
                    self.reports_pushed += len(part)

    def stop(self) -> None:
        """Stop the report pusher (if any) and the server."""
        self._push_stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5)
            self._pusher = None
        super().stop()

    # -- dispatch ----------------------------------------------------------------------------------

    def handle(self, request: FakeRequest) -> FakeResponse:
        """Answer one Solapi request (auth first, then the endpoint)."""
        if request.path.startswith("/_files/") and request.method == "GET":
            hosted = self._hosted.get(request.path.removeprefix("/_files/"))
            if hosted is None:
                return FakeResponse(404, {"errorCode": "NotFound", "errorMessage": "no such file"})
            return FakeResponse(200, raw=hosted[0], headers={"Content-Type": hosted[1]})
        self.recorded.append(request)
        refused = self._authenticate(request.headers.get("authorization"))
        if refused is not None:
            return refused
        route = (request.method, request.path.rstrip("/"))
        if route == ("POST", "/messages/v4/send-many/detail"):
            return self._send_many(request)
        if route == ("GET", "/messages/v4/list"):
            return self._list(request)
        if route == ("POST", "/storage/v1/files"):
            return self._upload(request)
        if route == ("GET", "/kakao/v2/templates"):
            return self._templates(request)
        if route == ("GET", "/senderid/v1/numbers"):
            if self.senders is None:  # no list configured: as if the account could not tell
                return _error(404, "NotFound", "no sender number list")
            listed = [{"phoneNumber": n, "status": "ACTIVE", "handleKey": f"SID_{n}"} for n in sorted(self.senders)]
            return FakeResponse(200, {"senderIds": listed})
        if route == ("GET", "/cash/v1/balance"):
            return FakeResponse(
                200, {"balance": self.balance, "point": self.point, "deposit": 0, "accountId": "fake-account"}
            )
        return _error(404, "NotFound", f"{request.method} {request.path} does not exist")

    # -- auth --------------------------------------------------------------------------------------

    def _authenticate(self, header: str | None) -> FakeResponse | None:
        if not header:
            return _error(401, "InvalidAPIKey", "Authorization header is missing")
        match = _AUTH.match(header.strip())
        if match is None:
            return _error(403, "InvalidAPIKey", "Authorization must be 'HMAC-SHA256 apiKey=..., date=..., ...'")
        fields: dict[str, str] = {}
        for part in match.group(2).split(","):
            key, sep, value = part.strip().partition("=")
            if sep:
                fields[key] = value
        api_key, date, salt, signature = (fields.get(k, "") for k in ("apiKey", "date", "salt", "signature"))
        if not (api_key and date and signature) or not 12 <= len(salt) <= 64:
            return _error(403, "InvalidAPIKey", "apiKey, date, salt (12-64 characters) and signature are required")
        if not hmac.compare_digest(api_key, self.api_key):
            return _error(403, "InvalidAPIKey", "unknown API key")
        signed_at = _parse_time(date)
        if signed_at is None:
            return _error(403, "InvalidAPIKey", "date must be an ISO 8601 date-time")
        now = time.time()
        if abs(now - signed_at) > SIGNATURE_WINDOW:
            return _error(403, "RequestTimeTooSkewed", "date is more than 15 minutes away from the server time")
        expected = hmac.new(self._api_secret, (date + salt).encode("utf-8"), _DIGESTS[match.group(1)]).hexdigest()
        if not hmac.compare_digest(expected, signature.lower()):
            return _error(403, "SignatureDoesNotMatch", "signature does not match")
        with self._sig_lock:
            if now >= self._next_prune:
                # Once a minute, not per request: at 50 requests/s the window holds ~45,000 signatures.
                self._next_prune = now + 60.0
                cutoff = now - SIGNATURE_WINDOW
                self._signatures = {s: t for s, t in self._signatures.items() if t > cutoff}
            seen = self._signatures.get(signature)
            if seen is not None and now - seen <= SIGNATURE_WINDOW:
                return _error(403, "DuplicatedSignature", "this signature was already used")
            self._signatures[signature] = now
        return None

    # -- send --------------------------------------------------------------------------------------

    def _new_id(self, prefix: str, now: float) -> str:
        stamp = datetime.fromtimestamp(now, _KST).strftime("%Y%m%d%H%M%S")
        return f"{prefix}{stamp}{self._tag}{next(self._counter):011d}"

    def _send_many(self, request: FakeRequest) -> FakeResponse:
        try:
            body = request.json()
        except ValueError:
            return _error(400, "ValidationError", "body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "ValidationError", "body must be an object")
        unknown = set(body) - _TOP_LEVEL
        if unknown:
            return _error(400, "ValidationError", f"'{sorted(unknown)[0]}' is not allowed")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "ValidationError", "'messages' must be a non-empty array")
        if len(messages) > MAX_MESSAGES:
            return _error(400, "RecipientsTooMany", f"at most {MAX_MESSAGES} messages per request")
        if not all(isinstance(m, dict) for m in messages):
            return _error(400, "ValidationError", "every message must be an object")
        allow_duplicates = body.get("allowDuplicates", False)
        show = body.get("showMessageList", False)
        if not isinstance(allow_duplicates, bool) or not isinstance(show, bool):
            return _error(400, "ValidationError", "allowDuplicates and showMessageList must be booleans")
        agent = body.get("agent")
        if agent is not None and not isinstance(agent, dict):
            return _error(400, "ValidationError", "'agent' must be an object")
        now = self.ledger.clock()
        starts_at = now
        scheduled = body.get("scheduledDate")
        if scheduled is not None:
            at = _parse_time(scheduled) if isinstance(scheduled, str) else None
            if at is None:
                return _error(400, "ValidationError", "scheduledDate must be an ISO 8601 date-time")
            starts_at = max(now, at)
        return self._accept(messages, now, starts_at, allow_duplicates, show, scheduled)

    def _accept(
        self,
        messages: list[dict[str, Any]],
        now: float,
        starts_at: float,
        allow_duplicates: bool,
        show: bool,
        scheduled: str | None,
    ) -> FakeResponse:
        group_id = self._new_id("G4V", now)
        stamp = datetime.fromtimestamp(now, _KST).strftime("%Y%m%d%H%M%S")
        prefix = f"M4V{stamp}{self._tag}"
        counter = self._counter
        accepted: list[LedgerEntry] = []
        message_list: list[dict[str, Any]] = []
        failed_list: list[dict[str, Any]] = []
        seen: set[str] = set()
        ok_text = STATUS_MESSAGES["2000"]
        placeholder = self.ledger.default_rule
        for message in messages:
            message_id = f"{prefix}{next(counter):011d}"
            refusal = self._check(message)
            to = message.get("to")
            to = to if isinstance(to, str) else ""
            if refusal is None and not allow_duplicates:
                if to in seen:
                    refusal = "1026"
                seen.add(to)
            custom = message.get("customFields") or {}
            if refusal is not None:
                record = {
                    "to": to,
                    "from": message.get("from"),
                    "type": message.get("type"),
                    "statusMessage": STATUS_MESSAGES.get(refusal, "intake error"),
                    "country": message.get("country") or "82",
                    "messageId": message_id,
                    "statusCode": refusal,
                    "accountId": "fake-account",
                    "customFields": custom,
                }
                failed_list.append(record)
                self.failed[message_id] = {**record, "groupId": group_id, "created": now}
                continue
            # Positional arguments and a shared placeholder rule (Ledger.accept sets the real one):
            # this loop runs 10,000 times per request.
            accepted.append(
                LedgerEntry(
                    message_id,
                    to,
                    message.get("type") or _detect_type(message),
                    starts_at,
                    custom.get("kmsgId"),
                    group_id,
                    message.get("text"),
                    message,
                    placeholder,
                )
            )
            if show:
                message_list.append(
                    {
                        "messageId": message_id,
                        "statusCode": "2000",
                        "customFields": custom,
                        "statusMessage": ok_text,
                    }
                )
        self.ledger.accept(accepted)
        for entry in accepted:
            if entry.type == "ATA" and entry.rule.final == "FAILED":
                self._replace(entry)
        if self._freeze_every and len(self.ledger.entries) >= self._next_freeze:
            # Every accepted message stays alive in the ledger; without this, each full garbage collection
            # walks all of them and throughput falls by half past a few hundred thousand messages.
            self._next_freeze = len(self.ledger.entries) + self._freeze_every
            gc.freeze()
        self.ledger.rejected += len(failed_list)
        self.groups[group_id] = {"created": now, "total": len(messages), "scheduledDate": scheduled}
        if accepted and self.should_lose_response():
            self.drop_connection()
        response: dict[str, Any] = {
            "failedMessageList": failed_list,
            "groupInfo": self._group_info(group_id, now, len(accepted), len(failed_list), scheduled),
        }
        if show:
            response["messageList"] = message_list
        return _json(response)

    def _replace(self, entry: LedgerEntry) -> None:
        """Create Solapi's SMS/LMS replacement of an AlimTalk that is going to fail (see the module docstring)."""
        options = entry.fields.get("kakaoOptions")
        disabled = isinstance(options, dict) and options.get("disableSms") is True
        sender, text = entry.fields.get("from"), entry.text
        if disabled or not sender or not isinstance(text, str) or not text:
            return
        failed_at = entry.accepted_at + entry.rule.final_after
        rep_type = "LMS" if _carrier_bytes(text) > 90 else "SMS"
        replacement = LedgerEntry(
            self._new_id("M4V", failed_at),
            entry.to,
            rep_type,
            failed_at,
            None,
            entry.group_id,
            text,
            {
                "from": sender,
                "country": entry.fields.get("country"),
                "customFields": entry.fields.get("customFields"),
                "replacementOf": entry.provider_message_id,
            },
        )
        replacement.rule = self.ledger.rule_for(replacement)
        self.replacements[entry.provider_message_id] = replacement
        self._replacement_ids[replacement.provider_message_id] = replacement

    @staticmethod
    def _group_info(group_id: str, now: float, ok: int, failed: int, scheduled: str | None) -> dict[str, Any]:
        created = _iso(now)
        return {
            "groupId": group_id,
            "status": "SCHEDULED" if scheduled else "SENDING",
            "count": {
                "total": ok + failed,
                "sentTotal": 0,
                "sentFailed": 0,
                "sentSuccess": 0,
                "sentPending": ok,
                "sentReplacement": 0,
                "refund": 0,
                "registeredFailed": failed,
                "registeredSuccess": ok,
            },
            "scheduledDate": scheduled,
            "accountId": "fake-account",
            "serviceMethod": "MT",
            "dateCreated": created,
            "dateUpdated": created,
        }

    # -- per-message intake checks -------------------------------------------------------------------

    def _check(self, message: Mapping[str, Any]) -> str | None:
        """Return Solapi's intake code for a refused message, or ``None`` when it is accepted."""
        to = message.get("to")
        if not isinstance(to, str) or not to:
            return "1010"
        if not _TO.match(to):
            return "1011"
        mtype = message.get("type") or _detect_type(message)
        if mtype not in _TYPES:
            return "1025"
        sender = message.get("from")
        if mtype in _NEEDS_FROM and not sender:
            return "1010"
        if sender and self.senders is not None and sender not in self.senders:
            return "1062"
        if to in self.blocked:
            return "1060"
        if self.balance <= 0:
            return "1030"
        code = self._check_text(message, mtype) or self._check_custom(message.get("customFields"))
        if code:
            return code
        if "kakaoOptions" in message and mtype not in _KAKAO:
            return "1033"
        checker = _TYPE_CHECKS.get(mtype)
        return checker(self, message) if checker is not None else None

    @staticmethod
    def _check_text(message: Mapping[str, Any], mtype: str) -> str | None:
        text = message.get("text")
        subject = message.get("subject")
        if text is not None and not isinstance(text, str):
            return "1011"
        if not text:
            return "1010" if mtype in _NEEDS_TEXT else None
        if mtype in ("SMS", "RCS_SMS"):
            if subject:
                return "1013"
            return "1031" if _carrier_bytes(text) > 90 else None
        if mtype in ("LMS", "MMS", "RCS_LMS", "RCS_MMS"):
            if subject is not None and (not isinstance(subject, str) or _carrier_bytes(subject) > 40):
                return "1014"
            return "1031" if _carrier_bytes(text) > 2000 else None
        limit = {"ATA": 1000, "CTA": 1000, "CTI": 400}.get(mtype)
        return "1031" if limit is not None and len(text) > limit else None

    @staticmethod
    def _check_custom(custom: object) -> str | None:
        if custom is None:
            return None
        if custom.__class__ is not dict:
            return "1032"
        for key, value in custom.items():
            if value.__class__ is not str or len(key) > 30 or len(value) > 100:
                return "1032"
        return None

    def _check_file(self, file_id: object, file_type: str, missing: str = "1034") -> str | None:
        if not file_id:
            return "1010"
        info = self.files.get(str(file_id))
        return None if info is not None and info["type"] == file_type else missing

    def _check_mms(self, message: Mapping[str, Any]) -> str | None:
        return self._check_file(message.get("imageId"), "MMS")

    def _check_kakao(self, message: Mapping[str, Any]) -> str | None:
        options = message.get("kakaoOptions")
        if not isinstance(options, dict) or not options.get("pfId"):
            return "1010"
        if self.pf_ids is not None and options["pfId"] not in self.pf_ids:
            return "1041"
        mtype = message.get("type") or _detect_type(message)
        if mtype == "ATA":
            template = options.get("templateId")
            if not template:
                return "1010"
            if self.templates is not None and template not in self.templates:
                return "1042"
            if self.alimtalk_templates is not None:
                return self._check_template(str(template), message, options)
        if "disableSms" in options and not isinstance(options["disableSms"], bool):
            return "1011"
        variables = options.get("variables")
        if variables is not None and (
            not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values())
        ):
            return "1011"
        buttons = options.get("buttons")
        if buttons is not None and (not isinstance(buttons, list) or len(buttons) > 5):
            return "1050"
        if mtype == "CTI":
            return self._check_file(options.get("imageId"), "KAKAO", "1051")
        return None

    def _check_template(self, code: str, message: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        raw = options.get("variables")
        if isinstance(raw, dict):
            # On the wire the names keep their "#{...}"; the text is then the SMS replacement's.
            variables = {str(k).removeprefix("#{").removesuffix("}"): str(v) for k, v in raw.items()}
            why = refusal(self.alimtalk_templates, code, variables=variables)
        else:
            text = message.get("text")
            why = refusal(self.alimtalk_templates, code, text=text if isinstance(text, str) else "", variables={})
        return {"unknown": "1042", "not_approved": "1042", "mismatch": "1043"}.get(why or "")

    def _templates(self, request: FakeRequest) -> FakeResponse:
        """``GET /kakao/v2/templates``: ``limit`` and ``startKey`` page through the list."""
        query = {k: v[0] for k, v in request.query.items() if v}
        try:
            limit = max(1, min(int(query.get("limit") or 100), 500))
            start = int(query.get("startKey") or 0)
        except ValueError:
            return _error(400, "ValidationError", "limit and startKey must be numbers")
        every = list((self.alimtalk_templates or {}).values())
        words = {"approved": "APPROVED", "inspecting": "INSPECTING", "rejected": "REJECTED"}
        page = [
            {
                "templateId": t.code,
                "name": t.name or t.code,
                "content": t.body,
                "status": words.get(t.status, "PENDING"),
                "channelId": t.channel or None,
                "variables": [{"name": f"#{{{v}}}"} for v in t.variables],
                "buttons": [
                    {
                        "buttonType": b.get("type"),
                        "buttonName": b.get("name"),
                        "linkMo": b.get("url_mobile"),
                        "linkPc": b.get("url_pc"),
                    }
                    for b in t.buttons
                ],
            }
            for t in every[start : start + limit]
        ]
        next_key = str(start + limit) if start + limit < len(every) else None
        return FakeResponse(200, {"templateList": page, "startKey": str(start), "limit": limit, "nextKey": next_key})

    @staticmethod
    def _check_naver(message: Mapping[str, Any]) -> str | None:
        options = message.get("naverOptions")
        if not isinstance(options, dict) or not options.get("talkId") or not options.get("templateId"):
            return "1010"
        return None

    @staticmethod
    def _check_voice(message: Mapping[str, Any]) -> str | None:
        options = message.get("voiceOptions") or {}
        if not isinstance(options, dict) or options.get("voiceType", "FEMALE") not in ("FEMALE", "MALE"):
            return "1011"
        return None

    def _check_fax(self, message: Mapping[str, Any]) -> str | None:
        options = message.get("faxOptions")
        ids = options.get("fileIds") if isinstance(options, dict) else None
        if not isinstance(ids, list) or not ids:
            return "1010"
        for file_id in ids:
            code = self._check_file(file_id, "FAX")
            if code:
                return code
        return None

    def _check_rcs(self, message: Mapping[str, Any]) -> str | None:
        options = message.get("rcsOptions")
        if not isinstance(options, dict) or not options.get("brandId"):
            return "1010"
        if message.get("type") in ("RCS_TPL", "RCS_ITPL", "RCS_LTPL") and not options.get("templateId"):
            return "1010"
        if message.get("imageId"):
            code = self._check_file(message["imageId"], "RCS")
            if code:
                return code
        extra = options.get("additionalBody")
        if extra is not None:
            # Solapi's key is the misspelled "imaggeId"; the correct spelling is a format error.
            if not isinstance(extra, dict) or "imageId" in extra:
                return "1011"
        return None

    # -- list --------------------------------------------------------------------------------------

    def _list(self, request: FakeRequest) -> FakeResponse:
        query = request.query
        try:
            limit = int((query.get("limit") or ["20"])[-1])
        except ValueError:
            return _error(400, "ValidationError", "limit must be a number")
        if not 1 <= limit <= 500:
            return _error(400, "ValidationError", "limit must be between 1 and 500")
        filters = {key: query[key][-1] for key in _SEARCHABLE if key in query}
        criteria = (query.get("criteria") or [""])[-1]
        if criteria:
            names = criteria.split(",")
            values = (query.get("value") or [""])[-1].split(",")
            conds = (query.get("cond") or ["eq"])[-1].split(",")
            if len(names) != len(values) or any(c != "eq" for c in conds) or not set(names) <= _SEARCHABLE:
                return _error(400, "ValidationError", "criteria, cond and value do not match (only eq is supported)")
            filters.update(zip(names, values, strict=True))
        ids = [v for key, vals in query.items() if key == "messageIds" or key.startswith("messageIds[") for v in vals]
        since = _parse_time(query["startDate"][-1]) if "startDate" in query else None
        until = _parse_time(query["endDate"][-1]) if "endDate" in query else None
        now = self.ledger.clock()
        status_filter = filters.pop("statusCode", None)
        rows = [
            row
            for row in self._candidates(filters.pop("messageId", None), ids, filters.get("groupId"))
            if self._row_matches(row, filters, since, until)
            # A replacement exists from the moment its AlimTalk failed.
            and not (isinstance(row, LedgerEntry) and "replacementOf" in row.fields and row.accepted_at > now)
        ]
        if status_filter is not None:
            rows = [r for r in rows if self._record(r, now)["statusCode"] == status_filter]
        start_key: str | None = (query.get("startKey") or [""])[-1] or None
        start = 0
        if start_key:
            start = next((i for i, r in enumerate(rows) if _row_id(r) == start_key), len(rows))
        page = [self._record(r, now) for r in rows[start : start + limit]]
        next_key = _row_id(rows[start + limit]) if start + limit < len(rows) else None
        return _json(
            {
                "startKey": start_key,
                "nextKey": next_key,
                "limit": limit,
                "messageList": {r["messageId"]: r for r in page},
            }
        )

    def _row_matches(
        self,
        row: LedgerEntry | dict[str, Any],
        filters: Mapping[str, str],
        since: float | None,
        until: float | None,
    ) -> bool:
        if isinstance(row, dict):
            created = row["created"]
            values = {
                "groupId": row["groupId"],
                "to": row["to"],
                "from": row.get("from"),
                "type": row.get("type"),
            }
        else:
            created = self._created(row)
            values = {"groupId": row.group_id, "to": row.to, "from": row.fields.get("from"), "type": row.type}
        if (since is not None and created < since) or (until is not None and created > until):
            return False
        return all(str(values.get(k)) == v for k, v in filters.items())

    def _candidates(
        self, message_id: str | None, ids: list[str], group_id: str | None
    ) -> Iterable[LedgerEntry | dict[str, Any]]:
        wanted = ([message_id] if message_id else []) + ids
        if wanted:
            found: list[LedgerEntry | dict[str, Any]] = []
            for mid in dict.fromkeys(wanted):
                entry = self.ledger.get(mid) or self._replacement_ids.get(mid)
                row = entry if entry is not None else self.failed.get(mid)
                if row is not None:
                    found.append(row)
            return found
        entries: list[LedgerEntry | dict[str, Any]] = list(self.ledger.entries.values())
        entries.extend(self.failed.values())
        entries.extend(self.replacements.values())
        if group_id:
            return [r for r in entries if (r.group_id if isinstance(r, LedgerEntry) else r["groupId"]) == group_id]
        return entries

    def _created(self, row: LedgerEntry) -> float:
        # Messages are created with their group; a replacement when its AlimTalk failed.
        if "replacementOf" in row.fields:
            return row.accepted_at
        created: float = self.groups.get(row.group_id or "", {}).get("created", row.accepted_at)
        return created

    def _record(self, row: LedgerEntry | dict[str, Any], now: float) -> dict[str, Any]:
        if isinstance(row, dict):
            created = _iso(row["created"])
            return {
                **{k: v for k, v in row.items() if k != "created"},
                "status": "FAILED",
                "dateCreated": created,
                "dateUpdated": created,
                "dateSent": None,
                "dateCompleted": None,
            }
        state, code, text = row.state(now)
        rule = row.rule
        sent_at = completed_at = None
        if state == "PENDING":
            code, status = "2000", "PENDING"
        elif state == "SENT":
            code, status = "3000", "SENDING"
            sent_at = row.accepted_at + rule.sent_after
        else:
            code = code or ("4000" if state == "DELIVERED" else _DEFAULT_FAILED_CODE)
            status = "COMPLETE" if state == "DELIVERED" else "FAILED"
            sent_at = row.accepted_at + min(rule.sent_after, rule.final_after)
            completed_at = row.accepted_at + rule.final_after
        fields = row.fields
        created_at = self._created(row)
        replacement = self.replacements.get(row.provider_message_id)
        if replacement is not None and replacement.accepted_at <= now:
            replacements = [{"messageId": replacement.provider_message_id, "type": replacement.type}]
        else:
            replacements = []
        return {
            "messageId": row.provider_message_id,
            "groupId": row.group_id,
            "type": row.type,
            "to": row.to,
            "from": fields.get("from"),
            "country": fields.get("country") or "82",
            "text": row.text,
            "subject": fields.get("subject"),
            "statusCode": code,
            "statusMessage": text or STATUS_MESSAGES.get(code, ""),
            "status": status,
            "customFields": fields.get("customFields") or {},
            "kakaoOptions": fields.get("kakaoOptions"),
            "replacement": "replacementOf" in fields,
            "replacements": replacements,
            "dateCreated": _iso(created_at),
            "dateUpdated": _iso(completed_at or sent_at or created_at),
            "dateSent": _iso(sent_at) if sent_at is not None else None,
            "dateCompleted": _iso(completed_at) if completed_at is not None else None,
        }

    # -- storage -----------------------------------------------------------------------------------

    def _upload(self, request: FakeRequest) -> FakeResponse:
        try:
            body = request.json()
        except ValueError:
            return _error(400, "ValidationError", "body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "ValidationError", "body must be an object")
        file_type, data = body.get("type"), body.get("file")
        if file_type not in _FILE_TYPES:
            return _error(400, "ValidationError", f"type must be one of {', '.join(sorted(_FILE_TYPES))}")
        if not isinstance(data, str) or not data:
            return _error(400, "ValidationError", "file (base64) is required")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return _error(400, "ValidationError", "file must be base64")
        link = body.get("link")
        if file_type == "KAKAO" and not link:
            return _error(400, "ValidationError", "link is required for KAKAO images")
        now = self.ledger.clock()
        file_id = self._new_id("ST01FZ", now)
        name = body.get("name") or "file"
        self.files[file_id] = {"type": file_type, "name": name, "size": len(raw), "link": link}
        return FakeResponse(
            200,
            {
                "fileId": file_id,
                "type": file_type,
                "name": name,
                "originalName": name,
                "link": link,
                "accountId": "fake-account",
                "dateCreated": _iso(now),
                "dateUpdated": _iso(now),
            },
        )


def _row_id(row: LedgerEntry | dict[str, Any]) -> str:
    return row.provider_message_id if isinstance(row, LedgerEntry) else str(row["messageId"])


def _detect_type(message: Mapping[str, Any]) -> str:
    # Solapi's autoTypeDetect: Kakao options decide first, then image, then length.
    options = message.get("kakaoOptions")
    if isinstance(options, dict):
        if options.get("templateId"):
            return "ATA"
        return "CTI" if options.get("imageId") else "CTA"
    if message.get("imageId"):
        return "MMS"
    text = message.get("text")
    return "LMS" if isinstance(text, str) and _carrier_bytes(text) > 90 else "SMS"


_TYPE_CHECKS: dict[str, Callable[[FakeSolapiServer, Mapping[str, Any]], str | None]] = {
    "MMS": FakeSolapiServer._check_mms,
    "ATA": FakeSolapiServer._check_kakao,
    "CTA": FakeSolapiServer._check_kakao,
    "CTI": FakeSolapiServer._check_kakao,
    "NSA": lambda server, message: FakeSolapiServer._check_naver(message),
    "VOICE": lambda server, message: FakeSolapiServer._check_voice(message),
    "FAX": FakeSolapiServer._check_fax,
    "RCS_SMS": FakeSolapiServer._check_rcs,
    "RCS_LMS": FakeSolapiServer._check_rcs,
    "RCS_MMS": FakeSolapiServer._check_rcs,
    "RCS_TPL": FakeSolapiServer._check_rcs,
    "RCS_ITPL": FakeSolapiServer._check_rcs,
    "RCS_LTPL": FakeSolapiServer._check_rcs,
}
