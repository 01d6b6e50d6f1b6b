"""Does a sweep cost what its due rows cost, whatever the size of the table?

Seeds a scratch PostgreSQL database with 1,000 due status checks and 1,000 due scheduled sends,
times the two claims the beat sweeps make (``Store.claim_due_checks``, the tracking sweep's
``FOR UPDATE SKIP LOCKED`` claim, and ``Store.claim_due_scheduled``, the schedule dispatch), then adds
1,000,000 rows that are not due (delivered, ``sent`` with a later check, scheduled for later) with
one ``INSERT ... SELECT generate_series`` and times them again. Prints the ``EXPLAIN (ANALYZE,
BUFFERS)`` plan of each claim, exactly as the store runs it, and both timings with their ratio.

    python -m bench.tracking_index [--non-due 1000000] [--due 1000] [--repeat 15]

Needs PostgreSQL on 127.0.0.1:5432 (``KMSG_BENCH_PG_ADMIN_URL``); the scratch database is dropped
at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, text

from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import Base
from kmsg_worker.storage.repo import Store

__all__ = ["explain", "main", "scratch_database", "seed"]

ADMIN_URL = os.environ.get("KMSG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
HOLD = timedelta(seconds=120)

# Every NOT NULL column, as one set-based INSERT: seconds for a million rows, not minutes.
# ``kind`` picks what a row is: 'due_check' | 'due_schedule' | 'mixed' (not due: 90 % delivered,
# 9 % sent with a check later, 1 % scheduled later).
_SEED = """
INSERT INTO kmsg_messages (
    id, tenant, type, recipient, status, priority, route, route_index, provider, provider_message_id,
    attempts, provider_attempts, deliveries, retry_task_published, outcome_unknown, check_count,
    native_fallback, content, created_at, updated_at, sent_at, next_check_at, scheduled_at, final_at
)
SELECT
    :prefix || g,
    'default', 'SMS', '010' || lpad((g % 100000000)::text, 8, '0'),
    CASE
        WHEN :kind = 'due_check' THEN 'sent'
        WHEN :kind = 'due_schedule' THEN 'scheduled'
        WHEN g % 100 < 90 THEN 'delivered'
        WHEN g % 100 < 99 THEN 'sent'
        ELSE 'scheduled'
    END,
    'bulk', '["mock"]'::jsonb, 0, 'mock', 'pm-' || g,
    1, 1, 1, false, false, 1, false, '{}'::jsonb,
    :now - interval '1 day', :now - interval '1 hour', :now - interval '1 hour',
    CASE
        WHEN :kind = 'due_check' THEN :now - (g % 600) * interval '1 second'
        WHEN :kind = 'mixed' THEN :now + (60 + g % 86400) * interval '1 second'
    END,
    CASE
        WHEN :kind = 'due_schedule' THEN :now - (g % 60) * interval '1 second'
        WHEN :kind = 'mixed' THEN :now + (60 + g % 864000) * interval '1 second'
    END,
    CASE WHEN :kind = 'mixed' AND g % 100 < 90 THEN :now - interval '30 minutes' END
FROM generate_series(1, :count) AS g
"""


@contextmanager
def scratch_database(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """Create an empty database with the schema; drop it afterwards. Yields its URL."""
    name = f"kmsg_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed(engine: Engine, *, kind: str, count: int, now: datetime, prefix: str) -> None:
    """Insert ``count`` rows of ``kind`` (see ``_SEED``) and refresh the planner's statistics."""
    with engine.begin() as conn:
        conn.execute(text(_SEED), {"kind": kind, "count": count, "now": now, "prefix": prefix})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE kmsg_messages"))


