"""Provider delivery reports pushed to ``POST /v1/providers/{provider}/reports``, on SQLite and PostgreSQL.

The fake Solapi accepts the sends over real HTTP; its message records (the list API's shape, which
its report push sends too) are posted to the API with Standard Webhooks signatures or a token. A
report settles a message without any poll; a forged, stale or missing authentication applies nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from kmsg_worker.api import create_app
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.delivery import deliver
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.base import DeliveryState, StatusReport
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.servers import fake_env
from kmsg_worker.tracking import apply_reports, poll_statuses
from kmsg_worker.webhooks.signing import new_secret, sign
from tests.conftest import RecordingDispatcher

pytestmark = pytest.mark.integration

SECRET = new_secret()
LIST = "GET /messages/v4/list"


@pytest.fixture(scope="module")
def solapi() -> Iterator[FakeSolapiServer]:
    server = FakeSolapiServer().start()
    yield server
    server.stop()


@pytest.fixture
def rt(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher, solapi: FakeSolapiServer
) -> Iterator[Runtime]:
    solapi.ledger.reset()
    env = {**fake_env({"solapi": solapi}), "KMSG_PROVIDERS": "solapi", "KMSG_REPORT_SECRET": SECRET}
    runtime = Runtime(settings_factory(backend_url, **env), dispatcher=dispatcher)
    yield runtime
    runtime.close()


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=rt, config=ApiConfig(auth_cache_seconds=0)), raise_server_exceptions=False) as c:
        yield c


def sent_message(rt: Runtime, **fields: Any) -> MessageRow:
    receipt = KMsg(runtime=rt).send(
        **{"to": "01055550000", "text": "배송이 시작되었습니다", "sender": "0212345678", **fields}
    )
    assert deliver(rt, receipt.message_id).action == "sent"
    row = rt.store.get(receipt.message_id)
    assert row is not None and row.status == "sent" and row.provider_message_id
    return row


def report_body(solapi: FakeSolapiServer, *rows: MessageRow) -> bytes:
    """The fake's records of these messages once final, as its report push sends them."""
    later = time.time() + 3600
    return orjson.dumps([solapi._record(solapi.ledger.entries[r.provider_message_id or ""], later) for r in rows])


def signed(body: bytes, secret: str = SECRET, stamp: float | None = None) -> dict[str, str]:
    when = int(time.time() if stamp is None else stamp)
    return {
        "content-type": "application/json",
        "webhook-id": "rpt_1",
        "webhook-timestamp": str(when),
        "webhook-signature": sign(secret, "rpt_1", when, body),
    }


def status(rt: Runtime, message_id: str) -> str:
    row = rt.store.get(message_id)
    assert row is not None
    return row.status


def test_a_signed_report_delivers_without_any_poll(rt: Runtime, client: TestClient, solapi: FakeSolapiServer) -> None:
    first, second = sent_message(rt), sent_message(rt, to="01055550001")
    body = report_body(solapi, first, second)
    answer = client.post("/v1/providers/solapi/reports", content=body, headers=signed(body))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": 2, "matched": 2, "delivered": 2, "failed": 0, "fallbacks": 0}
    assert status(rt, first.id) == status(rt, second.id) == "delivered"
    assert solapi.ledger.per_endpoint[LIST] == 0  # no status query was made
    row = rt.store.get(first.id)
    assert row is not None and row.provider_status_code == "4000" and row.delivered_at is not None
    # The same report again changes nothing; and a settled row is no longer polled
    again = client.post("/v1/providers/solapi/reports", content=body, headers=signed(body))
    assert again.json()["matched"] == 0
    assert poll_statuses(rt).claimed == 0


