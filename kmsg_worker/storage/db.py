"""Engine creation: one engine per process, tuned per backend.

SQLite (the embedded default) runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so
a producer, workers and beat in separate processes can share one file (``reference/performance.md``:
commit-per-row goes from ~900 to ~10,500 rows/s). PostgreSQL uses psycopg 3 with a small pool
(connections that sat idle are pinged at checkout).
After a fork, the child must not reuse the parent's connections: :func:`dispose_after_fork`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmsg_worker.errors import StorageUnavailableError
from kmsg_worker.storage.models import Base

__all__ = [
    "create_schema",
    "dispose_after_fork",
    "json_dumps",
    "make_engine",
    "make_sessionmaker",
    "storage_errors",
]


def json_dumps(value: Any) -> str:
    """JSON text for the database: orjson is ~10x faster than json, which matters at bulk volume."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create the process's engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``)."""
    parsed = make_url(url)
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
    anyone uses it (HikariCP skips its validation query the same way). A restart that lands inside
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
