"""Read-side queries of the system of record: what reports, gauges and ``kmsg doctor`` ask the database.

Each function answers one question and is named for it; the callers (:mod:`kmsg_worker.report`, the
backlog gauges of :mod:`kmsg_worker.observability`, :mod:`kmsg_worker.heartbeat`,
:mod:`kmsg_worker.doctor`) hold no SQL. Functions that take a ``Connection`` let a caller answer
several questions on one connection (a report, a scrape); the others open their own.

The backlog counts are bounded: each one is answered from a partial index on its status (there is
no index on ``status`` alone, so ``status IN (...) GROUP BY status`` would read the whole table).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Executable, and_, case, func, inspect, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from kmsg_worker.storage.models import Attempt, Heartbeat, MessageRow

__all__ = [
    "TEST_PROVIDER",
    "DatabaseProbe",
    "HeartbeatRow",
    "attempt_error_counts",
    "delivery_seconds",
    "failover_attempts",
    "fallback_child_statuses",
    "final_error_counts",
    "heartbeat_rows",
    "probe_database",
    "queued_by_priority",
    "retries_due",
    "scheduled_overdue",
    "schema_revision",
    "status_counts",
    "table_names",
    "tracking_due",
    "upsert_heartbeat",
    "waiting_state_counts",
]

M = MessageRow


# -- the delivery report: messages created in [since, until) ---------------------------------------


def _created_in(since: datetime, until: datetime) -> ColumnElement[bool]:
    return and_(M.created_at >= since, M.created_at < until)


#: The provider label of test-key (sandbox) messages in reports: they reached only the simulator.
TEST_PROVIDER = "test keys (simulator)"


def _report_provider(no_provider: str) -> ColumnElement[Any]:
    """The provider a report groups a message under: test-key messages apart from live ones."""
    # The sandbox marker the API pins on a test key's message (kmsg_worker.sandbox), read in SQL.
    sandboxed = M.content[("provider_options", "mock", "sandbox")].as_boolean().is_(True)
    return case((sandboxed, literal(TEST_PROVIDER)), else_=func.coalesce(M.provider, no_provider))


def status_counts(
    conn: Connection, since: datetime, until: datetime, *, no_provider: str
) -> list[tuple[str, str, str, int]]:
    """How many messages of the window are in each status, per provider and type.

    Returns:
        ``(provider, type, status, count)`` rows; a message never handed to a provider counts under
        ``no_provider``, a test key's message under :data:`TEST_PROVIDER`.
    """
    provider = _report_provider(no_provider)
    stmt = select(provider, M.type, M.status, func.count()).where(_created_in(since, until))
    return [(str(p), str(t), str(s), int(n)) for p, t, s, n in conn.execute(stmt.group_by(provider, M.type, M.status))]


def _seconds_to_delivered(conn: Connection) -> ColumnElement[Any]:
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", M.delivered_at - M.created_at)
    # SQLite keeps UTC timestamps as ISO text; julianday() parses them (millisecond precision).
    return (func.julianday(M.delivered_at) - func.julianday(M.created_at)) * 86400.0


def delivery_seconds(
    conn: Connection, since: datetime, until: datetime, *, no_provider: str
) -> list[tuple[str, str, float]]:
    """Seconds from acceptance to the delivery report of each delivered message of the window.

    Returns:
        ``(provider, type, seconds)`` rows, as the clocks recorded them (a provider clock behind
        ours can make one negative).
    """
    provider = _report_provider(no_provider)
    stmt = select(provider, M.type, _seconds_to_delivered(conn)).where(
        _created_in(since, until), M.status == "delivered", M.delivered_at.is_not(None)
    )
    return [(str(p), str(t), float(v)) for p, t, v in conn.execute(stmt)]


def failover_attempts(conn: Connection, since: datetime, until: datetime) -> Iterator[tuple[str, str]]:
    """The attempts of the window's messages that tried more than one provider, in order.

    Yields:
        ``(message_id, provider)`` per attempt, ordered by message and attempt number.
    """
    multi = (
        select(Attempt.message_id)
        .join(M, M.id == Attempt.message_id)
        .where(_created_in(since, until))
        .group_by(Attempt.message_id)
        .having(func.count(func.distinct(Attempt.provider)) > 1)
    )
    stmt = (
        select(Attempt.message_id, Attempt.provider)
        .where(Attempt.message_id.in_(multi.scalar_subquery()))
        .order_by(Attempt.message_id, Attempt.attempt_no)
    )
    for message_id, provider in conn.execute(stmt):
        yield str(message_id), str(provider)


def fallback_child_statuses(conn: Connection, since: datetime, until: datetime) -> dict[str, int]:
    """How many fallback children (SMS after a failed AlimTalk) of the window's messages are in each status."""
    parent, child = aliased(MessageRow), aliased(MessageRow)
    stmt = (
        select(child.status, func.count())
        .select_from(child)
        .join(parent, parent.id == child.parent_id)
        .where(parent.created_at >= since, parent.created_at < until)
        .group_by(child.status)
    )
    return {str(status): int(n) for status, n in conn.execute(stmt)}


def final_error_counts(conn: Connection, since: datetime, until: datetime) -> dict[str, int]:
    """The error codes the window's messages ended with (``failed``, ``unknown``, ``dead``), counted."""
    stmt = (
        select(M.error_code, func.count())
        .where(_created_in(since, until), M.status.in_(("failed", "unknown", "dead")), M.error_code.is_not(None))
        .group_by(M.error_code)
    )
    return {str(code): int(n) for code, n in conn.execute(stmt)}


