"""IWINV adapter: the shared contract against the fake over real HTTP, plus IWINV's wire details."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderError,
    ProviderNotAttempted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, MessageType, normalize
from kmsg_worker.providers.base import DeliveryState, ProviderConfig, StatusQuery
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.iwinv import (
    ALIMTALK_ERRORS,
    SMS_ERRORS,
    SMS_MESSAGES,
    IwinvProvider,
    alimtalk_report_state,
    image_filename,
    sms_report_state,
)
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings
from kmsg_worker.testing.fake_iwinv import (
    FAKE_API_KEY,
    FAKE_COMPANY_ID,
    FAKE_SMS_API_KEY,
    FAKE_SMS_AUTH_KEY,
    FakeIwinvServer,
    not_kakao_user_rule,
)
from kmsg_worker.testing.fakeserver import DeliveryRule
from tests.providers.contract import ProviderContract

VALID = {"api_key": FAKE_API_KEY, "sms_api_key": FAKE_SMS_API_KEY, "sms_auth_key": FAKE_SMS_AUTH_KEY}
TEMPLATES = {"TPL_ORDER": 2, "TPL_PLAIN": 0, "TPL_ONE": 1}
SENDER = "0212345678"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"END"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def alimtalk(to: str = "01012345678", **extra: Any) -> Message:
    fields: dict[str, Any] = {
        "to": to,
        "type": "ALIMTALK",
        "template_id": "TPL_ORDER",
        "variables": {"name": "홍길동", "order": "A-100"},
    }
    fields.update(extra)
    return normalize(fields)


def sms(to: str = "01012345678", text: str = "안내 문자입니다", **extra: Any) -> Message:
    fields: dict[str, Any] = {"to": to, "text": text, "type": "SMS", "sender": SENDER}
    fields.update(extra)
    return normalize(fields)


def mms(data: bytes = PNG, **extra: Any) -> Message:
    fields: dict[str, Any] = {
        "to": "01012345678",
        "type": "MMS",
        "text": "사진 안내",
        "sender": SENDER,
        "media": {"image": {"bytes": data}},
    }
    fields.update(extra)
    return normalize(fields)


def query(message: Message, pmid: str, requested_at: datetime | None = None) -> StatusQuery:
    return StatusQuery(
        message.id, pmid, message.type, message.to, requested_at or datetime.now(UTC), message.scheduled_at
    )


@pytest.fixture
def fake() -> Iterator[FakeIwinvServer]:
    with FakeIwinvServer(templates=TEMPLATES) as server:
        yield server


@pytest.fixture
def make_provider(fake: FakeIwinvServer) -> Iterator[Callable[..., IwinvProvider]]:
    clients: list[httpx.Client] = []

    def factory(
        credentials: dict[str, str] | None = None, timeout: float | None = None, **options: Any
    ) -> IwinvProvider:
        client = make_http_client(timeout=httpx.Timeout(timeout or 5.0))
        clients.append(client)
        opts = {"sms_company_id": FAKE_COMPANY_ID, "sender_number": SENDER, **options}
        config = ProviderConfig(name="iwinv", base_url=fake.url, credentials=credentials or VALID, options=opts)
        return IwinvProvider(config, client)

    yield factory
    for client in clients:
        client.close()


class Recorder:
    """An ``httpx.MockTransport`` handler playing IWINV with canned answers; keeps every request."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or self.ok

    @staticmethod
    def ok(request: httpx.Request) -> httpx.Response:
        if "secret" in request.headers:
            return httpx.Response(200, json={"resultCode": 0, "message": "전송 성공", "requestNo": "R1"})
        return httpx.Response(200, json={"code": 200, "message": "ok", "success": 1, "fail": 0, "seqNo": 77})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)

    def json(self, n: int = -1) -> Any:
        return json.loads(self.requests[n].content)


def mocked(
    recorder: Recorder,
    *,
    credentials: dict[str, str] | None = None,
    base_url: str | None = None,
    clock: Callable[[], datetime] | None = None,
    **options: Any,
) -> IwinvProvider:
    config = ProviderConfig(
        name="iwinv",
        base_url=base_url,
        credentials=credentials or {"api_key": "api-key", "sms_api_key": "sms-key", "sms_auth_key": "auth-key"},
        options=options,
    )
    return IwinvProvider(config, make_http_client(transport=httpx.MockTransport(recorder)), clock=clock)


# -- the shared contract --------------------------------------------------------------------------


class TestIwinvContract(ProviderContract):
    secrets = (
        FAKE_API_KEY,
        FAKE_SMS_API_KEY,
        FAKE_SMS_AUTH_KEY,
        b64(FAKE_API_KEY),
        b64(f"{FAKE_SMS_API_KEY}&{FAKE_SMS_AUTH_KEY}"),
    )

    def bad_credentials(self) -> dict[str, str]:
        return {"api_key": "wrong-key", "sms_api_key": "wrong-sms-key", "sms_auth_key": "wrong-auth"}

    def failed_code(self) -> str:
        # IWINV documents no SMS failure codes: anything but 06/1000/00/01 is a failure.
        return "99"


# -- configuration, hosts and authentication ------------------------------------------------------


