"""Tracking, AlimTalk fallback and scheduled sends with real worker and beat processes.

Real Celery workers and beats on Redis and PostgreSQL send over real HTTP to the fake Solapi and
IWINV servers running in this test process; the fakes' statuses progress over time
(:class:`~kmsg_worker.testing.fakeserver.DeliveryRule`) and their ledgers count what reached them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.repo import Store
from kmsg_worker.testing.fake_iwinv import not_kakao_user_rule
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeProviderServer, FakeRequest, FakeResponse
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]

FINAL = {"delivered", "failed", "cancelled", "unknown", "dead"}
ALIMTALK = "type='ALIMTALK', template_id='T_ORDER', variables={'name': '김민준'}"


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def fcluster(cluster: Cluster, fakes: dict[str, FakeProviderServer]) -> Cluster:
    """The cluster's processes send to the fake Solapi (SMS first) and IWINV over HTTP."""
    cluster.env.update(fake_env({k: v for k, v in fakes.items() if k in ("solapi", "iwinv")}))
    cluster.env["KMSG_PROVIDERS"] = "solapi,iwinv"
    return cluster


def produce(cluster: Cluster, body: str) -> Any:
    """Run producer code in its own process (with ``k = KMsg()``); it prints one JSON value last."""
    code = "import json\nfrom datetime import UTC, datetime, timedelta\nfrom kmsg_worker import KMsg\nk = KMsg()\n"
    result = cluster.run_python(code + body)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def store_for(cluster: Cluster) -> Store:
    return Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))


def rows(store: Store, ids: list[str]) -> dict[str, MessageRow]:
    found = {}
    for mid in ids:
        row = store.get(mid)
        assert row is not None, mid
        found[mid] = row
    return found


def all_final(store: Store, ids: list[str]) -> bool:
    return all(r.status in FINAL for r in rows(store, ids).values())


def start(cluster: Cluster, workers: int = 1, beats: int = 1) -> None:
    for i in range(workers):
        cluster.start_worker(f"w{i}", concurrency=2)
    for i in range(beats):
        cluster.start_beat(f"beat{i}")


def wait_for_worker(cluster: Cluster, store: Store) -> None:
    """Send one message and wait until it is sent: the worker is consuming."""
    probe = produce(cluster, "print(json.dumps(k.send(to='01049999999', text='probe').message_id))")
    wait_until(lambda: rows(store, [probe])[probe].status in {"sent", "delivered"}, 30, what="a worker up")


def count_polls(fake: FakeProviderServer) -> Counter[str]:
    """Count, per provider message id, the Solapi status-list requests that asked for it."""
    polls: Counter[str] = Counter()
    original = fake._list  # type: ignore[attr-defined]

    def counting(request: FakeRequest) -> FakeResponse:
        for key, values in request.query.items():
            if key in ("messageId", "messageIds") or key.startswith("messageIds["):
                polls.update(values)
        response: FakeResponse = original(request)
        return response

    fake._list = counting  # type: ignore[attr-defined]
    return polls


