"""``kmsg.poll_statuses``: the delivery-status sweep, run by beat."""

from __future__ import annotations

from config.celery import app
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.heartbeat import record_heartbeat
from kmsg_worker.tracking import poll_statuses
from tasks.context import get_runtime

__all__ = ["poll"]


@app.task(name=TASK_NAMES["poll"], acks_late=False, ignore_result=True)
def poll() -> int:
    """Poll providers for due ``sent`` messages; returns how many were claimed."""
    runtime = get_runtime()
    claimed = poll_statuses(runtime).claimed
    record_heartbeat(runtime.engine, "poll", runtime.now())
    return claimed