def test_registry_and_settings_split_secrets_from_options() -> None:
    assert provider_class("iwinv") is IwinvProvider
    env = {
        "KMSG_PROVIDERS": "iwinv",
        "KMSG_IWINV_API_KEY": "k",
        "KMSG_IWINV_SMS_AUTH_KEY": "a",
        "KMSG_IWINV_SMS_COMPANY_ID": "c",
        "KMSG_IWINV_SMS_BASE_URL": "http://sms.example",
    }
    config = Settings.from_env(env).provider_config("iwinv")
    assert dict(config.credentials) == {"api_key": "k", "sms_auth_key": "a"}
    assert config.options == {"sms_company_id": "c", "sms_base_url": "http://sms.example"}
    assert "k" not in repr(config)


def test_api_key_is_required() -> None:
    with pytest.raises(ConfigurationError) as info:
        IwinvProvider(ProviderConfig(name="iwinv"), make_http_client())
    assert info.value.variable == "KMSG_IWINV_API_KEY"


def test_default_hosts_paths_and_auth_headers() -> None:
    recorder = Recorder()
    provider = mocked(recorder)
    assert provider.send(alimtalk()).accepted
    assert provider.send(sms()).accepted
    talk, text = recorder.requests
    assert str(talk.url) == "https://alimtalk.bizservice.iwinv.kr/api/v2/send/"
    assert talk.headers["AUTH"] == b64("api-key")
    assert talk.headers["Content-Type"] == "application/json;charset=UTF-8"
    assert "secret" not in talk.headers
    assert str(text.url) == "https://sms.bizservice.iwinv.kr/api/v2/send/"
    assert text.headers["secret"] == b64("sms-key&auth-key")
    assert "AUTH" not in text.headers
    assert talk.method == text.method == "POST"


def test_base_url_options_and_forwarded_for() -> None:
    recorder = Recorder()
    provider = mocked(
        recorder,
        alimtalk_base_url="http://talk.test/",
        sms_base_url="http://sms.test",
        send_endpoint="/api/v3/send/",
        x_forwarded_for="203.0.113.7",
    )
    provider.send(alimtalk())
    provider.send(sms())
    assert [str(r.url) for r in recorder.requests] == [
        "http://talk.test/api/v3/send/",
        "http://sms.test/api/v2/send/",
    ]
    assert all(r.headers["X-Forwarded-For"] == "203.0.113.7" for r in recorder.requests)


def test_base_url_alone_addresses_both_apis() -> None:
    recorder = Recorder()
    provider = mocked(recorder, base_url="http://fake.test:8080")
    provider.send(alimtalk())
    provider.send(sms())
    assert [r.url.host for r in recorder.requests] == ["fake.test", "fake.test"]


def test_legacy_secret_from_one_sms_key(fake: FakeIwinvServer, make_provider: Any) -> None:
    recorder = Recorder()
    mocked(recorder, credentials={"api_key": "api-key", "sms_auth_key": "auth-key"}).send(sms())
    assert recorder.requests[0].headers["secret"] == b64("api-key&auth-key")
    # The fake accepts the legacy form too.
    provider = make_provider(credentials={"api_key": FAKE_API_KEY, "sms_auth_key": FAKE_SMS_AUTH_KEY})
    assert provider.send(sms()).accepted