def test_delivered_failed_and_the_non_kakao_fallback_exactly_once(
    fcluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given statuses that progress at the fakes: delivered after 2 s, failed (3059) after 1 s, and
    # an AlimTalk recipient without KakaoTalk (IWINV's own re-send off, our fallback asked)
    solapi, iwinv = fakes["solapi"].ledger, fakes["iwinv"].ledger
    solapi.set_rule("01040000001", DeliveryRule("DELIVERED", "4000", "수신 완료", sent_after=0.5, final_after=2))
    solapi.set_rule("01040000002", DeliveryRule("FAILED", "3059", "변작된 발신번호.", final_after=1))
    iwinv.set_rule("01040000003", not_kakao_user_rule(after=1))
    ids = produce(
        fcluster,
        "ids = [k.send(to='01040000001', text='delivered').message_id,\n"
        "       k.send(to='01040000002', text='fails').message_id,\n"
        f"       k.send(to='01040000003', provider_id='iwinv', {ALIMTALK}, provider_options={{'reSend': 'N'}},\n"
        "              failover={'content': '주문이 출고되었습니다'}).message_id]\n"
        "print(json.dumps(ids))\n",
    )
    ok, bad, ata = ids
    child = f"{ata}:fallback"
    store = store_for(fcluster)
    # When a worker and beat run
    start(fcluster)
    wait_until(lambda: all_final(store, ids), 45, interval=0.3, what="parents final")
    wait_until(lambda: store.get(child) is not None and all_final(store, [child]), 30, interval=0.3, what="child")
    # Then each ended as its provider said, keeping the provider's code and text
    got = rows(store, [ok, bad, ata, child])
    assert (got[ok].status, got[ok].provider_status_code, got[ok].delivered_at is not None) == (
        "delivered",
        "4000",
        True,
    )
    assert (got[bad].status, got[bad].error_code, got[bad].provider_status_code) == (
        "failed",
        "DELIVERY_FAILED",
        "3059",
    )
    assert got[bad].failed_at is not None and got[bad].provider_status_message == "변작된 발신번호."
    assert (got[ata].status, got[ata].error_code, got[ata].fallback_state) == ("failed", "NOT_KAKAO_USER", "created")
    # and the AlimTalk's SMS fallback was created once, sent once and delivered
    assert (got[child].type, got[child].status, got[child].parent_id) == ("SMS", "delivered", ata)
    assert [c.id for c in store.children(ata)] == [child]
    assert solapi.per_reference[child] == 1 and solapi.per_recipient["01040000003"] == 1
    assert iwinv.per_recipient["01040000003"] == 1
    assert solapi.duplicates() == {}


def test_scheduled_sends_leave_on_time_and_cancelled_ones_never(
    fcluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given the maintenance sweep every 5 s: only the 1 s schedule dispatch can make them on time
    fcluster.env["KMSG_SWEEP_INTERVAL_SECONDS"] = "5"
    store = store_for(fcluster)
    start(fcluster)
    wait_for_worker(fcluster, store)
    # When messages are scheduled 3-6 s ahead through every producer API, and two are cancelled
    made = produce(
        fcluster,
        "from tasks import send_message\n"
        "now = datetime.now(UTC)\n"
        "at = lambda s: now + timedelta(seconds=s)\n"
        "ids = [k.schedule(to='01041000001', text='a', at=at(3)).message_id,\n"
        "       k.schedule(to='01041000002', text='b', at=at(4)).message_id,\n"
        "       send_message.delay(to='01041000003', text='c', scheduled_at=at(5).isoformat()).id,\n"
        "       send_message.apply_async(kwargs={'to': '01041000004', 'text': 'd'}, countdown=6).id]\n"
        "batch = k.send_many([{'to': '0104100001%d' % i} for i in range(3)],\n"
        "                    defaults={'text': 'e', 'scheduled_at': at(5)})\n"
        "cancel = [k.schedule(to='0104100002%d' % i, text='x', at=at(4)).message_id for i in range(2)]\n"
        "for mid in cancel:\n"
        "    k.cancel(mid)\n"
        "print(json.dumps({'ids': ids + batch.message_ids, 'cancelled': cancel}))\n",
    )
    ids, cancelled = made["ids"], made["cancelled"]
    assert {r.status for r in rows(store, ids).values()} == {"scheduled"}
    wait_until(lambda: all(r.sent_at is not None for r in rows(store, ids).values()), 40, what="all sent")
    # Then each left no earlier than its time and within 2.5 s of it (p99 is measured by the bench)
    lateness = {m: (r.sent_at - r.scheduled_at).total_seconds() for m, r in rows(store, ids).items()}  # type: ignore[operator]
    assert all(0 <= late < 2.5 for late in lateness.values()), lateness
    # and the cancelled ones never reached the provider
    time.sleep(1.5)
    assert {r.status for r in rows(store, cancelled).values()} == {"cancelled"}
    ledger = fakes["solapi"].ledger
    assert all(ledger.per_reference[m] == 0 for m in cancelled)
    assert all(ledger.per_reference[m] == 1 for m in ids)


def test_worker_and_beat_restarted_before_the_due_time_still_send_once(
    fcluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    store = store_for(fcluster)
    start(fcluster)
    wait_for_worker(fcluster, store)
    # Given one message due while everything is down and one due after the restart
    ids = produce(
        fcluster,
        "now = datetime.now(UTC)\n"
        "print(json.dumps([k.schedule(to='01042000001', text='a', at=now + timedelta(seconds=5)).message_id,\n"
        "                  k.schedule(to='01042000002', text='b', at=now + timedelta(seconds=14)).message_id]))\n",
    )
    # When the worker and beat stop (as in a deploy) and come back after the first one's time
    for proc in fcluster.procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in fcluster.procs:
        proc.wait(20)
    due = rows(store, ids)[ids[0]].scheduled_at
    assert due is not None
    time.sleep(max(0.0, (due - datetime.now(due.tzinfo)).total_seconds()) + 1)
    assert {r.status for r in rows(store, ids).values()} == {"scheduled"}  # nobody was there to send
    start(fcluster)
    # Then both are sent, each exactly once
    wait_until(lambda: all(r.sent_at is not None for r in rows(store, ids).values()), 40, what="both sent")
    got = rows(store, ids)
    ledger = fakes["solapi"].ledger
    assert [ledger.per_reference[m] for m in ids] == [1, 1]
    late = got[ids[1]].sent_at - got[ids[1]].scheduled_at  # type: ignore[operator]
    assert timedelta(0) <= late < timedelta(seconds=3)  # the second one was on time after the restart
    assert [len(store.attempts(m)) for m in ids] == [1, 1]


def test_two_beats_cause_no_duplicate_sends_polls_or_fallbacks(
    fcluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given two beats (every periodic task fires twice each second), two workers, and statuses
    # final at the first poll, so that any duplicate poll would show at the fake
    fcluster.env["KMSG_SWEEP_INTERVAL_SECONDS"] = "1"
    solapi, iwinv = fakes["solapi"], fakes["iwinv"]
    polls = count_polls(solapi)
    non_kakao = [f"0104300010{i}" for i in range(5)]
    for number in non_kakao:
        iwinv.ledger.set_rule(number, not_kakao_user_rule())
    start(fcluster, workers=2, beats=2)
    store = store_for(fcluster)
    wait_for_worker(fcluster, store)
    made = produce(
        fcluster,
        "now = datetime.now(UTC)\n"
        "now_ids = [k.send(to='010430000%02d' % i, text='now').message_id for i in range(20)]\n"
        "later = [k.schedule(to='010430001%02d' % i, text='later', at=now + timedelta(seconds=3)).message_id\n"
        "         for i in range(10)]\n"
        f"ata = [k.send(to=n, provider_id='iwinv', {ALIMTALK}, provider_options={{'reSend': 'N'}},\n"
        f"              failover={{'content': '안내'}}).message_id for n in {non_kakao!r}]\n"
        "print(json.dumps({'sms': now_ids + later, 'ata': ata}))\n",
    )
    sms, ata = made["sms"], made["ata"]
    children = [f"{m}:fallback" for m in ata]
    wait_until(lambda: all_final(store, sms + ata), 45, interval=0.3, what="everything final")
    wait_until(lambda: all(store.get(c) is not None for c in children), 20, what="children created")
    wait_until(lambda: all_final(store, children), 30, interval=0.3, what="children final")
    time.sleep(2)  # let both beats fire a few more times over the settled rows
    # Then every message reached a provider once and was polled once; every fallback exists once
    assert {r.status for r in rows(store, sms + children).values()} == {"delivered"}
    assert {r.error_code for r in rows(store, ata).values()} == {"NOT_KAKAO_USER"}
    assert solapi.ledger.duplicates() == {}
    assert all(solapi.ledger.per_reference[m] == 1 for m in sms + children)
    assert all(iwinv.ledger.per_recipient[n] == 1 for n in non_kakao)
    pmids = [r.provider_message_id for r in rows(store, sms + children).values()]
    assert all(pmid and polls[pmid] == 1 for pmid in pmids), {p: polls[p] for p in pmids if polls[p] != 1}
    assert all([c.id for c in store.children(m)] == [f"{m}:fallback"] for m in ata)
    for beat in ("beat0", "beat1"):  # and both beats really were firing all along
        log = (fcluster.var_dir / f"{beat}.log").read_text(errors="replace")
        assert log.count("(kmsg.poll_statuses)") >= 5 and log.count("(kmsg.sweep)") >= 5, log[-2000:]
