"""``kmsg.send_chunk``: one provider bulk request per chunk of a batch."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.result import AsyncResult

from config.celery import app
from kmsg_worker.delivery import process_chunk
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.errors import ValidationError
from kmsg_worker.gctune import release_memory
from tasks.context import get_producer, get_runtime
from tasks.send import _dead_letter

__all__ = ["SendBulkTask", "send_bulk", "send_chunk"]


@app.task(name=TASK_NAMES["chunk"], bind=True, acks_late=True, reject_on_worker_lost=True)
def send_chunk(self: Task, *args: Any, **kwargs: Any) -> int:
    """Send chunk ``chunk`` of batch ``batch_id``; a malformed payload becomes a dead letter."""
    batch_id, chunk = kwargs.pop("batch_id", None), kwargs.pop("chunk", None)
    if args or kwargs or not isinstance(batch_id, str) or not isinstance(chunk, int) or isinstance(chunk, bool):
        _dead_letter(self, "malformed payload: expected batch_id and chunk", {"args": args, "kwargs": kwargs})
        return 0
    try:
        return process_chunk(get_runtime(), batch_id, chunk).sent
    finally:
        release_memory()


class SendBulkTask(Task):  # type: ignore[misc]
    """``send_bulk.delay(messages=[...], defaults={...})`` validates and stores in the caller's process.

    Only chunk tasks carrying ``(batch_id, chunk)`` reach the broker; the returned result's id is the
    batch id (``result.receipt`` holds the :class:`~kmsg_worker.producer.BatchReceipt`).
    """

    def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        options_in = dict(kwargs or {})
        messages = options_in.pop("messages", None)
        if messages is None:
            raise ValidationError("messages", "required", "send_bulk needs messages=[...] (mappings)")
        receipt = get_producer().send_many(messages, **options_in)
        result = AsyncResult(receipt.batch_id, app=self.app)
        result.receipt = receipt
        return result


@app.task(name=TASK_NAMES["bulk"], base=SendBulkTask, bind=True)
def send_bulk(self: Task, *args: Any, **kwargs: Any) -> int:
    """Never runs in a worker: ``delay``/``apply_async`` store the batch in the caller's process.

    A ``kmsg.send_bulk`` message that reaches a worker anyway (published by hand) would carry message
    content through the broker, so it is refused and dead-lettered.
    """
    _dead_letter(self, "send_bulk must be called with delay()/apply_async() in the producer", {"kwargs": list(kwargs)})
    return 0
