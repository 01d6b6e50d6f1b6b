"""``kmsg.send_chunk``: one provider bulk request per chunk of a batch."""

from __future__ import annotations

from typing import Any

from celery import Task

from config.celery import app
from kmsg_worker.bulk import process_chunk
from tasks.context import get_runtime
from tasks.send import _dead_letter

__all__ = ["send_chunk"]


@app.task(name="kmsg.send_chunk", bind=True, acks_late=True, reject_on_worker_lost=True)
def send_chunk(self: Task, *args: Any, **kwargs: Any) -> int:
    """Send chunk ``chunk`` of batch ``batch_id``; a malformed payload becomes a dead letter."""
    batch_id, chunk = kwargs.pop("batch_id", None), kwargs.pop("chunk", None)
    if args or kwargs or not isinstance(batch_id, str) or not isinstance(chunk, int) or isinstance(chunk, bool):
        _dead_letter(self, "malformed payload: expected batch_id and chunk", {"args": args, "kwargs": kwargs})
        return 0
    return process_chunk(get_runtime(), batch_id, chunk).sent
