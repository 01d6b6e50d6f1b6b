"""Real Celery workers against the fake providers over real HTTP: a provider outage is routed
around by its circuit breaker (and rejoined after a half-open probe), and two workers together
keep a provider's global rate limit, measured at the fake server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from kmsg_worker.circuit import CLOSED, OPEN, CircuitPolicy, RedisCircuitBreaker
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import ROOT, Cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SENT = {"sent", "delivered"}


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    yield servers
    for server in servers.values():
        server.stop()


def _producer(count: int, first: int, text: str) -> str:
    return (
        "import json\n"
        "from kmsg_worker import KMsg\n"
        "k = KMsg()\n"
        f"ids = [k.send(to='0109%07d' % i, text={text!r}).message_id for i in range({first}, {first + count})]\n"
        "print(json.dumps(ids))\n"
    )


def send_many(cluster: Cluster, count: int, first: int, text: str) -> list[str]:
    """Send ``count`` SMS to distinct numbers from a separate producer process."""
    result = cluster.run_python(_producer(count, first, text))
    assert result.returncode == 0, result.stderr
    ids: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return ids


def start_sending(cluster: Cluster, count: int, first: int, text: str) -> subprocess.Popen[str]:
    """Like :func:`send_many`, without waiting (the test watches the fakes meanwhile)."""
    return subprocess.Popen(
        [sys.executable, "-c", _producer(count, first, text)],
        env=cluster.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ids_of(producer: subprocess.Popen[str]) -> list[str]:
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 0, err
    ids: list[str] = json.loads(out.strip().splitlines()[-1])
    return ids


def rows(store: Store, ids: list[str]) -> dict[str, Any]:
    return {mid: store.get(mid) for mid in ids}


def all_sent(store: Store, ids: list[str]) -> bool:
    return all(r is not None and r.status in SENT for r in rows(store, ids).values())


def breaker(cluster: Cluster) -> RedisCircuitBreaker:
    """The workers' circuits, read from the test process as ``kmsg circuits`` reads them."""
    import redis

    policy = CircuitPolicy.from_env(cluster.env)
    prefix = cluster.env.get("KMSG_BROKER_KEY_PREFIX", "") + "kmsg:cb:"
    return RedisCircuitBreaker(redis.Redis.from_url(cluster.env["KMSG_BROKER_URL"]), policy, prefix=prefix)


