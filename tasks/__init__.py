"""Thin Celery tasks: take ids, call one :mod:`kmsg_worker` function, record the outcome.

Apps send with ``from tasks import send_message; send_message.delay(to=..., text=...)``.
"""

from tasks.bulk import send_bulk, send_chunk
from tasks.maintenance import sweep
from tasks.scheduling import dispatch_scheduled
from tasks.send import send_message
from tasks.templates import sync_templates
from tasks.tracking import poll
from tasks.webhooks import dispatch_webhooks

__all__ = [
    "dispatch_scheduled",
    "dispatch_webhooks",
    "poll",
    "send_bulk",
    "send_chunk",
    "send_message",
    "sweep",
    "sync_templates",
]
