"""``kmsg.send_message`` and ``kmsg.send_chunk``: thin tasks that take ids.

``send_message.delay(to=..., text=...)`` validates and stores the message **in the caller's
process** (a validation error is raised right there, before anything is queued), then publishes a
task carrying only the message id: phone numbers and text never reach the broker or Flower.
``send_message.delay(..., scheduled_at=...)``, or ``apply_async(kwargs={...}, eta=...)`` /
``countdown=...``, stores a schedule instead (any horizon), which beat dispatches when it is due:
no long Celery ETA is ever published.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task
from celery.result import AsyncResult

from config.celery import app
from kmsg_worker.delivery import deliver
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.logging import get_logger
from tasks.context import get_producer, get_runtime

__all__ = ["SendMessageTask", "send_message"]

log = get_logger("kmsg.tasks")


class SendMessageTask(Task):  # type: ignore[misc]
    """A task whose ``delay``/``apply_async`` with message fields goes through the producer API."""

    def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        if kwargs and "message_id" not in kwargs and not args:
            fields = dict(kwargs)
            when = _scheduled_from_options(options)
            if when is not None and fields.get("scheduled_at") is None:
                # A Celery ETA/countdown becomes a stored schedule: a long ETA sits in a worker's
                # memory and is redelivered past the visibility timeout (https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout).
                fields["scheduled_at"] = when
            receipt = get_producer().send(fields)
            result = AsyncResult(receipt.message_id, app=self.app)
            result.receipt = receipt
            return result
        return super().apply_async(args, kwargs, **options)


def _scheduled_from_options(options: dict[str, Any]) -> datetime | None:
    """The send time a caller asked for with Celery's ``eta`` (naive = UTC, as Celery reads it) or ``countdown``."""
    eta = options.get("eta")
    if isinstance(eta, datetime):
        return eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)
    if isinstance(eta, str):
        parsed = datetime.fromisoformat(eta)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    countdown = options.get("countdown")
    if countdown is not None:
        return get_runtime().now() + timedelta(seconds=float(countdown))
    return None


def _dead_letter(task: Task, reason: str, payload: Any, message_id: str | None = None) -> None:
    runtime = get_runtime()
    try:
        text = json.dumps(payload, default=repr)[:4000]
    except (TypeError, ValueError):
        text = repr(payload)[:4000]
    runtime.store.dead_letter(
        task_name=task.name,
        task_id=getattr(task.request, "id", None),
        reason=reason,
        payload=text,
        message_id=message_id,
        now=runtime.now(),
    )
    log.error("task.dead_lettered", task=task.name, reason=reason, message_id=message_id)


@app.task(name=TASK_NAMES["send"], base=SendMessageTask, bind=True, acks_late=True, reject_on_worker_lost=True)
def send_message(self: Task, *args: Any, **kwargs: Any) -> str:
    """Send one stored message by id (``kwargs={"message_id": ...}``).

    A malformed payload (no id, extra fields, an id that does not exist) is recorded as a dead
    letter and acknowledged: it never crashes or blocks the worker.
    """
    message_id = kwargs.pop("message_id", None)
    if message_id is None and len(args) == 1:
        message_id = args[0]
    elif args:
        _dead_letter(self, "unexpected positional arguments", {"args": args, "kwargs": kwargs})
        return "dead_letter"
    if not isinstance(message_id, str) or not message_id or kwargs:
        _dead_letter(self, "malformed payload: expected only message_id", {"message_id": message_id, "kwargs": kwargs})
        return "dead_letter"
    result = deliver(get_runtime(), message_id)
    if result.action == "not_claimed" and get_runtime().store.get(message_id) is None:
        _dead_letter(self, "unknown message id", {"message_id": message_id}, message_id=None)
        return "dead_letter"
    return result.action
