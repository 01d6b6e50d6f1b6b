"""A fake Aligo: the SMS API and the Kakao (AlimTalk/FriendTalk) API on one loopback port.

Endpoints (all ``POST``, multipart/form-data or urlencoded):

* ``/send/`` — ``key``, ``user_id``, ``sender``, ``receiver`` (comma-separated, at most 1,000),
  ``msg`` (1-2,000 bytes), ``msg_type`` (SMS/LMS/MMS), ``title`` (at most 44 bytes), ``rdate`` /
  ``rtime``, ``image`` (URL) or ``image1..3`` (JPEG/PNG/GIF file), ``testmode_yn``;
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
``-105`` too many receivers in one request (more than 1,000 on ``/send/``, 500 on Kakao)
``-201`` not enough remaining messages (see :attr:`FakeAligoServer.remain`)
``-501`` unknown AlimTalk template code
``-990`` the sender number is not registered — **this fake's own code**; the real code is not in
         our reference, so the adapter treats it as an unclassified (transient) provider error
``-991`` the Kakao sender key is unknown — **this fake's own code**, same caveat
======== ==========================================================================================

A successful ``/send/`` answers ``{result_code, message, msg_id, success_cnt, error_cnt,
msg_type}``; receivers that are not domestic numbers (``0`` + 8-10 digits) are counted in
``error_cnt`` and not accepted. Each accepted recipient is recorded in the :class:`Ledger` under the
id ``"<msg_id>:<n>"`` (``n`` = its 1-based position in the request), the id the adapter reports.

``response_shape`` chooses between the shapes Aligo is seen to use (``providers.md`` §3.3):
``"result_code_string"`` (k-msg's tested shape: ``"1"`` / ``"0"`` strings, the default),
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
from typing import Any

from kmsg_worker.message import count_bytes
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
_KAKAO_MAX_RECEIVERS = 500


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
        self.response_shape = response_shape
        #: Remaining messages per type; a send needing more is refused with -201.
        self.remain: dict[str, int] = {"SMS": 10**9, "LMS": 10**9, "MMS": 10**9, **(remain or {})}
        #: Media types of the request bodies seen (``multipart/form-data`` ...), for wire checks.
        self.content_types: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._routes = {
            "/send/": self._send,
            "/remain/": self._remain,
            "/akv10/alimtalk/send/": self._alimtalk,
            "/akv10/friendtalk/send/": self._friendtalk,
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

    def _send(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        sender = self._check_sender(form)
        msg = form.get("msg")
        if not isinstance(msg, str) or not 1 <= (size := count_bytes(msg)) <= 2000:
            raise _Refusal(-103, "메시지 내용은 1~2,000 byte 입니다.")
        msg_type = form.get("msg_type") or ("LMS" if size > 90 else "SMS")
        if msg_type not in ("SMS", "LMS", "MMS") or (msg_type == "SMS" and size > 90):
            raise _Refusal(-103, "메시지 타입이 올바르지 않습니다.")
        title = form.get("title")
        if title is not None and (not isinstance(title, str) or not 1 <= count_bytes(title) <= 44):
            raise _Refusal(-103, "제목은 1~44 byte 입니다.")
        image = self._check_image(form) if msg_type == "MMS" else None
        rdate, rtime = form.get("rdate"), form.get("rtime")
        self._check_schedule(rdate, rtime)
        receivers = [r.strip() for r in str(form.get("receiver") or "").split(",")]
        if len(receivers) > _SMS_MAX_RECEIVERS:
            raise _Refusal(-105, "수신자는 최대 1,000명입니다.")
        valid = [(n, r) for n, r in enumerate(receivers, 1) if _RECEIVER.match(r)]
        if not valid:
            raise _Refusal(-103, "올바른 수신번호가 없습니다.")
        test_mode = str(form.get("testmode_yn", "N")).upper() == "Y"
        if not test_mode:
            self._charge(msg_type, len(valid))
        msg_id = self._next_msg_id()
        now = self.ledger.clock()
        # One fields dict shared by every recipient of the request (read-only by convention).
        fields = {
            "sender": sender,
            "title": title,
            "rdate": rdate,
            "rtime": rtime,
            "image": image,
            "test_mode": test_mode,
        }
        group, rule = str(msg_id), self.ledger.default_rule  # accept() sets each entry's real rule
        self._finish([LedgerEntry(f"{msg_id}:{n}", r, msg_type, now, None, group, msg, fields, rule) for n, r in valid])
        return FakeResponse(200, self._sms_success(msg_id, len(valid), len(receivers) - len(valid), msg_type))

    def _remain(self, form: Mapping[str, Any]) -> FakeResponse:
        self._check_auth(form, "key", "user_id")
        with self._lock:
            counts = {f"{kind}_CNT": self.remain[kind] for kind in ("SMS", "LMS", "MMS")}
        return FakeResponse(200, {"result_code": self._code(1), "message": "success", **counts})

    def _alimtalk(self, form: Mapping[str, Any]) -> FakeResponse:
        return self._kakao(form, "ALIMTALK")

    def _friendtalk(self, form: Mapping[str, Any]) -> FakeResponse:
        return self._kakao(form, "FRIENDTALK")

    def _kakao(self, form: Mapping[str, Any], kind: str) -> FakeResponse:
        self._check_auth(form, "apikey", "userid")
        if form.get("senderkey") != self.sender_key:
            raise _Refusal(CODE_UNKNOWN_SENDER_KEY, "발신프로필 키가 유효하지 않습니다.")
        tpl_code = form.get("tpl_code")
        if kind == "ALIMTALK" and tpl_code not in self.templates:
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
