"""``/v1/templates`` through FastAPI's TestClient, on SQLite and PostgreSQL: a tenant's registry, sending by it."""

from __future__ import annotations

from fastapi.testclient import TestClient

from kmsg_worker.runtime import Runtime
from tests.api.conftest import Keys, stored_count
from tests.api.test_api import _problem
from tests.conftest import RecordingDispatcher

BODY = "#{name}님, 주문 #{order} 발송"


def test_a_tenants_templates_from_draft_to_send(
    client: TestClient, keys: Keys, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    created = client.post("/v1/templates", json={"name": "order_shipped", "body": BODY}, headers=keys.a_live)
    assert created.status_code == 201, created.text
    assert (created.json()["ref"], created.json()["state"], created.json()["variables"]) == (
        "order_shipped@1",
        "draft",
        ["name", "order"],
    )
    preview = client.post(
        "/v1/templates/order_shipped/preview", json={"variables": {"name": "김", "order": "7"}}, headers=keys.a_live
    )
    assert preview.json() | {"steps": []} == {
        "ref": "order_shipped@1",
        "text": "김님, 주문 7 발송",
        "subject": None,
        "bytes": 17,
        "type": "SMS",
        "missing": [],
        "unknown": [],
        "steps": [],
    }
    message = {"to": "01012345678", "sender": "0212345678", "template": "order_shipped"}
    draft = client.post(
        "/v1/messages", json={**message, "variables": {"name": "김", "order": "1"}}, headers=keys.a_live
    )
    assert _problem(draft, 422, "validation")["errors"][0]["rule"] == "not_published"  # type: ignore[index]
    assert client.post("/v1/templates/order_shipped/publish", headers=keys.a_live).status_code == 200
    _problem(client.post("/v1/templates/order_shipped@1/publish", headers=keys.a_live), 409, "invalid-state")
    missing = client.post("/v1/messages", json={**message, "variables": {"name": "김"}}, headers=keys.a_live)
    errors = _problem(missing, 422, "validation")["errors"]
    assert errors[0]["field"] == "variables" and errors[0]["rule"] == "missing"  # type: ignore[index]
    assert "order" in errors[0]["message"]  # type: ignore[index]
    assert stored_count(runtime) == 0
    sent = client.post("/v1/messages", json={**message, "variables": {"name": "김", "order": "1"}}, headers=keys.a_live)
    assert sent.status_code == 202, sent.text
    row = runtime.store.get(sent.json()["id"])
    assert row is not None and row.content["template"] == "order_shipped@1" and row.tenant == "shop-a"
    edited = client.post("/v1/templates/order_shipped/edit", json={"body": "#{name}님 완료"}, headers=keys.a_live)
    assert (edited.json()["version"], edited.json()["state"]) == (2, "draft")
    versions = client.get("/v1/templates/order_shipped", headers=keys.a_live).json()["data"]
    assert [(v["version"], v["state"]) for v in versions] == [(1, "published"), (2, "draft")]
    archived = client.post("/v1/templates/order_shipped@1/archive", headers=keys.a_live)
    assert archived.json()["state"] == "archived"
    listed = client.get("/v1/templates", headers=keys.a_live).json()["data"]
    assert [v["ref"] for v in listed] == ["order_shipped@2"]


def test_templates_are_scoped_to_the_keys_tenant(client: TestClient, keys: Keys) -> None:
    client.post("/v1/templates", json={"name": "t", "body": "hi #{x}"}, headers=keys.a_live)
    client.post("/v1/templates/t/publish", headers=keys.a_live)
    assert client.get("/v1/templates", headers=keys.b_live).json() == {"data": []}
    _problem(client.get("/v1/templates/t", headers=keys.b_live), 404, "not-found")
    other = client.post(
        "/v1/messages",
        json={"to": "01012345678", "sender": "0212345678", "template": "t", "variables": {"x": "1"}},
        headers=keys.b_live,
    )
    assert _problem(other, 422, "validation")["errors"][0]["rule"] == "unknown"  # type: ignore[index]


def test_bad_template_requests_name_the_field(client: TestClient, keys: Keys) -> None:
    typo = client.post("/v1/templates", json={"name": "t", "body": "x", "bdy": "y"}, headers=keys.a_live)
    assert _problem(typo, 422, "validation")["errors"][0]["field"] == "bdy"  # type: ignore[index]
    no_body = client.post("/v1/templates", json={"name": "t"}, headers=keys.a_live)
    assert _problem(no_body, 422, "validation")["errors"][0]["field"] == "body"  # type: ignore[index]
    bad_type = client.post("/v1/templates", json={"name": "t", "body": "x", "type": "ALIMTALK"}, headers=keys.a_live)
    assert _problem(bad_type, 422, "validation")["errors"][0]["field"] == "type"  # type: ignore[index]
    assert client.get("/v1/templates").status_code == 401


def test_an_advertising_preview_is_composed_with_the_tenants_profile(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    from kmsg_worker.storage.advertising import set_advertiser

    assert client.post("/v1/templates", json={"name": "sale", "body": "#{name}님 세일"}, headers=keys.a_live).is_success
    url = "/v1/templates/sale/preview"
    ask = {"variables": {"name": "김"}, "purpose": "advertising", "sender": "02-1234-5678"}
    # shop-a has no profile: refused like an advertising send, naming the rule
    missing = _problem(client.post(url, json=ask, headers=keys.a_live), 422, "validation")
    assert missing["errors"][0]["rule"] == "advertiser_profile"  # type: ignore[index]
    set_advertiser(
        runtime.store, "shop-a", "0212345678", name="가나다마트", opt_out="0801234567", contact=None, now=runtime.now()
    )
    shown = client.post(url, json=ask, headers=keys.a_live).json()
    assert shown["text"].startswith("(광고)가나다마트") and "\n김님 세일\n" in shown["text"]
    assert "무료수신거부" in shown["text"] and shown["steps"] == ["advertising"]
    # shop-b has no such template: that is what it is told, before any advertiser profile is looked up
    other = _problem(client.post(url, json=ask, headers=keys.b_live), 422, "validation")
    assert (other["errors"][0]["field"], other["errors"][0]["rule"]) == ("template", "unknown")  # type: ignore[index]
    bad = client.post(url, json={**ask, "purpose": "promo"}, headers=keys.a_live)
    assert _problem(bad, 422, "validation")["errors"][0]["rule"] == "enum"  # type: ignore[index]
