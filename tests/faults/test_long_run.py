"""A long run under every fault at once, bounded in size and time by environment variables.

The mix of the chaos run that found the unfinished messages: a bulk plus single sends, scheduled
sends and AlimTalk with SMS fallback, against the fake Solapi with 30 % 503, 10 % 429, 2 %
connection resets, 5 % accepted-but-lost replies and 80 ms latency; meanwhile a bulk worker and a
send worker are SIGKILLed, beat is SIGKILLed, the broker (a ``redis-server`` of the test's own) is
stopped for 10 s and later wiped. Then the faults are cleared and every message must be *final*
(``delivered``, ``failed``, ``unknown``, ``dead`` or ``cancelled``: delivery tracking is on) within
``KMSG_FAULT_LONG_SETTLE_SECONDS``, with no message accepted twice at the fake.

Sizes (defaults keep it to a few minutes on 2 shared cores; the 20,000-message run of the reliability
figures is ``KMSG_FAULT_LONG_BULK=20000``, to be run on a quiet machine):

* ``KMSG_FAULT_LONG_BULK`` (2,000): rows of the bulk, in chunks of 500;
* ``KMSG_FAULT_LONG_SINGLES`` (100): single sends, plus 20 scheduled and 20 AlimTalk with fallback;
* ``KMSG_FAULT_LONG_SETTLE_SECONDS`` (300): the bound after the faults are cleared.

The process count is held: every killed worker is replaced, and at the end the workers started
last are all alive.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kmsg_worker.storage.models import MessageRow
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeProviderServer
from tests.conftest import Cluster, wait_until
from tests.faults.infra import PrivateRedis, kill_tree
from tests.faults.test_faults import FINAL, figures, producer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

BULK = int(os.environ.get("KMSG_FAULT_LONG_BULK", "2000"))
SINGLES = int(os.environ.get("KMSG_FAULT_LONG_SINGLES", "100"))
SETTLE = float(os.environ.get("KMSG_FAULT_LONG_SETTLE_SECONDS", "300"))
NOT_KAKAO = "9"  #: AlimTalk to numbers ending in 9 fails "not a Kakao user" (3104)


def statuses(kmsg: object, ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    with kmsg.runtime.store.sessions() as s:  # type: ignore[attr-defined]
        for start in range(0, len(ids), 1000):
            stmt = (
                select(MessageRow.status, func.count())
                .where(MessageRow.id.in_(ids[start : start + 1000]))
                .group_by(MessageRow.status)
            )
            for status, n in s.execute(stmt):
                out[status] = out.get(status, 0) + int(n)
    return out


def test_every_message_ends_final_under_every_fault_at_once(
    cluster: Cluster, solapi: FakeProviderServer, tmp_path: Path
) -> None:
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    try:
        cluster.env.update(
            {
                "KMSG_BROKER_URL": broker.url,
                "KMSG_REDIS_URL": broker.url,
                # Delivery tracking on: "final" means delivered/failed, not just accepted.
                "KMSG_TRACKING_FIRST_CHECK_SECONDS": "1",
            }
        )
        solapi.ledger.add_rule(DeliveryRule(final="FAILED", code="3104"), suffix=NOT_KAKAO, type="ALIMTALK")
        solapi.set_faults(
            latency_ms=80, error_rate=0.3, rate_limit_rate=0.1, retry_after=1, reset_rate=0.02, lost_response_rate=0.05
        )
        kmsg = producer(cluster)
        bulk_worker = cluster.start_worker("bulk", concurrency=2, queues="kmsg.bulk")
        send_worker = cluster.start_worker(
            "send", concurrency=2, queues="kmsg.priority,kmsg.send,kmsg.poll,kmsg.maintenance"
        )
        beat = cluster.start_beat()
        started = time.monotonic()
        batch = kmsg.send_many(
            ({"to": f"0106{i:07d}"} for i in range(BULK)), defaults={"text": "[fault] long bulk"}, chunk_size=500
        )
        ids = list(batch.message_ids)
        ids += [kmsg.send(to=f"0107{i:07d}", text=f"[fault] single {i}").message_id for i in range(SINGLES)]
        at = datetime.now(UTC) + timedelta(seconds=20)
        ids += [
            kmsg.send(to=f"0108{i:07d}", text="[fault] scheduled", scheduled_at=at.isoformat()).message_id
            for i in range(20)
        ]
        ids += [
            kmsg.send(
                to=f"0109{i:07d}",
                type="ALIMTALK",
                template_id="T_ORDER",
                text="[fault] 주문이 접수되었습니다",
                failover={"enabled": True, "content": "[fault] 주문이 접수되었습니다"},
            ).message_id
            for i in range(20)
        ]

        # Faults while it runs: kill a bulk and a send worker, then beat; stop Redis 10 s; wipe it.
        time.sleep(5)
        for victim in (bulk_worker, send_worker, beat):
            kill_tree(victim.pid, signal.SIGKILL)
            victim.wait()
        workers = [
            cluster.start_worker("bulk2", concurrency=2, queues="kmsg.bulk"),
            cluster.start_worker("send2", concurrency=2, queues="kmsg.priority,kmsg.send,kmsg.poll,kmsg.maintenance"),
        ]
        beat = cluster.start_beat("beat2")
        time.sleep(5)
        broker.stop()
        time.sleep(10)
        broker.start()
        time.sleep(10)
        broker.flushall()
        time.sleep(5)
        solapi.set_faults()
        cleared = time.monotonic()

        def all_final() -> bool:
            return sum(n for st, n in statuses(kmsg, ids).items() if st in FINAL) == len(ids)

        try:
            wait_until(all_final, SETTLE, interval=2, what="every message final after the faults cleared")
        finally:
            final = statuses(kmsg, ids)
            stats = solapi.ledger.stats()
            figures(
                "long_run",
                messages=len(ids),
                bulk=BULK,
                statuses=final,
                duplicate_messages=len(stats["duplicate_messages"]),
                replacements=len(getattr(solapi, "replacements", {})),
                list_requests=stats["per_endpoint"].get("GET /messages/v4/list", 0),
                settle_s=round(time.monotonic() - cleared, 1),
                total_s=round(time.monotonic() - started, 1),
            )
        assert stats["duplicate_messages"] == {}
        assert all(p.poll() is None for p in [*workers, beat]), cluster.logs()
        assert "Unrecoverable error" not in cluster.logs()
    finally:
        broker.close()
