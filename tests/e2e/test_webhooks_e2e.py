"""Webhooks end to end: a real API process, Celery worker and beat, the fake Solapi pushing its
delivery reports, and a loopback receiver that verifies every signature.

- API -> worker -> fake Solapi -> sent; the fake's report -> delivered (no status poll at all);
  every message.sent and message.delivered event reaches the receiver, signed, although the
  receiver refused everything for a while (ids deduplicate the repeats).
- A worker SIGKILLed after its transitions, before any dispatch, loses no event: another worker
  delivers them all from the outbox.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from kmsg_worker.api import admin
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import MessageRow, WebhookEvent
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from kmsg_worker.webhooks.signing import new_secret
from tests.conftest import QUEUE_LIST, Cluster, api_server, wait_until
from tests.webhook_receiver import Receiver, start_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

REPORT_SECRET = new_secret()
LIST = "GET /messages/v4/list"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = start_receiver(Receiver())
    yield r
    assert r.server is not None
    r.server.shutdown()


@pytest.fixture
def solapi(cluster: Cluster) -> Iterator[FakeSolapiServer]:
    servers = start_fakes()
    cluster.env.update(fake_env({"solapi": servers["solapi"]}))
    cluster.env.update(
        {
            "KMSG_PROVIDERS": "solapi",
            "KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
            "KMSG_WEBHOOK_INTERVAL_SECONDS": "0.5",
            "KMSG_WEBHOOK_BACKOFF_BASE_SECONDS": "0.5",
            "KMSG_WEBHOOK_BACKOFF_MAX_SECONDS": "2",
            "KMSG_WEBHOOK_BATCH_SIZE": "20",
            "KMSG_REPORT_SECRET": REPORT_SECRET,
            # No status poll within the test: only the fake's reports can settle a message.
            "KMSG_TRACKING_FIRST_CHECK_SECONDS": "3600",
        }
    )
    solapi = servers["solapi"]
    assert isinstance(solapi, FakeSolapiServer)
    yield solapi
    for server in servers.values():
        server.stop()


@pytest.fixture
def api(cluster: Cluster, solapi: FakeSolapiServer) -> Iterator[httpx.Client]:
    with api_server(cluster) as client:
        yield client


def _key(cluster: Cluster, tenant: str) -> dict[str, str]:
    settings = Settings.from_env(cluster.env)
    admin.create_tenant(tenant, settings=settings)
    return {"Authorization": f"Bearer {admin.create_key(tenant, settings=settings).token}"}


def _subscribe(api: httpx.Client, key: dict[str, str], receiver: Receiver) -> None:
    made = api.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["message.sent", "message.delivered"]}, headers=key
    )
    assert made.status_code == 201, made.text
    receiver.secret = made.json()["secret"]


def _statuses(cluster: Cluster) -> dict[str, int]:
    engine = make_engine(cluster.env["KMSG_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return {
                s: int(n) for s, n in conn.execute(select(MessageRow.status, func.count()).group_by(MessageRow.status))
            }
    finally:
        engine.dispose()


def _send(api: httpx.Client, key: dict[str, str], singles: int, bulk: int) -> None:
    for i in range(singles):
        answer = api.post("/v1/messages", json={"to": f"010-4444-{i:04d}", "text": "[e2e] 주문 확인"}, headers=key)
        assert answer.status_code == 202, answer.text
    rows = [{"to": f"0105555{i:04d}"} for i in range(bulk)]
    batch = api.post("/v1/batches", json={"messages": rows, "defaults": {"text": "[e2e] 안내"}}, headers=key)
    assert batch.status_code == 202, batch.text


def test_reports_settle_messages_and_every_event_reaches_a_receiver_that_was_down(
    cluster: Cluster, solapi: FakeSolapiServer, api: httpx.Client, receiver: Receiver
) -> None:
    key = _key(cluster, "shop-a")
    _subscribe(api, key, receiver)
    solapi.push_reports(f"{api.base_url}/v1/providers/solapi/reports", REPORT_SECRET, interval=0.2)
    cluster.start_worker("w1", concurrency=2)
    cluster.start_beat()
    # Given a receiver that refuses everything for now
    receiver.down = True
    _send(api, key, singles=5, bulk=40)
    # Then the fake's reports deliver every message without a single status query
    try:
        wait_until(lambda: _statuses(cluster) == {"delivered": 45}, 90, what="45 messages delivered by reports")
    except AssertionError:
        print(_statuses(cluster), solapi.reports_pushed, cluster.logs())
        raise
    assert solapi.ledger.per_endpoint[LIST] == 0
    wait_until(lambda: receiver.refused >= 2, 30, what="the dispatcher to have tried twice")
    assert receiver.event_ids() == []
    # When the receiver comes back, every event arrives, signed
    receiver.down = False
    wait_until(lambda: len(set(receiver.event_ids())) == 90, 60, what="90 distinct events at the receiver")
    assert receiver.bad_signatures == 0
    by_message = Counter((e["data"]["message_id"], e["type"]) for e in receiver.events())
    assert len(by_message) == 90 and {t for _, t in by_message} == {"message.sent", "message.delivered"}
    assert all(len(r["body"]["events"]) <= 20 for r in receiver.requests)
    assert all(e["data"]["to"].count("*") >= 4 for e in receiver.events())  # masked


def test_a_worker_killed_after_its_transitions_loses_no_event(
    cluster: Cluster, solapi: FakeSolapiServer, api: httpx.Client, receiver: Receiver
) -> None:
    key = _key(cluster, "shop-a")
    _subscribe(api, key, receiver)
    # Given a worker that sends but never dispatches webhooks (its kmsg.webhooks is not consumed)
    no_hooks = ",".join(q for q in QUEUE_LIST.split(",") if q != "kmsg.webhooks")
    first = cluster.start_worker("w1", concurrency=2, queues=no_hooks)
    cluster.start_beat()
    _send(api, key, singles=3, bulk=30)
    wait_until(lambda: sum(_statuses(cluster).values()) == 33 and "queued" not in _statuses(cluster), 90, what="sent")
    # When it is killed outright, between its transitions and any dispatch
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    engine = make_engine(cluster.env["KMSG_DATABASE_URL"])
    with engine.connect() as conn:
        pending = conn.execute(select(func.count()).where(WebhookEvent.delivered_at.is_(None))).scalar_one()
    engine.dispose()
    assert pending >= 33 and receiver.event_ids() == []
    # Then another worker delivers every event the outbox holds
    cluster.start_worker("w2", concurrency=2)
    wait_until(lambda: len(set(receiver.event_ids())) >= 33, 60, what="every message.sent event")
    sent = {e["data"]["message_id"] for e in receiver.events() if e["type"] == "message.sent"}
    assert len(sent) == 33 and receiver.bad_signatures == 0
