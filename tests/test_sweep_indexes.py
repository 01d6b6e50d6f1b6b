"""The sweeps' claims are served by their partial indexes, so their cost follows the due rows.

A smaller table than the benchmark's million rows (``python -m bench.tracking_index``), but with the
same mix and real planner statistics (``VACUUM ANALYZE``): PostgreSQL must choose the partial index
of each claim, never a scan of the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from bench.tracking_index import explain, seed
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from tests.conftest import truncate

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
#: claim -> (the index it must use, the call). Retries and leases have no due rows here: the planner
#: may serve them with the status index instead of their partial one, equally without a table scan.
CLAIMS: dict[str, tuple[str, Callable[[Store], Any]]] = {
    "status checks": (
        "ix_kmsg_messages_due_check",
        lambda s: s.claim_due_checks(now=NOW, hold=timedelta(seconds=120), limit=1000),
    ),
    "scheduled sends": ("ix_kmsg_messages_due_schedule", lambda s: s.claim_due_scheduled(now=NOW, limit=1000)),
    "retries": (
        "ix_kmsg_messages_due_retry",
        lambda s: s.claim_due_retries(now=NOW, grace=timedelta(seconds=60), limit=1000),
    ),
    "expired leases": (
        "ix_kmsg_messages_lease",
        lambda s: s.claim_expired_leases(now=NOW, extend=timedelta(seconds=120), limit=1000),
    ),
}


@pytest.fixture(scope="module")
def seeded(pg_url: str) -> Iterator[Store]:
    truncate(pg_url)
    engine = make_engine(pg_url)
    seed(engine, kind="mixed", count=60_000, now=NOW, prefix="old-")
    seed(engine, kind="due_check", count=300, now=NOW, prefix="due-check-")
    seed(engine, kind="due_schedule", count=300, now=NOW, prefix="due-schedule-")
    yield Store(engine)
    engine.dispose()
    truncate(pg_url)


@pytest.mark.parametrize("claim", sorted(CLAIMS))
def test_each_claim_uses_its_partial_index(seeded: Store, claim: str) -> None:
    index, call = CLAIMS[claim]
    plan = explain(seeded.engine, lambda: call(seeded), analyze=False)
    allowed = (index,) if claim in ("status checks", "scheduled sends") else (index, "ix_kmsg_messages_status")
    assert any(re.search(rf"(Index Scan using|Bitmap Index Scan on) {name}\b", plan) for name in allowed), plan
    assert "Seq Scan" not in plan, plan
    assert "LockRows" in plan, plan  # FOR UPDATE SKIP LOCKED: two sweeps never take the same row


def test_a_look_up_by_provider_id_uses_its_index(seeded: Store) -> None:
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(seeded.engine, "before_cursor_execute", capture)
    try:
        found = seeded.find_by_provider_id("pm-4242", ["mock", "solapi", "iwinv"])
    finally:
        event.remove(seeded.engine, "before_cursor_execute", capture)
    assert [row.id for row in found] == ["old-4242"]
    # the statement the store sent, planned on 60,600 rows with fresh statistics
    [(statement, parameters)] = sent
    with seeded.engine.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {statement}", parameters).scalars())
    assert re.search(r"(Index Scan using|Bitmap Index Scan on) ix_kmsg_messages_provider_pmid\b", plan), plan
    assert "Seq Scan" not in plan, plan
    # a probe per provider (the index leads with it), not a walk of the whole index for the id
    assert re.search(r"Index Cond: \(+provider\)::text = ANY", plan), plan


def test_explaining_a_claim_changes_nothing(seeded: Store) -> None:
    explain(seeded.engine, lambda: CLAIMS["status checks"][1](seeded))
    explain(seeded.engine, lambda: CLAIMS["scheduled sends"][1](seeded))
    with seeded.engine.connect() as conn:
        due_checks = conn.execute(
            text("SELECT count(*) FROM kmsg_messages WHERE status = 'sent' AND next_check_at <= :now"), {"now": NOW}
        ).scalar_one()
        due_sends = conn.execute(
            text("SELECT count(*) FROM kmsg_messages WHERE status = 'scheduled' AND scheduled_at <= :now"), {"now": NOW}
        ).scalar_one()
    assert (due_checks, due_sends) == (300, 300)
    # and the claims themselves take exactly the due rows
    claimed = seeded.claim_due_checks(now=NOW, hold=timedelta(seconds=120), limit=1000)
    assert len(claimed) == 300 and all(r.id.startswith("due-check-") for r in claimed)
    assert len(seeded.claim_due_scheduled(now=NOW, limit=1000)) == 300