@pytest.mark.parametrize("case", ["forged", "stale", "tampered", "none", "wrong_token"])
def test_a_forged_stale_or_missing_authentication_applies_nothing(
    rt: Runtime, client: TestClient, solapi: FakeSolapiServer, case: str
) -> None:
    row = sent_message(rt)
    body = report_body(solapi, row)
    url, headers, content = "/v1/providers/solapi/reports", signed(body), body
    if case == "forged":
        headers = signed(body, secret=new_secret())
    elif case == "stale":
        headers = signed(body, stamp=time.time() - 3600)
    elif case == "tampered":
        content = body.replace(b'"4000"', b'"3104"')
    elif case == "none":
        headers = {"content-type": "application/json"}
    else:
        url, headers = url + "?token=not-the-secret", {"content-type": "application/json"}
    answer = client.post(url, content=content, headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.json()["type"] == "urn:kmsg:problem:report-unauthorized"
    assert status(rt, row.id) == "sent"


def test_a_token_in_the_url_is_accepted_for_providers_that_cannot_sign(
    rt: Runtime, client: TestClient, solapi: FakeSolapiServer
) -> None:
    row = sent_message(rt)
    body = report_body(solapi, row)
    answer = client.post("/v1/providers/solapi/reports", params={"token": SECRET}, content=body)
    assert answer.status_code == 200 and status(rt, row.id) == "delivered"


def test_a_non_kakao_report_settles_the_alimtalk_once(
    rt: Runtime, client: TestClient, solapi: FakeSolapiServer, dispatcher: RecordingDispatcher
) -> None:
    # Solapi replaces a failed AlimTalk by SMS itself when a failover is asked: ours is skipped, once
    to = "01055550099"
    solapi.fail_alimtalk_for([to])
    parent = sent_message(
        rt,
        to=to,
        type="ALIMTALK",
        template_id="T_ORDER",
        variables={"name": "김민준"},
        kakao={"profile_id": "KA01PF"},
        failover={"content": "주문이 출고되었습니다"},
    )
    body = report_body(solapi, parent)
    answers = [client.post("/v1/providers/solapi/reports", content=body, headers=signed(body)) for _ in range(2)]
    assert [a.json()["failed"] for a in answers] == [1, 0]
    row = rt.store.get(parent.id)
    assert row is not None and (row.status, row.error_code) == ("failed", "NOT_KAKAO_USER")
    assert row.fallback_state == "skipped:native_fallback" and rt.store.children(parent.id) == []


def test_a_reported_non_kakao_failure_creates_our_fallback_exactly_once(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    # The mock does no SMS replacement of its own: the report path creates our child, once,
    # whether the report comes twice or a poll sees the failure too.
    rt = Runtime(settings_factory(backend_url), dispatcher=dispatcher)
    try:
        receipt = KMsg(runtime=rt).send(
            type="ALIMTALK",
            to="01055550098",
            template_id="T_ORDER",
            variables={"name": "김민준"},
            failover={"content": "주문이 출고되었습니다"},
            provider_id="mock",
            provider_options={"mock": {"deliver": "FAILED:3104"}},
        )
        assert deliver(rt, receipt.message_id).action == "sent"
        row = rt.store.get(receipt.message_id)
        assert row is not None and row.provider_message_id
        report = StatusReport("", DeliveryState.FAILED, code="3104", description="카카오톡 미사용자")
        first = apply_reports(rt, "mock", [(row.provider_message_id, report)])
        second = apply_reports(rt, "mock", [(row.provider_message_id, report)])
        assert first.fallbacks == [f"{row.id}:fallback"] and second.fallbacks == [] and second.claimed == 0
        assert [c.id for c in rt.store.children(row.id)] == [f"{row.id}:fallback"]
        assert dispatcher.ids.count(f"{row.id}:fallback") == 1
    finally:
        rt.close()


def test_reports_for_an_unconfigured_provider_or_a_bad_body_are_refused(rt: Runtime, client: TestClient) -> None:
    body = b'[{"messageId": "M1", "statusCode": "4000"}]'
    assert client.post("/v1/providers/iwinv/reports", content=body, headers=signed(body)).status_code == 404
    bad = b'{"hello": 1}'
    assert client.post("/v1/providers/solapi/reports", content=bad, headers=signed(bad)).status_code == 400


def test_a_report_that_overtakes_the_send_is_refused_for_a_retry_and_then_applied(
    rt: Runtime, client: TestClient, solapi: FakeSolapiServer
) -> None:
    # Given a message the provider has answered for but that our worker has not recorded as sent
    receipt = KMsg(runtime=rt).send(to="01055550077", text="배송 안내", sender="0212345678")
    early = orjson.dumps(
        [{"messageId": "M-EARLY", "statusCode": "4000", "customFields": {"kmsgId": receipt.message_id}}]
    )
    answer = client.post("/v1/providers/solapi/reports", content=early, headers=signed(early))
    # Then the sender is asked to come again, and nothing changed
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["type"] == "urn:kmsg:problem:report-early"
    assert status(rt, receipt.message_id) == "queued"
    # Once the send is recorded, the provider's repeat settles it
    assert deliver(rt, receipt.message_id).action == "sent"
    row = rt.store.get(receipt.message_id)
    assert row is not None
    body = report_body(solapi, row)
    assert client.post("/v1/providers/solapi/reports", content=body, headers=signed(body)).status_code == 200
    assert status(rt, receipt.message_id) == "delivered"


def test_a_send_recorded_while_its_report_is_being_matched_is_asked_for_again(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a sent message, set back to 'sending' as if its worker had not committed yet
    row = sent_message(rt, to="01055550088")
    pmid = row.provider_message_id or ""
    with rt.store.sessions.begin() as s:
        s.get(MessageRow, row.id).status = "sending"  # type: ignore[union-attr]
    matching = rt.store.sent_by_provider_ids

    def match_then_the_worker_commits(provider: str, ids: Any) -> list[MessageRow]:
        found = matching(provider, ids)  # the row is not 'sent' yet: not matched
        with rt.store.sessions.begin() as s:  # and now the worker's 'sent' lands
            s.get(MessageRow, row.id).status = "sent"  # type: ignore[union-attr]
        return found

    monkeypatch.setattr(rt.store, "sent_by_provider_ids", match_then_the_worker_commits)
    report = StatusReport(row.id, DeliveryState.DELIVERED)
    # When the report is applied in that instant, it is neither applied nor lost: it must come again
    first = apply_reports(rt, "solapi", [(pmid, report)])
    assert (first.claimed, first.early) == (0, 1) and status(rt, row.id) == "sent"
    monkeypatch.undo()
    # Then its repeat settles the message
    second = apply_reports(rt, "solapi", [(pmid, report)])
    assert (second.claimed, second.delivered, second.early) == (1, 1, 0) and status(rt, row.id) == "delivered"
