"""Advertising through real workers: a campaign against the tenant's opt-out list, the fake Solapi's
registered sender numbers, and a 080 opt-out reported by the provider, on Redis + PostgreSQL.

The night window is tested with an injected clock in tests/test_advertising.py; here the campaign
carries the recipients' night consent, so the test does not depend on the hour it runs at.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kmsg_worker.storage.advertising import export_suppressions
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import SENDER, fake_env, start_fakes
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def fakes(cluster: Cluster) -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    cluster.env.update(fake_env(servers))
    cluster.env["KMSG_PROVIDERS"] = "solapi"
    cluster.env["KMSG_SUPPRESSION_KEY"] = "e2e-suppression-key"
    yield servers
    for server in servers.values():
        server.stop()


def test_a_campaign_skips_opted_out_numbers_and_only_registered_senders_send(
    cluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    solapi = fakes["solapi"]
    assert isinstance(solapi, FakeSolapiServer)
    solapi.senders = {SENDER}
    cluster.start_worker()
    # The producer (another process): a profile, five opted-out numbers, a 40-row campaign
    result = cluster.run_python(
        "import json\n"
        "from datetime import UTC, datetime\n"
        "from kmsg_worker import KMsg, adrules\n"
        "from kmsg_worker.errors import ValidationError\n"
        "from kmsg_worker.storage.advertising import set_advertiser\n"
        "kmsg = KMsg()\n"
        "rt = kmsg.runtime\n"
        "set_advertiser(rt.store, 'default', '*', name='가나다마트', opt_out='080-123-4567',\n"
        "    contact=None, now=rt.now())\n"
        "numbers = ['0105555%04d' % i for i in range(40)]\n"
        "adrules.suppress(rt.settings, rt.store, 'default', numbers[:5], source='cli', now=rt.now())\n"
        "receipt = kmsg.send_many([{'to': n} for n in numbers],\n"
        "    defaults={'text': '[e2e] 겨울 세일', 'purpose': 'advertising', 'night_consent': True})\n"
        "try:\n"
        "    kmsg.send(to='01012345678', sender='0311112222', text='hi')\n"
        "    refused = None\n"
        "except ValidationError as exc:\n"
        "    refused = [exc.field, exc.rule, exc.detail]\n"
        "print(json.dumps({'ids': receipt.message_ids, 'batch': receipt.batch_id, 'refused': refused}))\n"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # An unregistered sender is refused at the producer, naming it and the provider
    field, rule, detail = out["refused"]
    assert (field, rule) == ("sender", "not_registered") and "0311112222" in detail and "solapi" in detail
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))
    ids = out["ids"]

    def settled() -> bool:
        counts = store.count_by_status(ids)
        return counts.get("suppressed") == 5 and counts.get("sent", 0) + counts.get("delivered", 0) == 35

    wait_until(settled, 90, interval=0.3, what="35 sent and 5 suppressed")
    # The opted-out numbers never reached the provider; the others did, once each, composed
    assert solapi.ledger.stats()["accepted"] == 35
    row = store.get(ids[5])
    assert row is not None and row.content["text"].startswith("(광고)가나다마트\n")
    assert row.content["text"].endswith("무료수신거부 080-123-4567")
    for message_id in ids[:5]:
        suppressed = store.get(message_id)
        assert suppressed is not None and suppressed.status == "suppressed" and suppressed.attempts == 0
    assert len(list(export_suppressions(store, "default"))) == 5
