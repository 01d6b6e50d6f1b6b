"""A real Celery worker -> each adapter -> its fake server over real HTTP, results in PostgreSQL."""

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


@pytest.mark.parametrize("provider", ["solapi", "iwinv", "aligo"])
def test_single_and_bulk_sends_through_each_provider(
    cluster: Cluster, fakes: dict[str, FakeProviderServer], provider: str
) -> None:
    # Given a worker whose only provider is `provider`, pointed at its fake
    cluster.env["KMSG_PROVIDERS"] = provider
    cluster.start_worker()
    # When another process sends one message with send_message.delay and a batch with send_bulk.delay
    result = cluster.run_python(
        "import json\n"
        "from tasks import send_bulk, send_message\n"
        "one = send_message.delay(to='010-4444-0001', text='[e2e] 인증번호 123456')\n"
        "rows = [{'to': '0104444%04d' % i, 'variables': {'n': i}} for i in range(2, 52)]\n"
        "batch = send_bulk.delay(messages=rows, defaults={'text': '[e2e] 쿠폰 #{n}'})\n"
        "print(json.dumps({'one': one.id, 'batch': batch.id, 'ids': batch.receipt.message_ids}))\n"
    )
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout.strip().splitlines()[-1])
    ids = [sent["one"], *sent["ids"]]
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))

    def accepted() -> bool:
        rows = [store.get(m) for m in ids]
        return all(r is not None and r.sent_at is not None for r in rows)

    wait_until(accepted, 90, interval=0.3, what=f"every message accepted by {provider}")
    # Then every message was recorded with the provider's id, and each recipient reached the fake once
    for message_id in ids:
        row = store.get(message_id)
        assert row is not None and row.provider == provider and row.provider_message_id
        assert [a.outcome for a in store.attempts(message_id)] == ["accepted"]
    ledger = fakes[provider].ledger
    assert ledger.per_recipient["01044440001"] == 1
    assert all(ledger.per_recipient[f"0104444{i:04d}"] == 1 for i in range(2, 52))
    assert store.get(sent["ids"][0]).batch_id == sent["batch"]  # type: ignore[union-attr]
