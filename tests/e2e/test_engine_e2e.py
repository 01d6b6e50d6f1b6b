"""The one engine through real workers: a bulk honours the operator's per-type retry limits."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def fakes(cluster: Cluster) -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    cluster.env.update(fake_env(servers))
    yield servers
    for server in servers.values():
        server.stop()


def test_a_bulk_with_an_sms_retry_limit_of_one_fails_after_one_attempt_each(
    cluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given a worker whose only provider, Solapi, answers every request 503, and at most one attempt for SMS
    cluster.env["KMSG_PROVIDERS"] = "solapi"
    cluster.env["KMSG_RETRY_BY_TYPE"] = json.dumps({"SMS": {"max_attempts": 1}})
    cluster.env["KMSG_CIRCUIT_ENABLED"] = "false"
    fakes["solapi"].set_faults(error_rate=1.0, error_status=503)
    cluster.start_worker()
    # When another process sends a 30-message bulk
    result = cluster.run_python(
        "import json\n"
        "from tasks import send_bulk\n"
        "rows = [{'to': '0105555%04d' % i, 'variables': {'n': i}} for i in range(30)]\n"
        "batch = send_bulk.delay(messages=rows, defaults={'text': '[e2e] 쿠폰 #{n}'})\n"
        "print(json.dumps({'ids': batch.receipt.message_ids}))\n"
    )
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout.strip().splitlines()[-1])["ids"]
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))

    def all_final() -> bool:
        return store.count_by_status(ids) == {"failed": 30}

    wait_until(all_final, 90, interval=0.3, what="every message failed")
    # Then each recipient was tried exactly once (no retry), and its one attempt says why
    for message_id in ids:
        row = store.get(message_id)
        assert row is not None and row.attempts == 1 and row.error_code == "NETWORK_SERVICE_UNAVAILABLE"
        attempts = store.attempts(message_id)
        assert [(a.outcome, a.http_status) for a in attempts] == [("retryable", 503)]
    assert fakes["solapi"].ledger.stats()["accepted"] == 0