def test_sms_types_need_the_sms_keys(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider(credentials={"api_key": FAKE_API_KEY})
    assert not provider.supports(MessageType.SMS)
    assert not provider.supports(MessageType.MMS)
    assert provider.supports(MessageType.ALIMTALK)
    with pytest.raises(ProviderRejected) as info:
        provider.send(sms())
    assert info.value.code is ErrorCode.UNSUPPORTED
    assert info.value.blame == "provider"
    assert "KMSG_IWINV_SMS_API_KEY" in str(info.value)
    assert fake.ledger.requests == 0
    assert provider.send(alimtalk()).accepted


def test_capabilities() -> None:
    caps = IwinvProvider.capabilities
    assert caps.types == {MessageType.SMS, MessageType.LMS, MessageType.MMS, MessageType.ALIMTALK}
    assert (caps.bulk_limit, caps.status_query, caps.bulk_status, caps.alimtalk_fallback) == (
        1000,
        True,
        False,
        "full",
    )
    assert (caps.balance, caps.templates, caps.file_upload, caps.lookup_by_reference) == (
        True,
        True,
        False,
        False,
    )
    assert IwinvProvider.required_credentials == {"api_key"}


# -- AlimTalk wire ---------------------------------------------------------------------------------


def test_template_params_follow_variable_order_or_the_explicit_list() -> None:
    recorder = Recorder()
    provider = mocked(recorder)
    provider.send(alimtalk(variables={"zeta": "1", "alpha": "2", "mid": 3}))
    body = recorder.json()
    assert body["templateCode"] == "TPL_ORDER"
    assert body["list"] == [{"phone": "01012345678", "templateParam": ["1", "2", "3"]}]
    provider.send(alimtalk(provider_options={"templateParam": ["b", None, 5]}))
    assert recorder.json()["list"][0]["templateParam"] == ["b", "", "5"]


def test_resend_stays_off_even_when_a_sender_exists() -> None:
    # IWINV's paid SMS re-send must not be switched on just because a sender number is known.
    recorder = Recorder()
    provider = mocked(recorder, sender_number=SENDER, sms_sender_number=SENDER)
    outcome = provider.send(alimtalk(sender="0299998888"))
    body = recorder.json()
    assert body["reSend"] == "N"
    assert not {"resendCallback", "resendType", "resendContent", "resendTitle"} & body.keys()
    assert outcome.native_fallback is False
    provider.send(alimtalk(failover={"enabled": False, "content": "x"}))
    assert recorder.json()["reSend"] == "N"


def test_resend_on_when_failover_is_requested() -> None:
    recorder = Recorder()
    provider = mocked(recorder)
    message = alimtalk(
        sender="02-1234-5678",
        failover={
            "enabled": True,
            "channel": "lms",
            "content": " 주문이 접수되었습니다 ",
            "title": "주문 안내",
        },
    )
    outcome = provider.send(message)
    body = recorder.json()
    assert body["reSend"] == "Y"
    assert body["resendCallback"] == "0212345678"
    assert body["resendType"] == "N"  # IWINV: N = send resendContent instead of the AlimTalk text
    assert body["resendContent"] == "주문이 접수되었습니다"
    assert body["resendTitle"] == "주문 안내"
    assert outcome.accepted and outcome.native_fallback is True
    assert outcome.warnings == []


def test_resend_without_fallback_text_reuses_the_alimtalk_text() -> None:
    recorder = Recorder()
    mocked(recorder, sender_number=SENDER).send(alimtalk(failover=True))
    body = recorder.json()
    assert (body["reSend"], body["resendType"], body["resendCallback"]) == ("Y", "Y", SENDER)
    assert "resendContent" not in body


def test_provider_options_override_resend_fields() -> None:
    recorder = Recorder()
    provider = mocked(recorder)
    provider.send(
        alimtalk(provider_options={"reSend": "Y", "resendCallback": "1588-0000", "resendType": "Y"}, failover=False)
    )
    body = recorder.json()
    assert (body["reSend"], body["resendCallback"], body["resendType"]) == ("Y", "15880000", "Y")
    provider.send(alimtalk(provider_options={"reSend": "N"}, failover=True, sender=SENDER))
    assert recorder.json()["reSend"] == "N"


@pytest.mark.parametrize(
    "extra",
    [
        {"failover": True},  # no sender anywhere
        {"provider_options": {"reSend": "maybe"}},
        {"provider_options": {"templateParam": "a,b"}},
        {"sender": SENDER, "failover": True, "provider_options": {"resendType": "N"}},  # N without text
    ],
)
def test_invalid_alimtalk_requests_are_refused_without_a_call(extra: dict[str, Any]) -> None:
    recorder = Recorder()
    outcome = mocked(recorder).send(alimtalk(**extra))
    assert not outcome.accepted
    assert isinstance(outcome.error, ProviderRejected)
    assert outcome.error.blame == "message"
    assert recorder.requests == []


def test_alimtalk_recipients_of_one_template_share_a_request(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    messages = [alimtalk(to=f"0105555000{i}", variables={"n": str(i), "o": "x"}) for i in range(3)]
    messages.append(alimtalk(to="01055550009", template_id="TPL_PLAIN", variables={}))
    fake.ledger.set_rule(messages[1].to, not_kakao_user_rule())
    outcomes = provider.send_batch(messages)
    assert all(o.accepted for o in outcomes)
    assert fake.stats()["alimtalk_requests"] == 2
    # The two template requests run concurrently: find the shared one by its size, not its order.
    bodies = [json.loads(r.body) for r in fake.recent]
    first = next(b for b in bodies if len(b["list"]) == 3)
    assert [item["templateParam"] for item in first["list"]] == [["0", "x"], ["1", "x"], ["2", "x"]]
    assert len({o.provider_message_id for o in outcomes[:3]}) == 1
    # One seqNo for three recipients: the status query tells them apart by number.
    states = [
        provider.query_status([query(m, o.provider_message_id)])[0] for m, o in zip(messages, outcomes, strict=True)
    ]
    assert [r.state for r in states] == [
        DeliveryState.DELIVERED,
        DeliveryState.FAILED,
        DeliveryState.DELIVERED,
    ] + [DeliveryState.DELIVERED]
    assert states[1].not_kakao_user and states[1].code == "3019"
    assert not states[0].not_kakao_user


def test_a_bad_recipient_does_not_sink_the_others(fake: FakeIwinvServer, make_provider: Any) -> None:
    # The fake refuses the whole list (508) when one recipient has the wrong parameter count;
    # the adapter splits the refused list to find it.
    provider = make_provider()
    good = [alimtalk(to=f"0106666000{i}", template_id="TPL_ONE", variables={"v": str(i)}) for i in range(5)]
    bad = alimtalk(to="01066669999", template_id="TPL_ONE", variables={"v": "1", "extra": "2"})
    outcomes = provider.send_batch([*good[:2], bad, *good[2:]])
    assert [o.accepted for o in outcomes] == [True, True, False, True, True, True]
    assert outcomes[2].error is not None and outcomes[2].error.provider_code == "508"
    assert sum(fake.ledger.per_recipient.values()) == 5


def test_same_parameters_are_not_split(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    messages = [alimtalk(to=f"0107777000{i}", template_id="TPL_ONE", variables={"a": "1", "b": "2"}) for i in range(4)]
    outcomes = provider.send_batch(messages)
    assert not any(o.accepted for o in outcomes)
    assert {o.error.code for o in outcomes if o.error} == {ErrorCode.INVALID_REQUEST}
    assert fake.ledger.requests == 1


def test_partial_acceptance_warns() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 200, "message": "ok", "success": 1, "fail": 1, "seqNo": 9})

    outcomes = mocked(Recorder(answer)).send_batch([alimtalk(), alimtalk(to="01099998888")])
    assert all(o.accepted and o.provider_message_id == "9" for o in outcomes)
    assert [w.code for w in outcomes[0].warnings] == ["IWINV_PARTIAL_ACCEPTANCE"]


def test_all_recipients_refused_inside_a_200() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 200, "message": "ok", "success": 0, "fail": 1, "seqNo": 9})

    outcome = mocked(Recorder(answer)).send(alimtalk())
    assert not outcome.accepted
    assert outcome.error is not None and outcome.error.code is ErrorCode.INVALID_RECIPIENT


