"""Engine creation: one engine per process, tuned per backend.

SQLite (the embedded default) runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so
a producer, workers and beat in separate processes can share one file (WAL lets readers run beside
the one writer, and NORMAL syncs at checkpoints rather than at every commit:
https://www.sqlite.org/wal.html). PostgreSQL uses psycopg 3 with a small pool
(connections that sat idle are pinged at checkout).
After a fork, the child must not reuse the parent's connections: :func:`dispose_after_fork`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmsg_worker.errors import ConfigurationError, StorageUnavailableError
from kmsg_worker.logging import get_logger
from kmsg_worker.settings import mask_url
from kmsg_worker.storage.models import Base

__all__ = [
    "backend_pid",
    "create_schema",
    "dispose_after_fork",
    "json_dumps",
    "make_engine",
    "make_sessionmaker",
    "settle_lost_commit",
    "storage_errors",
]

log = get_logger("kmsg.storage")


def json_dumps(value: Any) -> str:
    """JSON text for the database (orjson: several times faster than json, which matters at bulk volume)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create the process's engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``).

    Raises:
        ConfigurationError: ``url`` is not a database URL; the error shows it with the password masked.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        # Neither the error nor its cause may carry the URL: it holds the database password.
        raise ConfigurationError(
            f"KMSG_DATABASE_URL={mask_url(url)!r} is not a database URL ({type(exc).__name__})",
            variable="KMSG_DATABASE_URL",
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            # Errors must not echo rows: their parameters hold phone numbers and message text.
            hide_parameters=True,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_pre_ping=False,
            json_serializer=json_dumps,
            json_deserializer=orjson.loads,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # Plain postgresql:// would pick psycopg2; this project ships psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(
        parsed,
        echo=echo,
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        # Pinged at checkout by _ping_when_idle instead: only connections that sat idle.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
    )
    _ping_when_idle(engine)
    return engine


#: A pooled connection checked in less than this long ago is handed out without a ping.
PING_AFTER_IDLE_SECONDS = 0.5


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only if it sat idle for :data:`PING_AFTER_IDLE_SECONDS`.

    A ping on every checkout (``pool_pre_ping``) is a round trip on every single send's critical
    path, twice (the producer's INSERT and the worker's claim): ~0.3 ms each on an idle machine,
    more under load. A connection checked in half a second ago was working then; one that sat
    longer (a database restart happens in that time) is pinged, and a dead one is replaced before
    anyone uses it. A restart that lands inside
    the window costs the one statement that meets the dead connection: SQLAlchemy then invalidates
    the whole pool, producers get :class:`StorageUnavailableError` for that call and workers leave
    the message ``queued`` for the sweep.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["kmsg_checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("kmsg_checked_in")
        if last is not None and time.monotonic() - last < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out (or opens) another one.
            raise DisconnectionError(f"pooled connection is gone: {type(exc).__name__}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (rows are read, then handed on)."""
    return sessionmaker(engine, expire_on_commit=False)


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (the embedded default; PostgreSQL uses Alembic)."""
    Base.metadata.create_all(engine)


def dispose_after_fork(engine: Engine) -> None:
    """Drop connections inherited from the parent process without closing the parent's sockets."""
    engine.dispose(close=False)


class storage_errors:  # noqa: N801 - used as a context manager, reads like one
    """Turn "cannot reach the database" into :class:`StorageUnavailableError` for producers."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is not None and isinstance(exc, OperationalError):
            raise StorageUnavailableError(
                f"the database is unavailable; nothing was accepted ({type(exc.orig).__name__})"
            ) from exc
        return False


#: How long :func:`settle_lost_commit` waits for the server session of a lost commit to end.
SETTLE_SECONDS = 10.0


def backend_pid(conn: Connection | Session) -> int | None:
    """The PostgreSQL server process of ``conn``'s connection (``None`` on SQLite).

    libpq learns it when the connection opens, so asking costs no round trip: it is taken before a
    commit for :func:`settle_lost_commit`, on every single send.
    """
    connection = conn.connection() if isinstance(conn, Session) else conn
    info = getattr(connection.connection.driver_connection, "info", None)
    pid = getattr(info, "backend_pid", None)
    return pid if isinstance(pid, int) else None


def settle_lost_commit(
    engine: Engine, pid: int, written: Callable[[Connection], bool], *, timeout: float = SETTLE_SECONDS
) -> bool | None:
    """Whether a commit whose connection was lost before its reply took effect (``None``: cannot tell).

    A commit (or an autocommitted statement) sent just before the connection broke may have been
    applied: the reply was lost, not necessarily the work. Looking for its rows at once is not
    enough: the server session ``pid`` that received it may still be running it (waiting on a lock,
    flushing WAL) and not yet know its client is gone, so the rows could appear after the look-up
    said they were missing. Its transaction is settled only once that session has ended: this
    asks the server to end it (``pg_terminate_backend``; before its commit point that aborts it,
    after it the commit stands), waits until it is gone from ``pg_stat_activity``, and only then
    calls ``written`` on a new connection.

    Behind a pooler in transaction mode the pid libpq reports is not a server process: the wait then
    finds nothing to wait for, and the look-up is only as good as the pooler's own handling.

    Args:
        engine: The engine the lost connection came from (a new connection is opened).
        pid: :func:`backend_pid` of the lost connection, taken before the commit.
        written: Looks for what the commit wrote; True if it is there.
        timeout: Seconds to wait for the server session to end.

    Returns:
        ``True`` (committed), ``False`` (not committed), ``None`` (the database could not be reached,
        or the session did not end in time).
    """
    started = time.monotonic()
    outcome = _settle(engine, pid, written, started + timeout)
    log.warning(
        "storage.commit_settled",
        pid=pid,
        outcome={True: "committed", False: "not_committed", None: "unknown"}[outcome],
        waited_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return outcome


def _settle(engine: Engine, pid: int, written: Callable[[Connection], bool], deadline: float) -> bool | None:
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            gone = text("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = :pid)")
            if not conn.execute(gone, {"pid": pid}).scalar_one():
                try:
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                except DBAPIError:
                    # Not allowed to (another role's session): it ends by itself once it answers.
                    pass
                while not conn.execute(gone, {"pid": pid}).scalar_one():
                    if time.monotonic() > deadline:
                        return None
                    time.sleep(0.02)
            return written(conn)
    except DBAPIError:
        return None
