"""A fake IWINV (AlimTalk + SMS v2) on one loopback port.

IWINV serves AlimTalk and SMS v2 from two hosts with identical paths (``/api/v2/send/``,
``/api/history/``, ``/api/charge/``). The fake listens on one port and tells the two APIs apart
by the header each one authenticates with: ``AUTH`` (base64 of the API key) means AlimTalk,
``secret`` (base64 of ``"<sms api key>&<sms auth key>"``) means SMS v2. A request with neither is
answered as an AlimTalk authentication failure. Point the adapter's ``base_url`` at :attr:`url`
and leave ``sms_base_url`` unset: both APIs then reach this port.

Business errors are answered with HTTP 200 and the code in the body (``{"code": 401, ...}`` /
``{"resultCode": 14, ...}``), as IWINV does: a client treats any non-2xx status as a network
failure and reads every refusal from the body. Codes IWINV's API guide documents are used for
what they mean; where the fake needs a code
IWINV does not document (malformed body, empty list), it uses one from the documented
"invalid request" ranges (AlimTalk 502-517, SMS 41/43) so that the adapter's mapping is the same.

What the fake checks:

* AlimTalk send: ``templateCode`` (missing or unknown -> 501), ``list`` (empty -> 503, more than
  1,000 -> 504), ``templateParam`` (not a list, or a count other than the template's -> 508),
  ``reserve``/``sendDate`` (-> 509), ``reSend="Y"`` without ``resendCallback`` (-> 507), a
  callback outside ``senders`` (-> 505), no balance (-> 519). Numbers that are not 9-11 digits are
  counted in ``fail`` and not accepted.
* SMS v2 send (JSON, or multipart for MMS): ``from`` (missing or outside ``senders`` -> 13),
  ``to`` (missing/invalid -> 41, more than 1,000 -> 44), text empty or over 2,000 bytes (-> 21),
  title with a line break (-> 22) or over 40 bytes (-> 23), ``date`` malformed (-> 43) or past
  (-> 42), MMS image missing (-> 33), over 100 KB (-> 31) or not jpg/png/gif/webp (-> 32), no
  balance (-> 50).
* History: the date range is applied in Asia/Seoul, so an adapter that formats dates in another
  zone does not find its messages. SMS history also checks ``companyid`` (-> 14) and the 90-day
  limit (-> 43).

Every accepted recipient is one :class:`~kmsg_worker.testing.fakeserver.LedgerEntry` (its
``group_id`` is the ``seqNo``/``requestNo``). IWINV's wire carries no client reference, so entries
have ``reference=None`` and the adapter cannot look messages up by our id. Statuses progress by
the ledger's :class:`~kmsg_worker.testing.fakeserver.DeliveryRule`; :func:`not_kakao_user_rule`
gives the failure IWINV reports for a recipient without KakaoTalk.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from kmsg_worker.message import count_bytes
from kmsg_worker.testing.fake_templates import FakeTemplate, refusal, template_map
from kmsg_worker.testing.fakeserver import (
    Clock,
    DeliveryRule,
    FakeProviderServer,
    FakeRequest,
    FakeResponse,
    LedgerEntry,
    parse_multipart,
)

__all__ = [
    "FAKE_API_KEY",
    "FAKE_COMPANY_ID",
    "FAKE_SMS_API_KEY",
    "FAKE_SMS_AUTH_KEY",
    "FakeIwinvServer",
    "not_kakao_user_rule",
]

FAKE_API_KEY = "fake-iwinv-api-key"
FAKE_SMS_API_KEY = "fake-iwinv-sms-api-key"
FAKE_SMS_AUTH_KEY = "fake-iwinv-sms-auth-key"
FAKE_COMPANY_ID = "fake-iwinv-company"

SEOUL = ZoneInfo("Asia/Seoul")
_DATETIME = "%Y-%m-%d %H:%M:%S"
_PHONE = re.compile(r"\d{9,11}")
_MAX_RECIPIENTS = 1000
_MMS_MAX_BYTES = 100 * 1024
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
_HISTORY_MAX_DAYS = 90


def not_kakao_user_rule(after: float = 0.0) -> DeliveryRule:
    """The AlimTalk failure IWINV reports for a recipient who does not use KakaoTalk.

    Args:
        after: Seconds until the failure is reported.
    """
    return DeliveryRule(final="FAILED", code="3019", message="카카오톡 미사용자", final_after=after)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _parse_datetime(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, _DATETIME).replace(tzinfo=SEOUL).timestamp()
    except ValueError:
        return None


def _parse_date(value: object) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _format(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, SEOUL).strftime(_DATETIME)


def _int(value: object, default: int) -> int:
    try:
        return int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else default
    except ValueError:
        return default


def _json_object(request: FakeRequest) -> dict[str, Any] | None:
    try:
        body = request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _alimtalk(code: int, message: str, **extra: Any) -> FakeResponse:
    return FakeResponse(200, {"code": code, "message": message, **extra})


def _sms(code: int, message: str, **extra: Any) -> FakeResponse:
    return FakeResponse(200, {"resultCode": code, "message": message, **extra})


class FakeIwinvServer(FakeProviderServer):
    """Fake IWINV AlimTalk and SMS v2 APIs (see the module docstring).

    Args:
        host: Loopback address.
        port: 0 picks a free port.
        api_key: AlimTalk API key (``AUTH`` header).
        sms_api_key: SMS v2 API key.
        sms_auth_key: SMS v2 auth key.
        company_id: Company id the SMS history API expects.
        templates: ``{templateCode: number of parameters}``; ``None`` accepts any template.
        alimtalk_templates: AlimTalk templates with bodies and approval states (listed and enforced).
        senders: Registered sender numbers; ``None`` accepts any.
        charge: Balance answered by the charge APIs; 0 or less refuses sends (519 / 50).
        clock: Time source for status progression and history dates.
    """

    name = "iwinv"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str = FAKE_API_KEY,
        sms_api_key: str = FAKE_SMS_API_KEY,
        sms_auth_key: str = FAKE_SMS_AUTH_KEY,
        company_id: str = FAKE_COMPANY_ID,
        templates: Mapping[str, int] | None = None,
        alimtalk_templates: Iterable[FakeTemplate] | None = None,
        senders: Iterable[str] | None = None,
        charge: float = 100_000.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(host, port, clock=clock)
        self._auth = _b64(api_key)
        # The legacy one-key form (AlimTalk key & SMS auth key) is accepted too.
        self._secrets = frozenset({_b64(f"{sms_api_key}&{sms_auth_key}"), _b64(f"{api_key}&{sms_auth_key}")})
        self.company_id = company_id
        self.templates: dict[str, int] | None = dict(templates) if templates is not None else None
        #: AlimTalk templates with approval states; when set, they are what ``/api/template/`` lists,
        #: and a send of an unknown or unapproved one is refused with 501, one whose
        #: ``templateParam`` does not fill the body with 508.
        self.alimtalk_templates = template_map(alimtalk_templates)
        self.senders: set[str] | None = set(senders) if senders is not None else None
        self.charge = charge
        #: The last requests received (headers and bodies), for wire assertions in tests.
        self.recent: deque[FakeRequest] = deque(maxlen=64)
        self._index_lock = threading.Lock()
        self._by_seq: dict[str, list[LedgerEntry]] = {}
        self._by_request: dict[str, list[LedgerEntry]] = {}
        self._routes: dict[tuple[str, str], Callable[[FakeRequest], FakeResponse]] = {
            ("alimtalk", "/api/v2/send/"): self._alimtalk_send,
            ("alimtalk", "/api/history/"): self._alimtalk_history,
            ("alimtalk", "/api/charge/"): self._alimtalk_charge,
            ("alimtalk", "/api/template/"): self._alimtalk_templates,
            ("sms", "/api/v2/send/"): self._sms_send,
            ("sms", "/api/history/"): self._sms_history,
            ("sms", "/api/charge/"): self._sms_charge,
        }

    def start(self) -> FakeIwinvServer:
        """Serve in a background thread; returns ``self``.

        Polls for shutdown every 50 ms instead of ``serve_forever``'s 500 ms, so that a test
        suite starting one server per test does not spend half a second stopping each one.
        """
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-iwinv", daemon=True
        )
        self._thread.start()
        return self

    # -- dispatch -----------------------------------------------------------------------------------

    def handle(self, request: FakeRequest) -> FakeResponse:
        """Route by API (auth header) and path; check the credentials of that API first."""
        self.recent.append(request)
        api = "sms" if "secret" in request.headers else "alimtalk"
        route = self._routes.get((api, request.path))
        if route is None:
            return FakeResponse(404, raw=b"Not Found")
        if request.method != "POST":
            return FakeResponse(405, raw=b"Method Not Allowed")
        if api == "sms":
            if request.headers.get("secret") not in self._secrets:
                self.ledger.rejected += 1
                return _sms(14, "인증 정보 오류")
        elif request.headers.get("auth") != self._auth:
            self.ledger.rejected += 1
            return _alimtalk(401, "인증 실패")
        response = route(request)
        if isinstance(response.body, Mapping) and response.body.get("code", response.body.get("resultCode")) not in (
            0,
            200,
        ):
            self.ledger.rejected += 1
        return response

    def _accept(self, index: dict[str, list[LedgerEntry]], group: str, entries: list[LedgerEntry]) -> None:
        self.ledger.accept(entries)
        with self._index_lock:
            index[group] = entries
        if self.should_lose_response():
            self.drop_connection()

    def _live(self, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
        """Entries still in the ledger (a control-API reset forgets them)."""
        current = self.ledger.entries
        return [e for e in entries if current.get(e.provider_message_id) is e]

    # -- AlimTalk ----------------------------------------------------------------------------------

    def _alimtalk_send(self, request: FakeRequest) -> FakeResponse:
        body = _json_object(request)
        if body is None:
            return _alimtalk(502, "요청 형식 오류")
        template = body.get("templateCode")
        if not template or not isinstance(template, str):
            return _alimtalk(501, "템플릿 코드 없음")
        if self.templates is not None and template not in self.templates:
            return _alimtalk(501, "등록되지 않은 템플릿 코드")
        items = body.get("list")
        if not isinstance(items, list) or not items:
            return _alimtalk(503, "수신자 목록 없음")
        if len(items) > _MAX_RECIPIENTS:
            return _alimtalk(504, "수신자 수 초과")
        refused = self._check_alimtalk_options(body)
        if refused is not None:
            return refused
        wanted = self.templates.get(template) if self.templates is not None else None
        if self.alimtalk_templates is not None:
            known = self.alimtalk_templates.get(template)
            if known is None or known.status != "approved":
                return _alimtalk(501, "등록되지 않았거나 승인되지 않은 템플릿")
        phones: list[tuple[str, list[str]]] = []
        fail = 0
        for item in items:
            params = item.get("templateParam", []) if isinstance(item, dict) else None
            if isinstance(params, list) and refusal(self.alimtalk_templates, template, params=params):
                return _alimtalk(508, "템플릿 변수(templateParam)가 템플릿과 맞지 않음")
            if not isinstance(params, list) or (wanted is not None and len(params) != wanted):
                return _alimtalk(508, "템플릿 변수(templateParam) 오류")
            phone = item.get("phone") if isinstance(item, dict) else None
            if isinstance(phone, str) and _PHONE.fullmatch(phone):
                phones.append((phone, [str(p) for p in params]))
            else:
                fail += 1
        if self.charge <= 0:
            return _alimtalk(519, "잔액 부족")
        seq = str(int(self.ledger.next_id()))  # seqNo is a number on the wire
        now = self.ledger.clock()
        shared = {key: body.get(key) for key in ("templateCode", "reserve", "sendDate", "reSend", "resendType")}
        entries = [
            LedgerEntry(
                f"A{seq}-{i:04d}",
                phone,
                "ALIMTALK",
                now,
                None,
                seq,
                None,
                {**shared, "templateParam": params},
            )
            for i, (phone, params) in enumerate(phones)
        ]
        self._accept(self._by_seq, seq, entries)
        return _alimtalk(200, "발송 요청 성공", success=len(entries), fail=fail, seqNo=int(seq))

    def _check_alimtalk_options(self, body: Mapping[str, Any]) -> FakeResponse | None:
        reserve = body.get("reserve", "N")
        if reserve not in ("Y", "N"):
            return _alimtalk(509, "예약 여부(reserve) 오류")
        if reserve == "Y" and _parse_datetime(body.get("sendDate")) is None:
            return _alimtalk(509, "예약 일시(sendDate) 형식 오류")
        resend = body.get("reSend", "N")
        if resend not in ("Y", "N"):
            return _alimtalk(507, "재발송 여부(reSend) 오류")
        if resend == "Y":
            callback = body.get("resendCallback")
            if not isinstance(callback, str) or not callback.isdigit():
                return _alimtalk(507, "재발송 발신번호(resendCallback) 필요")
            if self.senders is not None and callback not in self.senders:
                return _alimtalk(505, "등록되지 않은 발신번호")
            if body.get("resendType") == "N" and not body.get("resendContent"):
                return _alimtalk(507, "재발송 내용(resendContent) 필요")
        return None

    def _alimtalk_history(self, request: FakeRequest) -> FakeResponse:
        body = _json_object(request)
        if body is None:
            return _alimtalk(502, "요청 형식 오류")
        start, end = _parse_datetime(body.get("startDate")), _parse_datetime(body.get("endDate"))
        if start is None or end is None:
            return _alimtalk(511, "조회 기간 형식 오류")
        seq = body.get("seqNo")
        with self._index_lock:
            if seq is not None:
                candidates = list(self._by_seq.get(str(seq), ()))
            else:
                candidates = [e for group in self._by_seq.values() for e in group]
        phone = body.get("phone")
        now = self.ledger.clock()
        rows = [
            self._alimtalk_row(e, now)
            for e in self._live(candidates)
            # History stores seconds: compare the way a DATETIME column would.
            if (not phone or e.to == phone) and start <= int(e.accepted_at) <= end
        ]
        return _alimtalk(200, "조회 성공", totalCount=len(rows), list=self._page(rows, body))

    @staticmethod
    def _alimtalk_row(entry: LedgerEntry, now: float) -> dict[str, Any]:
        state, code, text = entry.state(now)
        handed = entry.accepted_at + entry.rule.sent_after
        row = {
            "seqNo": int(entry.group_id or 0),
            "phone": entry.to,
            "templateCode": entry.fields.get("templateCode"),
            "requestDate": _format(entry.accepted_at),
            "sendDate": "",
            "receiveDate": "",
            "statusCode": "",
            "statusCodeName": "대기",
        }
        if state == "SENT":
            row.update(sendDate=_format(handed), statusCodeName="전송중")
        elif state == "DELIVERED":
            done = _format(entry.accepted_at + entry.rule.final_after)
            row.update(sendDate=_format(handed), receiveDate=done, statusCode="OK", statusCodeName="성공")
        elif state == "FAILED":
            done = _format(entry.accepted_at + entry.rule.final_after)
            row.update(sendDate=_format(handed), receiveDate=done, statusCode=code or "E999")
            row["statusCodeName"] = text or "발송 실패"
        return row

    def _alimtalk_charge(self, request: FakeRequest) -> FakeResponse:
        return _alimtalk(200, "조회 성공", charge=self.charge)

    def _alimtalk_templates(self, request: FakeRequest) -> FakeResponse:
        body = _json_object(request)
        if body is None:
            return _alimtalk(502, "요청 형식 오류")
        wanted = body.get("templateCode")
        if self.alimtalk_templates is not None:
            words = {"approved": "Y", "inspecting": "I", "rejected": "R"}
            listed = [
                {
                    "templateCode": t.code,
                    "templateName": t.name or t.code,
                    "templateContent": t.body,
                    "status": words.get(t.status, "I"),
                    "createDate": "2024-01-01 00:00:00",
                    "buttons": [dict(b) for b in t.buttons],
                }
                for t in self.alimtalk_templates.values()
                if not wanted or t.code == wanted
            ]
            return _alimtalk(200, "조회 성공", totalCount=len(listed), list=self._page(listed, body))
        rows = [
            {
                "templateCode": code,
                "templateName": f"template {code}",
                "templateContent": " ".join(f"#{{변수{i + 1}}}" for i in range(params)) or "안내 메시지",
                "status": "Y",
                "createDate": "2024-01-01 00:00:00",
                "buttons": [],
            }
            for code, params in (self.templates or {}).items()
            if not wanted or code == wanted
        ]
        return _alimtalk(200, "조회 성공", totalCount=len(rows), list=self._page(rows, body))

    # -- SMS v2 ------------------------------------------------------------------------------------

    def _sms_send(self, request: FakeRequest) -> FakeResponse:
        image: bytes | None = None
        filename = ""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = parse_multipart(request)
            raw_image = form.pop("image", None)
            if not isinstance(raw_image, bytes) or not raw_image:
                return _sms(33, "파일 업로드 실패")
            image = raw_image
            filename = self._filename(request)
            body: Any = form
            to: Any = [form["to"]] if isinstance(form.get("to"), str) else None
        else:
            body = _json_object(request)
            if body is None:
                return _sms(43, "요청 형식 오류")
            to = body.get("to")
        refused = self._check_sms(body, to, image, filename)
        if refused is not None:
            return refused
        text = str(body["text"])
        title = body.get("title")
        if image is not None:
            msg_type = "MMS"
        else:
            msg_type = str(body.get("msgType") or ("LMS" if title or count_bytes(text) > 90 else "SMS"))
        request_no = self.ledger.next_id()
        now = self.ledger.clock()
        shared = {"msgType": msg_type, "from": body.get("from"), "title": title, "date": body.get("date")}
        rule = self.ledger.default_rule
        entries = [
            LedgerEntry(f"S{request_no}-{i:04d}", phone, msg_type, now, None, request_no, text, shared, rule)
            for i, phone in enumerate(to)
        ]
        self._accept(self._by_request, request_no, entries)
        return _sms(0, "전송 성공", requestNo=request_no, msgType=msg_type)

    def _check_sms(self, body: Mapping[str, Any], to: Any, image: bytes | None, filename: str) -> FakeResponse | None:
        sender = body.get("from")
        if not isinstance(sender, str) or not sender.isdigit():
            return _sms(13, "발신번호 없음")
        if self.senders is not None and sender not in self.senders:
            return _sms(13, "등록되지 않은 발신번호")
        if not isinstance(to, list) or not to:
            return _sms(41, "수신번호 없음")
        if len(to) > _MAX_RECIPIENTS:
            return _sms(44, "1회 최대 1000건까지 발송 가능")
        if not all(isinstance(p, str) and _PHONE.fullmatch(p) for p in to):
            return _sms(41, "수신번호 형식 오류")
        refused = self._check_sms_content(body, image, filename)
        if refused is None and self.charge <= 0:
            refused = _sms(50, "잔액 부족")
        return refused

    def _check_sms_content(self, body: Mapping[str, Any], image: bytes | None, filename: str) -> FakeResponse | None:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip() or count_bytes(text) > 2000:
            return _sms(21, "본문은 1바이트 이상 2000바이트 이하")
        title = body.get("title")
        if title is not None:
            if not isinstance(title, str) or "\n" in title or "\r" in title:
                return _sms(22, "제목에 사용할 수 없는 문자")
            if count_bytes(title) > 40:
                return _sms(23, "제목은 40바이트 이하")
        if body.get("date"):
            when = _parse_datetime(body.get("date"))
            if when is None:
                return _sms(43, "날짜 형식 오류")
            if when < self.ledger.clock() - 60:
                return _sms(42, "예약 시간 오류")
        if image is not None:
            if len(image) > _MMS_MAX_BYTES:
                return _sms(31, "첨부 파일은 100KB 이하")
            if not filename.lower().endswith(_IMAGE_EXTENSIONS):
                return _sms(32, "허용되지 않는 파일 확장자")
        return None

    @staticmethod
    def _filename(request: FakeRequest) -> str:
        match = re.search(rb'name="image"; filename="([^"]*)"', request.body)
        return match.group(1).decode("utf-8", "replace") if match else ""

    def _sms_history(self, request: FakeRequest) -> FakeResponse:
        body = _json_object(request)
        if body is None:
            return _sms(43, "요청 형식 오류")
        if body.get("companyid") != self.company_id:
            return _sms(14, "회사 아이디 오류")
        start, end = _parse_date(body.get("startDate")), _parse_date(body.get("endDate"))
        if start is None or end is None or start > end:
            return _sms(43, "날짜 형식 오류")
        if (end - start).days > _HISTORY_MAX_DAYS:
            return _sms(43, "조회 기간은 90일 이내")
        request_no = body.get("requestNo")
        with self._index_lock:
            if request_no:
                candidates = list(self._by_request.get(str(request_no), ()))
            else:
                candidates = [e for group in self._by_request.values() for e in group]
        phone = body.get("phone")
        now = self.ledger.clock()
        rows = [
            self._sms_row(e, now)
            for e in self._live(candidates)
            if (not phone or e.to == phone) and start <= datetime.fromtimestamp(e.accepted_at, SEOUL).date() <= end
        ]
        return _sms(0, "조회 성공", totalCount=len(rows), list=self._page(rows, body))

    @staticmethod
    def _sms_row(entry: LedgerEntry, now: float) -> dict[str, Any]:
        state, code, text = entry.state(now)
        row = {
            "requestNo": entry.group_id,
            "msgType": entry.type,
            "phone": entry.to,
            "sendDate": _format(entry.accepted_at),
            "sendStatusCode": "00",
            "sendStatusMsg": "대기",
        }
        if state == "SENT":
            row.update(sendStatusCode="01", sendStatusMsg="처리중")
        elif state == "DELIVERED":
            row.update(sendStatusCode="06", sendStatusMsg="전송 성공")
        elif state == "FAILED":
            row.update(sendStatusCode=code or "99", sendStatusMsg=text or "전송 실패")
        return row

    def _sms_charge(self, request: FakeRequest) -> FakeResponse:
        return _sms(0, "조회 성공", charge=self.charge)

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _page(rows: list[dict[str, Any]], body: Mapping[str, Any]) -> list[dict[str, Any]]:
        number = max(1, _int(body.get("pageNum"), 1))
        size = max(1, _int(body.get("pageSize"), 15))
        return rows[(number - 1) * size : number * size]

    def stats(self) -> dict[str, Any]:
        """Ledger summary plus the number of AlimTalk and SMS requests accepted."""
        with self._index_lock:
            groups = {"alimtalk_requests": len(self._by_seq), "sms_requests": len(self._by_request)}
        return {**self.ledger.stats(), **groups}
