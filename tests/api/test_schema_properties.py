"""Property-based tests of the live schema with schemathesis (bounded examples, SQLite runtime).

For every operation and generated request: no 5xx, every answer matches the documented schema
(status code, content type, body), and a refused (4xx) request stores nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kmsg_worker.api import create_app
from kmsg_worker.api.config import ApiConfig
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.tenants import TenantStore
from tests.api.conftest import bearer, stored_count
from tests.conftest import RecordingDispatcher


@pytest.fixture
def sqlite_runtime(tmp_path: Path) -> Iterator[Runtime]:
    env = {"KMSG_VAR_DIR": str(tmp_path / "var"), "KMSG_DATABASE_URL": f"sqlite:///{tmp_path / 'kmsg.sqlite'}"}
    rt = Runtime(Settings.from_env(env), dispatcher=RecordingDispatcher())
    (rt.settings.var_dir / "broker" / "queue").mkdir(parents=True, exist_ok=True)  # /readyz: the embedded broker
    yield rt
    rt.close()


@pytest.fixture
def live_key(sqlite_runtime: Runtime) -> dict[str, str]:
    store = TenantStore(sqlite_runtime.engine)
    store.create_tenant("prop", now=sqlite_runtime.now())
    return bearer(store.create_key("prop", now=sqlite_runtime.now()).token)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Generated requests per operation (bounded: this runs in CI).
EXAMPLES = 30


def test_no_5xx_answers_match_the_schema_and_refusals_store_nothing(
    sqlite_runtime: Runtime, live_key: dict[str, str]
) -> None:
    app = create_app(runtime=sqlite_runtime, config=ApiConfig(rate_limit=1_000_000, auth_cache_seconds=60))
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # 9 of messages, batches and health, 7 of templates, 3 of suppressions, 6 of webhooks and reports
    assert len(operations) == 25

    seen: Counter[int] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            before = stored_count(sqlite_runtime)
            response = case.call(headers=live_key)
            seen[response.status_code // 100] += 1
            case.validate_response(response, checks=CHECKS)
            if 400 <= response.status_code < 500:
                assert stored_count(sqlite_runtime) == before, response.text

        check()
    # Both paths were exercised: accepted requests and refused ones.
    assert seen[2] > 0 and seen[4] > 0, seen
