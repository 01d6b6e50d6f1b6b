"""Aligo personalised bulk: ``/send_mass/`` in the adapter and in the fake, over real HTTP.

The adapter packs texts shared by few receivers into ``/send_mass/`` requests (500 receiver/text
pairs each) and keeps ``/send/`` for a text shared by many; the fake implements ``/send_mass/``
with Aligo's authentication, limits and codes and records every accepted message once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kmsg_worker.message import Message, normalize
from kmsg_worker.providers.aligo import MASS_BATCH_LIMIT, SHARED_TEXT_MIN, AligoProvider
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.testing.fake_aligo import FakeAligoServer
from kmsg_worker.testing.fakeserver import FakeRequest, parse_multipart

API_KEY = "aligo-mass-key-5c2e8a1f07"
USER_ID = "kmsgmass"
SENDER = "0212345678"


@pytest.fixture
def fake() -> Iterator[FakeAligoServer]:
    with FakeAligoServer(api_key=API_KEY, user_id=USER_ID) as server:
        yield server


@pytest.fixture
def make_provider(fake: FakeAligoServer) -> Iterator[Callable[..., AligoProvider]]:
    clients: list[httpx.Client] = []

    def factory(**options: Any) -> AligoProvider:
        client = make_http_client(timeout=httpx.Timeout(5.0))
        clients.append(client)
        config = ProviderConfig(
            name="aligo", base_url=fake.url, credentials={"api_key": API_KEY}, options={"user_id": USER_ID, **options}
        )
        return AligoProvider(config, client)

    yield factory
    for client in clients:
        client.close()


def sms(to: str, text: str, **extra: Any) -> Message:
    return normalize({"to": to, "text": text, "type": "SMS", "sender": SENDER, **extra})


def personalised(count: int, start: int = 0) -> list[Message]:
    return [sms(f"010{start + i:08d}", f"{start + i}번 고객님, 주문이 접수되었습니다") for i in range(count)]


def post_form(fake: FakeAligoServer, path: str, fields: dict[str, str]) -> Any:
    return httpx.post(fake.url + path, files={k: (None, v) for k, v in fields.items()}).json()


def mass_fields(count: int, **extra: str) -> dict[str, str]:
    fields = {"key": API_KEY, "user_id": USER_ID, "sender": SENDER, "msg_type": "SMS", "cnt": str(count)}
    for n in range(1, count + 1):
        fields[f"rec_{n}"] = f"010{n:08d}"
        fields[f"msg_{n}"] = f"고객 {n}님 안내"
    fields.update(extra)
    return fields


# -- the adapter --------------------------------------------------------------------------------


def test_1000_personalised_texts_take_two_send_mass_requests(fake: FakeAligoServer, make_provider: Any) -> None:
    # Given 1,000 SMS, every text different
    messages = personalised(1000)

    # When they are sent as one batch
    outcomes = make_provider().send_batch(messages)

    # Then two /send_mass/ requests of 500 carried them, each message accepted once with its own text
    assert fake.ledger.requests == 2
    assert sorted(Counter(e.group_id for e in fake.ledger.entries.values()).values()) == [500, 500]
    assert all(o.accepted for o in outcomes)
    for message, outcome in zip(messages, outcomes, strict=True):
        entry = fake.ledger.get(outcome.provider_message_id or "")
        assert entry is not None and (entry.to, entry.text) == (message.to, message.text)
    assert max(fake.ledger.per_recipient.values()) == 1
    assert fake.ledger.per_recipient.total() == 1000


def test_a_text_shared_by_many_goes_through_send_and_the_rest_through_send_mass(
    fake: FakeAligoServer, make_provider: Any
) -> None:
    shared = [sms(f"0102{i:07d}", "모두에게 같은 안내") for i in range(SHARED_TEXT_MIN)]
    rest = personalised(10)
    outcomes = make_provider().send_batch([*rest[:5], *shared, *rest[5:]])

    assert all(o.accepted for o in outcomes)
    sizes = sorted(Counter(e.group_id for e in fake.ledger.entries.values()).values())
    assert sizes == [10, SHARED_TEXT_MIN]  # one /send_mass/ for the ten texts, one /send/ for the shared one
    texts_per_request = {
        gid: {e.text for e in fake.ledger.entries.values() if e.group_id == gid}
        for gid in {e.group_id for e in fake.ledger.entries.values()}
    }
    assert sorted(len(t) for t in texts_per_request.values()) == [1, 10]


def test_a_receiver_is_never_twice_in_one_request(fake: FakeAligoServer, make_provider: Any) -> None:
    messages = [sms("01077770000", "첫 번째 안내"), sms("01077770000", "두 번째 안내"), sms("01077770001", "세 번째")]
    outcomes = make_provider().send_batch(messages)

    assert all(o.accepted for o in outcomes)
    per_request = Counter((e.group_id, e.to) for e in fake.ledger.entries.values())
    assert max(per_request.values()) == 1
    assert fake.ledger.per_recipient["01077770000"] == 2


def test_send_mass_wire_fields(fake: FakeAligoServer, make_provider: Any) -> None:
    seen: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> httpx.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        seen.append(parse_multipart(FakeRequest("POST", request.url.path, {}, headers, request.read())))
        body = {"result_code": "1", "message": "success", "msg_id": "55", "success_cnt": 3, "error_cnt": 0}
        return httpx.Response(200, json=body)

    config = ProviderConfig(name="aligo", credentials={"api_key": API_KEY}, options={"user_id": USER_ID})
    provider = AligoProvider(config, make_http_client(transport=httpx.MockTransport(record)))
    lms = [
        normalize({"to": f"0103333000{i}", "text": f"{i}번 " + "긴 안내 " * 20, "type": "LMS", "sender": SENDER})
        for i in range(3)
    ]
    outcomes = provider.send_batch(lms)

    [form] = seen
    assert form["cnt"] == "3" and form["msg_type"] == "LMS" and form["sender"] == SENDER
    assert [form[f"rec_{n}"] for n in (1, 2, 3)] == [m.to for m in lms]
    assert [form[f"msg_{n}"] for n in (1, 2, 3)] == [m.text for m in lms]
    assert "msg" not in form and "receiver" not in form
    assert [o.provider_message_id for o in outcomes] == ["55:1", "55:2", "55:3"]


def test_send_mass_partial_acceptance_is_never_resent(fake: FakeAligoServer, make_provider: Any) -> None:
    # Given a personalised batch with one receiver Aligo refuses (it only counts refusals)
    good = personalised(3)
    bad = dataclasses.replace(sms("01099990000", "잘못된 번호"), id="bad", to="0101")  # bypasses normalisation
    outcomes = make_provider().send_batch([*good, bad])

    # Then every message is reported accepted with the partial-acceptance warning (a resend would
    # duplicate the accepted ones) and the fake holds each good one once
    assert all(o.accepted for o in outcomes)
    assert {w.code for o in outcomes for w in o.warnings} == {"PARTIAL_ACCEPTANCE"}
    assert fake.ledger.per_recipient == Counter({m.to: 1 for m in good})


def test_personalised_lms_and_sms_never_share_a_request(fake: FakeAligoServer, make_provider: Any) -> None:
    messages = [
        *personalised(3),
        *[normalize({"to": f"0104444000{i}", "text": f"{i} 장문", "type": "LMS", "sender": SENDER}) for i in range(3)],
    ]
    make_provider().send_batch(messages)
    types = {
        gid: {e.type for e in fake.ledger.entries.values() if e.group_id == gid}
        for gid in {e.group_id for e in fake.ledger.entries.values()}
    }
    assert sorted(sorted(t) for t in types.values()) == [["LMS"], ["SMS"]]


# -- the fake -----------------------------------------------------------------------------------


def test_fake_send_mass_accepts_500_pairs_and_counts_each_once(fake: FakeAligoServer) -> None:
    body = post_form(fake, "/send_mass/", mass_fields(MASS_BATCH_LIMIT))
    assert (body["result_code"], body["success_cnt"], body["error_cnt"]) == ("1", 500, 0)
    assert fake.ledger.per_recipient.total() == 500 and max(fake.ledger.per_recipient.values()) == 1
    assert fake.ledger.get(f"{body['msg_id']}:7").text == "고객 7님 안내"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (mass_fields(501), "-105"),
        (mass_fields(2, key="wrong"), "-101"),
        (mass_fields(2, msg_type=""), "-103"),
        (mass_fields(2, cnt="3"), "-103"),  # rec_3 / msg_3 missing
        (mass_fields(2, msg_2="가" * 46), "-103"),  # 92 bytes is not an SMS
        (mass_fields(2, sender="0299999999"), "-990"),
        (mass_fields(2, msg_type="MMS"), "-103"),  # no image
    ],
)
def test_fake_send_mass_refuses_like_aligo(fake: FakeAligoServer, fields: dict[str, str], code: str) -> None:
    assert post_form(fake, "/send_mass/", fields)["result_code"] == code
    assert fake.ledger.per_recipient.total() == 0


def test_fake_send_mass_counts_invalid_receivers_as_errors(fake: FakeAligoServer) -> None:
    body = post_form(fake, "/send_mass/", mass_fields(3, rec_2="12"))
    assert (body["success_cnt"], body["error_cnt"]) == (2, 1)
    assert set(fake.ledger.per_recipient) == {"01000000001", "01000000003"}


def test_fake_send_mass_charges_the_remaining_count(fake: FakeAligoServer) -> None:
    fake.remain["SMS"] = 2
    assert post_form(fake, "/send_mass/", mass_fields(3))["result_code"] == "-201"
    assert fake.ledger.per_recipient.total() == 0
