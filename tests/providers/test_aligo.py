"""Aligo adapter: the shared contract over real HTTP, the wire format, error mapping and batching.

Three tiers: the contract suite and end-to-end tests run against :class:`FakeAligoServer` on
loopback; wire tests drive the adapter through an ``httpx.MockTransport`` that records each request
(exact URL, multipart fields) and plays a canned Aligo answer; a live class talks to the real
``/remain/`` only when ``KMSG_ALIGO_LIVE_API_KEY`` and ``KMSG_ALIGO_LIVE_USER_ID`` are set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, MessageType, normalize
from kmsg_worker.providers.aligo import ERROR_BLAME, ERROR_CODES, AligoProvider
from kmsg_worker.providers.base import DeliveryState, ProviderConfig, SendOutcome
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings
from kmsg_worker.testing.fake_aligo import CODE_UNREGISTERED_SENDER, FakeAligoServer
from kmsg_worker.testing.fakeserver import FakeRequest, parse_multipart
from tests.providers.contract import ProviderContract

API_KEY = "aligo-test-key-93f1c7a2e5"
USER_ID = "kmsgtester"
SENDER_KEY = "aligo-sender-key-0b7e5d21c4"
SENDER = "0212345678"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeAligoServer]:
    with FakeAligoServer(api_key=API_KEY, user_id=USER_ID, sender_key=SENDER_KEY) as server:
        yield server


@pytest.fixture
def make_provider(fake: FakeAligoServer) -> Iterator[Callable[..., AligoProvider]]:
    clients: list[httpx.Client] = []

    def factory(
        credentials: dict[str, str] | None = None, timeout: float | None = None, **options: Any
    ) -> AligoProvider:
        client = make_http_client(timeout=httpx.Timeout(timeout or 5.0))
        clients.append(client)
        config = ProviderConfig(
            name="aligo",
            base_url=fake.url,
            credentials=credentials if credentials is not None else {"api_key": API_KEY},
            options={"user_id": USER_ID, "sender_key": SENDER_KEY, **options},
        )
        return AligoProvider(config, client)

    yield factory
    for client in clients:
        client.close()


class Wire:
    """An ``httpx.MockTransport`` handler playing Aligo: records requests, answers from a script."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    def form(self, n: int = 0) -> dict[str, Any]:
        request = self.requests[n]
        headers = {k.lower(): v for k, v in request.headers.items()}
        return parse_multipart(FakeRequest(request.method, request.url.path, {}, headers, request.read()))


SMS_OK = {"result_code": "1", "message": "success", "msg_id": "123456789", "success_cnt": 1, "error_cnt": 0}
KAKAO_OK = {"result_code": "0", "message": "성공적으로 전송요청 하였습니다.", "msg_id": "987654"}


def wired(wire: Wire, clock: datetime | None = None, **options: Any) -> AligoProvider:
    """An adapter on the real default hosts, its HTTP played by ``wire``."""
    config = ProviderConfig(
        name="aligo",
        credentials={"api_key": API_KEY},
        options={"user_id": USER_ID, "sender_key": SENDER_KEY, **options},
    )
    client = make_http_client(transport=httpx.MockTransport(wire))
    return AligoProvider(config, client, clock=(lambda: clock) if clock else None)


def sms(to: str = "01012345678", **extra: Any) -> Message:
    fields: dict[str, Any] = {"to": to, "text": "인증번호 [123456] 입니다", "type": "SMS", "sender": SENDER}
    fields.update(extra)
    return normalize(fields)


def alimtalk(to: str = "01012345678", **extra: Any) -> Message:
    fields: dict[str, Any] = {
        "to": to,
        "type": "ALIMTALK",
        "template_id": "TPL_OTP",
        "variables": {"code": "123456"},
        "provider_options": {"templateContent": "인증번호는 [#{code}] 입니다."},
        "sender": SENDER,
    }
    fields.update(extra)
    return normalize(fields)


def error_of(provider: AligoProvider, message: Message) -> ProviderError:
    """The error of a send, whether raised (whole request) or per message (outcome)."""
    try:
        outcome = provider.send(message)
    except ProviderError as exc:
        return exc
    assert not outcome.accepted and outcome.error is not None
    return outcome.error


# -- the shared contract --------------------------------------------------------------------------


class TestAligoContract(ProviderContract):
    secrets = (API_KEY,)

    def failed_code(self) -> str:
        # Aligo reports a receiver's result as a text (sms_state), which is kept as the code.
        return "결번"

    def bad_credentials(self) -> dict[str, str]:
        return {"api_key": "not-the-right-key"}


# -- configuration --------------------------------------------------------------------------------


