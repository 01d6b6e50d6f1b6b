"""``kmsg.dispatch_webhooks``: deliver the event outbox to the tenants' endpoints, run by beat."""

from __future__ import annotations

from config.celery import app
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.heartbeat import record_heartbeat
from kmsg_worker.webhooks.dispatch import dispatch_webhooks as run_dispatcher
from tasks.context import get_runtime

__all__ = ["dispatch_webhooks"]


@app.task(name=TASK_NAMES["webhooks"], acks_late=False, ignore_result=True)
def dispatch_webhooks() -> int:
    """Deliver due webhook events; returns how many were delivered."""
    runtime = get_runtime()
    delivered = run_dispatcher(runtime).delivered
    record_heartbeat(runtime.engine, "webhooks", runtime.now())
    return delivered