def test_an_outage_is_routed_around_by_the_circuit_and_the_provider_rejoins_after_a_probe(
    cluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given IWINV (first in every SMS route) answering 503 to everything, Solapi healthy,
    # and two worker processes sharing the circuit through Redis
    a, b = fakes["iwinv"], fakes["solapi"]
    a.set_faults(error_rate=1.0, error_status=503)
    cluster.env.update(fake_env(fakes))
    cooldown = 3.0
    cluster.env.update(
        {
            "KMSG_PROVIDERS": "iwinv,solapi",
            "KMSG_CIRCUIT_CONSECUTIVE_FAILURES": "3",
            "KMSG_CIRCUIT_MIN_REQUESTS": "6",
            "KMSG_CIRCUIT_COOLDOWN_SECONDS": str(cooldown),
        }
    )
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    cluster.start_beat()
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))
    circuits = breaker(cluster)
    assert circuits.policy.cooldown == cooldown
    # When 40 messages are sent
    producer = start_sending(cluster, 40, 0, "outage")
    wait_until(lambda: a.ledger.requests > 0, 60, interval=0.01, what="the first call to iwinv")
    first_call = time.monotonic()
    wait_until(lambda: circuits.snapshot("iwinv").state == OPEN, 60, interval=0.01, what="iwinv's circuit to open")
    opened_after = time.monotonic() - first_call
    calls_until_open = a.ledger.requests
    ids = ids_of(producer)
    wait_until(lambda: all_sent(store, ids), 90, interval=0.3, what="every message sent")
    # Then every one went out through Solapi, exactly once, and IWINV accepted none
    found = rows(store, ids)
    assert {r.provider for r in found.values()} == {"solapi"}
    assert all(b.ledger.per_reference[mid] == 1 for mid in ids), b.ledger.duplicates()
    assert len(a.ledger.entries) == 0
    # IWINV was called only until its circuit opened (plus calls already in flight), not per message
    calls_phase_one = a.ledger.requests
    assert 3 <= calls_phase_one < len(ids)
    hops = Counter(x.outcome for mid in ids for x in store.attempts(mid))
    assert hops["circuit_open"] >= 1 and hops["accepted"] == len(ids)
    assert circuits.snapshot("iwinv").state == OPEN or circuits.snapshot("iwinv").state == "half_open"

    # When IWINV recovers and its cool-down passes
    a.set_faults()
    recovered = time.monotonic()
    remaining = circuits.snapshot("iwinv").retry_in
    wait_until(lambda: circuits.snapshot("iwinv").retry_in == 0, cooldown + 5, interval=0.05, what="cool-down")
    later = send_many(cluster, 10, 100, "recovered")
    # Then a probe goes to IWINV, succeeds, and the circuit closes; later messages use IWINV again
    wait_until(lambda: circuits.snapshot("iwinv").state == CLOSED, 60, interval=0.05, what="iwinv's circuit to close")
    closed_after = time.monotonic() - recovered
    wait_until(lambda: all_sent(store, later), 60, interval=0.3, what="the later messages sent")
    by = Counter(r.provider for r in rows(store, later).values())
    assert by["iwinv"] >= 1, by
    # Nothing reached any provider twice
    per_number = Counter(a.ledger.per_recipient) + Counter(b.ledger.per_recipient)
    assert len(per_number) == len(ids) + len(later) and set(per_number.values()) == {1}
    print(
        f"\ncircuit: opened {opened_after:.3f}s after the first call to the failing provider "
        f"({calls_until_open} calls by then, {calls_phase_one} in all for the {len(ids)} messages); "
        f"closed {closed_after:.2f}s after recovery ({remaining:.2f}s of cool-down left then, plus one probe); "
        f"later messages by provider: {dict(by)}"
    )


def test_two_workers_together_keep_the_global_rate_at_the_provider(
    cluster: Cluster, fakes: dict[str, FakeProviderServer]
) -> None:
    rate, count = 20, 280
    cluster.env.update(fake_env(fakes))
    cluster.env.update({"KMSG_PROVIDERS": "solapi", "KMSG_RATE_LIMITS": json.dumps({"solapi": rate})})
    solapi = fakes["solapi"]
    # Given 280 queued SMS (14 s of capacity) and two worker processes of two children each
    ids = send_many(cluster, count, 0, "rate")
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))
    wait_until(lambda: len(solapi.ledger.entries) >= count, 60, interval=0.2, what="every message at the fake")
    wait_until(lambda: all_sent(store, ids), 30, interval=0.3, what="every message recorded as sent")
    stamps = sorted(e.accepted_at for e in list(solapi.ledger.entries.values()))
    assert all(solapi.ledger.per_reference[mid] == 1 for mid in ids), solapi.ledger.duplicates()
    # Then, measured at the provider: after the first second (a full bucket holds one second of
    # capacity, by design) a 10 s window carries the configured rate within 10 %
    start = stamps[0] + 1.0
    steady = sum(start <= t < start + 10 for t in stamps) / 10
    # and no 10 s window anywhere carries more than the token bucket allows: its one-second
    # ceiling plus ten seconds of rate (a few messages of slack for network jitter)
    busiest = max(sum(t0 <= t < t0 + 10 for t in stamps) for t0 in stamps)
    total_span = stamps[-1] - stamps[0]
    print(
        f"\nrate limit {rate}/s, 2 workers x 2: steady 10 s window {steady:.2f}/s "
        f"({(steady - rate) / rate:+.1%}); busiest 10 s window {busiest} messages "
        f"(bound {rate * 11}); {count} messages in {total_span:.2f}s"
    )
    assert abs(steady - rate) <= 0.1 * rate
    assert busiest <= rate * 11 + 3
