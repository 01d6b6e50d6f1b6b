"""Authentication, the key-state cache, the per-key rate limit and the health probes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kmsg_worker.api import create_app
from kmsg_worker.api.auth import Authenticator
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.api.problems import Problem
from kmsg_worker.ratelimit import LocalRateLimiter
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.tenants import TenantStore, parse_key
from tests.api.conftest import Keys, bearer, stored_count
from tests.conftest import RecordingDispatcher

SMS = {"to": "010-1234-5678", "text": "hello", "sender": "0212345678"}


def _refused(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["type"] == "urn:kmsg:problem:unauthorized"


def test_missing_malformed_unknown_and_wrong_keys_are_401_and_store_nothing(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    token = keys.a_live["Authorization"].removeprefix("Bearer ")
    parsed = parse_key(token)
    assert parsed is not None
    wrong_secret = f"kmsg_live_{parsed.key_id}_{'A' * 43}"
    wrong_kind = f"kmsg_test_{parsed.key_id}_{parsed.secret}"
    unknown = f"kmsg_live_{'0' * 12}_{parsed.secret}"
    for headers in (
        {},
        {"Authorization": token},  # no scheme
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer not-a-key"},
        bearer(wrong_secret),
        bearer(wrong_kind),
        bearer(unknown),
    ):
        _refused(client.post("/v1/messages", json=SMS, headers=headers))
        _refused(client.get("/v1/messages", headers=headers))
    assert stored_count(runtime) == 0
    # the same key, well formed, is accepted
    assert client.post("/v1/messages", json=SMS, headers=keys.a_live).status_code == 202


def test_a_revoked_key_and_a_disabled_tenants_keys_are_refused_at_once(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    assert client.get("/v1/messages", headers=keys.a_live).status_code == 200
    keys.store.revoke_key(keys.a_live_id, now=runtime.now())
    _refused(client.get("/v1/messages", headers=keys.a_live))
    assert client.get("/v1/messages", headers=keys.b_live).status_code == 200
    keys.store.disable_tenant("shop-b", now=runtime.now())
    _refused(client.get("/v1/messages", headers=keys.b_live))
    # shop-a's test key is untouched by either
    assert client.get("/v1/messages", headers=keys.a_test).status_code == 200


def test_key_state_is_reused_for_at_most_the_cache_time(runtime: Runtime, keys: Keys) -> None:
    now = [100.0]
    auth = Authenticator(keys.store, LocalRateLimiter(), rate=1000, cache_seconds=2.0, clock=lambda: now[0])
    header = keys.a_live["Authorization"]
    assert auth.identify(header).tenant == "shop-a"
    keys.store.revoke_key(keys.a_live_id, now=runtime.now())
    now[0] += 1.9
    assert auth.identify(header).tenant == "shop-a"  # within the cache time
    now[0] += 0.2
    with pytest.raises(Problem) as refused:
        auth.identify(header)
    assert refused.value.status == 401


@pytest.fixture
def redis_runtime(
    backend_url: str, settings_factory: Any, redis_url: str, dispatcher: RecordingDispatcher
) -> Iterator[Runtime]:
    prefix = f"kmsgapitest{uuid.uuid4().hex[:8]}:"
    rt = Runtime(
        settings_factory(backend_url, KMSG_REDIS_URL=redis_url, KMSG_BROKER_KEY_PREFIX=prefix), dispatcher=dispatcher
    )
    yield rt
    client = rt.redis
    stale = list(client.scan_iter(match=f"{prefix}*"))
    if stale:
        client.delete(*stale)
    rt.close()


def test_the_per_key_rate_limit_answers_429_with_retry_after(redis_runtime: Runtime) -> None:
    store = TenantStore(redis_runtime.engine)
    store.create_tenant("shop-a", now=redis_runtime.now())
    first = bearer(store.create_key("shop-a", now=redis_runtime.now()).token)
    second = bearer(store.create_key("shop-a", now=redis_runtime.now()).token)
    config = ApiConfig(rate_limit=1, auth_cache_seconds=0)
    with TestClient(create_app(runtime=redis_runtime, config=config)) as client:
        assert client.get("/v1/messages", headers=first).status_code == 200
        limited = client.post("/v1/messages", json=SMS, headers=first)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert limited.json()["type"] == "urn:kmsg:problem:rate-limited"
        # another key has its own bucket
        assert client.get("/v1/messages", headers=second).status_code == 200
    assert stored_count(redis_runtime) == 0


def test_health_probes_need_no_key_and_readiness_checks_the_broker(client: TestClient, runtime: Runtime) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    folder = runtime.settings.var_dir / "broker" / "queue"
    ready = client.get("/readyz")
    if not folder.is_dir():
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"database": "ok", "broker": "unreachable"}
        folder.mkdir(parents=True)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_no_docs_page_and_no_cors_unless_configured(client: TestClient, runtime: Runtime) -> None:
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/messages", headers=preflight).headers
    config = ApiConfig(cors_origins=("https://app.example",))
    with TestClient(create_app(runtime=runtime, config=config)) as cors:
        allowed = cors.options("/v1/messages", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
