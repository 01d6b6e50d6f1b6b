"""The webhook endpoints of the HTTP API: add (secret shown once), list, rotate, delete, scoped to the tenant."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import Keys

PUBLIC = "https://93.184.216.34/hooks"  # an address literal: resolving it needs no DNS


def test_an_endpoint_is_added_listed_rotated_and_removed_by_its_tenant_only(client: TestClient, keys: Keys) -> None:
    made = client.post(
        "/v1/webhooks", json={"url": PUBLIC, "events": ["message.sent", "message.delivered"]}, headers=keys.a_live
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["secret"].startswith("whsec_") and body["events"] == ["message.delivered", "message.sent"]
    # the secret is never shown again, and the other tenant sees nothing
    [listed] = client.get("/v1/webhooks", headers=keys.a_live).json()["data"]
    assert listed["id"] == body["id"] and "secret" not in listed
    assert client.get("/v1/webhooks", headers=keys.b_live).json()["data"] == []
    assert client.delete(f"/v1/webhooks/{body['id']}", headers=keys.b_live).status_code == 404
    assert client.post(f"/v1/webhooks/{body['id']}/rotate", headers=keys.b_live).status_code == 404
    rotated = client.post(f"/v1/webhooks/{body['id']}/rotate", headers=keys.a_live).json()
    assert rotated["secret"] != body["secret"] and rotated["previous_secret_valid_until"]
    assert client.delete(f"/v1/webhooks/{body['id']}", headers=keys.a_live).status_code == 204
    assert client.get("/v1/webhooks", headers=keys.a_live).json()["data"] == []


def test_refused_destinations_and_bad_bodies_answer_422_naming_the_field(client: TestClient, keys: Keys) -> None:
    cases = [
        ({"url": "https://10.0.0.1/h", "events": ["message.sent"]}, "url", "public_address"),
        ({"url": "https://169.254.169.254/latest", "events": ["message.sent"]}, "url", "public_address"),
        ({"url": "http://93.184.216.34/h", "events": ["message.sent"]}, "url", "scheme"),
        ({"url": "http://127.0.0.1:9/h", "events": ["message.sent"]}, "url", "scheme"),
        ({"url": PUBLIC, "events": ["message.read"]}, "events", "known_type"),
        ({"url": PUBLIC, "events": []}, "events", "required"),
        ({"url": PUBLIC, "events": ["message.sent"], "secret": "x"}, "secret", "unknown_field"),
    ]
    for payload, field, rule in cases:
        answer = client.post("/v1/webhooks", json=payload, headers=keys.a_live)
        assert answer.status_code == 422, (payload, answer.text)
        problem = answer.json()
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert [(e["field"], e["rule"]) for e in problem["errors"]] == [(field, rule)], payload
    assert client.get("/v1/webhooks", headers=keys.a_live).json()["data"] == []