def attempt_error_counts(conn: Connection, since: datetime, until: datetime) -> dict[tuple[str, str], int]:
    """The error codes of every failed attempt of the window's messages, per provider, counted."""
    stmt = (
        select(Attempt.provider, Attempt.error_code, func.count())
        .join(M, M.id == Attempt.message_id)
        .where(_created_in(since, until), Attempt.error_code.is_not(None))
        .group_by(Attempt.provider, Attempt.error_code)
    )
    return {(str(p), str(code)): int(n) for p, code, n in conn.execute(stmt)}


# -- backlogs (scrape-time gauges, ``kmsg doctor``) --------------------------------------------------


def waiting_state_counts(conn: Connection, states: Iterable[str]) -> dict[str, int]:
    """How many messages are in each of ``states`` (one indexed count per state)."""
    return {status: int(conn.execute(select(func.count()).where(M.status == status)).scalar_one()) for status in states}


def queued_by_priority(conn: Connection) -> list[tuple[str, datetime | None, int]]:
    """``queued`` messages per priority: ``(priority, oldest queued_at, count)``."""
    stmt = select(M.priority, func.min(M.queued_at), func.count()).where(M.status == "queued").group_by(M.priority)
    return [(str(priority), first, int(count)) for priority, first, count in conn.execute(stmt)]


def tracking_due(conn: Connection, now: datetime) -> tuple[int, datetime | None]:
    """``sent`` messages whose status check is due: ``(count, earliest due time)``."""
    stmt = select(func.count(), func.min(M.next_check_at)).where(M.status == "sent", M.next_check_at <= now)
    count, first = conn.execute(stmt).one()
    return int(count), first


def scheduled_overdue(conn: Connection, now: datetime) -> tuple[int, datetime | None]:
    """``scheduled`` messages whose time has passed: ``(count, earliest scheduled time)``."""
    stmt = select(func.count(), func.min(M.scheduled_at)).where(M.status == "scheduled", M.scheduled_at <= now)
    count, first = conn.execute(stmt).one()
    return int(count), first


def retries_due(conn: Connection, now: datetime) -> int:
    """``retrying`` messages whose next attempt is due."""
    stmt = select(func.count()).where(M.status == "retrying", M.next_attempt_at <= now)
    return int(conn.execute(stmt).scalar_one())


# -- heartbeats of the periodic jobs ----------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatRow:
    """One row of ``kmsg_heartbeats``."""

    name: str
    beat_at: datetime
    host: str | None
    pid: int | None


def upsert_heartbeat(engine: Engine, name: str, beat_at: datetime) -> None:
    """Overwrite the heartbeat row ``name`` with ``beat_at``, this host and this process (one upsert)."""
    values = {"name": name, "beat_at": beat_at, "host": socket.gethostname()[:255], "pid": os.getpid()}
    update = {"beat_at": beat_at, "host": values["host"], "pid": values["pid"]}
    stmt: Executable
    if engine.dialect.name == "postgresql":
        pg = postgresql.insert(Heartbeat).values(**values)
        stmt = pg.on_conflict_do_update(index_elements=[Heartbeat.name], set_=update)
    else:
        lite = sqlite.insert(Heartbeat).values(**values)
        stmt = lite.on_conflict_do_update(index_elements=[Heartbeat.name], set_=update)
    with engine.begin() as conn:
        conn.execute(stmt)


def heartbeat_rows(engine: Engine) -> list[HeartbeatRow]:
    """Every recorded heartbeat (empty when no periodic job ever ran)."""
    with engine.connect() as conn:
        rows = conn.execute(select(Heartbeat.name, Heartbeat.beat_at, Heartbeat.host, Heartbeat.pid)).all()
    return [HeartbeatRow(r.name, r.beat_at, r.host, r.pid) for r in rows]


# -- the database itself (``kmsg doctor``) -----------------------------------------------------------


@dataclass(frozen=True)
class DatabaseProbe:
    """What one round trip to the database told.

    Attributes:
        product: ``PostgreSQL 16.4`` or ``SQLite``.
        server_now: The server's clock (PostgreSQL), ``None`` for SQLite.
        local_now: This host's clock, read right after the server's.
    """

    product: str
    server_now: datetime | None
    local_now: datetime


def probe_database(engine: Engine, *, statement_timeout_ms: int = 5000) -> DatabaseProbe:
    """Connect, and read the server's clock and version (PostgreSQL) or run ``SELECT 1`` (SQLite).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: The database is unreachable or refused.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"SET statement_timeout = {int(statement_timeout_ms)}"))
            server_now = conn.execute(text("SELECT now()")).scalar_one()
            local_now = datetime.now(UTC)
            version = conn.execute(text("SHOW server_version")).scalar_one()
            return DatabaseProbe(f"PostgreSQL {str(version).split()[0]}", server_now, local_now)
        conn.execute(text("SELECT 1"))
        return DatabaseProbe("SQLite", None, datetime.now(UTC))


def table_names(engine: Engine) -> set[str]:
    """The tables present in the database."""
    return set(inspect(engine).get_table_names())


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (``None``: never migrated)."""
    # Imported here, a real cost: Alembic's runtime adds ~100 ms to an import of this module
    # (``python -X importtime``, SQLAlchemy already loaded) and only ``kmsg doctor`` asks this; the
    # metrics server and ``kmsg report`` import this module too.
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