def explain(engine: Engine, call: Callable[[], Any], *, analyze: bool = True) -> str:
    """The PostgreSQL plan of the claim ``call`` makes, exactly as the store sends it.

    The call is stopped just before its ``UPDATE`` reaches the server (the statement is captured
    and the call's transaction rolls back); the ``EXPLAIN`` runs in a transaction that is rolled
    back too. Nothing changes.
    """
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "UPDATE KMSG_MESSAGES" in statement.upper():
            captured.append((statement, parameters))
            raise _Captured

    event.listen(engine, "before_cursor_execute", capture)
    try:
        call()
    except Exception:
        if not captured:
            raise
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    if not captured:
        raise AssertionError("the call made no UPDATE of kmsg_messages")
    statement, parameters = captured[0]
    options = "ANALYZE, BUFFERS, COSTS OFF, TIMING OFF" if analyze else "COSTS OFF"
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            lines = conn.exec_driver_sql(f"EXPLAIN ({options}) {statement}", parameters).scalars().all()
        finally:
            trans.rollback()
    return "\n".join(str(line) for line in lines)


class _Captured(Exception):
    """Stops a call once its statement is captured."""


def _time_claims(store: Store, now: datetime, repeat: int) -> dict[str, float]:
    """Median milliseconds of each claim; after every timed run the rows are put back as they were."""
    engine = store.engine
    checks: list[float] = []
    schedules: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = store.claim_due_checks(now=now, hold=HOLD, limit=1000)
        checks.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        due = store.claim_due_scheduled(now=now, limit=1000)
        schedules.append((time.perf_counter() - started) * 1000)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE kmsg_messages SET next_check_at = :due WHERE id = ANY(:ids)"),
                {"due": now - timedelta(seconds=30), "ids": [r.id for r in rows]},
            )
            conn.execute(
                text("UPDATE kmsg_messages SET status = 'scheduled', queued_at = NULL WHERE id = ANY(:ids)"),
                {"ids": [i for i, _ in due]},
            )
        if len(rows) != 1000 or len(due) != 1000:
            raise AssertionError(f"claimed {len(rows)} checks and {len(due)} schedules, expected 1000 each")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE kmsg_messages"))
    return {"check_ms": statistics.median(checks), "schedule_ms": statistics.median(schedules)}


def _plans(store: Store, now: datetime) -> dict[str, str]:
    return {
        "check": explain(store.engine, lambda: store.claim_due_checks(now=now, hold=HOLD, limit=1000)),
        "schedule": explain(store.engine, lambda: store.claim_due_scheduled(now=now, limit=1000)),
    }


def main() -> None:
    """Run the benchmark and print plans, timings and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--non-due", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    now = datetime.now(UTC)
    with scratch_database() as url:
        engine = make_engine(url)
        store = Store(engine)
        seed(engine, kind="due_check", count=args.due, now=now, prefix="due-check-")
        seed(engine, kind="due_schedule", count=args.due, now=now, prefix="due-schedule-")
        small = _time_claims(store, now, args.repeat)
        small_plans = _plans(store, now)
        started = time.perf_counter()
        seed(engine, kind="mixed", count=args.non_due, now=now, prefix="old-")
        seeded_s = time.perf_counter() - started
        big = _time_claims(store, now, args.repeat)
        big_plans = _plans(store, now)
        with engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM kmsg_messages")).scalar_one()
        engine.dispose()
    print(f"seeded {args.non_due:,} non-due rows in {seeded_s:.1f} s (table: {total:,} rows)")
    for name, label in (("check", "tracking claim (due status checks)"), ("schedule", "schedule claim (due sends)")):
        print(f"\n== {label}: plan with {args.due:,} due rows alone\n{small_plans[name]}")
        print(f"\n== {label}: plan with {args.due:,} due among {total:,} rows\n{big_plans[name]}")
    print()
    for key, label in (("check_ms", "tracking claim"), ("schedule_ms", "schedule claim")):
        ratio = big[key] / small[key]
        print(
            f"{label:15s} {args.due:,} due alone: {small[key]:7.2f} ms   with {args.non_due:,} non-due: "
            f"{big[key]:7.2f} ms   ratio {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
