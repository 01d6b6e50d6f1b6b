"""Fixtures of the API tests: an app on the test's runtime (SQLite and PostgreSQL), tenants and keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from kmsg_worker.api import create_app
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.tenants import TenantStore


@dataclass
class Keys:
    """Bearer headers of the test tenants' keys."""

    a_live: dict[str, str]
    a_test: dict[str, str]
    b_live: dict[str, str]
    a_live_id: str
    store: TenantStore


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api_config() -> ApiConfig:
    # No cache: revocations are seen at once; the cache has its own test.
    return ApiConfig(rate_limit=10_000, auth_cache_seconds=0, max_body_bytes=4096, max_batch_bytes=64 * 1024)


@pytest.fixture
def client(runtime: Runtime, api_config: ApiConfig) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime, config=api_config), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def keys(runtime: Runtime) -> Keys:
    store = TenantStore(runtime.engine)
    now = runtime.now()
    store.create_tenant("shop-a", now=now)
    store.create_tenant("shop-b", now=now)
    a_live = store.create_key("shop-a", now=now)
    return Keys(
        bearer(a_live.token),
        bearer(store.create_key("shop-a", kind="test", now=now).token),
        bearer(store.create_key("shop-b", now=now).token),
        a_live.key_id,
        store,
    )


def stored_count(runtime: Runtime) -> int:
    from sqlalchemy import func, select

    with runtime.store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(MessageRow)) or 0)