def test_user_id_is_required_and_named() -> None:
    config = ProviderConfig(name="aligo", credentials={"api_key": API_KEY})
    with pytest.raises(ConfigurationError) as info:
        AligoProvider(config, httpx.Client())
    assert info.value.variable == "KMSG_ALIGO_USER_ID"
    assert "KMSG_ALIGO_USER_ID" in str(info.value)


def test_api_key_is_required_and_named() -> None:
    config = ProviderConfig(name="aligo", options={"user_id": USER_ID})
    with pytest.raises(ConfigurationError) as info:
        AligoProvider(config, httpx.Client())
    assert info.value.variable == "KMSG_ALIGO_API_KEY"


@pytest.mark.parametrize(("key", "value"), [("test_mode", "maybe"), ("batch_limit", "lots"), ("sender", "12")])
def test_invalid_options_are_configuration_errors(key: str, value: str) -> None:
    config = ProviderConfig(name="aligo", credentials={"api_key": API_KEY}, options={"user_id": USER_ID, key: value})
    with pytest.raises(ConfigurationError) as info:
        AligoProvider(config, httpx.Client())
    assert info.value.variable == f"KMSG_ALIGO_{key.upper()}"


def test_built_from_the_environment_with_only_the_api_key_secret() -> None:
    settings = Settings.from_env(
        {
            "KMSG_PROVIDERS": "aligo",
            "KMSG_ALIGO_API_KEY": API_KEY,
            "KMSG_ALIGO_USER_ID": USER_ID,
            "KMSG_ALIGO_SENDER": "02-1234-5678",
            "KMSG_ALIGO_TEST_MODE": "y",
        }
    )
    settings.check_providers()
    config = settings.provider_config("aligo")
    assert dict(config.credentials) == {"api_key": API_KEY}
    assert provider_class("aligo") is AligoProvider
    wire = Wire(SMS_OK)
    provider = AligoProvider(config, make_http_client(transport=httpx.MockTransport(wire)))
    provider.send(normalize({"to": "01012345678", "text": "hi", "type": "SMS"}))
    assert (wire.form()["sender"], wire.form()["testmode_yn"]) == ("0212345678", "Y")
    assert API_KEY not in repr(provider) + repr(config)


def test_capabilities_and_credential_keys() -> None:
    caps = AligoProvider.capabilities
    assert caps.types == {
        MessageType.SMS,
        MessageType.LMS,
        MessageType.MMS,
        MessageType.ALIMTALK,
        MessageType.FRIENDTALK,
    }
    assert (caps.bulk_limit, caps.status_query, caps.bulk_status, caps.alimtalk_fallback) == (
        1000,
        True,
        True,
        "partial",
    )
    assert (caps.balance, caps.file_upload, caps.lookup_by_reference) == (True, False, False)
    assert AligoProvider.credential_keys == {"api_key"} == AligoProvider.required_credentials


def test_separate_hosts_are_configurable() -> None:
    wire = Wire(SMS_OK, KAKAO_OK)
    provider = wired(wire, sms_base_url="https://sms.example.test/", kakao_base_url="https://kakao.example.test")
    provider.send(sms())
    provider.send(alimtalk())
    assert [str(r.url) for r in wire.requests] == [
        "https://sms.example.test/send/",
        "https://kakao.example.test/akv10/alimtalk/send/",
    ]


# -- wire format ----------------------------------------------------------------------------------


def test_sms_wire_is_a_multipart_post_to_send() -> None:
    wire = Wire(SMS_OK)
    outcome = wired(wire).send(sms())

    request = wire.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://apis.aligo.in/send/"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert wire.form() == {
        "key": API_KEY,
        "user_id": USER_ID,
        "receiver": "01012345678",
        "sender": SENDER,
        "msg": "인증번호 [123456] 입니다",
        "msg_type": "SMS",
        "testmode_yn": "N",
    }
    assert outcome.accepted
    assert outcome.provider_message_id == "123456789:1"
    assert outcome.state is DeliveryState.PENDING


def test_lms_carries_the_subject_as_title_and_test_mode() -> None:
    wire = Wire(SMS_OK)
    wired(wire, test_mode="Y", sender="1588-1234").send(
        normalize({"to": "010-1111-2222", "type": "LMS", "text": "긴 안내문 " * 20, "subject": "공지사항"})
    )
    form = wire.form()
    assert (form["msg_type"], form["title"], form["testmode_yn"]) == ("LMS", "공지사항", "Y")
    assert form["sender"] == "15881234"  # the option's default sender, normalised
    assert form["receiver"] == "01011112222"


def test_mms_with_a_url_sends_the_image_field() -> None:
    wire = Wire(SMS_OK)
    wired(wire).send(sms(type="MMS", text="사진", image_url="https://cdn.example.test/a.jpg"))
    form = wire.form()
    assert (form["msg_type"], form["image"]) == ("MMS", "https://cdn.example.test/a.jpg")
    assert "image1" not in form


