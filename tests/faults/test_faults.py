"""Fault injection with real worker processes, real PostgreSQL and Redis, and the fake Solapi server.

Every test counts at the fake how many times each message (our id travels in Solapi's
customFields) was accepted: the invariant is *every accepted message ends final, none twice*.
Each test prints one ``FAULT-FIGURES`` line (in flight, lost, duplicated, time to recover) that
docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from config.celeryconfig import build_config
from kmsg_worker.dispatch import CeleryDispatcher
from kmsg_worker.errors import StorageUnavailableError
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import ChunkLease, MessageRow
from kmsg_worker.testing.fakeserver import FakeProviderServer
from tests.conftest import Cluster, wait_until
from tests.faults.infra import PrivateRedis, TcpProxy, kill_tree

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

FINAL = {"delivered", "failed", "cancelled", "unknown", "dead"}


def producer(cluster: Cluster) -> KMsg:
    """A producer in the test process, publishing to the cluster's broker."""
    settings = Settings.from_env(cluster.env)
    app = Celery("fault-producer")
    app.config_from_object(build_config(settings))
    return KMsg(runtime=Runtime(settings, dispatcher=CeleryDispatcher(app)))


def counts(kmsg: KMsg, ids: list[str] | None = None, batch_id: str | None = None) -> dict[str, int]:
    stmt = select(MessageRow.status, func.count()).group_by(MessageRow.status)
    if batch_id is not None:
        stmt = stmt.where(MessageRow.batch_id == batch_id)
    with kmsg.runtime.store.sessions() as s:
        if ids is not None:
            out: dict[str, int] = {}
            for start in range(0, len(ids), 1000):
                part = ids[start : start + 1000]
                for status, n in s.execute(stmt.where(MessageRow.id.in_(part))):
                    out[status] = out.get(status, 0) + int(n)
            return out
        return {status: int(n) for status, n in s.execute(stmt)}


def rows_in_flight(kmsg: KMsg, batch_id: str) -> int:
    """Rows of the batch's chunks whose lease says their request is in flight (bulk rows stay queued)."""
    with kmsg.runtime.store.sessions() as s:
        chunks = list(
            s.scalars(select(ChunkLease.chunk).where(ChunkLease.batch_id == batch_id, ChunkLease.in_flight.is_(True)))
        )
        if not chunks:
            return 0
        stmt = select(func.count()).where(
            MessageRow.batch_id == batch_id, MessageRow.chunk.in_(chunks), MessageRow.status == "queued"
        )
        return int(s.execute(stmt).scalar_one())


def all_done(kmsg: KMsg, total: int, **where: Any) -> bool:
    c = counts(kmsg, **where)
    return sum(n for st, n in c.items() if st == "sent" or st in FINAL) == total


def duplicates(fake: FakeProviderServer, ids: list[str]) -> dict[str, int]:
    return {m: fake.ledger.per_reference[m] for m in ids if fake.ledger.per_reference[m] > 1}


def figures(name: str, **values: Any) -> None:
    print(f"FAULT-FIGURES {name} {json.dumps(values)}")


