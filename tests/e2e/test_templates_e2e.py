"""Templates through a real Celery worker and the fake providers over real HTTP, results in PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.templates import sync_provider_templates
from kmsg_worker.testing.fake_templates import FakeTemplate
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import Cluster, RecordingDispatcher, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ATA_BODY = "#{고객}님, 주문 #{주문번호}이 발송되었습니다"


@pytest.fixture
def fakes(cluster: Cluster) -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    servers["solapi"].alimtalk_templates = {  # type: ignore[attr-defined]
        "SHIP": FakeTemplate("SHIP", ATA_BODY),
        "PROMO": FakeTemplate("PROMO", "이벤트 #{쿠폰}", status="inspecting"),
    }
    cluster.env.update(fake_env(servers))
    cluster.env["KMSG_PROVIDERS"] = "solapi"
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def admin(cluster: Cluster, fakes: dict[str, FakeProviderServer]) -> Iterator[KMsg]:
    """The operator's producer on the cluster's database (authoring and sync; it queues nothing)."""
    runtime = Runtime(Settings.from_env(cluster.env), dispatcher=RecordingDispatcher())
    with KMsg(runtime=runtime) as kmsg:
        yield kmsg


def test_a_template_bulk_and_an_alimtalk_bulk_through_a_worker(
    cluster: Cluster, fakes: dict[str, FakeProviderServer], admin: KMsg
) -> None:
    # Given a published SMS template, the Solapi AlimTalk templates synced, and a worker
    now = admin.runtime.now()
    admin.templates.create("default", "order_shipped", "[e2e] #{name}님, 주문 #{order} 발송", now=now)
    admin.templates.publish("default", "order_shipped", now=now)
    assert sync_provider_templates(admin.runtime, "solapi").new == 2
    cluster.start_worker()
    # When another process sends a 40-row template bulk, a 20-row AlimTalk bulk, and one AlimTalk
    # whose text is not the approved template
    result = cluster.run_python(
        "import json\n"
        "from kmsg_worker import KMsg\n"
        "from kmsg_worker.errors import ValidationError\n"
        "kmsg = KMsg()\n"
        "rows = [{'to': '0105555%04d' % i, 'variables': {'name': 'n%d' % i, 'order': str(i)}} for i in range(40)]\n"
        "sms = kmsg.send_many(rows, defaults={'template': 'order_shipped'})\n"
        "ata_rows = [{'to': '0106666%04d' % i, 'variables': {'고객': 'c%d' % i, '주문번호': str(i)}}\n"
        "            for i in range(20)]\n"
        "ata = kmsg.send_many(ata_rows, defaults={'type': 'ALIMTALK', 'template_id': 'SHIP'})\n"
        "try:\n"
        "    kmsg.send(type='ALIMTALK', to='01077770000', template_id='SHIP',\n"
        "              variables={'고객': '김', '주문번호': '1'}, text='김님, 주문 1이 발송됨')\n"
        "    refused = None\n"
        "except ValidationError as exc:\n"
        "    refused = [exc.field, exc.rule]\n"
        "print(json.dumps({'sms': sms.message_ids, 'ata': ata.message_ids, 'refused': refused}))\n"
    )
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout.strip().splitlines()[-1])
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))
    ids = sent["sms"] + sent["ata"]

    def accepted() -> bool:
        rows = [store.get(m) for m in ids]
        return all(r is not None and r.sent_at is not None for r in rows)

    wait_until(accepted, 90, interval=0.3, what="every message accepted by solapi")
    # Then every row went out rendered from its version, each recipient once
    ledger = fakes["solapi"].ledger
    for i, message_id in enumerate(sent["sms"]):
        row = store.get(message_id)
        assert row is not None and row.provider == "solapi"
        assert (row.content["template"], row.content["text"]) == ("order_shipped@1", f"[e2e] n{i}님, 주문 {i} 발송")
        assert ledger.per_recipient[f"0105555{i:04d}"] == 1
    for i, message_id in enumerate(sent["ata"]):
        row = store.get(message_id)
        assert row is not None and row.content["text"] == f"c{i}님, 주문 {i}이 발송되었습니다"
        assert [a.outcome for a in store.attempts(message_id)] == ["accepted"]
    # And the mismatch was refused by the producer: nothing stored, never sent to the provider
    assert sent["refused"] == ["text", "template_mismatch"]
    assert ledger.per_recipient["01077770000"] == 0


def test_without_the_preflight_the_provider_refuses_the_same_message(
    cluster: Cluster, fakes: dict[str, FakeProviderServer], admin: KMsg
) -> None:
    # Given the preflight off: the message is accepted, and the fake applies the same rule
    cluster.env["KMSG_ALIMTALK_PREFLIGHT"] = "off"
    cluster.start_worker()
    result = cluster.run_python(
        "from kmsg_worker import KMsg\n"
        "r = KMsg().send(type='ALIMTALK', to='01077770001', template_id='SHIP', variables={'고객': '김'})\n"
        "print(r.message_id)\n"
    )
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip().splitlines()[-1]
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))

    def failed() -> bool:
        row = store.get(message_id)
        return row is not None and row.status == "failed"

    wait_until(failed, 60, interval=0.3, what="the provider refused the message")
    row = store.get(message_id)
    assert row is not None and row.error_code == "TEMPLATE_MISMATCH"