def test_mms_with_bytes_sends_a_file_part_image1() -> None:
    wire = Wire(SMS_OK)
    wired(wire).send(sms(type="MMS", text="사진", media={"image": {"bytes": PNG}}))
    form = wire.form()
    assert form["image1"] == PNG
    assert b'filename="image1.png"' in wire.requests[0].read()
    assert b"Content-Type: image/png" in wire.requests[0].read()


def test_mms_with_bytes_that_are_not_an_image_is_refused_without_a_request() -> None:
    wire = Wire(SMS_OK)
    outcome = wired(wire).send(sms(type="MMS", text="사진", media={"image": {"bytes": b"%PDF-1.4"}}))
    assert not outcome.accepted and outcome.error is not None
    assert outcome.error.code is ErrorCode.INVALID_REQUEST
    assert wire.requests == []


def test_international_korean_number_goes_in_domestic_form() -> None:
    wire = Wire(SMS_OK)
    wired(wire).send(sms(to="+82 10-9876-5432"))
    assert wire.form()["receiver"] == "01098765432"


def test_alimtalk_wire_with_failover_and_the_partial_warning() -> None:
    wire = Wire(KAKAO_OK)
    message = alimtalk(failover={"enabled": True, "channel": "lms", "content": "대체 문자", "title": "안내"})
    outcome = wired(wire).send(message)

    assert str(wire.requests[0].url) == "https://kakaoapi.aligo.in/akv10/alimtalk/send/"
    assert wire.requests[0].headers["content-type"].startswith("multipart/form-data")
    assert wire.form() == {
        "apikey": API_KEY,
        "userid": USER_ID,
        "senderkey": SENDER_KEY,
        "tpl_code": "TPL_OTP",
        "sender": SENDER,
        "testMode": "N",
        "failover": "Y",
        "receiver_1": "01012345678",
        "subject_1": "알림톡",
        "message_1": "인증번호는 [123456] 입니다.",
        "fsubject_1": "안내",
        "fmessage_1": "대체 문자",
    }
    assert outcome.accepted and outcome.provider_message_id == "987654:1"
    assert outcome.native_fallback
    [warning] = outcome.warnings
    assert warning.code == "FAILOVER_PARTIAL_PROVIDER"
    assert warning.details == {
        "mappedFields": ["failover", "fsubject_N", "fmessage_N"],
        "unsupportedFields": ["channel"],
    }


def test_alimtalk_without_failover_says_n_and_warns_nothing() -> None:
    wire = Wire(KAKAO_OK)
    outcome = wired(wire).send(alimtalk(kakao={"profile_id": "per-message-profile"}))
    form = wire.form()
    assert form["failover"] == "N"
    assert form["senderkey"] == "per-message-profile"
    assert "fmessage_1" not in form
    assert outcome.warnings == [] and not outcome.native_fallback


def test_alimtalk_failover_without_content_falls_back_to_the_alimtalk_text() -> None:
    wire = Wire(KAKAO_OK)
    outcome = wired(wire).send(alimtalk(failover=True))
    assert wire.form()["fmessage_1"] == "인증번호는 [123456] 입니다."
    assert [w.code for w in outcome.warnings] == ["FALLBACK_CONTENT_MISSING", "FAILOVER_PARTIAL_PROVIDER"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"variables": {"_full_text": "전문 그대로", "code": "1"}}, "전문 그대로"),
        ({}, "인증번호는 [123456] 입니다."),
        ({"provider_options": {}, "text": "본문 #{code}"}, "본문 123456"),
        ({"provider_options": {}, "variables": {"a": "첫째", "b": "둘째"}}, "첫째\n둘째"),
    ],
    ids=["full_text", "templateContent", "text", "variables_joined"],
)
def test_alimtalk_text_precedence(extra: dict[str, Any], expected: str) -> None:
    wire = Wire(KAKAO_OK)
    wired(wire).send(alimtalk(**extra))
    assert wire.form()["message_1"] == expected


def test_friendtalk_wire_with_image_url_and_buttons_json() -> None:
    wire = Wire(KAKAO_OK)
    buttons = [
        {
            "name": "주문 보기",
            "type": "WL",
            "url_mobile": "https://m.example.test",
            "url_pc": "https://example.test",
        }
    ]
    message = normalize(
        {
            "to": "01012345678",
            "type": "FRIENDTALK",
            "text": "새 소식",
            "sender": SENDER,
            "image_url": "https://cdn.example.test/ft.png",
            "buttons": buttons,
        }
    )
    wired(wire).send(message)
    assert str(wire.requests[0].url) == "https://kakaoapi.aligo.in/akv10/friendtalk/send/"
    form = wire.form()
    assert (form["subject_1"], form["message_1"], form["image_1"]) == (
        "친구톡",
        "새 소식",
        "https://cdn.example.test/ft.png",
    )
    assert "tpl_code" not in form and "failover" not in form
    assert json.loads(form["button_1"]) == {
        "button": [
            {
                "name": "주문 보기",
                "linkType": "WL",
                "linkTypeName": "웹링크",
                "linkMo": "https://m.example.test",
                "linkPc": "https://example.test",
            }
        ]
    }


