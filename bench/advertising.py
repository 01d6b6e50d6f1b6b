"""Advertising intake against a large opt-out list, measured in the same invocation.

A 100,000-row advertising batch (``KMsg.send_many``: composed (광고) text, each row's number
hashed and looked up) for a tenant whose suppression list holds 1,000,000 numbers (1 % of the
batch's numbers among them), against the same batch in a second scratch database whose
suppression table is empty (no list at all, so not even an index to descend), and the same rows
sent as informational there (no advertising rule at all). The three run ``--rounds`` times, in
turns whose order reverses every round; the best round of each is compared, and the ratio of
each round (measured under the same load) is printed too. Chunks are published to Redis (no
worker consumes: this is the intake, as in ``bench.api``).

    python -m bench.advertising [--rows 100000] [--list 1000000] [--rounds 3]

Target: the listed tenant's rate is at least 85 % of the rate without a list.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
import uuid
from typing import Any

import redis

from bench.run import scratch_database

REDIS = os.environ.get("KMSG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
SENDER = "0212345678"
TARGET = 0.85


def _rows(count: int) -> list[dict[str, Any]]:
    return [{"to": f"0101{i:07d}", "variables": {"name": f"고객{i}"}} for i in range(count)]


def _preload(db_url: str, settings: Any, tenant: str, size: int, batch_numbers: int) -> None:
    """``size`` keyed hashes for ``tenant`` by COPY (1 % of them the batch's own numbers)."""
    from kmsg_worker import adrules
    from kmsg_worker.storage.db import make_engine
    from kmsg_worker.storage.repo import Store

    engine = make_engine(db_url)
    hasher = adrules.hasher_for(settings, Store(engine))
    overlap = [f"0101{i:07d}" for i in range(0, batch_numbers, 100)]
    others = [f"0109{i:07d}" for i in range(size - len(overlap))]
    started = time.perf_counter()
    buffer = io.StringIO()
    for digest in hasher.digests(overlap + others):
        buffer.write(f"\\\\x{digest.hex()}\t{tenant}\timport\t\\N\t2026-12-07T00:00:00+00:00\n")
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(
            "COPY kmsg_suppressions (digest, tenant, source, provider_code, created_at) FROM STDIN"
        ) as copy:
            copy.write(buffer.getvalue())
        conn.exec_driver_sql("ANALYZE kmsg_suppressions")
    engine.dispose()
    print(f"  list of {size:,} hashes loaded in {time.perf_counter() - started:.1f} s ({len(overlap):,} in the batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--list", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from kmsg_worker import KMsg
    from kmsg_worker.logging import configure_logging
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.advertising import set_advertiser

    prefix = f"kmsg-bench-ads-{uuid.uuid4().hex[:8]}:"
    with scratch_database() as db_url, scratch_database() as empty_url:
        env = {
            "KMSG_DATABASE_URL": db_url,
            "KMSG_BROKER_URL": REDIS,
            "KMSG_BROKER_KEY_PREFIX": prefix,
            "KMSG_VAR_DIR": f"/tmp/kmsg-bench-ads-{os.getpid()}",
            "KMSG_SUPPRESSION_KEY": "bench-key-" + uuid.uuid4().hex,
            "KMSG_PROVIDERS": "mock",
            "KMSG_LOG_LEVEL": "WARNING",
        }
        os.environ.update(env)  # the Celery app the producer publishes through reads them
        settings = Settings.from_env(env)
        empty_settings = Settings.from_env({**env, "KMSG_DATABASE_URL": empty_url})
        configure_logging("WARNING")
        try:
            with KMsg(settings) as kmsg, KMsg(empty_settings) as empty:
                for producer in (kmsg, empty):
                    set_advertiser(
                        producer.runtime.store,
                        "shop",
                        SENDER,
                        name="가나다마트",
                        opt_out="080-123-4567",
                        contact=None,
                        now=producer.runtime.now(),
                    )
                    producer.send_many(_rows(1000), defaults={"text": "warm-up", "sender": SENDER})
                _preload(db_url, settings, "shop", args.list, args.rows)
                text = "#{name}님, 겨울 세일 쿠폰이 도착했습니다"
                advertising = {"purpose": "advertising", "tenant": "shop"}
                cases: dict[str, tuple[Any, dict[str, Any]]] = {
                    f"advertising, {args.list:,}-number list": (kmsg, advertising),
                    "advertising, no list": (empty, advertising),
                    "informational (no rule)": (empty, {"tenant": "shop"}),
                }
                best: dict[str, float] = {}
                suppressed: dict[str, int] = {}
                paired: list[float] = []
                for round_no in range(1, args.rounds + 1):
                    this_round: dict[str, float] = {}
                    order = list(cases.items())
                    for name, (producer, extra) in order if round_no % 2 else reversed(order):
                        rows = _rows(args.rows)  # built before the clock starts
                        defaults = {"text": text, "sender": SENDER, **extra}
                        started = time.perf_counter()
                        receipt = producer.send_many(rows, defaults=defaults, on_invalid="skip")
                        rate = args.rows / (time.perf_counter() - started)
                        assert len(receipt.message_ids) == args.rows
                        suppressed[name] = producer.batch_summary(receipt.batch_id).suppressed
                        best[name] = max(best.get(name, 0.0), rate)
                        print(f"  round {round_no}: {name:<38} {rate:9.0f} rows/s")
                        this_round[name] = rate
                    names = list(cases)
                    paired.append(this_round[names[0]] / this_round[names[1]])
        finally:
            client = redis.Redis.from_url(REDIS)
            stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if stale:
                client.delete(*stale)
    listed, empty, plain = (best[name] for name in cases)
    ratio = listed / empty
    print(f"advertising intake, {args.rows:,} rows, best of {args.rounds} rounds (PostgreSQL, Redis broker)")
    for name, rate in best.items():
        print(f"  {name:<38} {rate:9.0f} rows/s  suppressed {suppressed[name]:,}")
    print(f"  listed / empty list: {ratio:.1%} (target >= {TARGET:.0%}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    rounds = ", ".join(f"{r:.0%}" for r in paired)
    print(f"  the same ratio round by round: {rounds}; median {statistics.median(paired):.0%}")
    print(f"  listed / informational: {listed / plain:.1%} (the whole advertising rule set's cost)")


if __name__ == "__main__":
    main()
