"""Heartbeats of the periodic jobs: "beat is alive" observed as "its tasks actually ran".

The maintenance sweep and the status poll each overwrite one row of ``kmsg_heartbeats`` when they
run in a worker. A fresh row proves three things at once: beat fires, the task reached the broker,
and a worker consumed its queue — process liveness alone proves none of them
(``celery-production.md`` B13). ``kmsg doctor`` and the ``kmsg_beat_heartbeat_age_seconds`` gauge
read them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, Executable, select
from sqlalchemy.dialects import postgresql, sqlite

from kmsg_worker.storage.models import Heartbeat

__all__ = ["HeartbeatInfo", "read_heartbeats", "record_heartbeat"]


@dataclass(frozen=True)
class HeartbeatInfo:
    """The last run of one periodic job.

    Attributes:
        name: ``sweep`` or ``poll``.
        beat_at: When it last ran (UTC).
        host: The worker host that ran it.
        pid: The worker process that ran it.
    """

    name: str
    beat_at: datetime
    host: str | None
    pid: int | None


def record_heartbeat(engine: Engine, name: str, now: datetime) -> None:
    """Overwrite the heartbeat row ``name`` with ``now`` (one upsert, safe under concurrency)."""
    values = {"name": name, "beat_at": now, "host": socket.gethostname()[:255], "pid": os.getpid()}
    update = {"beat_at": now, "host": values["host"], "pid": values["pid"]}
    stmt: Executable
    if engine.dialect.name == "postgresql":
        pg = postgresql.insert(Heartbeat).values(**values)
        stmt = pg.on_conflict_do_update(index_elements=[Heartbeat.name], set_=update)
    else:
        lite = sqlite.insert(Heartbeat).values(**values)
        stmt = lite.on_conflict_do_update(index_elements=[Heartbeat.name], set_=update)
    with engine.begin() as conn:
        conn.execute(stmt)


def read_heartbeats(engine: Engine) -> dict[str, HeartbeatInfo]:
    """Every recorded heartbeat by job name (empty when no periodic job ever ran)."""
    with engine.connect() as conn:
        rows = conn.execute(select(Heartbeat.name, Heartbeat.beat_at, Heartbeat.host, Heartbeat.pid)).all()
    return {r.name: HeartbeatInfo(r.name, r.beat_at, r.host, r.pid) for r in rows}