def test_friendtalk_endpoint_override() -> None:
    wire = Wire(KAKAO_OK)
    wired(wire, friendtalk_endpoint="/akv10/friendtalk/send_v2/").send(
        normalize({"to": "01012345678", "type": "FRIENDTALK", "text": "hi", "sender": SENDER})
    )
    assert wire.requests[0].url.path == "/akv10/friendtalk/send_v2/"


def test_friendtalk_image_bytes_are_unsupported() -> None:
    wire = Wire(KAKAO_OK)
    message = normalize(
        {
            "to": "01012345678",
            "type": "FRIENDTALK",
            "text": "hi",
            "sender": SENDER,
            "media": {"image": {"bytes": PNG}},
        }
    )
    error = error_of(wired(wire), message)
    assert (error.code, error.blame) == (ErrorCode.UNSUPPORTED, "provider")
    assert wire.requests == []


# -- response shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "pmid"),
    [
        ({"result_code": 1, "message": "success", "msg_id": 555, "success_cnt": 1, "error_cnt": 0}, "555:1"),
        ({"result_code": "1", "message": "success", "msg_id": "556"}, "556:1"),
    ],
    ids=["number", "string"],
)
def test_sms_result_code_as_string_or_number(answer: dict[str, Any], pmid: str) -> None:
    outcome = wired(Wire(answer)).send(sms())
    assert outcome.accepted and outcome.provider_message_id == pmid


@pytest.mark.parametrize(
    "answer",
    [
        {"code": 0, "message": "성공", "info": {"type": "AT", "mid": 777, "scnt": 1, "fcnt": 0}},
        {"result_code": 0, "message": "성공", "msg_id": 777},
        {"result_code": "0", "message": "성공", "msg_id": "777"},
    ],
    ids=["code_info", "number", "string"],
)
def test_kakao_success_shapes(answer: dict[str, Any]) -> None:
    outcome = wired(Wire(answer)).send(alimtalk())
    assert outcome.accepted and outcome.provider_message_id == "777:1"


def test_sms_success_code_is_not_the_kakao_one() -> None:
    # /send/ succeeds with 1; a 0 there is not a success (and not a known error either).
    with pytest.raises(ProviderTransientError) as info:
        wired(Wire({"result_code": "0", "message": "?"})).send(sms())
    assert info.value.provider_code == "0"


@pytest.mark.parametrize("shape", ["result_code_string", "result_code_number", "code_info"])
def test_every_fake_shape_end_to_end(shape: str) -> None:
    fake = FakeAligoServer(api_key=API_KEY, user_id=USER_ID, sender_key=SENDER_KEY, response_shape=shape)
    fake.start()
    try:
        with make_http_client() as client:
            config = ProviderConfig(
                name="aligo",
                base_url=fake.url,
                credentials={"api_key": API_KEY},
                options={"user_id": USER_ID, "sender_key": SENDER_KEY},
            )
            provider = AligoProvider(config, client)
            outcomes = [provider.send(sms()), provider.send(alimtalk(to="01099998888"))]
            assert provider.balance().amount == 10**9 - 1
    finally:
        fake.stop()
    for outcome, to in zip(outcomes, ["01012345678", "01099998888"], strict=True):
        assert outcome.accepted, outcome.error
        entry = fake.ledger.get(outcome.provider_message_id or "")
        assert entry is not None and entry.to == to
    assert fake.content_types == {"multipart/form-data": 3}


# -- batching -------------------------------------------------------------------------------------


