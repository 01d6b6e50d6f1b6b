"""A test key's messages are processed by the engine but only ever reach the simulator.

The live provider here is Solapi, pointed at its fake over real HTTP: its counters must stay at 0
for every test message, whatever KMSG_ROUTING says, while a live key's message does reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kmsg_worker.api import create_app
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.delivery import deliver
from kmsg_worker.observability.events import Metrics
from kmsg_worker.producer import KMsg
from kmsg_worker.report import build_report
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.queries import TEST_PROVIDER
from kmsg_worker.storage.tenants import TenantStore
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from kmsg_worker.tracking import poll_statuses
from tests.api.conftest import bearer
from tests.conftest import Clock, RecordingDispatcher, total


@pytest.fixture
def solapi() -> Iterator[FakeProviderServer]:
    servers = start_fakes()
    yield servers["solapi"]
    for server in servers.values():
        server.stop()


@pytest.fixture
def live_runtime(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher, solapi: FakeProviderServer
) -> Iterator[Runtime]:
    env = {**fake_env({"solapi": solapi}), "KMSG_PROVIDERS": "solapi", "KMSG_ROUTING": '{"SMS": ["solapi"]}'}
    rt = Runtime(settings_factory(backend_url, **env), dispatcher=dispatcher)
    rt.now = Clock()
    yield rt
    rt.close()


def test_test_key_messages_follow_the_magic_numbers_and_never_reach_a_real_provider(
    live_runtime: Runtime, solapi: FakeProviderServer, metrics: Metrics
) -> None:
    rt = live_runtime
    clock: Clock = rt.now  # type: ignore[assignment]
    store = TenantStore(rt.engine)
    store.create_tenant("shop-a", now=clock.now)
    test_key = bearer(store.create_key("shop-a", kind="test", now=clock.now).token)
    live_key = bearer(store.create_key("shop-a", now=clock.now).token)
    expected = {
        "01000000001": "delivered",
        "01000000002": "failed",
        "01000000003": "delivered",
        "01000000004": "failed",
        "01000000005": "sent",
        "01055556666": "delivered",
    }
    with TestClient(create_app(runtime=rt, config=ApiConfig(auth_cache_seconds=0))) as client:
        ids = {}
        for number in expected:
            body = {"to": number, "text": "sandbox", "provider_id": "solapi"}
            receipt = client.post("/v1/messages", json=body, headers=test_key).json()
            assert receipt["route"] == ["mock"] and receipt["test"] is True, receipt
            ids[number] = receipt["id"]
        for message_id in ids.values():
            deliver(rt, message_id)
        clock.advance(rt.settings.retry.max_delay + 1)
        deliver(rt, ids["01000000003"])  # the retry after the simulated temporary error
        clock.advance(rt.settings.tracking.first_check + 1)
        poll_statuses(rt)
        got = {n: client.get(f"/v1/messages/{m}", headers=test_key).json() for n, m in ids.items()}
        assert {n: g["status"] for n, g in got.items()} == expected
        assert all(g["test"] is True and g["provider"] == "mock" for g in got.values())
        assert got["01000000002"]["provider_status_code"] == "SIMULATED_FAILURE"
        assert [a["outcome"] for a in got["01000000003"]["attempts"]] == ["retryable", "accepted"]
        assert got["01000000004"]["error_code"] == "INVALID_RECIPIENT"
        listed = client.get("/v1/messages", headers=test_key).json()["data"]
        assert len(listed) == len(expected) and all(m["test"] for m in listed)
        assert solapi.ledger.requests == 0 and sum(solapi.ledger.per_recipient.values()) == 0
        # a live key's message, same body, goes to the real (fake) provider
        live = client.post("/v1/messages", json={"to": "01000000001", "text": "live"}, headers=live_key).json()
        assert live["route"] == ["solapi"] and live["test"] is False
        deliver(rt, live["id"])
        assert solapi.ledger.per_recipient["01000000001"] == 1
    # the mark travels beyond the API: the producer's view (kmsg get) and the report
    kmsg = KMsg(runtime=rt)
    assert kmsg.get(ids["01000000001"]).test is True and kmsg.get(live["id"]).test is False
    report = build_report(rt.engine, clock.now - timedelta(days=1), clock.now + timedelta(days=1))
    by_provider = {g.provider: g.total for g in report.groups if g.type == "SMS"}
    assert by_provider == {TEST_PROVIDER: len(expected), "solapi": 1}
    # and the metrics, from the engine's own events: every test message's under test="true"
    reg = metrics.registry
    sms = {"type": "SMS", "tenant": "shop-a"}
    assert total(reg, "kmsg_messages_accepted_total", test="true", provider="mock", **sms) == len(expected)
    assert total(reg, "kmsg_messages_accepted_total", test="false", provider="solapi", **sms) == 1
    assert total(reg, "kmsg_messages_sent_total", test="true", **sms) == 5  # all but the refused number
    assert total(reg, "kmsg_messages_sent_total", test="false", **sms) == 1
    assert total(reg, "kmsg_messages_delivered_total", test="true", **sms) == 3
    assert total(reg, "kmsg_messages_failed_total", test="true", stage="send", **sms) == 1
    assert total(reg, "kmsg_messages_failed_total", test="true", stage="delivery", **sms) == 1
    assert total(reg, "kmsg_messages_failed_total", test="false") == 0


def test_a_test_keys_batch_goes_to_the_simulator_only(
    live_runtime: Runtime, solapi: FakeProviderServer, metrics: Metrics
) -> None:
    rt = live_runtime
    store = TenantStore(rt.engine)
    store.create_tenant("shop-a", now=rt.now())
    test_key = bearer(store.create_key("shop-a", kind="test", now=rt.now()).token)
    rows = [{"to": "01000000002"}, {"to": "01077778888", "provider_id": "solapi"}, {"to": "01077779999"}]
    with TestClient(create_app(runtime=rt, config=ApiConfig(auth_cache_seconds=0))) as client:
        body = {"defaults": {"text": "쿠폰", "sender": "0212345678"}, "messages": rows}
        receipt = client.post("/v1/batches", json=body, headers=test_key).json()
        assert receipt["test"] is True and receipt["accepted"] == 3
        assert client.get(f"/v1/batches/{receipt['batch_id']}", headers=test_key).json()["test"] is True
        for message_id in receipt["message_ids"]:
            got = client.get(f"/v1/messages/{message_id}", headers=test_key).json()
            assert got["route"] == ["mock"] and got["test"] is True
    from kmsg_worker.delivery import process_chunk

    for _, chunk, _ in rt.dispatcher.chunks:  # type: ignore[attr-defined]
        process_chunk(rt, receipt["batch_id"], chunk)
    with rt.store.sessions() as s:
        from sqlalchemy import select

        from kmsg_worker.storage.models import MessageRow

        providers = set(s.scalars(select(MessageRow.provider).where(MessageRow.batch_id == receipt["batch_id"])))
    assert providers == {"mock"}
    assert solapi.ledger.requests == 0
    reg = metrics.registry
    assert total(reg, "kmsg_messages_accepted_total", test="true", tenant="shop-a") == 3
    assert total(reg, "kmsg_messages_sent_total", test="true", provider="mock", type="SMS", tenant="shop-a") == 3
    assert total(reg, "kmsg_messages_accepted_total", test="false") == 0
    assert total(reg, "kmsg_messages_sent_total", test="false") == 0


def test_a_live_key_cannot_mark_its_messages_as_test_ones(live_runtime: Runtime) -> None:
    rt = live_runtime
    store = TenantStore(rt.engine)
    store.create_tenant("shop-a", now=rt.now())
    live_key = bearer(store.create_key("shop-a", now=rt.now()).token)
    forged = {"to": "01012345678", "text": "x", "provider_options": {"mock": {"sandbox": True}}}
    with TestClient(create_app(runtime=rt, config=ApiConfig(auth_cache_seconds=0))) as client:
        refused = client.post("/v1/messages", json=forged, headers=live_key)
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == "provider_options.mock.sandbox"
        batch = {"messages": [forged], "on_invalid": "skip"}
        answer = client.post("/v1/batches", json=batch, headers=live_key).json()
        assert answer["accepted"] == 0 and answer["invalid"][0]["rule"] == "forbidden"
