"""The beat schedule. Every entry is safe to run twice at once (claims are conditional updates)."""

from __future__ import annotations

from typing import Any

from kmsg_worker.dispatch import QUEUES, TASK_NAMES
from kmsg_worker.settings import Settings

__all__ = ["beat_schedule"]


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Periodic tasks: the maintenance sweep and the delivery-status sweep."""
    every = settings.sweep_interval
    # A sweep that has not started before the next one is due is useless: expire it.
    return {
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