def test_2500_identical_texts_take_three_requests(fake: FakeAligoServer, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    messages = [sms(to=f"010{i:08d}") for i in range(2500)]
    outcomes: list[SendOutcome] = []
    for start in range(0, len(messages), provider.batch_limit):
        outcomes.extend(provider.send_batch(messages[start : start + provider.batch_limit]))

    assert fake.ledger.requests == 3
    per_request = Counter(entry.group_id for entry in fake.ledger.entries.values())
    assert sorted(per_request.values()) == [500, 1000, 1000]
    assert all(o.accepted for o in outcomes)
    assert len({o.provider_message_id for o in outcomes}) == 2500
    recipients = {pmid: entry.to for pmid, entry in fake.ledger.entries.items()}
    assert [recipients[o.provider_message_id or ""] for o in outcomes] == [m.to for m in messages]
    assert max(fake.ledger.per_recipient.values()) == 1


def test_different_texts_share_one_send_mass_request_and_ids_map_back(
    fake: FakeAligoServer, make_provider: Any
) -> None:
    provider: AligoProvider = make_provider()
    texts = ["A 안내", "B 안내", "A 안내", "C 안내", "B 안내"]
    messages = [sms(to=f"0105555000{i}", text=t) for i, t in enumerate(texts)]
    outcomes = provider.send_batch(messages)

    assert fake.ledger.requests == 1  # one /send_mass/ with a text per receiver
    for message, outcome in zip(messages, outcomes, strict=True):
        entry = fake.ledger.get(outcome.provider_message_id or "")
        assert entry is not None
        assert (entry.to, entry.text) == (message.to, message.text)


def test_same_text_with_another_sender_or_schedule_is_another_request(
    fake: FakeAligoServer, make_provider: Any
) -> None:
    provider: AligoProvider = make_provider()
    messages = [sms(to="01010000001"), sms(to="01010000002", sender="15881234"), sms(to="01010000003")]
    provider.send_batch(messages)
    assert fake.ledger.requests == 2


def test_alimtalk_batches_500_per_request(fake: FakeAligoServer, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    messages = [alimtalk(to=f"010{i:08d}", variables={"code": f"{i:06d}"}) for i in range(1000)]
    outcomes = provider.send_batch(messages)

    assert fake.ledger.requests == 2
    for message, outcome in zip(messages, outcomes, strict=True):
        entry = fake.ledger.get(outcome.provider_message_id or "")
        assert entry is not None and entry.to == message.to
        assert entry.text == f"인증번호는 [{message.variables['code']}] 입니다."


def test_batch_limit_option_lowers_the_chunk_size(fake: FakeAligoServer, make_provider: Any) -> None:
    provider: AligoProvider = make_provider(batch_limit="200")
    assert provider.batch_limit == 200
    provider.send_batch([alimtalk(to=f"010{i:08d}") for i in range(200)])
    assert fake.ledger.requests == 1


# -- schedules ------------------------------------------------------------------------------------


@pytest.fixture
def foreign_tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a process time zone far from Seoul, to prove nothing reads it."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


NOW = datetime(2030, 1, 1, 0, 0, tzinfo=UTC)


@pytest.mark.usefixtures("foreign_tz")
@pytest.mark.parametrize(
    ("scheduled_at", "rdate", "rtime"),
    [
        ("2030-01-02T00:30:00+00:00", "20300102", "0930"),
        ("2030-01-01T15:05:00+00:00", "20300102", "0005"),  # the Seoul date is the next day
        ("2030-01-01T15:05:30+00:00", "20300102", "0006"),  # rounded up: never early
        ("2030-01-01T10:00:00", "20300101", "1000"),  # naive input is Seoul time
    ],
)
def test_sms_schedule_is_seoul_time(scheduled_at: str, rdate: str, rtime: str) -> None:
    wire = Wire(SMS_OK)
    wired(wire, clock=NOW).send(sms(scheduled_at=scheduled_at))
    form = wire.form()
    assert (form["rdate"], form["rtime"]) == (rdate, rtime)


@pytest.mark.usefixtures("foreign_tz")
def test_kakao_schedule_is_seoul_time() -> None:
    wire = Wire(KAKAO_OK)
    wired(wire, clock=NOW).send(alimtalk(scheduled_at="2030-01-01T15:05:00+00:00"))
    form = wire.form()
    assert (form["reserve"], form["reserve_date"], form["reserve_time"]) == ("Y", "20300102", "0005")
    assert form["senddate"] == "20300102000500"


def test_a_due_schedule_is_sent_at_once() -> None:
    wire = Wire(SMS_OK)
    due = dataclasses.replace(sms(), scheduled_at=datetime(2029, 12, 31, 23, 59, tzinfo=UTC))
    wired(wire, clock=NOW).send(due)
    assert "rdate" not in wire.form() and "rtime" not in wire.form()


def test_scheduled_send_is_recorded_by_the_fake(fake: FakeAligoServer, make_provider: Any) -> None:
    outcome = make_provider().send(sms(scheduled_at="2099-05-05T01:00:00+00:00"))
    entry = fake.ledger.get(outcome.provider_message_id)
    assert entry is not None and (entry.fields["rdate"], entry.fields["rtime"]) == ("20990505", "1000")


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected", "blame", "raised"),
    [
        ("-100", ErrorCode.AUTHENTICATION_FAILED, "provider", True),
        ("-101", ErrorCode.AUTHENTICATION_FAILED, "provider", True),
        ("-102", ErrorCode.INSUFFICIENT_BALANCE, "provider", True),
        ("-201", ErrorCode.INSUFFICIENT_BALANCE, "provider", True),
        ("-103", ErrorCode.INVALID_REQUEST, "message", False),
        ("-105", ErrorCode.INVALID_REQUEST, "message", False),
        ("-501", ErrorCode.TEMPLATE_NOT_FOUND, "message", False),
        ("-999", ErrorCode.PROVIDER_ERROR, "provider", True),
    ],
)
@pytest.mark.parametrize("as_number", [False, True], ids=["string", "number"])
def test_error_code_table(code: str, expected: ErrorCode, blame: str, raised: bool, as_number: bool) -> None:
    answer = {"result_code": int(code) if as_number else code, "message": "오류입니다."}
    provider = wired(Wire(answer))
    if raised:
        with pytest.raises(ProviderError) as info:
            provider.send(sms())
        error = info.value
    else:
        outcome = provider.send(sms())
        assert not outcome.accepted and outcome.state is DeliveryState.FAILED
        assert outcome.error is not None
        error = outcome.error
    assert error.code is expected
    assert error.blame == blame
    assert error.provider_code == code
    assert str(error) == f"aligo: 오류입니다. (code: {code})"
    assert error.retryable is (code not in ERROR_CODES)
    assert isinstance(error, ProviderRejected if code in ERROR_CODES else ProviderTransientError)


def test_error_tables_agree() -> None:
    assert ERROR_CODES.keys() == ERROR_BLAME.keys()


def test_kakao_error_in_code_info_shape() -> None:
    error = error_of(wired(Wire({"code": -501, "message": "템플릿 없음"})), alimtalk())
    assert (error.code, error.provider_code, error.blame) == (ErrorCode.TEMPLATE_NOT_FOUND, "-501", "message")


def test_vendor_text_is_scrubbed_of_identifiers_and_numbers() -> None:
    answer = {"result_code": "-101", "message": f"key {API_KEY} / {USER_ID} 수신 010-1234-5678 인증오류"}
    with pytest.raises(ProviderRejected) as info:
        wired(Wire(answer)).send(sms())
    for text in (str(info.value), repr(info.value), info.value.provider_message or ""):
        assert API_KEY not in text and USER_ID not in text and "1234-5678" not in text
    assert "(code: -101)" in str(info.value)


def test_http_errors_go_through_the_base_mapping() -> None:
    with pytest.raises(ProviderRejected) as info:
        wired(Wire(httpx.Response(403, text="forbidden"))).send(sms())
    assert (info.value.code, info.value.status_code) == (ErrorCode.AUTHENTICATION_FAILED, 403)


def test_a_non_json_answer_is_transient() -> None:
    with pytest.raises(ProviderTransientError):
        wired(Wire(httpx.Response(200, text="<html>maintenance</html>"))).send(sms())


def test_missing_sender_is_a_per_message_refusal(fake: FakeAligoServer, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()  # no default sender configured
    orphan = normalize({"to": "01011110000", "type": "SMS", "text": "발신번호 없음"})
    outcomes = provider.send_batch([sms(to="01011110001"), orphan, sms(to="01011110002")])

    assert [o.accepted for o in outcomes] == [True, False, True]
    error = outcomes[1].error
    assert error is not None and (error.code, error.blame) == (ErrorCode.INVALID_REQUEST, "message")
    assert "KMSG_ALIGO_SENDER" in str(error)
    assert fake.ledger.requests == 1 and fake.ledger.per_recipient["01011110000"] == 0


def test_missing_sender_key_blames_the_provider(make_provider: Any) -> None:
    provider: AligoProvider = make_provider(sender_key="")
    error = error_of(provider, alimtalk())
    assert (error.code, error.blame) == (ErrorCode.INVALID_REQUEST, "provider")
    assert "KMSG_ALIGO_SENDER_KEY" in str(error)


def test_unknown_template_from_the_fake(fake: FakeAligoServer, make_provider: Any) -> None:
    error = error_of(make_provider(), alimtalk(template_id="NO_SUCH"))
    assert (error.code, error.provider_code) == (ErrorCode.TEMPLATE_NOT_FOUND, "-501")
    assert fake.ledger.per_recipient["01012345678"] == 0


def test_unregistered_sender_from_the_fake_is_unclassified(make_provider: Any) -> None:
    with pytest.raises(ProviderTransientError) as info:
        make_provider().send(sms(sender="0299998888"))
    assert info.value.code is ErrorCode.PROVIDER_ERROR
    assert info.value.provider_code == str(CODE_UNREGISTERED_SENDER)


def test_insufficient_balance_from_the_fake(fake: FakeAligoServer, make_provider: Any) -> None:
    fake.remain["SMS"] = 2
    provider: AligoProvider = make_provider()
    with pytest.raises(ProviderRejected) as info:
        provider.send_batch([sms(to=f"0107777000{i}") for i in range(3)])
    assert (info.value.code, info.value.provider_code) == (ErrorCode.INSUFFICIENT_BALANCE, "-201")
    assert provider.balance().amount == 2


def test_a_message_blamed_chunk_does_not_stop_the_others(fake: FakeAligoServer, make_provider: Any) -> None:
    outcomes = make_provider().send_batch([alimtalk(template_id="NO_SUCH"), alimtalk(to="01022223333")])
    assert [o.accepted for o in outcomes] == [False, True]


def test_a_later_failure_never_hides_earlier_acceptances() -> None:
    # Given a batch of three contents: the first request is accepted, the second times out
    calls: list[httpx.Request] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json=SMS_OK)

    config = ProviderConfig(
        name="aligo", credentials={"api_key": API_KEY}, options={"user_id": USER_ID, "max_in_flight": "1"}
    )
    provider = AligoProvider(config, make_http_client(transport=httpx.MockTransport(flaky)))
    # Three senders: three requests, whatever the texts
    batch = [
        sms(to="01030000001", text="첫째"),
        sms(to="01030000002", text="둘째", sender="15881234"),
        sms(to="01030000003", text="셋째", sender="01000000000"),
    ]

    # When it is sent
    outcomes = provider.send_batch(batch)

    # Then the accepted one stays accepted, the timed-out one is an unknown outcome, and the third
    # is reported as not sent (retryable, no reconciliation needed) without being attempted
    assert outcomes[0].accepted
    assert isinstance(outcomes[1].error, ProviderTimeout)
    assert isinstance(outcomes[2].error, ProviderTransientError)
    assert not isinstance(outcomes[2].error, ProviderTimeout)
    assert len(calls) == 2


def test_a_first_failure_raises() -> None:
    with pytest.raises(ProviderTransientError) as info:
        wired(Wire(httpx.Response(503))).send_batch([sms(text="첫째"), sms(text="둘째")])
    assert info.value.status_code == 503


def test_partial_acceptance_is_reported_on_every_recipient(fake: FakeAligoServer, make_provider: Any) -> None:
    good = sms(to="01044440000")
    bad = dataclasses.replace(sms(), id="bad", to="0101")  # bypasses normalisation
    outcomes = make_provider().send_batch([good, bad])
    assert all(o.accepted for o in outcomes)
    for outcome in outcomes:
        [warning] = outcome.warnings
        assert warning.code == "PARTIAL_ACCEPTANCE"
        assert warning.details == {"success_cnt": 1, "error_cnt": 1}
    assert fake.ledger.per_recipient == {"01044440000": 1}


def test_every_recipient_refused_is_a_per_message_failure() -> None:
    answer = {"result_code": "1", "message": "success", "msg_id": "1", "success_cnt": 0, "error_cnt": 1}
    outcome = wired(Wire(answer)).send(sms())
    assert not outcome.accepted and outcome.error is not None
    assert outcome.error.code is ErrorCode.INVALID_RECIPIENT


# -- balance --------------------------------------------------------------------------------------


def test_balance_reads_remain() -> None:
    wire = Wire({"result_code": 1, "message": "success", "SMS_CNT": 1234, "LMS_CNT": 400, "MMS_CNT": 150})
    balance = wired(wire).balance()
    assert (balance.amount, balance.currency) == (1234.0, "SMS_CNT")
    assert str(wire.requests[0].url) == "https://apis.aligo.in/remain/"
    assert wire.form() == {"key": API_KEY, "user_id": USER_ID}


def test_balance_counts_down_and_health_probes_it(fake: FakeAligoServer, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    before = provider.balance().amount
    provider.send_batch([sms(to=f"0106666000{i}") for i in range(4)])
    assert provider.balance().amount == before - 4
    assert provider.health().ok


def test_health_fails_on_bad_credentials(make_provider: Any) -> None:
    report = make_provider(credentials={"api_key": "wrong-key-000"}).health()
    assert not report.ok and "(code: -101)" in report.detail


# -- the fake on its own --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeAligoServer]:
    with FakeAligoServer(api_key=API_KEY, user_id=USER_ID, sender_key=SENDER_KEY) as server:
        yield server


@pytest.fixture
def bare_fake(shared_server: FakeAligoServer) -> FakeAligoServer:
    """One server for the tests of the fake itself (each server stop waits ~0.5 s), emptied per test."""
    shared_server.ledger.reset()
    return shared_server


def post_form(fake: FakeAligoServer, path: str, fields: dict[str, str]) -> Any:
    files = {name: (None, value) for name, value in fields.items()}
    return httpx.post(fake.url + path, files=files).json()


def sms_fields(**extra: str) -> dict[str, str]:
    return {
        "key": API_KEY,
        "user_id": USER_ID,
        "sender": SENDER,
        "receiver": "01012345678",
        "msg": "hi",
        **extra,
    }


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (sms_fields(receiver=",".join(f"010{i:08d}" for i in range(1001))), "-105"),
        (sms_fields(msg="가" * 1001, msg_type="LMS"), "-103"),
        (sms_fields(msg="", msg_type="SMS"), "-103"),
        (sms_fields(msg_type="LMS", title="가" * 23), "-103"),
        (sms_fields(rdate="2030-01-01", rtime="0900"), "-103"),
        (sms_fields(msg_type="MMS"), "-103"),
        (sms_fields(key="wrong"), "-101"),
    ],
    ids=[
        "1001_receivers",
        "2002_bytes",
        "empty",
        "title_46_bytes",
        "bad_rdate",
        "mms_without_image",
        "bad_key",
    ],
)
def test_fake_refuses_like_aligo(bare_fake: FakeAligoServer, fields: dict[str, str], code: str) -> None:
    body = post_form(bare_fake, "/send/", fields)
    assert body["result_code"] == code
    assert bare_fake.ledger.per_recipient.total() == 0


