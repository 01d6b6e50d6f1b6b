"""The advertising opt-out list through the HTTP API, and advertising messages refused or summarised."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.advertising import export_suppressions, set_advertiser
from tests.api.conftest import Keys
from tests.conftest import RecordingDispatcher


@pytest.fixture
def runtime(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    rt = Runtime(settings_factory(backend_url, KMSG_SUPPRESSION_KEY="api-test-key"), dispatcher=dispatcher)
    set_advertiser(rt.store, "shop-a", "*", name="가나다마트", opt_out="080-123-4567", contact=None, now=rt.now())
    yield rt
    rt.close()


def test_the_opt_out_list_is_managed_per_tenant_and_suppresses_advertising(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    added = client.post("/v1/suppressions", json={"numbers": ["010-1111-2222", "01033334444"]}, headers=keys.a_live)
    assert added.status_code == 200, added.text
    assert added.json() == {"given": 2, "changed": 2, "count": 2}
    assert client.get("/v1/suppressions", headers=keys.a_live).json() == {"count": 2}
    assert client.get("/v1/suppressions", headers=keys.b_live).json() == {"count": 0}  # per tenant
    [entry, _] = list(export_suppressions(runtime.store, "shop-a"))
    assert entry.source == "api"
    # An advertising message to a listed number is refused with a clear problem
    ad = {"to": "01011112222", "sender": "0212345678", "text": "세일", "purpose": "advertising"}
    refused = client.post("/v1/messages", json=ad, headers=keys.a_live)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["rule"] == "suppressed"
    # The same number for another tenant, and an informational message, are accepted
    set_advertiser(runtime.store, "shop-b", "*", name="다른가게", opt_out="0809998888", contact=None, now=runtime.now())
    assert client.post("/v1/messages", json=ad, headers=keys.b_live).status_code == 202
    info = {"to": "01011112222", "sender": "0212345678", "text": "배송 안내"}
    assert client.post("/v1/messages", json=info, headers=keys.a_live).status_code == 202
    # A batch counts its suppressed rows
    batch = client.post(
        "/v1/batches",
        json={
            "defaults": {"text": "세일", "sender": "0212345678", "purpose": "advertising"},
            "messages": [{"to": "01011112222"}, {"to": "01055556666"}],
        },
        headers=keys.a_live,
    )
    assert batch.status_code == 202, batch.text
    summary = client.get(f"/v1/batches/{batch.json()['batch_id']}", headers=keys.a_live).json()
    assert summary["suppressed"] == 1 and summary["by_status"] == {"queued": 1, "suppressed": 1}
    # Removing makes it sendable again
    removed = client.post("/v1/suppressions/remove", json={"numbers": ["01011112222"]}, headers=keys.a_live)
    assert removed.json() == {"given": 1, "changed": 1, "count": 1}
    assert client.post("/v1/messages", json=ad, headers=keys.a_live).status_code == 202


def test_a_test_key_cannot_change_the_list_and_bad_numbers_are_named(client: TestClient, keys: Keys) -> None:
    forbidden = client.post("/v1/suppressions", json={"numbers": ["01011112222"]}, headers=keys.a_test)
    assert forbidden.status_code == 403
    assert forbidden.json()["type"] == "urn:kmsg:problem:forbidden"
    bad = client.post("/v1/suppressions", json={"numbers": ["01011112222", "hello"]}, headers=keys.a_live)
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "numbers[1]"
    assert client.get("/v1/suppressions", headers=keys.a_live).json() == {"count": 0}  # nothing stored
    empty = client.post("/v1/suppressions", json={"numbers": []}, headers=keys.a_live)
    assert empty.status_code == 422


def test_alimtalk_advertising_is_refused_by_the_api(client: TestClient, keys: Keys) -> None:
    body = {
        "type": "ALIMTALK",
        "to": "01012345678",
        "template_id": "T1",
        "kakao": {"profile_id": "pf"},
        "text": "x",
        "purpose": "advertising",
    }
    refused = client.post("/v1/messages", json=body, headers=keys.a_live)
    assert refused.status_code == 422
    assert (refused.json()["errors"][0]["field"], refused.json()["errors"][0]["rule"]) == ("purpose", "not_allowed")
