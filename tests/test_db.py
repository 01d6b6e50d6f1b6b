"""The PostgreSQL connection pool: idle connections are pinged at checkout, busy ones are not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from kmsg_worker.storage import db
from kmsg_worker.storage.db import make_engine


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(admin: Engine, pid: int) -> None:
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one() is True
    time.sleep(0.05)  # the backend is gone once the signal is handled


@pytest.fixture
def engines(pg_url: str) -> Iterator[tuple[Engine, Engine]]:
    engine = make_engine(pg_url)
    admin = make_engine(pg_url)
    yield engine, admin
    engine.dispose()
    admin.dispose()


def test_a_connection_that_died_while_idle_is_replaced_before_use(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, admin = engines
    first = _backend_pid(engine)
    _terminate(admin, first)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout counts as idle
    second = _backend_pid(engine)  # no error: the ping found it dead, the pool opened another
    assert second != first


def test_a_connection_used_within_the_window_is_not_pinged(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, admin = engines
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    first = _backend_pid(engine)
    _terminate(admin, first)
    # The trade documented in _ping_when_idle: the one statement that meets the dead connection
    # fails (producers turn it into StorageUnavailableError) ...
    with pytest.raises(OperationalError):
        _backend_pid(engine)
    # ... and the pool, invalidated by that failure, hands out a fresh connection next.
    assert _backend_pid(engine) != first