def test_fake_takes_1000_receivers_and_44_byte_titles(bare_fake: FakeAligoServer) -> None:
    receivers = ",".join(f"010{i:08d}" for i in range(1000))
    body = post_form(bare_fake, "/send/", sms_fields(receiver=receivers, msg_type="LMS", title="가" * 22))
    assert (body["result_code"], body["success_cnt"], body["error_cnt"]) == ("1", 1000, 0)
    assert len(bare_fake.ledger.entries) == 1000


def test_fake_kakao_refuses_more_than_500_and_unknown_sender_keys(bare_fake: FakeAligoServer) -> None:
    base = {
        "apikey": API_KEY,
        "userid": USER_ID,
        "senderkey": SENDER_KEY,
        "tpl_code": "TPL_OTP",
        "sender": SENDER,
    }
    many = {**base, **{f"receiver_{n}": f"010{n:08d}" for n in range(1, 502)}}
    many.update({f"message_{n}": "x" for n in range(1, 502)})
    assert post_form(bare_fake, "/akv10/alimtalk/send/", many)["result_code"] == "-105"
    wrong_key = {**base, "senderkey": "nope", "receiver_1": "01012345678", "message_1": "x"}
    assert int(post_form(bare_fake, "/akv10/alimtalk/send/", wrong_key)["result_code"]) < 0


