"""Aligo delivery results: ``/sms_list/`` (per ``mid``) and ``/list/`` in the adapter and the fake.

Statuses progress over time at the fake (its ledger's delivery rules, on a controllable clock), so
the adapter is shown to follow a message from waiting to delivered or failed, for a whole bulk
request in one call per ``mid``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import ErrorCode, ProviderRejected
from kmsg_worker.message import Message, MessageType, normalize
from kmsg_worker.providers.aligo import AligoProvider, sms_state
from kmsg_worker.providers.base import DeliveryState, ProviderConfig, SendOutcome, StatusQuery
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.testing.fake_aligo import FakeAligoServer
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeRequest, FakeResponse, parse_multipart

API_KEY = "aligo-results-key-8b3d1e"
USER_ID = "kmsgresults"
SENDER = "0212345678"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingAligo(FakeAligoServer):
    """Counts the requests per path, and can fail ``/sms_list/`` for chosen ``mid`` values."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(api_key=API_KEY, user_id=USER_ID, clock=clock)
        self.paths: list[str] = []
        self.failing_mids: set[str] = set()

    def handle(self, request: FakeRequest) -> FakeResponse:
        self.paths.append(request.path)
        if request.path == "/sms_list/" and self.failing_mids:
            if str(parse_multipart(request).get("mid")) in self.failing_mids:
                return FakeResponse(503, {"message": "busy"})
        return super().handle(request)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[CountingAligo]:
    with CountingAligo(clock) as server:
        yield server


@pytest.fixture
def make_provider(fake: CountingAligo) -> Iterator[Callable[..., AligoProvider]]:
    clients: list[httpx.Client] = []

    def factory(api_key: str = API_KEY) -> AligoProvider:
        clients.append(make_http_client(timeout=httpx.Timeout(5.0)))
        config = ProviderConfig(
            name="aligo", base_url=fake.url, credentials={"api_key": api_key}, options={"user_id": USER_ID}
        )
        return AligoProvider(config, clients[-1])

    yield factory
    for client in clients:
        client.close()


def sms(to: str, text: str) -> Message:
    return normalize({"to": to, "text": text, "type": "SMS", "sender": SENDER})


def queries(messages: list[Message], outcomes: list[SendOutcome]) -> list[StatusQuery]:
    return [
        StatusQuery(m.id, o.provider_message_id or "", m.type, m.to, datetime.now(UTC))
        for m, o in zip(messages, outcomes, strict=True)
    ]


def test_a_message_goes_from_waiting_to_delivered(fake: CountingAligo, clock: Clock, make_provider: Any) -> None:
    # Given a message the carrier takes after 10 s and reports delivered after 20 s
    fake.ledger.default_rule = DeliveryRule(sent_after=10, final_after=20)
    provider: AligoProvider = make_provider()
    messages = [sms("01012340000", "인증번호 123456")]
    [query] = queries(messages, provider.send_batch(messages))

    # When its status is asked at 0 s, 10 s and 20 s, then it is pending, sent, delivered
    states = []
    for at in (0, 10, 20):
        clock.now = fake.ledger.get(query.provider_message_id).accepted_at + at  # type: ignore[union-attr]
        [report] = provider.query_status([query])
        states.append((report.state, report.code))
    assert states == [
        (DeliveryState.PENDING, "대기중"),
        (DeliveryState.SENT, "전송중"),
        (DeliveryState.DELIVERED, "발송완료"),
    ]


def test_a_failure_keeps_aligos_reason(fake: CountingAligo, make_provider: Any) -> None:
    fake.ledger.set_rule("01055550000", DeliveryRule(final="FAILED", message="수신번호 결번"))
    provider: AligoProvider = make_provider()
    messages = [sms("01055550000", "안내"), sms("01055550001", "다른 안내")]
    reports = {r.message_id: r for r in provider.query_status(queries(messages, provider.send_batch(messages)))}
    assert reports[messages[0].id].state is DeliveryState.FAILED
    assert reports[messages[0].id].code == "수신번호 결번"
    assert reports[messages[0].id].failed_at is not None
    assert reports[messages[1].id].state is DeliveryState.DELIVERED