# -- dates -------------------------------------------------------------------------------------------


@pytest.fixture
def new_york() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.mark.usefixtures("new_york")
def test_reservation_dates_are_in_seoul_whatever_the_process_zone() -> None:
    assert time.strftime("%Z") in ("EST", "EDT")
    when = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    recorder = Recorder()
    provider = mocked(recorder)
    talk = provider.send(replace(alimtalk(), scheduled_at=when))
    text = provider.send(replace(sms(), scheduled_at=when))
    assert (recorder.json(0)["reserve"], recorder.json(0)["sendDate"]) == ("Y", "2099-01-02 12:04:05")
    assert recorder.json(1)["date"] == "2099-01-02 12:04:05"
    assert talk.state is text.state is DeliveryState.PENDING
    # Naive datetimes are Asia/Seoul, not the process's zone.
    provider.send(replace(sms(), scheduled_at=datetime(2099, 1, 2, 3, 4, 5)))
    assert recorder.json()["date"] == "2099-01-02 03:04:05"


def test_a_schedule_about_to_fall_due_is_sent_now() -> None:
    recorder = Recorder()
    provider = mocked(recorder)
    outcome = provider.send(replace(alimtalk(), scheduled_at=datetime.now(UTC) + timedelta(seconds=5)))
    assert recorder.json()["reserve"] == "N" and "sendDate" not in recorder.json()
    assert outcome.state is DeliveryState.SENT


@pytest.mark.usefixtures("new_york")
def test_history_dates_are_in_seoul() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 200, "resultCode": 0, "list": []})

    recorder = Recorder(answer)
    now = datetime(2024, 5, 1, 15, 30, 0, tzinfo=UTC)  # 2024-05-02 00:30 in Seoul, 11:30 in New York
    provider = mocked(recorder, clock=lambda: now, sms_company_id="co")
    requested = now - timedelta(minutes=5)
    assert provider.query_status([query(alimtalk(), "41", requested), query(sms(), "R9", requested)]) == []
    talk, text = recorder.json(0), recorder.json(1)
    assert str(recorder.requests[0].url).endswith("/api/history/")
    assert (talk["startDate"], talk["endDate"], talk["seqNo"]) == (
        "2024-05-01 00:25:00",
        "2024-05-02 00:30:00",
        41,
    )
    assert (talk["pageNum"], talk["pageSize"], talk["phone"]) == (1, 15, "01012345678")
    assert text == {
        "version": "1.0",
        "companyid": "co",
        "startDate": "2024-05-01",
        "endDate": "2024-05-02",
        "requestNo": "R9",
        "pageNum": 1,
        "pageSize": 15,
        "phone": "01012345678",
    }


