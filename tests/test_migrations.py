"""The Alembic migrations on a real PostgreSQL: they build exactly the models' schema and keep data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.migrate import alembic_config, upgrade
from kmsg_worker.storage.models import Base
from tests.conftest import scratch_pg_database


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """A database with no tables at all (the session database is built by ``create_all``)."""
    with scratch_pg_database("kmsg_migrate") as url:
        yield url


def test_migrations_at_head_build_the_models_schema(empty_pg: str) -> None:
    upgrade(empty_pg)
    engine = make_engine(empty_pg)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            drift = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert drift == []


def test_attempts_keep_their_rows_when_the_surrogate_id_goes(empty_pg: str) -> None:
    from alembic import command

    upgrade(empty_pg, "0006")
    engine = make_engine(empty_pg)
    now = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    insert = text(
        "INSERT INTO kmsg_attempts (message_id, attempt_no, provider, outcome, created_at)"
        " VALUES (:m, :n, 'mock', 'accepted', :now)"
    )
    try:
        with engine.begin() as conn:
            for message, attempt in (("m1", 1), ("m1", 2), ("m2", 1)):
                conn.execute(insert, {"m": message, "n": attempt, "now": now})
        upgrade(empty_pg, "0007")
        with engine.begin() as conn:
            kept = conn.execute(text("SELECT message_id, attempt_no FROM kmsg_attempts ORDER BY 1, 2")).all()
            key = conn.execute(
                text(
                    "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i"
                    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                    " WHERE i.indrelid = 'kmsg_attempts'::regclass AND i.indisprimary"
                )
            ).scalar_one()
        assert [tuple(r) for r in kept] == [("m1", 1), ("m1", 2), ("m2", 1)]
        assert key == ["message_id", "attempt_no"]
        # the key still refuses a second row for the same attempt (a redelivered send records nothing twice)
        with pytest.raises(IntegrityError, match="kmsg_attempts_pkey"), engine.begin() as conn:
            conn.execute(insert, {"m": "m1", "n": 2, "now": now})
        # and the way back restores the surrogate id
        command.downgrade(alembic_config(empty_pg), "0006")
        with engine.begin() as conn:
            ids = conn.execute(text("SELECT count(DISTINCT id) FROM kmsg_attempts")).scalar_one()
        assert ids == 3
    finally:
        engine.dispose()


def test_message_content_moves_to_json_and_back_unchanged(empty_pg: str) -> None:
    from alembic import command

    upgrade(empty_pg, "0007")
    engine = make_engine(empty_pg)
    now = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    content = '{"id": "m1", "to": "01012345678", "type": "SMS", "text": "주문 A-1025 출고", "variables": {"n": "1"}}'
    column_type = text(
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_name = 'kmsg_messages' AND column_name = 'content'"
    )
    read = text("SELECT content FROM kmsg_messages WHERE id = 'm1'")
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO kmsg_messages (id, tenant, type, recipient, status, priority, route, route_index,"
                    " attempts, provider_attempts, deliveries, retry_task_published, outcome_unknown, check_count,"
                    " native_fallback, content, created_at, updated_at) VALUES ('m1', 'default', 'SMS',"
                    " '01012345678', 'queued', 'normal', '[\"mock\"]', 0, 0, 0, 0, false, false, 0, false,"
                    " CAST(:content AS jsonb), :now, :now)"
                ),
                {"content": content, "now": now},
            )
            before = conn.execute(read).scalar_one()
        upgrade(empty_pg, "0008")
        with engine.begin() as conn:
            assert conn.execute(column_type).scalar_one() == "json"
            assert conn.execute(read).scalar_one() == before
        command.downgrade(alembic_config(empty_pg), "0007")
        with engine.begin() as conn:
            assert conn.execute(column_type).scalar_one() == "jsonb"
            assert conn.execute(read).scalar_one() == before
    finally:
        engine.dispose()
