"""A fake Aligo: the SMS API and the Kakao (AlimTalk/FriendTalk) API on one loopback port.

Endpoints (all ``POST``, multipart/form-data or urlencoded):

* ``/send/`` — ``key``, ``user_id``, ``sender``, ``receiver`` (comma-separated, at most 1,000),
  ``msg`` (1-2,000 bytes), ``msg_type`` (SMS/LMS/MMS), ``title`` (at most 44 bytes), ``rdate`` /
  ``rtime``, ``image`` (URL) or ``image1..3`` (JPEG/PNG/GIF file), ``testmode_yn``;
* ``/send_mass/`` — ``key``, ``user_id``, ``sender``, ``msg_type`` (required), ``cnt`` (1-500) and
  ``rec_N`` / ``msg_N`` for N = 1..cnt (each text 1-2,000 bytes, at most 90 for SMS), ``title``,
  ``rdate`` / ``rtime``, the image fields, ``testmode_yn``; one ``msg_id`` for the request;
* ``/sms_list/`` — ``key``, ``user_id``, ``mid``, ``page`` (from 1), ``page_size`` (30-500, default
  30) -> ``list`` of ``{mdid, type, sender, receiver, sms_state, reg_date, send_date,
  reserve_date}`` in request order and ``next_yn``; ``sms_state`` progresses with the ledger's
  delivery rules: ``대기중`` (this fake's word for "not handed over yet"), ``전송중``, then
  ``발송완료`` or the rule's ``message`` / ``code`` (default ``전송실패``);
* ``/list/`` — ``key``, ``user_id``, ``page``, ``page_size``, ``start_date`` (YYYYMMDD, default
  today), ``limit_day`` (default 7) -> ``list`` of the requests sent ``{mid, type, sender,
  sms_count, reserve_state, msg, fail_count, reg_date, reserve}``, newest first, and ``next_yn``;
* ``/remain/`` — ``key``, ``user_id`` -> ``SMS_CNT``, ``LMS_CNT``, ``MMS_CNT``;
* ``/akv10/alimtalk/send/`` and ``/akv10/friendtalk/send/`` — ``apikey``, ``userid``,
  ``senderkey``, ``tpl_code`` (AlimTalk), ``sender``, ``receiver_N`` / ``subject_N`` /
  ``message_N`` / ``button_N`` / ``image_N`` / ``fsubject_N`` / ``fmessage_N`` for N = 1..500,
  ``failover``, ``testMode``, ``reserve`` / ``reserve_date`` / ``reserve_time`` / ``senddate``.

Like Aligo, every refusal is HTTP 200 with a negative code and a message. Codes used:

======== ==========================================================================================
``-101`` wrong ``key``/``user_id`` (or ``apikey``/``userid``) — Aligo's authentication error
``-103`` a required field is missing or a value is out of range (text bytes, title bytes, dates,
         image, button JSON, no valid receiver) — one of Aligo's documented invalid-request codes
``-105`` too many receivers in one request (more than 1,000 on ``/send/``, 500 on ``/send_mass/``
         and Kakao)
``-201`` not enough remaining messages (see :attr:`FakeAligoServer.remain`)
``-501`` unknown AlimTalk template code
``-990`` the sender number is not registered — **this fake's own code**; the real code is not in
         our reference, so the adapter treats it as an unclassified (transient) provider error
``-991`` the Kakao sender key is unknown — **this fake's own code**, same caveat
======== ==========================================================================================

A successful ``/send/`` or ``/send_mass/`` answers ``{result_code, message, msg_id, success_cnt, error_cnt,
msg_type}``; receivers that are not domestic numbers (``0`` + 8-10 digits) are counted in
``error_cnt`` and not accepted. Each accepted recipient is recorded in the :class:`Ledger` under the
id ``"<msg_id>:<n>"`` (``n`` = its 1-based position in the request), the id the adapter reports.

``response_shape`` chooses between the shapes Aligo is seen to use:
``"result_code_string"`` (``"1"`` / ``"0"`` strings, the default),
``"result_code_number"`` (the same with numbers) and ``"code_info"`` (Kakao endpoints answer
``{code: 0, message, info: {type, mid, current, unit, total, scnt, fcnt}}``; the SMS endpoints
then use numeric ``result_code``). Requests in test mode (``testmode_yn``/``testMode`` = ``Y``) are
recorded with ``fields["test_mode"] = True`` and cost nothing.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from kmsg_worker.message import count_bytes
from kmsg_worker.testing.fake_templates import FakeTemplate, refusal, template_map
from kmsg_worker.testing.fakeserver import (
    Clock,
    FakeProviderServer,
    FakeRequest,
    FakeResponse,
    LedgerEntry,
    parse_multipart,
)

__all__ = [
    "CODE_UNKNOWN_SENDER_KEY",
    "CODE_UNREGISTERED_SENDER",
    "DEFAULT_API_KEY",
    "DEFAULT_SENDERS",
    "DEFAULT_SENDER_KEY",
    "DEFAULT_TEMPLATES",
    "DEFAULT_USER_ID",
    "RESPONSE_SHAPES",
    "FakeAligoServer",
]

DEFAULT_API_KEY = "fake-aligo-api-key-7d1c3e9b"
DEFAULT_USER_ID = "fakeuser"
DEFAULT_SENDER_KEY = "fake-aligo-sender-key-4a8f2b6e"
DEFAULT_SENDERS = ("0212345678", "15881234", "01000000000")
DEFAULT_TEMPLATES: Mapping[str, str] = {
    "TPL_OTP": "인증번호는 [#{code}] 입니다.",
    "TPL_ORDER": "#{name}님, 주문이 접수되었습니다.",
}
RESPONSE_SHAPES = ("result_code_string", "result_code_number", "code_info")

#: This fake's code for an unregistered sender number (not a documented Aligo code).
CODE_UNREGISTERED_SENDER = -990
#: This fake's code for an unknown Kakao sender key (not a documented Aligo code).
CODE_UNKNOWN_SENDER_KEY = -991

_RECEIVER = re.compile(r"^0\d{8,10}$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{4}$")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8")
_SMS_MAX_RECEIVERS = 1000
_MASS_MAX_RECEIVERS = 500
_KAKAO_MAX_RECEIVERS = 500
_SEOUL = ZoneInfo("Asia/Seoul")
#: Aligo-like ``sms_state`` words per ledger state (the final FAILED word comes from the rule).
_SMS_STATES = {"PENDING": "대기중", "SENT": "전송중", "DELIVERED": "발송완료"}


@dataclass
class _SentRequest:
    """One accepted SMS-API request, as ``/list/`` and ``/sms_list/`` report it."""

    mid: int
    msg_type: str
    sender: str
    msg: str
    accepted_at: float
    reserve: str | None
    refused: int
    entries: list[LedgerEntry] = field(default_factory=list)


def _seoul_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, _SEOUL).strftime("%Y-%m-%d %H:%M:%S")


class _Refusal(Exception):
    """Raised inside a handler: answer this Aligo failure code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeAligoServer(FakeProviderServer):
    """Fake Aligo SMS and Kakao APIs; see the module docstring for the endpoints and codes.

    Args:
        host: Always loopback.
        port: 0 picks a free port.
        clock: Time source of the ledger.
        api_key: The valid API key (``key`` / ``apikey``).
        user_id: The valid user id (``user_id`` / ``userid``).
        sender_key: The valid Kakao sender profile key.
        senders: Registered sender numbers.
        templates: AlimTalk template codes (-> template text, kept for reference).
        alimtalk_templates: AlimTalk templates with bodies and approval states (listed and enforced).
        response_shape: One of :data:`RESPONSE_SHAPES`.
        remain: Remaining messages per type (``SMS``, ``LMS``, ``MMS``) for ``/remain/`` and ``-201``.
    """

    name = "aligo"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Clock = time.time,
        api_key: str = DEFAULT_API_KEY,
        user_id: str = DEFAULT_USER_ID,
        sender_key: str = DEFAULT_SENDER_KEY,
        senders: Iterable[str] = DEFAULT_SENDERS,
        templates: Mapping[str, str] | None = None,
        alimtalk_templates: Iterable[FakeTemplate] | None = None,
        response_shape: str = "result_code_string",
        remain: Mapping[str, int] | None = None,
    ) -> None:
        if response_shape not in RESPONSE_SHAPES:
            raise ValueError(f"response_shape must be one of {', '.join(RESPONSE_SHAPES)}")
        super().__init__(host, port, clock=clock)
        self.api_key = api_key
        self.user_id = user_id
        self.sender_key = sender_key
        self.senders = set(senders)
        self.templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
        #: AlimTalk templates with approval states; when set, they are what ``/akv10/template/list/``
        #: lists, and a send of an unknown or unapproved one, or one whose ``message_N`` is not the
        #: body with values in place of its variables, is refused with -501.
        self.alimtalk_templates = template_map(alimtalk_templates)
        self.response_shape = response_shape
        #: Remaining messages per type; a send needing more is refused with -201.
        self.remain: dict[str, int] = {"SMS": 10**9, "LMS": 10**9, "MMS": 10**9, **(remain or {})}
        #: Media types of the request bodies seen (``multipart/form-data`` ...), for wire checks.
        self.content_types: Counter[str] = Counter()
        #: Accepted SMS-API requests by ``mid`` (what ``/list/`` and ``/sms_list/`` read).
        self.sent: dict[int, _SentRequest] = {}
        self._lock = threading.Lock()
        self._routes = {
            "/send/": self._send,
            "/send_mass/": self._send_mass,
            "/list/": self._list,
            "/sms_list/": self._sms_list,
            "/remain/": self._remain,
            "/akv10/alimtalk/send/": self._alimtalk,
            "/akv10/friendtalk/send/": self._friendtalk,
            "/akv10/template/list/": self._template_list,
        }

    # -- dispatch ---------------------------------------------------------------------------------

    def handle(self, request: FakeRequest) -> FakeResponse:
        """Answer one Aligo API request."""
        path = request.path if request.path.endswith("/") else request.path + "/"
        route = self._routes.get(path)
        if route is None:
            return FakeResponse(404, {"result_code": "-404", "message": "unknown endpoint"})
        if request.method != "POST":
            return FakeResponse(405, {"result_code": "-405", "message": "POST only"})
        kakao = path.startswith("/akv10/")
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
        with self._lock:
            self.content_types[content_type] += 1
        try:
            form = parse_multipart(request)
            return route(form)
        except _Refusal as refusal:
            with self._lock:
                self.ledger.rejected += 1
            return FakeResponse(200, self._failure(refusal, kakao=kakao))
        except ValueError:
            return FakeResponse(200, self._failure(_Refusal(-103, "폼 데이터가 아닙니다."), kakao=kakao))

    # -- response shapes --------------------------------------------------------------------------

    def _code(self, code: int) -> int | str:
        return str(code) if self.response_shape == "result_code_string" else code

    def _failure(self, refusal: _Refusal, *, kakao: bool) -> dict[str, Any]:
        if kakao and self.response_shape == "code_info":
            return {"code": refusal.code, "message": refusal.message}
        return {"result_code": self._code(refusal.code), "message": refusal.message}

    def _sms_success(self, msg_id: int, accepted: int, refused: int, msg_type: str) -> dict[str, Any]:
        return {
            "result_code": self._code(1),
            "message": "success",
            "msg_id": self._code(msg_id),
            "success_cnt": accepted,
            "error_cnt": refused,
            "msg_type": msg_type,
        }

    def _kakao_success(self, msg_id: int, accepted: int, refused: int, kind: str) -> dict[str, Any]:
        message = "성공적으로 전송요청 하였습니다."
        if self.response_shape == "code_info":
            info = {
                "type": kind,
                "mid": msg_id,
                "current": str(self.remain["SMS"]),
                "unit": 1,
                "total": accepted,
                "scnt": accepted,
                "fcnt": refused,
            }
            return {"code": 0, "message": message, "info": info}
        return {
            "result_code": self._code(0),
            "message": message,
            "msg_id": self._code(msg_id),
            "success_cnt": accepted,
            "error_cnt": refused,
        }

    # -- checks -----------------------------------------------------------------------------------

    def _check_auth(self, form: Mapping[str, Any], key: str, user: str) -> None:
        if form.get(key) != self.api_key or form.get(user) != self.user_id:
            raise _Refusal(-101, "인증오류입니다.")

    def _check_sender(self, form: Mapping[str, Any]) -> str:
        sender = form.get("sender")
        if not isinstance(sender, str) or not sender:
            raise _Refusal(-103, "발신번호가 없습니다.")
        if sender not in self.senders:
            raise _Refusal(CODE_UNREGISTERED_SENDER, "등록되지 않은 발신번호입니다.")
        return sender

    @staticmethod
    def _check_schedule(date: Any, clock_time: Any) -> None:
        if date is None and clock_time is None:
            return
        if not (
            isinstance(date, str) and _DATE.match(date) and isinstance(clock_time, str) and _TIME.match(clock_time)
        ):
            raise _Refusal(-103, "예약일시 형식이 올바르지 않습니다.")

    @staticmethod
    def _check_image(form: Mapping[str, Any]) -> Any:
        files = [form[name] for name in ("image", "image1", "image2", "image3") if name in form]
        if not files:
            raise _Refusal(-103, "MMS 이미지가 없습니다.")
        for value in files:
            if isinstance(value, bytes) and not value.startswith(_IMAGE_MAGIC):
                raise _Refusal(-103, "이미지는 JPEG, PNG, GIF만 가능합니다.")
            if not value:
                raise _Refusal(-103, "MMS 이미지가 비어 있습니다.")
        first = files[0]
        return f"<{len(first)} bytes>" if isinstance(first, bytes) else first

    def _charge(self, msg_type: str, count: int) -> None:
        with self._lock:
            if self.remain.get(msg_type, 0) < count:
                raise _Refusal(-201, "잔여건수가 부족합니다.")
            self.remain[msg_type] -= count

    def _next_msg_id(self) -> int:
        return 700_000_000 + int(self.ledger.next_id())

    def _finish(self, entries: list[LedgerEntry]) -> None:
        self.ledger.accept(entries)
        if self.should_lose_response():
            self.drop_connection()

    # -- endpoints --------------------------------------------------------------------------------

    @staticmethod
    def _check_text(msg: Any, msg_type: str | None) -> str:
        if not isinstance(msg, str) or not 1 <= (size := count_bytes(msg)) <= 2000:
            raise _Refusal(-103, "메시지 내용은 1~2,000 byte 입니다.")
        kind = msg_type or ("LMS" if size > 90 else "SMS")
        if kind not in ("SMS", "LMS", "MMS") or (kind == "SMS" and size > 90):
            raise _Refusal(-103, "메시지 타입이 올바르지 않습니다.")
        return kind

    def _check_request(self, form: Mapping[str, Any], msg_type: str) -> dict[str, Any]:
        """Checks shared by ``/send/`` and ``/send_mass/``; returns the request-level fields."""
        title = form.get("title")
        if title is not None and (not isinstance(title, str) or not 1 <= count_bytes(title) <= 44):
            raise _Refusal(-103, "제목은 1~44 byte 입니다.")
        image = self._check_image(form) if msg_type == "MMS" else None
        rdate, rtime = form.get("rdate"), form.get("rtime")
        self._check_schedule(rdate, rtime)
        test_mode = str(form.get("testmode_yn", "N")).upper() == "Y"
        return {"title": title, "rdate": rdate, "rtime": rtime, "image": image, "test_mode": test_mode}

    def _accept_sms(
        self, sender: str, msg_type: str, fields: dict[str, Any], pairs: list[tuple[int, str, str]], total: int
    ) -> FakeResponse:
        """Charge, record and answer the valid ``(n, receiver, text)`` pairs of one SMS-API request."""
        if not fields["test_mode"]:
            self._charge(msg_type, len(pairs))
        msg_id = self._next_msg_id()
        now = self.ledger.clock()
        fields = {"sender": sender, **fields}  # shared by every recipient of the request (read-only)
        group, rule = str(msg_id), self.ledger.default_rule  # accept() sets each entry's real rule
        entries = [
            LedgerEntry(f"{msg_id}:{n}", r, msg_type, now, None, group, text, fields, rule) for n, r, text in pairs
        ]
        reserve = f"{fields['rdate']}{fields['rtime']}" if fields.get("rdate") else None
        with self._lock:
            self.sent[msg_id] = _SentRequest(
                msg_id, msg_type, sender, pairs[0][2], now, reserve, total - len(pairs), entries
            )
        self._finish(entries)
        return FakeResponse(200, self._sms_success(msg_id, len(pairs), total - len(pairs), msg_type))

    def _send(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        sender = self._check_sender(form)
        msg = form.get("msg")
        msg_type = self._check_text(msg, form.get("msg_type"))
        fields = self._check_request(form, msg_type)
        receivers = [r.strip() for r in str(form.get("receiver") or "").split(",")]
        if len(receivers) > _SMS_MAX_RECEIVERS:
            raise _Refusal(-105, "수신자는 최대 1,000명입니다.")
        valid = [(n, r, str(msg)) for n, r in enumerate(receivers, 1) if _RECEIVER.match(r)]
        if not valid:
            raise _Refusal(-103, "올바른 수신번호가 없습니다.")
        return self._accept_sms(sender, msg_type, fields, valid, len(receivers))

    def _send_mass(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        sender = self._check_sender(form)
        msg_type = form.get("msg_type")
        if msg_type not in ("SMS", "LMS", "MMS"):
            raise _Refusal(-103, "msg_type(SMS, LMS, MMS)은 필수입니다.")
        try:
            count = int(str(form.get("cnt")))
        except ValueError:
            raise _Refusal(-103, "cnt 가 올바르지 않습니다.") from None
        if count > _MASS_MAX_RECEIVERS:
            raise _Refusal(-105, "수신자는 최대 500명입니다.")
        if count < 1:
            raise _Refusal(-103, "cnt 가 올바르지 않습니다.")
        fields = self._check_request(form, msg_type)
        pairs: list[tuple[int, str, str]] = []
        for n in range(1, count + 1):
            receiver, msg = form.get(f"rec_{n}"), form.get(f"msg_{n}")
            if not isinstance(receiver, str) or not receiver:
                raise _Refusal(-103, f"rec_{n} 가 없습니다.")
            self._check_text(msg, msg_type)
            if _RECEIVER.match(receiver.strip()):
                pairs.append((n, receiver.strip(), str(msg)))
        if not pairs:
            raise _Refusal(-103, "올바른 수신번호가 없습니다.")
        return self._accept_sms(sender, msg_type, fields, pairs, count)

    @staticmethod
    def _paging(form: Mapping[str, Any], default_size: int, low: int) -> tuple[int, int]:
        try:
            page = int(str(form.get("page") or 1))
            size = int(str(form.get("page_size") or default_size))
        except ValueError:
            raise _Refusal(-103, "page / page_size 가 올바르지 않습니다.") from None
        if page < 1 or not low <= size <= 500:
            raise _Refusal(-103, "page / page_size 가 올바르지 않습니다.")
        return page, size

    def _sms_state(self, entry: LedgerEntry, now: float) -> str:
        state, _, message = entry.state(now)
        if state == "FAILED":
            return message or entry.rule.code or "전송실패"
        return _SMS_STATES.get(state, state)

    def _sms_list(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        try:
            mid = int(str(form.get("mid")))
        except ValueError:
            raise _Refusal(-103, "mid 가 올바르지 않습니다.") from None
        page, size = self._paging(form, 30, 30)
        with self._lock:
            sent = self.sent.get(mid)
        entries = sent.entries if sent is not None else []
        rows = entries[(page - 1) * size : page * size]
        now = self.ledger.clock()
        listed = [
            {
                "mdid": f"{mid}{n:04d}",
                "type": entry.type,
                "sender": entry.fields.get("sender"),
                "receiver": entry.to,
                "sms_state": self._sms_state(entry, now),
                "reg_date": _seoul_text(entry.accepted_at),
                "send_date": _seoul_text(entry.accepted_at + entry.rule.sent_after),
                "reserve_date": sent.reserve if sent is not None else None,
            }
            for n, entry in enumerate(rows, (page - 1) * size + 1)
        ]
        more = len(entries) > page * size
        return FakeResponse(
            200, {"result_code": self._code(1), "message": "success", "list": listed, "next_yn": "Y" if more else "N"}
        )

    def _list(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        page, size = self._paging(form, 30, 1)
        now = self.ledger.clock()
        raw_start = form.get("start_date")
        try:
            start = (
                datetime.strptime(str(raw_start), "%Y%m%d").replace(tzinfo=_SEOUL)
                if raw_start
                else datetime.fromtimestamp(now, _SEOUL).replace(hour=0, minute=0, second=0, microsecond=0)
            )
            days = int(str(form.get("limit_day") or 7))
        except ValueError:
            raise _Refusal(-103, "start_date / limit_day 가 올바르지 않습니다.") from None
        # Aligo reads back from start_date over limit_day days.
        low, high = (start - timedelta(days=days - 1)).timestamp(), (start + timedelta(days=1)).timestamp()
        with self._lock:
            chosen = [r for r in self.sent.values() if low <= r.accepted_at < high]
        chosen.sort(key=lambda r: r.mid, reverse=True)
        rows = chosen[(page - 1) * size : page * size]
        listed = [
            {
                "mid": r.mid,
                "type": r.msg_type,
                "sender": r.sender,
                "sms_count": len(r.entries),
                "reserve_state": "예약대기중" if r.reserve else "",
                "msg": r.msg,
                "fail_count": r.refused,
                "reg_date": _seoul_text(r.accepted_at),
                "reserve": r.reserve or "",
            }
            for r in rows
        ]
        more = len(chosen) > page * size
        return FakeResponse(
            200, {"result_code": self._code(1), "message": "success", "list": listed, "next_yn": "Y" if more else "N"}
        )

    def _remain(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        with self._lock:
            counts = {f"{kind}_CNT": self.remain[kind] for kind in ("SMS", "LMS", "MMS")}
        return FakeResponse(200, {"result_code": self._code(1), "message": "success", **counts})

    def _alimtalk(self, form: Mapping[str, Any]) -> FakeResponse:
        return self._kakao(form, "ALIMTALK")

    def _template_list(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "apikey", "userid")
        if form.get("senderkey") != self.sender_key:
            raise _Refusal(CODE_UNKNOWN_SENDER_KEY, "발신프로필 키가 유효하지 않습니다.")
        templates = self.alimtalk_templates
        if templates is None:
            templates = {code: FakeTemplate(code, body) for code, body in self.templates.items()}
        words = {"approved": "APR", "inspecting": "REQ", "rejected": "REJ"}
        listed = [
            {
                "templtCode": t.code,
                "templtName": t.name or t.code,
                "templtContent": t.body,
                "inspStatus": words.get(t.status, "REG"),
                "status": "R",
                "buttons": [
                    {"name": b.get("name"), "linkType": b.get("type"), "linkMo": b.get("url_mobile")} for b in t.buttons
                ],
            }
            for t in templates.values()
        ]
        return FakeResponse(200, {"code": 0, "message": "정상적으로 조회하였습니다.", "list": listed})

    def _friendtalk(self, form: Mapping[str, Any]) -> FakeResponse:
        return self._kakao(form, "FRIENDTALK")

    def _kakao(self, form: Mapping[str, Any], kind: str) -> FakeResponse:
        self._check_auth(form, "apikey", "userid")
        if form.get("senderkey") != self.sender_key:
            raise _Refusal(CODE_UNKNOWN_SENDER_KEY, "발신프로필 키가 유효하지 않습니다.")
        tpl_code = form.get("tpl_code")
        known = self.templates if self.alimtalk_templates is None else self.alimtalk_templates
        if kind == "ALIMTALK" and tpl_code not in known:
            raise _Refusal(-501, "템플릿 코드가 존재하지 않습니다.")
        sender = self._check_sender(form)
        count = sum(1 for name in form if name.startswith("receiver_"))
        if count == 0:
            raise _Refusal(-103, "수신자가 없습니다.")
        if count > _KAKAO_MAX_RECEIVERS:
            raise _Refusal(-105, "수신자는 최대 500명입니다.")
        reserved = form.get("reserve") == "Y"
        if reserved:
            self._check_schedule(form.get("reserve_date"), form.get("reserve_time"))
        common = {
            "sender": sender,
            "tpl_code": tpl_code,
            "failover": form.get("failover", "N"),
            "reserve_date": form.get("reserve_date") if reserved else None,
            "reserve_time": form.get("reserve_time") if reserved else None,
            "test_mode": str(form.get("testMode", "N")).upper() == "Y",
        }
        msg_id = self._next_msg_id()
        now, rule = self.ledger.clock(), self.ledger.default_rule
        entries: list[LedgerEntry] = []
        refused = 0
        for n in range(1, count + 1):
            receiver, message = form.get(f"receiver_{n}"), form.get(f"message_{n}")
            if not isinstance(receiver, str):
                raise _Refusal(-103, f"receiver_{n} 가 없습니다.")
            if not isinstance(message, str) or not message or len(message) > 1000:
                raise _Refusal(-103, f"message_{n} 은 1~1,000자입니다.")
            if kind == "ALIMTALK" and refusal(self.alimtalk_templates, tpl_code, text=message):
                raise _Refusal(-501, "템플릿이 승인되지 않았거나 내용이 일치하지 않습니다.")
            button = form.get(f"button_{n}")
            if button is not None and not _valid_button_json(button):
                raise _Refusal(-103, f"button_{n} 형식이 올바르지 않습니다.")
            if not _RECEIVER.match(receiver):
                refused += 1
                continue
            fields = {
                **common,
                "subject": form.get(f"subject_{n}"),
                "button": button,
                "image": form.get(f"image_{n}"),
                "fsubject": form.get(f"fsubject_{n}"),
                "fmessage": form.get(f"fmessage_{n}"),
            }
            entries.append(LedgerEntry(f"{msg_id}:{n}", receiver, kind, now, None, str(msg_id), message, fields, rule))
        if not entries:
            raise _Refusal(-103, "올바른 수신번호가 없습니다.")
        self._finish(entries)
        body = self._kakao_success(msg_id, len(entries), refused, "AT" if kind == "ALIMTALK" else "FT")
        return FakeResponse(200, body)


def _valid_button_json(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("button"), list)