def test_sigkill_a_worker_in_the_middle_of_a_20000_message_bulk(cluster: Cluster, solapi: FakeProviderServer) -> None:
    # Given a 20,000-message batch in chunks of 500 and a provider that takes 150 ms per request
    solapi.set_faults(latency_ms=150)
    kmsg = producer(cluster)
    rows = ({"to": f"010{i:08d}"} for i in range(20_000))
    receipt = kmsg.send_many(rows, defaults={"text": "[fault] bulk", "sender": "0212345678"}, chunk_size=500)
    victim = cluster.start_worker("victim", concurrency=2, queues="kmsg.bulk")
    wait_until(lambda: counts(kmsg, batch_id=receipt.batch_id).get("sent", 0) >= 3000, 120, what="3,000 sent")
    # When the worker is killed without warning while chunks are in flight
    kill_tree(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    in_flight = rows_in_flight(kmsg, receipt.batch_id)
    cluster.start_worker("rescuer", concurrency=2)
    cluster.start_beat()
    wait_until(lambda: all_done(kmsg, 20_000, batch_id=receipt.batch_id), 300, interval=1, what="every message final")
    recovered = time.monotonic() - killed_at
    # Then every message was accepted by the provider exactly once
    final = counts(kmsg, batch_id=receipt.batch_id)
    dup = duplicates(solapi, receipt.message_ids)
    figures(
        "sigkill_bulk",
        messages=20_000,
        in_flight=in_flight,
        statuses=final,
        duplicated=len(dup),
        lost=20_000 - sum(final.values()),
        recover_s=round(recovered, 1),
    )
    assert final == {"sent": 20_000}
    assert dup == {}
    assert solapi.ledger.stats()["accepted"] == 20_000


def test_redis_stopped_for_10_s_then_wiped(cluster: Cluster, solapi: FakeProviderServer, tmp_path: Path) -> None:
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    try:
        cluster.env.update({"KMSG_BROKER_URL": broker.url, "KMSG_REDIS_URL": broker.url})
        kmsg = producer(cluster)
        cluster.start_worker("w", concurrency=2)
        cluster.start_beat()
        ids = [kmsg.send(to=f"0102000{i:04d}", text="[fault] redis").message_id for i in range(100)]
        # When Redis stops for 10 s while producers keep sending
        broker.stop()
        stopped_at = time.monotonic()
        during = [kmsg.send(to=f"0103000{i:04d}", text="[fault] redis down").message_id for i in range(50)]
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))
        broker.start()
        restarted_at = time.monotonic()
        ids += during
        wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 120, interval=0.5, what="recovery after restart")
        restart_recovery = time.monotonic() - restarted_at
        # and then its data is wiped with tasks still queued
        more = [kmsg.send(to=f"0104000{i:04d}", text="[fault] flushall").message_id for i in range(100)]
        broker.flushall()
        wiped_at = time.monotonic()
        ids += more
        wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 120, interval=0.5, what="recovery after FLUSHALL")
        final = counts(kmsg, ids=ids)
        dup = duplicates(solapi, ids)
        figures(
            "redis_outage",
            messages=len(ids),
            sent_while_down=len(during),
            statuses=final,
            duplicated=len(dup),
            lost=len(ids) - sum(final.values()),
            recover_after_restart_s=round(restart_recovery, 1),
            recover_after_flushall_s=round(time.monotonic() - wiped_at, 1),
        )
        assert final == {"sent": len(ids)}
        assert dup == {}
    finally:
        broker.close()


def test_postgresql_unreachable_for_10_s(cluster: Cluster, solapi: FakeProviderServer, pg_url: str) -> None:
    proxy = TcpProxy(5432)
    try:
        url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
        cluster.env["KMSG_DATABASE_URL"] = url
        kmsg = producer(cluster)
        cluster.start_worker("w", concurrency=2)
        cluster.start_beat()
        ids = [kmsg.send(to=f"0105000{i:04d}", text="[fault] pg").message_id for i in range(150)]
        # When the database becomes unreachable for 10 s
        proxy.cut()
        cut_at = time.monotonic()
        refused = 0
        for i in range(10):
            with pytest.raises(StorageUnavailableError):
                kmsg.send(to=f"0106000{i:04d}", text="[fault] refused")
            refused += 1
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
        proxy.restore()
        wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 180, interval=0.5, what="recovery")
        # Then producers were told (nothing reported accepted that was not stored) and nothing was lost
        engine = make_engine(pg_url)
        with engine.connect() as conn:
            stored_refused = conn.execute(
                select(func.count()).select_from(MessageRow).where(MessageRow.recipient.like("0106000%"))
            ).scalar_one()
        engine.dispose()
        final = counts(kmsg, ids=ids)
        dup = duplicates(solapi, ids)
        figures(
            "postgres_outage",
            messages=len(ids),
            refused=refused,
            refused_stored=stored_refused,
            statuses=final,
            duplicated=len(dup),
            lost=len(ids) - sum(final.values()),
            recover_s=round(time.monotonic() - cut_at, 1),
        )
        assert stored_refused == 0
        assert final == {"sent": len(ids)}
        assert dup == {}
    finally:
        proxy.close()