@pytest.mark.usefixtures("new_york")
def test_status_round_trip_with_the_fake_in_another_zone(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    message = alimtalk()
    outcome = provider.send(message)
    [report] = provider.query_status([query(message, outcome.provider_message_id)])
    assert report.state is DeliveryState.DELIVERED


# -- SMS / LMS / MMS wire ---------------------------------------------------------------------------


def test_sms_and_lms_bodies() -> None:
    recorder = Recorder()
    provider = mocked(recorder, sms_sender_number="0311112222")
    provider.send(normalize({"to": "010-1234-5678", "text": "짧은 문자", "type": "SMS"}))
    assert recorder.json() == {
        "version": "1.0",
        "from": "0311112222",
        "text": "짧은 문자",
        "msgType": "SMS",
        "to": ["01012345678"],
    }
    provider.send(sms(provider_options={"msgType": "GSMS"}))
    assert recorder.json()["msgType"] == "GSMS"
    provider.send(normalize({"to": "01012345678", "text": "가" * 60, "sender": SENDER}))  # inferred LMS
    body = recorder.json()
    assert body["title"] == "가" * 20 and "msgType" not in body
    provider.send(
        normalize({"to": "01012345678", "text": "본문", "subject": " 제목 ", "type": "LMS", "sender": SENDER})
    )
    assert recorder.json()["title"] == "제목"
    provider.send(
        normalize({"to": "+82 10-1234-5678", "text": "😀" * 30 + "\n둘째 줄", "type": "LMS", "sender": SENDER})
    )
    body = recorder.json()
    assert body["title"] == "😀" * 10  # 20 characters would be 80 bytes; IWINV takes 40
    assert body["to"] == ["01012345678"]


def test_missing_sender_is_refused_on_the_provider(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider(sender_number=None)
    outcome = provider.send(normalize({"to": "01012345678", "text": "x", "type": "SMS"}))
    assert not outcome.accepted and outcome.error is not None
    assert outcome.error.blame == "provider"
    assert "KMSG_IWINV_SMS_SENDER_NUMBER" in str(outcome.error)
    assert fake.ledger.requests == 0


def test_2500_identical_messages_take_three_requests(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    messages = [sms(to=f"010{i:08d}") for i in range(2500)]
    outcomes = [o for start in range(0, 2500, 1000) for o in provider.send_batch(messages[start : start + 1000])]
    assert all(o.accepted for o in outcomes)
    assert fake.ledger.requests == 3
    assert [len(json.loads(r.body)["to"]) for r in fake.recent] == [1000, 1000, 500]
    assert len(fake.ledger.per_recipient) == 2500 and max(fake.ledger.per_recipient.values()) == 1
    assert len({o.provider_message_id for o in outcomes}) == 3


def test_different_content_is_not_merged(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    messages = [
        sms(to="01010000001", text="첫째"),
        sms(to="01010000002", text="둘째"),
        sms(to="01010000003", text="첫째"),
        sms(to="01010000004", text="첫째", sender="0311112222"),
        normalize({"to": "01010000005", "text": "첫째", "type": "LMS", "sender": SENDER}),
    ]
    outcomes = provider.send_batch(messages)
    assert all(o.accepted for o in outcomes)
    bodies = [json.loads(r.body) for r in fake.recent]
    # The four requests run concurrently: their order at the fake is not the batch's.
    assert sorted((b["text"], b["to"], b["from"], b.get("msgType")) for b in bodies) == [
        ("둘째", ["01010000002"], SENDER, "SMS"),
        ("첫째", ["01010000001", "01010000003"], SENDER, "SMS"),
        ("첫째", ["01010000004"], "0311112222", "SMS"),
        ("첫째", ["01010000005"], SENDER, None),
    ]
    assert outcomes[0].provider_message_id == outcomes[2].provider_message_id != outcomes[1].provider_message_id


def test_one_request_never_repeats_a_number(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    outcomes = provider.send_batch([sms(), sms(), sms(to="01099990000")])
    assert all(o.accepted for o in outcomes)
    # The two requests run concurrently (bounded in-flight window): their order at the server is free.
    assert sorted(json.loads(r.body)["to"] for r in fake.recent) == [
        ["01012345678"],
        ["01012345678", "01099990000"],
    ]
    assert fake.ledger.per_recipient["01012345678"] == 2


def test_mms_is_multipart_with_the_image_bytes(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    outcome = provider.send(mms(subject="사진"))
    assert outcome.accepted, outcome.error
    request = fake.recent[-1]
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.headers["secret"] == b64(f"{FAKE_SMS_API_KEY}&{FAKE_SMS_AUTH_KEY}")
    assert b'name="image"; filename="image.png"' in request.body and b"Content-Type: image/png" in request.body
    assert b'name="to"\r\n\r\n01012345678\r\n' in request.body
    assert b'name="title"\r\n\r\n' + "사진".encode() in request.body
    assert PNG in request.body
    entry = next(iter(fake.ledger.entries.values()))
    assert (entry.type, entry.to) == ("MMS", "01012345678")


def test_mms_image_limit_is_100_kb(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    exact = b"\xff\xd8\xff" + b"\x01" * (100 * 1024 - 3)
    assert provider.send(mms(exact)).accepted
    outcome = provider.send(mms(exact + b"\x01"))
    assert not outcome.accepted and outcome.error is not None
    assert (outcome.error.code, outcome.error.blame) == (ErrorCode.INVALID_REQUEST, "message")
    assert "100 KB" in str(outcome.error)
    assert fake.ledger.requests == 1


def test_mms_url_is_refused_as_unsupported(fake: FakeIwinvServer, make_provider: Any) -> None:
    message = normalize(
        {
            "to": "01012345678",
            "type": "MMS",
            "text": "x",
            "sender": SENDER,
            "image_url": "https://x.test/a.jpg",
        }
    )
    outcome = make_provider().send(message)
    assert not outcome.accepted and outcome.error is not None
    assert (outcome.error.code, outcome.error.blame) == (ErrorCode.UNSUPPORTED, "provider")
    assert "bytes" in str(outcome.error)
    assert fake.ledger.requests == 0


def test_fake_refuses_oversized_images_and_bad_extensions(fake: FakeIwinvServer) -> None:
    headers = {"secret": b64(f"{FAKE_SMS_API_KEY}&{FAKE_SMS_AUTH_KEY}")}
    form = {"version": "1.0", "from": SENDER, "to": "01012345678", "title": "t", "text": "x"}
    with httpx.Client() as client:
        big = client.post(
            f"{fake.url}/api/v2/send/", headers=headers, data=form, files={"image": ("a.jpg", b"1" * 102_401)}
        )
        odd = client.post(f"{fake.url}/api/v2/send/", headers=headers, data=form, files={"image": ("a.bmp", b"1")})
    assert (big.json()["resultCode"], odd.json()["resultCode"]) == (31, 32)


@pytest.mark.parametrize(
    ("filename", "content_type", "data", "expected"),
    [
        (None, None, PNG, ("image.png", "image/png")),
        ("photo", "image/gif", b"????", ("photo.gif", "image/gif")),
        ("photo", None, b"RIFF\x00\x00\x00\x00WEBPVP8 ", ("photo.webp", "image/webp")),
        ("scan.JPG", None, b"x", ("scan.JPG", "image/jpeg")),
        ("raw", None, b"x", ("raw.jpg", "image/jpeg")),
        ("a.bin", None, b"x", ("a.bin", "application/octet-stream")),
    ],
)
def test_image_filename(filename: str | None, content_type: str | None, data: bytes, expected: tuple[str, str]) -> None:
    assert image_filename(filename, content_type, data) == expected


# -- errors -----------------------------------------------------------------------------------------


def refusal(provider: IwinvProvider, message: Message) -> ProviderError:
    """The error of a refused send: raised when the provider is to blame, an outcome otherwise."""
    try:
        outcome = provider.send(message)
    except ProviderError as exc:
        assert exc.blame == "provider", "a message-blamed refusal must come back as an outcome"
        return exc
    assert not outcome.accepted and outcome.error is not None
    assert outcome.error.blame == "message", "a provider-blamed failure must be raised"
    return outcome.error


def _answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Recorder:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return Recorder(answer)


ALIMTALK_TABLE = [
    (201, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED, "provider"),
    (206, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED, "provider"),
    (401, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED, "provider"),
    (403, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED, "provider"),
    (429, ProviderRateLimited, ErrorCode.RATE_LIMIT_EXCEEDED, "provider"),
    (519, ProviderRejected, ErrorCode.INSUFFICIENT_BALANCE, "provider"),
    (404, ProviderRejected, ErrorCode.TEMPLATE_NOT_FOUND, "message"),
    (501, ProviderRejected, ErrorCode.TEMPLATE_NOT_FOUND, "message"),
    (505, ProviderRejected, ErrorCode.SENDER_NOT_REGISTERED, "provider"),
    *[(c, ProviderRejected, ErrorCode.INVALID_REQUEST, "message") for c in (502, 508, 510, 517, 540)],
    (518, ProviderTransientError, ErrorCode.PROVIDER_ERROR, "provider"),
    (599, ProviderTransientError, ErrorCode.PROVIDER_ERROR, "provider"),
    (300, ProviderRejected, ErrorCode.INVALID_REQUEST, "provider"),
]


@pytest.mark.parametrize(("code", "cls", "error_code", "blame"), ALIMTALK_TABLE)
def test_alimtalk_codes(code: int, cls: type[ProviderError], error_code: ErrorCode, blame: str) -> None:
    recorder = _answer({"code": code, "message": f"오류 {code}"}, headers={"Retry-After": "3"})
    error = refusal(mocked(recorder), alimtalk())
    assert type(error) is cls
    assert (error.code, error.blame, error.provider_code) == (error_code, blame, str(code))
    assert error.provider_message == f"오류 {code}"
    if cls is ProviderRateLimited:
        assert error.retry_after == 3


def test_alimtalk_table_covers_the_documented_range() -> None:
    assert all(ALIMTALK_ERRORS[c].code is ErrorCode.INVALID_REQUEST for c in range(502, 518) if c != 505)


SMS_TABLE = [
    *[(c, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED, "provider") for c in (14, 15, 202, 206)],
    (13, ProviderRejected, ErrorCode.SENDER_NOT_REGISTERED, "provider"),
    (50, ProviderRejected, ErrorCode.INSUFFICIENT_BALANCE, "provider"),
    *[(c, ProviderRejected, ErrorCode.INVALID_REQUEST, "message") for c in (21, 22, 23, 31, 32, 33, 41, 42, 43)],
    (44, ProviderRejected, ErrorCode.INVALID_REQUEST, "provider"),
    (11, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE, "provider"),
    (12, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE, "provider"),
    (1, ProviderTransientError, ErrorCode.PROVIDER_ERROR, "provider"),
]


@pytest.mark.parametrize(("code", "cls", "error_code", "blame"), SMS_TABLE)
def test_sms_codes_with_korean_fallback_text(
    code: int, cls: type[ProviderError], error_code: ErrorCode, blame: str
) -> None:
    # resultCode as a string, no message: the built-in Korean table supplies the text.
    error = refusal(mocked(_answer({"resultCode": str(code)})), sms())
    assert type(error) is cls
    assert (error.code, error.blame, error.provider_code) == (error_code, blame, str(code))
    assert error.provider_message == SMS_MESSAGES[code]
    assert SMS_MESSAGES[code] in str(error)
    assert code in SMS_ERRORS or cls is ProviderTransientError


@pytest.mark.parametrize(
    ("recorder", "expected"),
    [
        (_answer("501"), ErrorCode.TEMPLATE_NOT_FOUND),  # IWINV sometimes answers a bare number
        (_answer(519), ErrorCode.INSUFFICIENT_BALANCE),
        (_answer({"message": "denied"}, status=401), ErrorCode.AUTHENTICATION_FAILED),
        (_answer({"code": 401, "message": "x"}, status=401), ErrorCode.AUTHENTICATION_FAILED),
        (_answer("<html>not here</html>", status=404), ErrorCode.INVALID_REQUEST),
    ],
)
def test_odd_answers(recorder: Recorder, expected: ErrorCode) -> None:
    error = refusal(mocked(recorder), alimtalk())
    assert isinstance(error, ProviderRejected) and error.code is expected


def test_sms_success_as_string_code() -> None:
    outcome = mocked(_answer({"resultCode": "0", "msgid": 123})).send(sms())
    assert outcome.accepted and outcome.provider_message_id == "123"


def test_unreadable_success_answer_is_an_unknown_outcome() -> None:
    with pytest.raises(ProviderTimeout):
        mocked(_answer("<html>ok</html>")).send(sms())


def test_vendor_text_is_masked() -> None:
    error = refusal(mocked(_answer({"resultCode": 41, "message": "수신번호 010-1234-5678 오류"})), sms())
    assert "1234" not in str(error) and "1234" not in (error.provider_message or "")
    assert "5678" in str(error)


def test_bad_auth_on_both_apis_via_the_fake(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider(credentials={"api_key": "nope", "sms_api_key": "a", "sms_auth_key": "b"})
    for message, code in ((alimtalk(), "401"), (sms(), "14")):
        with pytest.raises(ProviderRejected) as info:
            provider.send(message)
        assert (info.value.code, info.value.provider_code) == (ErrorCode.AUTHENTICATION_FAILED, code)
        assert info.value.status_code == 200
        assert "nope" not in str(info.value) and b64("nope") not in repr(info.value)
    assert fake.ledger.rejected == 2 and not fake.ledger.entries


def test_no_balance_via_the_fake(fake: FakeIwinvServer, make_provider: Any) -> None:
    fake.charge = 0
    provider = make_provider()
    for message, code in ((alimtalk(), "519"), (sms(), "50")):
        with pytest.raises(ProviderRejected) as info:
            provider.send(message)
        assert (info.value.code, info.value.provider_code) == (ErrorCode.INSUFFICIENT_BALANCE, code)


def test_unknown_template_via_the_fake(fake: FakeIwinvServer, make_provider: Any) -> None:
    error = refusal(make_provider(), alimtalk(template_id="NOPE"))
    assert (error.code, error.blame, error.provider_code) == (ErrorCode.TEMPLATE_NOT_FOUND, "message", "501")


# -- batches that partly fail --------------------------------------------------------------------------


def test_message_refusal_in_one_request_leaves_the_others(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    too_long = replace(sms(to="01020000002"), type=MessageType.LMS, text="가" * 1001)  # 2,002 bytes
    outcomes = provider.send_batch([sms(to="01020000001"), too_long])
    assert outcomes[0].accepted
    assert not outcomes[1].accepted and outcomes[1].error is not None
    assert (outcomes[1].error.provider_code, outcomes[1].error.blame) == ("21", "message")


def test_provider_failure_after_an_accepted_request_is_reported_per_message() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, json={"resultCode": 0, "requestNo": "R1"})
        return httpx.Response(503, text="busy")

    recorder = Recorder(answer)
    # One request at a time, so that "first" and "second" are well defined (concurrent windows: test_concurrency)
    outcomes = mocked(recorder, max_in_flight=1).send_batch([sms(text="a"), sms(text="b"), sms(text="c")])
    assert outcomes[0].accepted
    assert isinstance(outcomes[1].error, ProviderTransientError) and outcomes[1].error.status_code == 503
    # Not tried after the provider failed: retryable, and not an unknown outcome.
    assert isinstance(outcomes[2].error, ProviderTransientError)
    assert len(recorder.requests) == 2


def test_timeout_mid_batch_marks_only_that_request_unknown() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"resultCode": 0, "requestNo": f"R{calls}"})

    batch = [sms(text="a"), sms(text="b"), sms(text="c")]
    outcomes = mocked(Recorder(answer), max_in_flight=1).send_batch(batch)
    assert outcomes[0].accepted
    assert isinstance(outcomes[1].error, ProviderTimeout) and outcomes[1].state is DeliveryState.UNKNOWN
    assert (
        type(outcomes[2].error) is ProviderNotAttempted
        and outcomes[2].error.code is ErrorCode.PROVIDER_ERROR
        and outcomes[2].state is DeliveryState.FAILED
    )


def test_nothing_accepted_raises_the_failure() -> None:
    with pytest.raises(ProviderRejected) as info:
        mocked(_answer({"resultCode": 14})).send_batch([sms(text="a"), sms(text="b")])
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


# -- status ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            {"statusCode": "OK", "statusCodeName": "성공", "sendDate": "2024-01-01 00:00:00"},
            DeliveryState.DELIVERED,
        ),
        ({"statusCode": "", "statusCodeName": "발송 성공"}, DeliveryState.DELIVERED),
        (
            {"statusCode": "3019", "statusCodeName": "카카오톡 미사용자", "sendDate": "2024-01-01 00:00:00"},
            DeliveryState.FAILED,
        ),
        ({"statusCode": "E1", "statusCodeName": "실패", "sendDate": "not a date"}, DeliveryState.PENDING),
        ({"statusCode": "", "statusCodeName": "대기", "sendDate": ""}, DeliveryState.PENDING),
        (
            {"statusCode": "", "statusCodeName": "전송중", "sendDate": "2024-01-01 00:00:00"},
            DeliveryState.SENT,
        ),
        ({"statusCode": "", "statusCodeName": "", "sendDate": "2099-01-01 00:00:00"}, DeliveryState.PENDING),
    ],
)
def test_alimtalk_status_mapping(item: dict[str, str], expected: DeliveryState) -> None:
    assert alimtalk_report_state(item, datetime(2025, 1, 1, tzinfo=UTC)) is expected


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"sendStatusCode": "06", "sendStatusMsg": ""}, DeliveryState.DELIVERED),
        ({"sendStatusCode": "1000"}, DeliveryState.DELIVERED),
        ({"sendStatusCode": "", "sendStatus": "전송 성공"}, DeliveryState.DELIVERED),
        ({"sendStatusCode": "00"}, DeliveryState.PENDING),
        ({"sendStatusMsg": "발송 대기"}, DeliveryState.PENDING),
        ({"sendStatusCode": "01"}, DeliveryState.SENT),
        ({"sendStatusMsg": "처리중"}, DeliveryState.SENT),
        ({}, DeliveryState.UNKNOWN),
        ({"sendStatusCode": "16", "sendStatusMsg": "결번"}, DeliveryState.FAILED),
    ],
)
def test_sms_status_mapping(item: dict[str, str], expected: DeliveryState) -> None:
    assert sms_report_state(item) is expected


