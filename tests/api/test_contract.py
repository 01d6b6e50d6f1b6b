"""The API's contract: the OpenAPI snapshot, the request fields the domain accepts, the problem types,
the masked access log, and the admin functions behind the kmsg tenants / keys commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient

from kmsg_worker.api import admin, create_app
from kmsg_worker.api.problems import PROBLEM_TYPES
from kmsg_worker.api.schemas import MessageRequest
from kmsg_worker.errors import MessageNotFoundError, ValidationError
from kmsg_worker.logging import configure_logging
from kmsg_worker.message.validate import _KNOWN
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.tenants import parse_key
from tests.api.conftest import Keys
from tests.conftest import ROOT

SNAPSHOT = Path(__file__).with_name("openapi.json")


def test_the_openapi_schema_matches_the_committed_snapshot(runtime: Runtime) -> None:
    schema = create_app(runtime=runtime).openapi()
    rendered = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if os.environ.get("KMSG_UPDATE_OPENAPI") == "1":
        SNAPSHOT.write_text(rendered, encoding="utf-8")
    assert SNAPSHOT.read_text(encoding="utf-8") == rendered, (
        "the API changed: review the difference, then refresh the snapshot with "
        "KMSG_UPDATE_OPENAPI=1 pytest tests/api/test_contract.py"
    )


def test_the_schema_is_served_and_documents_every_path(client: TestClient) -> None:
    served = client.get("/openapi.json").json()
    assert set(served["paths"]) == {
        "/livez",
        "/readyz",
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/messages/{message_id}/cancel",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
        "/v1/templates",
        "/v1/templates/{name}",
        "/v1/templates/{name}/edit",
        "/v1/templates/{ref}/preview",
        "/v1/templates/{ref}/publish",
        "/v1/templates/{ref}/archive",
        "/v1/suppressions",
        "/v1/suppressions/remove",
        "/v1/webhooks",
        "/v1/providers/{provider}/reports",
        "/v1/webhooks/{endpoint_id}",
        "/v1/webhooks/{endpoint_id}/rotate",
        "/v1/webhooks/{endpoint_id}/test",
    }
    assert served["components"]["schemas"]["MessageRequest"]["additionalProperties"] is False


def test_the_documented_message_fields_are_exactly_the_domains_minus_the_tenant() -> None:
    assert set(MessageRequest.model_fields) == set(_KNOWN) - {"tenant"}


def test_every_problem_type_is_documented() -> None:
    guide = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    missing = [slug for slug in PROBLEM_TYPES if f"urn:kmsg:problem:{slug}" not in guide]
    assert missing == []


def test_the_access_log_has_one_line_per_request_without_the_key_or_the_query(client: TestClient, keys: Keys) -> None:
    token = keys.a_live["Authorization"].removeprefix("Bearer ")
    # Another test of the session may have configured a quieter level (kmsg --log-level WARNING):
    # the access log is INFO, as a server logs it by default.
    configure_logging("INFO")
    with structlog.testing.capture_logs() as logs:
        client.post(
            "/v1/messages", json={"to": "01012345678", "text": "x", "sender": "0212345678"}, headers=keys.a_live
        )
        client.get("/v1/messages", params={"batch_id": "01012345678"}, headers=keys.a_live)
    lines = [e for e in logs if e["event"] == "api.request"]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", "/v1/messages", 202),
        ("GET", "/v1/messages", 200),
    ]
    assert all(e["key_id"] == keys.a_live_id for e in lines)
    text = json.dumps(logs, default=str)
    assert token not in text and parse_key(token).secret not in text  # type: ignore[union-attr]
    assert "01012345678" not in text


def test_admin_functions_manage_tenants_and_keys(backend_url: str, settings_factory: Any) -> None:
    settings = settings_factory(backend_url)
    assert admin.create_tenant("agency-1", settings=settings)["name"] == "agency-1"
    with pytest.raises(ValidationError):
        admin.create_tenant("agency-1", settings=settings)
    issued = admin.create_key("agency-1", test=True, label="staging", settings=settings)
    assert issued.token.startswith("kmsg_test_") and issued.token not in repr(issued)
    listed = admin.list_keys("agency-1", settings=settings)
    assert [(k["id"], k["kind"], k["label"], k["revoked_at"]) for k in listed] == [
        (issued.key_id, "test", "staging", None)
    ]
    assert issued.token not in json.dumps(listed, default=str)
    assert admin.revoke_key(issued.key_id, settings=settings)["revoked_at"] is not None
    assert admin.disable_tenant("agency-1", settings=settings)["disabled_at"] is not None
    assert [t["name"] for t in admin.list_tenants(settings=settings)] == ["agency-1"]
    with pytest.raises(MessageNotFoundError):
        admin.revoke_key("ffffffffffff", settings=settings)


def test_the_api_settings_come_from_the_environment_and_refuse_nonsense() -> None:
    from kmsg_worker.api.config import ApiConfig
    from kmsg_worker.errors import ConfigurationError

    config = ApiConfig.from_env(
        {"KMSG_API_RATE_LIMIT": "12.5", "KMSG_API_CORS_ORIGINS": "https://a.example, https://b"}
    )
    assert config.rate_limit == 12.5 and config.cors_origins == ("https://a.example", "https://b")
    assert ApiConfig.from_env({}) == ApiConfig()
    for name, value in (("KMSG_API_RATE_LIMIT", "fast"), ("KMSG_API_MAX_BODY_BYTES", "10")):
        with pytest.raises(ConfigurationError) as bad:
            ApiConfig.from_env({name: value})
        assert bad.value.variable == name