def test_provider_faults_5xx_429_and_lost_responses(cluster: Cluster, solapi: FakeProviderServer) -> None:
    # 30 % 5xx, 10 % 429 with Retry-After, 10 % accepted-but-response-lost
    solapi.set_faults(error_rate=0.3, rate_limit_rate=0.1, retry_after=1, lost_response_rate=0.1)
    kmsg = producer(cluster)
    cluster.start_worker("w", concurrency=2)
    cluster.start_beat()
    started = time.monotonic()
    singles = [kmsg.send(to=f"0107000{i:04d}", text="[fault] provider").message_id for i in range(150)]
    batch = kmsg.send_many(
        ({"to": f"0108{i:07d}"} for i in range(2000)), defaults={"text": "[fault] bulk"}, chunk_size=200
    )
    ids = singles + batch.message_ids
    wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 420, interval=1, what="every message final")
    final = counts(kmsg, ids=ids)
    dup = duplicates(solapi, ids)
    with kmsg.runtime.store.sessions() as s:
        from kmsg_worker.storage.models import Attempt

        outcomes = dict(s.execute(select(Attempt.outcome, func.count()).group_by(Attempt.outcome)).all())
    figures(
        "provider_faults",
        messages=len(ids),
        statuses=final,
        attempts=outcomes,
        duplicated=len(dup),
        lost=len(ids) - sum(final.values()),
        seconds=round(time.monotonic() - started, 1),
    )
    assert dup == {}
    assert sum(final.values()) == len(ids)
    assert final.get("sent", 0) >= len(ids) * 0.99, final
    assert outcomes.get("timeout", 0) > 0 and outcomes.get("retryable", 0) > 0


def test_a_worker_stalled_past_its_lease_is_replaced(cluster: Cluster, solapi: FakeProviderServer) -> None:
    # Lease 6 s: the hard time limit (0.75 x lease) kills a frozen worker before its lease expires.
    cluster.env["KMSG_LEASE_SECONDS"] = "6"
    solapi.set_faults(latency_ms=1500)
    kmsg = producer(cluster)
    stalled = cluster.start_worker("stalled", concurrency=1)
    ids = [kmsg.send(to=f"0109000{i:04d}", text="[fault] stall").message_id for i in range(6)]
    wait_until(lambda: counts(kmsg, ids=ids).get("sending", 0) >= 1, 60, what="a message in flight")
    # Freeze the pool child mid-call (the parent stays alive and enforces the time limit)
    children = subprocess.run(["pgrep", "-P", str(stalled.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the worker should have a pool child"
    os.kill(int(children[0]), signal.SIGSTOP)
    stalled_at = time.monotonic()
    cluster.start_worker("healthy", concurrency=2)
    cluster.start_beat()
    wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 120, interval=0.5, what="every message final")
    final = counts(kmsg, ids=ids)
    dup = duplicates(solapi, ids)
    figures(
        "stalled_worker",
        messages=len(ids),
        statuses=final,
        duplicated=len(dup),
        recover_s=round(time.monotonic() - stalled_at, 1),
    )
    assert final == {"sent": len(ids)}
    assert dup == {}


def test_graceful_shutdown_during_a_bulk(cluster: Cluster, solapi: FakeProviderServer) -> None:
    solapi.set_faults(latency_ms=100)
    kmsg = producer(cluster)
    receipt = kmsg.send_many(
        ({"to": f"0110{i:07d}"} for i in range(5000)), defaults={"text": "[fault] term"}, chunk_size=250
    )
    first = cluster.start_worker("first", concurrency=2, queues="kmsg.bulk")
    wait_until(lambda: counts(kmsg, batch_id=receipt.batch_id).get("sent", 0) >= 500, 120, what="500 sent")
    os.kill(first.pid, signal.SIGTERM)  # warm shutdown of the main process: in-flight chunks finish
    first.wait(60)
    after_stop = counts(kmsg, batch_id=receipt.batch_id)
    cluster.start_worker("second", concurrency=2)
    cluster.start_beat()
    wait_until(lambda: all_done(kmsg, 5000, batch_id=receipt.batch_id), 180, interval=1, what="every message final")
    final = counts(kmsg, batch_id=receipt.batch_id)
    dup = duplicates(solapi, receipt.message_ids)
    figures("sigterm_bulk", messages=5000, at_shutdown=after_stop, statuses=final, duplicated=len(dup))
    assert after_stop.get("sending", 0) == 0  # nothing left half-done by a graceful stop
    assert final == {"sent": 5000}
    assert dup == {}