def test_status_progresses_through_the_ledger(make_provider: Any) -> None:
    now = [1_700_000_000.0]
    server = FakeIwinvServer(templates=TEMPLATES, clock=lambda: now[0]).start()
    try:
        client = make_http_client()
        config = ProviderConfig(
            name="iwinv", base_url=server.url, credentials=VALID, options={"sms_company_id": FAKE_COMPANY_ID}
        )
        provider = IwinvProvider(config, client, clock=lambda: datetime.fromtimestamp(now[0], UTC))
        server.ledger.default_rule = DeliveryRule(sent_after=10, final_after=60)
        talk, text = alimtalk(), sms()
        sent = provider.send_batch([talk, text])
        requested = datetime.fromtimestamp(now[0], UTC)

        def states() -> list[DeliveryState]:
            reports = provider.query_status(
                [
                    query(talk, sent[0].provider_message_id or "", requested),
                    query(text, sent[1].provider_message_id or "", requested),
                ]
            )
            return [r.state for r in reports]

        assert states() == [DeliveryState.PENDING, DeliveryState.PENDING]
        now[0] += 20
        assert states() == [DeliveryState.SENT, DeliveryState.SENT]
        now[0] += 60
        assert states() == [DeliveryState.DELIVERED, DeliveryState.DELIVERED]
        client.close()
    finally:
        server.stop()


