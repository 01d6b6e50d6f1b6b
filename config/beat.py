"""The beat schedule and scheduler. Every entry is safe to run twice at once (claims are conditional updates)."""

from __future__ import annotations

import logging
import time
from typing import Any

import structlog
from celery.beat import PersistentScheduler
from kombu.exceptions import OperationalError  # type: ignore[attr-defined,unused-ignore]

from kmsg_worker.dispatch import QUEUES, TASK_NAMES
from kmsg_worker.settings import Settings

__all__ = ["OutageQuietScheduler", "beat_schedule"]

log = structlog.get_logger("kmsg.beat")


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Periodic tasks: the maintenance and status sweeps, the webhook dispatcher, the scheduled-send dispatch.

    Scheduled sends get their own entry, every ``KMSG_SCHEDULE_INTERVAL_SECONDS`` (1 s): with only
    the 5 s maintenance sweep a scheduled message would leave up to 5 s late (``bench/schedule_latency.py``).
    Each run is one probe of a partial index when nothing is due, so a short period is cheap.
    """
    every = settings.sweep_interval
    # A sweep that has not started before the next one is due is useless: expire it.
    schedule: dict[str, Any] = {
        "kmsg-maintenance-sweep": {
            "task": TASK_NAMES["sweep"],
            "schedule": every,
            "options": {"queue": QUEUES["maintenance"], "expires": every * 2},
        },
        "kmsg-poll-statuses": {
            "task": TASK_NAMES["poll"],
            "schedule": every,
            "options": {"queue": QUEUES["poll"], "expires": every * 2},
        },
    }
    # Webhooks have their own queue: a slow receiver never delays a sweep or a poll.
    tick = settings.webhooks.interval
    schedule["kmsg-dispatch-webhooks"] = {
        "task": TASK_NAMES["webhooks"],
        "schedule": tick,
        "options": {"queue": QUEUES["webhooks"], "expires": max(tick * 2, 2.0)},
    }
    if settings.schedule_interval < every:
        tick = settings.schedule_interval
        schedule["kmsg-dispatch-scheduled"] = {
            "task": TASK_NAMES["schedule"],
            "schedule": tick,
            "options": {"queue": QUEUES["maintenance"], "expires": tick * 2},
        }
    if settings.template_sync_interval > 0:
        # The providers' AlimTalk templates (approval states, bodies) for the preflight; hourly by
        # default: approvals take hours to days, and each run is one list request per provider.
        period = settings.template_sync_interval
        schedule["kmsg-sync-templates"] = {
            "task": TASK_NAMES["template_sync"],
            "schedule": period,
            "options": {"queue": QUEUES["maintenance"], "expires": period},
        }
    return schedule


#: Celery's beat logger: the per-entry line keeps its usual logger name.
_celery_beat_log = logging.getLogger("celery.beat")
#: Celery's own wording of that line (a stdlib log format, not one of kmsg's events).
_SENDING_DUE_TASK = "Scheduler: Sending due task %s (%s)"


class OutageQuietScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, logging a broker outage once instead of a traceback per tick.

    Celery's ``apply_entry`` logs every failed publish at ERROR with two stack dumps; with a 1 s
    schedule that is a traceback a second for as long as Redis is down (154 of them in one test
    run of six 3-second outages), which buries whatever else happened. Here a publish that fails
    because the broker cannot be reached logs ``beat.broker_unreachable`` once (WARNING, with the
    error text) and ``beat.broker_reachable`` once it works again (with the outage's length and
    how many runs were skipped); a skipped run is not made up for, the next one is due within
    the schedule's period. Any other error keeps Celery's logging.
    """

    _down_since: float | None = None
    _skipped = 0

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Publish one due entry; a broker outage is reported per outage, not per entry."""
        # The line Celery's own apply_entry writes for every due entry (operators grep for it).
        _celery_beat_log.info(_SENDING_DUE_TASK, entry.name, entry.task)
        try:
            self.apply_async(entry, producer=producer, advance=False)
        except Exception as exc:  # noqa: BLE001 - everything but an outage goes to Celery's handler
            cause = exc.__cause__ or exc.__context__
            if not self._is_outage(cause or exc):
                super().apply_entry(entry, producer=producer)
                return
            self._outage(cause or exc)
            self._skipped += 1
            return
        if self._down_since is not None:
            log.warning(
                "beat.broker_reachable",
                down_seconds=round(time.monotonic() - self._down_since, 1),
                skipped_runs=self._skipped,
            )
            self._down_since, self._skipped = None, 0

    def _ensure_connected(self) -> Any:
        # Celery's version logs every reconnection try at ERROR; one warning per outage is enough.
        def on_error(exc: Exception, interval: float) -> None:
            self._outage(exc)

        return self.connection.ensure_connection(on_error, self.app.conf.broker_connection_max_retries)

    def _outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("beat.broker_unreachable", error=f"{type(exc).__name__}: {exc}"[:300])

    def _is_outage(self, exc: BaseException) -> bool:
        errors: tuple[type[BaseException], ...] = (OperationalError, ConnectionError, TimeoutError, OSError)
        try:
            connection = self.connection  # the scheduler's own publishing connection
            errors += tuple(connection.connection_errors) + tuple(connection.recoverable_connection_errors)
        except Exception:  # noqa: BLE001 - the transport's own error types are a bonus, not required
            pass
        return isinstance(exc, errors)
