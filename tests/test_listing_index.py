"""A tenant's newest-first listing (``GET /v1/messages``) is served by its partial index, never a sort of the table.

60,000 rows of the producer's own tenant and 20,000 of an API tenant, with real planner statistics:
the store's statement, exactly as sent (bound parameters, so as a prepared statement would be
planned too), must walk ``ix_kmsg_messages_tenant_created`` and stop at the page size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from bench.tracking_index import seed
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.tenants import TenantStore
from tests.conftest import truncate

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def engine(pg_url: str) -> Iterator[Engine]:
    truncate(pg_url)
    engine = make_engine(pg_url)
    seed(engine, kind="mixed", count=60_000, now=NOW, prefix="own-")
    seed(engine, kind="mixed", count=20_000, now=NOW, prefix="api-")
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE kmsg_messages SET tenant = 'shop-a', "
                "created_at = created_at + (substr(id, 5)::int) * interval '1 millisecond' WHERE id LIKE 'api-%'"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE kmsg_messages"))
    yield engine
    engine.dispose()
    truncate(pg_url)


def _plan_of_listing(engine: Engine, **kwargs: Any) -> tuple[list[Any], str]:
    store = TenantStore(engine)
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        rows = store.messages("shop-a", limit=50, **kwargs)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = sent
    with engine.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {statement}", parameters).scalars())
    return rows, plan


def test_the_first_page_and_the_next_walk_the_tenant_index(engine: Engine) -> None:
    first, plan = _plan_of_listing(engine)
    assert [row.id for row in first] == [f"api-{n}" for n in range(20_000, 19_950, -1)]
    assert re.search(r"Index (Only )?Scan( Backward)? using ix_kmsg_messages_tenant_created\b", plan), plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
    # the next page: the cursor (the last row's created_at and id) is a bound in the same index
    second, plan = _plan_of_listing(engine, before=(first[-1].created_at, first[-1].id))
    assert [row.id for row in second] == [f"api-{n}" for n in range(19_950, 19_900, -1)]
    assert re.search(r"Index (Only )?Scan( Backward)? using ix_kmsg_messages_tenant_created\b", plan), plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