def test_failed_sms_keeps_code_and_text(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    message = sms()
    fake.ledger.set_rule(message.to, DeliveryRule(final="FAILED", code="16", message="결번"))
    outcome = provider.send(message)
    [report] = provider.query_status([query(message, outcome.provider_message_id)])
    assert (report.state, report.code, report.description) == (DeliveryState.FAILED, "16", "결번")
    assert report.failed_at is not None and not report.not_kakao_user


def test_status_ignores_other_messages_rows() -> None:
    rows = [{"seqNo": 5, "phone": "01012345678", "statusCode": "OK", "statusCodeName": "성공"}]
    recorder = _answer({"code": 200, "list": rows})
    assert mocked(recorder).query_status([query(alimtalk(), "6")]) == []
    masked = [{"seqNo": 6, "phone": "010****5678", "statusCode": "OK", "statusCodeName": "성공"}]
    [report] = mocked(_answer({"code": 200, "list": masked})).query_status([query(alimtalk(), "6")])
    assert report.state is DeliveryState.DELIVERED


def test_sms_status_needs_the_company_id_and_a_recent_message(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider(sms_company_id=None)
    with pytest.raises(ProviderRejected) as info:
        provider.query_status([query(sms(), "1")])
    assert "KMSG_IWINV_SMS_COMPANY_ID" in str(info.value)
    old = datetime.now(UTC) - timedelta(days=100)
    with pytest.raises(ProviderRejected) as info:
        make_provider().query_status([query(sms(), "1", old)])
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert fake.ledger.requests == 0


def test_one_failing_query_does_not_hide_the_others(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider(sms_company_id=None)
    message = alimtalk()
    outcome = provider.send(message)
    reports = provider.query_status([query(sms(), "1"), query(message, outcome.provider_message_id)])
    assert [r.message_id for r in reports] == [message.id]


# -- balance, templates, health ------------------------------------------------------------------------


def test_balance_and_sms_balance(fake: FakeIwinvServer, make_provider: Any) -> None:
    fake.charge = 12_345.0
    provider = make_provider()
    assert provider.balance().amount == 12_345.0
    assert provider.sms_balance().amount == 12_345.0
    paths = [(r.path, "secret" in r.headers, json.loads(r.body)) for r in fake.recent]
    assert paths == [("/api/charge/", False, {}), ("/api/charge/", True, {"version": "1.0"})]
    assert provider.health().ok


def test_templates(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    assert {t["templateCode"] for t in provider.templates()} == set(TEMPLATES)
    assert provider.template("TPL_ONE")["templateContent"] == "#{변수1}"
    assert json.loads(fake.recent[-1].body) == {"pageNum": "1", "pageSize": "15", "templateCode": "TPL_ONE"}
    with pytest.raises(ProviderRejected) as info:
        provider.template("NOPE")
    assert info.value.code is ErrorCode.TEMPLATE_NOT_FOUND


def test_fake_control_reset_forgets_history(fake: FakeIwinvServer, make_provider: Any) -> None:
    provider = make_provider()
    message = sms()
    outcome = provider.send(message)
    httpx.post(f"{fake.url}/_fake/reset")
    assert provider.query_status([query(message, outcome.provider_message_id)]) == []


def test_fake_sms_throughput(fake: FakeIwinvServer, make_provider: Any, capsys: pytest.CaptureFixture[str]) -> None:
    provider = make_provider()
    messages = [sms(to=f"010{i:08d}") for i in range(1000)]
    provider.send_batch(messages)  # warm up the connection
    rounds = 10
    started = time.perf_counter()
    for _ in range(rounds):
        assert all(o.accepted for o in provider.send_batch(messages))
    rate = rounds * 1000 / (time.perf_counter() - started)
    with capsys.disabled():
        print(f"\nIWINV fake + adapter, SMS 1,000 recipients/request: {rate:,.0f} msgs/s")
    assert rate > 5_000  # generous: ~90,000 on the reference machine


# -- live --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("KMSG_IWINV_LIVE_API_KEY"),
    reason="live IWINV test: set KMSG_IWINV_LIVE_API_KEY (reads the charge API only, sends nothing)",
)
class TestIwinvLive:
    def test_charge(self) -> None:
        config = ProviderConfig(name="iwinv", credentials={"api_key": os.environ["KMSG_IWINV_LIVE_API_KEY"]})
        with make_http_client() as client:
            balance = IwinvProvider(config, client).balance()
        assert balance.amount >= 0
