"""The beat schedule. Every entry is safe to run twice at once (claims are conditional updates)."""

from __future__ import annotations

from typing import Any

from kmsg_worker.dispatch import QUEUES, TASK_NAMES
from kmsg_worker.settings import Settings

__all__ = ["beat_schedule"]


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Periodic tasks: the maintenance sweep, the delivery-status sweep and the scheduled-send dispatch.

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
    if settings.schedule_interval < every:
        tick = settings.schedule_interval
        schedule["kmsg-dispatch-scheduled"] = {
            "task": TASK_NAMES["schedule"],
            "schedule": tick,
            "options": {"queue": QUEUES["maintenance"], "expires": tick * 2},
        }
    return schedule
