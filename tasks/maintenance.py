"""``kmsg.sweep``: the maintenance sweep (scheduled, retries, stale queued, expired leases)."""

from __future__ import annotations

from dataclasses import asdict

from config.celery import app
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.sweeps import sweep as run_sweep
from tasks.context import get_runtime

__all__ = ["sweep"]


@app.task(name=TASK_NAMES["sweep"], acks_late=False, ignore_result=True)
def sweep() -> dict[str, int]:
    """Run one maintenance sweep."""
    return asdict(run_sweep(get_runtime()))
