"""``kmsg.dispatch_scheduled``: enqueue scheduled messages whose time has come (beat, every second)."""

from __future__ import annotations

from config.celery import app
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.sweeps import dispatch_scheduled as run_dispatch
from tasks.context import get_runtime

__all__ = ["dispatch_scheduled"]


@app.task(name=TASK_NAMES["schedule"], acks_late=False, ignore_result=True)
def dispatch_scheduled() -> int:
    """Move due ``scheduled`` rows to ``queued`` and enqueue them; returns how many were enqueued."""
    return run_dispatch(get_runtime())
