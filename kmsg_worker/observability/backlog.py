"""Gauges read when Prometheus scrapes: broker queue lengths and the database's backlogs.

:class:`BacklogCollector` asks the broker for queue lengths (Redis ``LLEN``) and the database for the
age of the oldest queued message, the tracking and scheduled backlogs and the beat heartbeats
(:func:`read_backlog`, also used by ``kmsg doctor``). Liveness is consumption: a worker process can
be alive and consume nothing; the oldest-queued age shows it.

The backlog gauges describe the whole system (database and broker), not one worker: aggregate them
with ``max()``, never ``sum()``, when several endpoints expose them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from kmsg_worker.dispatch import QUEUES, queue_for
from kmsg_worker.heartbeat import read_heartbeats
from kmsg_worker.settings import Settings
from kmsg_worker.storage import queries
from kmsg_worker.storage.db import make_engine

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["WAITING_STATES", "BacklogCollector", "BacklogSnapshot", "read_backlog"]


def _broker_lengths(settings: Settings, queues: Iterable[str]) -> dict[str, int]:
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        # Imported here, a real cost: redis takes ~380 ms to import (python -X importtime), and
        # every process that loads the app (config/celery.py) or the command line imports
        # this module; a filesystem broker never needs it.
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        prefix = settings.broker_key_prefix  # kombu's global_keyprefix
        try:
            pipe = client.pipeline(transaction=False)
            names = list(queues)
            # kombu keeps a priority-stepped message in "<queue>\x06\x16<step>"; count every step.
            keys = [[f"{prefix}{q}", *(f"{prefix}{q}\x06\x16{step}" for step in (3, 6, 9))] for q in names]
            for group in keys:
                for key in group:
                    pipe.llen(key)
            values = iter(pipe.execute())
            return {q: sum(int(next(values)) for _ in group) for q, group in zip(names, keys, strict=True)}
        finally:
            client.close()
    if url.startswith("filesystem"):
        folder = settings.var_dir / "broker" / "queue"
        counts = dict.fromkeys(queues, 0)
        suffixes = {f"{q}.msg": q for q in counts}
        if folder.is_dir():
            for name in os.listdir(folder):
                queue = suffixes.get(name.partition(".")[2])
                if queue is not None:
                    counts[queue] += 1
        return counts
    return {}


@dataclass(frozen=True)
class BacklogSnapshot:
    """What :class:`BacklogCollector` read (also used by ``kmsg doctor``).

    Attributes:
        queue_length: Tasks waiting in the broker, by queue (empty when the broker is unreadable).
        queued: Messages ``queued`` in the database, by queue.
        oldest_queued_age: Age in seconds of the oldest ``queued`` message, by queue.
        states: Messages in each non-final state.
        tracking_due: ``sent`` messages whose status check is due.
        tracking_oldest_due_age: How late the most overdue check is, seconds.
        scheduled_overdue: ``scheduled`` messages whose time has passed.
        scheduled_oldest_overdue_age: How late the most overdue one is, seconds.
        retries_due: ``retrying`` messages whose next attempt is due.
        heartbeat_age: Seconds since each periodic job last ran.
        errors: What could not be read (``database``, ``broker``) and why.
    """

    queue_length: dict[str, int]
    queued: dict[str, int]
    oldest_queued_age: dict[str, float]
    states: dict[str, int]
    tracking_due: int
    tracking_oldest_due_age: float
    scheduled_overdue: int
    scheduled_oldest_overdue_age: float
    retries_due: int
    heartbeat_age: dict[str, float]
    errors: dict[str, str]


WAITING_STATES = ("scheduled", "queued", "sending", "retrying", "sent")


def read_backlog(settings: Settings, engine: Engine, *, now: datetime | None = None) -> BacklogSnapshot:
    """Read queue lengths and database backlogs once (bounded: every query uses a status index)."""
    now = now or datetime.now(UTC)
    errors: dict[str, str] = {}
    try:
        lengths = _broker_lengths(settings, QUEUES.values())
    except Exception as exc:  # noqa: BLE001 - any broker failure is reported as a gauge, not raised
        lengths, errors["broker"] = {}, f"{type(exc).__name__}: {exc}"[:300]

    def age(ts: datetime | None) -> float:
        return max(0.0, (now - ts).total_seconds()) if ts is not None else 0.0

    queued: dict[str, int] = {}
    oldest: dict[str, float] = {}
    states: dict[str, int] = {}
    tracking = (0, 0.0)
    scheduled = (0, 0.0)
    retries = 0
    heartbeats: dict[str, float] = {}
    try:
        with engine.connect() as conn:
            states = {s: n for s, n in queries.waiting_state_counts(conn, WAITING_STATES).items() if n}
            for priority, first, count in queries.queued_by_priority(conn):
                queue = queue_for(priority) if priority in ("high", "normal", "bulk") else QUEUES["send"]
                queued[queue] = queued.get(queue, 0) + count
                oldest[queue] = max(oldest.get(queue, 0.0), age(first))
            count, first = queries.tracking_due(conn, now)
            tracking = (count, age(first))
            count, first = queries.scheduled_overdue(conn, now)
            scheduled = (count, age(first))
            retries = queries.retries_due(conn, now)
        heartbeats = {name: age(info.beat_at) for name, info in read_heartbeats(engine).items()}
    except SQLAlchemyError as exc:
        errors["database"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:300]
    for queue in (QUEUES["priority"], QUEUES["send"], QUEUES["bulk"]):
        queued.setdefault(queue, 0)
        oldest.setdefault(queue, 0.0)
    return BacklogSnapshot(
        queue_length=lengths,
        queued=queued,
        oldest_queued_age=oldest,
        states={s: states.get(s, 0) for s in WAITING_STATES},
        tracking_due=tracking[0],
        tracking_oldest_due_age=tracking[1],
        scheduled_overdue=scheduled[0],
        scheduled_oldest_overdue_age=scheduled[1],
        retries_due=retries,
        heartbeat_age=heartbeats,
        errors=errors,
    )


class BacklogCollector(Collector):
    """Gauges read from the broker and the database at scrape time.

    Args:
        settings: Broker and database URLs.
        engine: The database engine (default: one built from the settings, kept for later scrapes).
        clock: Time source (tests).
    """

    def __init__(
        self, settings: Settings, engine: Engine | None = None, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def engine(self) -> Engine:
        """The engine, created on the first scrape."""
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url, pool_size=1)
        return self._engine

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not query the database."""
        return []

    def collect(self) -> Iterable[Metric]:
        """One read of the broker and the database, as gauge families."""
        snap = read_backlog(self.settings, self.engine, now=self._clock())

        def family(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]) -> Metric:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in values.items():
                fam.add_metric(list(key), value)
            return fam

        def single(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(name, doc, value=value)

        out = [
            family(
                "kmsg_backlog_source_up",
                "1 when the source could be read at this scrape.",
                ["source"],
                {
                    ("database",): 0.0 if "database" in snap.errors else 1.0,
                    ("broker",): 0.0 if "broker" in snap.errors else 1.0,
                },
            ),
            family(
                "kmsg_queue_length",
                "Tasks waiting in the broker queue.",
                ["queue"],
                {(q,): n for q, n in snap.queue_length.items()},
            ),
        ]
        if "database" in snap.errors:
            return out
        out += [
            family(
                "kmsg_queue_oldest_age_seconds",
                "Age of the oldest queued message (database): grows when no worker consumes.",
                ["queue"],
                {(q,): a for q, a in snap.oldest_queued_age.items()},
            ),
            family(
                "kmsg_queued_messages",
                "Messages queued in the database.",
                ["queue"],
                {(q,): n for q, n in snap.queued.items()},
            ),
            family(
                "kmsg_messages_in_state",
                "Messages in each non-final state.",
                ["status"],
                {(s,): n for s, n in snap.states.items()},
            ),
            single("kmsg_tracking_backlog_messages", "Sent messages whose status check is due.", snap.tracking_due),
            single(
                "kmsg_tracking_oldest_due_age_seconds",
                "How late the most overdue status check is.",
                snap.tracking_oldest_due_age,
            ),
            single("kmsg_scheduled_backlog_messages", "Scheduled messages (all).", snap.states["scheduled"]),
            single(
                "kmsg_scheduled_overdue_messages",
                "Scheduled messages past their time, not dispatched.",
                snap.scheduled_overdue,
            ),
            single(
                "kmsg_scheduled_oldest_overdue_age_seconds",
                "How late the most overdue scheduled message is.",
                snap.scheduled_oldest_overdue_age,
            ),
            single("kmsg_retry_backlog_messages", "Retrying messages whose next attempt is due.", snap.retries_due),
            family(
                "kmsg_beat_heartbeat_age_seconds",
                "Seconds since each periodic job last ran in a worker.",
                ["job"],
                {(j,): a for j, a in snap.heartbeat_age.items()},
            ),
        ]
        return out