def test_fake_throughput_with_1000_receivers_per_request(bare_fake: FakeAligoServer) -> None:
    """Prints the fake's /send/ throughput; run with ``-s`` to see it (bound kept generous)."""
    receivers = ",".join(f"010{i:08d}" for i in range(1000))
    files = {name: (None, value) for name, value in sms_fields(receiver=receivers, msg="성능 측정 " * 5).items()}
    requests = 40
    with httpx.Client() as client:
        client.post(bare_fake.url + "/send/", files=files)  # warm the connection
        started = time.perf_counter()
        for _ in range(requests):
            assert client.post(bare_fake.url + "/send/", files=files).json()["result_code"] == "1"
        elapsed = time.perf_counter() - started
    rate = requests * 1000 / elapsed
    print(f"\nfake aligo /send/: {rate:,.0f} msgs/s ({requests} requests x 1,000 receivers in {elapsed:.3f} s)")
    assert len(bare_fake.ledger.entries) == (requests + 1) * 1000
    assert rate > 10_000


# -- live -----------------------------------------------------------------------------------------

LIVE_KEY = os.environ.get("KMSG_ALIGO_LIVE_API_KEY")
LIVE_USER = os.environ.get("KMSG_ALIGO_LIVE_USER_ID")


@pytest.mark.skipif(
    not (LIVE_KEY and LIVE_USER),
    reason="live Aligo test: set KMSG_ALIGO_LIVE_API_KEY and KMSG_ALIGO_LIVE_USER_ID (calls /remain/ only)",
)
class TestAligoLive:
    def test_remain_answers_with_a_count(self) -> None:
        config = ProviderConfig(
            name="aligo", credentials={"api_key": LIVE_KEY or ""}, options={"user_id": LIVE_USER or ""}
        )
        with make_http_client() as client:
            balance = AligoProvider(config, client).balance()
        assert balance.currency == "SMS_CNT" and balance.amount >= 0
