"""Heartbeats of the periodic jobs: "beat is alive" observed as "its tasks actually ran".

The maintenance sweep and the status poll each overwrite one row of ``kmsg_heartbeats`` when they
run in a worker. A fresh row proves three things at once: beat fires, the task reached the broker,
and a worker consumed its queue — process liveness alone proves none of them (a beat can run while
its publishes fail). ``kmsg doctor`` and the ``kmsg_beat_heartbeat_age_seconds`` gauge
read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from kmsg_worker.storage import queries

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
    queries.upsert_heartbeat(engine, name, now)


def read_heartbeats(engine: Engine) -> dict[str, HeartbeatInfo]:
    """Every recorded heartbeat by job name (empty when no periodic job ever ran)."""
    return {r.name: HeartbeatInfo(r.name, r.beat_at, r.host, r.pid) for r in queries.heartbeat_rows(engine)}
