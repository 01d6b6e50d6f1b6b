"""The HTTP API end to end: a real uvicorn process, real Celery worker and beat, the fake Solapi.

A message posted over HTTP (as curl would) reaches ``delivered`` and is read back through the
API; test-key messages reach their magic-number outcomes without the fake ever seeing them; another
tenant's reads and cancels are 404; a streamed NDJSON batch is stored and completes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kmsg_worker.api import admin
from kmsg_worker.settings import Settings
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import Cluster, api_server, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

#: Rows of the streamed batch (the 100,000-row upload is a bench run, too heavy for every CI run).
NDJSON_ROWS = int(os.environ.get("KMSG_E2E_NDJSON_ROWS", "10000"))


@pytest.fixture
def solapi(cluster: Cluster) -> Iterator[FakeProviderServer]:
    servers = start_fakes()
    cluster.env.update(fake_env({"solapi": servers["solapi"]}))
    cluster.env["KMSG_PROVIDERS"] = "solapi"
    yield servers["solapi"]
    for server in servers.values():
        server.stop()


@pytest.fixture
def api(cluster: Cluster, solapi: FakeProviderServer) -> Iterator[httpx.Client]:
    with api_server(cluster) as client:
        yield client


def _keys(cluster: Cluster) -> dict[str, dict[str, str]]:
    settings = Settings.from_env(cluster.env)
    out = {}
    for tenant in ("shop-a", "shop-b"):
        admin.create_tenant(tenant, settings=settings)
    for name, tenant, test in (("a", "shop-a", False), ("a_test", "shop-a", True), ("b", "shop-b", False)):
        out[name] = {"Authorization": f"Bearer {admin.create_key(tenant, test=test, settings=settings).token}"}
    return out


def _status(api: httpx.Client, message_id: str, key: dict[str, str]) -> str:
    status: str = api.get(f"/v1/messages/{message_id}", headers=key).json()["status"]
    return status


def _ndjson(count: int) -> Iterator[bytes]:
    for i in range(count):
        yield f'{{"to": "0109{i:07d}", "variables": {{"n": {i}}}}}\n'.encode()


def test_messages_posted_over_http_are_delivered_and_read_back(
    cluster: Cluster, solapi: FakeProviderServer, api: httpx.Client
) -> None:
    keys = _keys(cluster)
    cluster.start_worker("w1", concurrency=2)
    cluster.start_beat()
    # a live message reaches the fake Solapi and is delivered
    body: dict[str, Any] = {"to": "010-3333-0001", "text": "[e2e] 인증번호 123456", "priority": "high"}
    sent = api.post("/v1/messages", json=body, headers={**keys["a"], "Idempotency-Key": "e2e-1"})
    assert sent.status_code == 202, sent.text
    live_id = sent.json()["id"]
    # test messages: one per outcome
    outcomes = {"01000000001": "delivered", "01000000002": "failed", "01000000003": "delivered"}
    test_ids = {}
    for number in outcomes:
        answer = api.post("/v1/messages", json={"to": number, "text": "[e2e] test"}, headers=keys["a_test"])
        assert answer.status_code == 202 and answer.json()["route"] == ["mock"], answer.text
        test_ids[number] = answer.json()["id"]
    # a streamed NDJSON batch with a test key
    upload = api.post(
        "/v1/batches",
        params={"defaults": '{"text": "[e2e] 쿠폰 #{n}"}', "on_invalid": "skip"},
        content=_ndjson(NDJSON_ROWS),
        headers={**keys["a_test"], "Content-Type": "application/x-ndjson"},
    )
    assert upload.status_code == 202, upload.text
    batch = upload.json()
    assert batch["accepted"] == NDJSON_ROWS and batch["invalid"] == []

    def settled() -> bool:
        if _status(api, live_id, keys["a"]) != "delivered":
            return False
        if any(_status(api, m, keys["a_test"]) != outcomes[n] for n, m in test_ids.items()):
            return False
        summary = api.get(f"/v1/batches/{batch['batch_id']}", headers=keys["a_test"]).json()
        return bool(summary["by_status"].get("delivered") == NDJSON_ROWS)

    try:
        wait_until(settled, 180, interval=1.0, what="every message delivered or failed as expected")
    except AssertionError:
        print(cluster.logs())
        raise
    got = api.get(f"/v1/messages/{live_id}", headers=keys["a"]).json()
    assert got["provider"] == "solapi" and got["provider_message_id"] and got["test"] is False
    assert [a["outcome"] for a in got["attempts"]] == ["accepted"]
    # the fake saw the live message once and no test message at all
    assert solapi.ledger.per_recipient["01033330001"] == 1
    assert sum(solapi.ledger.per_recipient.values()) == 1
    # another tenant's reads and cancels are 404, like a missing message
    for path in (f"/v1/messages/{live_id}", f"/v1/batches/{batch['batch_id']}"):
        assert api.get(path, headers=keys["b"]).status_code == 404
        assert api.post(f"{path}/cancel", headers=keys["b"]).status_code == 404
    assert api.get("/v1/messages", headers=keys["b"]).json()["data"] == []