def test_a_whole_bulk_is_answered_with_one_call_per_mid(fake: CountingAligo, make_provider: Any) -> None:
    # Given 1,000 personalised SMS (two /send_mass/ requests) and 1,000 of one text (one /send/)
    provider: AligoProvider = make_provider()
    personal = [sms(f"010{i:08d}", f"{i}번 고객님 안내") for i in range(1000)]
    shared = [sms(f"011{i:08d}", "모두 같은 안내") for i in range(1000)]
    sent = queries(personal, provider.send_batch(personal)) + queries(shared, provider.send_batch(shared))
    fake.paths.clear()

    # When all 2,000 are asked at once
    reports = provider.query_status(sent)

    # Then each got its own report, from 4 calls: one per /send_mass/ mid, two pages for /send/'s
    assert {r.message_id for r in reports} == {q.message_id for q in sent}
    assert all(r.state is DeliveryState.DELIVERED for r in reports)
    assert fake.paths == ["/sms_list/"] * 4


def test_kakao_and_unknown_ids_are_not_known_yet(fake: CountingAligo, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    now = datetime.now(UTC)
    asked = [
        StatusQuery("k", "700000123:1", MessageType.ALIMTALK, "01012345678", now),
        StatusQuery("u", "799999999:1", MessageType.SMS, "01012345678", now),
    ]
    assert provider.query_status(asked) == []
    assert fake.paths == ["/sms_list/"]  # only the SMS id was asked about


def test_one_mid_failing_keeps_the_others(fake: CountingAligo, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    first = [sms("01020000001", "가 안내"), sms("01020000002", "나 안내")]
    second = [sms("01020000003", "다 안내"), sms("01020000004", "라 안내")]
    asked = queries(first, provider.send_batch(first)) + queries(second, provider.send_batch(second))
    fake.failing_mids = {asked[0].provider_message_id.split(":")[0]}
    reports = provider.query_status(asked)
    assert {r.message_id for r in reports} == {m.id for m in second}


def test_every_mid_failing_raises(fake: CountingAligo, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    messages = [sms("01020000001", "가 안내")]
    asked = queries(messages, provider.send_batch(messages))
    with pytest.raises(ProviderRejected) as info:
        make_provider(api_key="not-the-key").query_status(asked)
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def test_sent_list_reads_the_requests(fake: CountingAligo, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    provider.send_batch([sms(f"010300000{i}", f"{i} 안내") for i in range(3)])  # one /send_mass/
    provider.send_batch([sms("01040000000", "혼자")])  # one /send/
    rows = provider.sent_list(start_date=datetime.fromtimestamp(fake.ledger.clock(), UTC))
    assert [r["sms_count"] for r in rows] == [1, 3]  # newest first
    assert all(r["type"] == "SMS" and r["sender"] == SENDER for r in rows)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("발송완료", DeliveryState.DELIVERED),
        ("전송성공", DeliveryState.DELIVERED),
        ("대기중", DeliveryState.PENDING),
        ("예약대기중", DeliveryState.PENDING),
        ("전송중", DeliveryState.SENT),
        ("전송실패", DeliveryState.FAILED),
        ("수신번호 결번", DeliveryState.FAILED),
        ("", DeliveryState.UNKNOWN),
        (None, DeliveryState.UNKNOWN),
    ],
)
def test_sms_state_words(text: Any, state: DeliveryState) -> None:
    assert sms_state(text) is state


def test_fake_sms_list_pages_and_checks_auth(fake: CountingAligo, make_provider: Any) -> None:
    provider: AligoProvider = make_provider()
    outcomes = provider.send_batch([sms(f"0105{i:07d}", "같은 안내") for i in range(40)])
    mid = (outcomes[0].provider_message_id or "").split(":")[0]

    def ask(**fields: str) -> Any:
        form = {"key": API_KEY, "user_id": USER_ID, "mid": mid, **fields}
        return httpx.post(fake.url + "/sms_list/", files={k: (None, v) for k, v in form.items()}).json()

    first, second = ask(page="1", page_size="30"), ask(page="2", page_size="30")
    assert (len(first["list"]), first["next_yn"], len(second["list"]), second["next_yn"]) == (30, "Y", 10, "N")
    assert {r["receiver"] for r in first["list"] + second["list"]} == {f"0105{i:07d}" for i in range(40)}
    assert ask(key="wrong")["result_code"] == "-101"
    assert ask(page_size="10")["result_code"] == "-103"
