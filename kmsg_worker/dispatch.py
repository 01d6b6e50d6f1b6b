"""How the library hands work to Celery without importing the Celery tasks.

:class:`Dispatcher` is the seam: the producer and the pipeline call it *after* their transaction
commits (outbox). :class:`CeleryDispatcher` publishes by task name through any Celery app, batching
publishes on one producer connection. Tests and the benchmarks can pass their own dispatcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Protocol

from kmsg_worker.logging import CORRELATION_HEADER, correlation_for_publish
from kmsg_worker.message import Priority

__all__ = ["CELERY_APP", "QUEUES", "TASK_NAMES", "CeleryDispatcher", "Dispatcher", "NullDispatcher", "queue_for"]

#: Import path of the project's Celery app, for ``celery -A`` and ``KMSG_DISPATCHER``. The library
#: names it (to Celery's command line, in a child process) and never imports it.
CELERY_APP = "config.celery"

#: Celery queue names, one per kind of work so a campaign never delays an OTP.
QUEUES = {
    "priority": "kmsg.priority",
    "send": "kmsg.send",
    "bulk": "kmsg.bulk",
    "poll": "kmsg.poll",
    "maintenance": "kmsg.maintenance",
    "webhooks": "kmsg.webhooks",
}
#: Every registered task name: the one table. The ``tasks`` package registers its tasks under these
#: names, and the library, the app's routes and the beat schedule publish by them without importing
#: the task modules. A name here is a wire contract: messages already queued carry it.
TASK_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "send": "kmsg.send_message",
        "chunk": "kmsg.send_chunk",
        "bulk": "kmsg.send_bulk",
        "poll": "kmsg.poll_statuses",
        "sweep": "kmsg.sweep",
        "schedule": "kmsg.dispatch_scheduled",
        "template_sync": "kmsg.sync_templates",
        "webhooks": "kmsg.dispatch_webhooks",
    }
)


def queue_for(priority: Priority | str) -> str:
    """The queue a single send of ``priority`` goes to."""
    value = Priority(priority)
    if value is Priority.HIGH:
        return QUEUES["priority"]
    if value is Priority.BULK:
        return QUEUES["bulk"]
    return QUEUES["send"]


class Dispatcher(Protocol):
    """Publishes task ids to the broker."""

    def send(self, message_ids: Sequence[str], *, priority: Priority | str, countdown: float | None = None) -> None:
        """Enqueue one send task per message id."""

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        """Enqueue one ``kmsg.send_chunk`` task per chunk number of a batch."""


class NullDispatcher:
    """Publishes nothing; the sweeps pick the rows up (used when no broker is reachable on purpose)."""

    def send(self, message_ids: Sequence[str], *, priority: Priority | str, countdown: float | None = None) -> None:
        """Do nothing."""

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        """Do nothing."""


class CeleryDispatcher:
    """Publish through a Celery app by task name (no import of the task modules).

    Args:
        app: A configured ``celery.Celery`` instance.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def send(self, message_ids: Sequence[str], *, priority: Priority | str, countdown: float | None = None) -> None:
        """Enqueue one ``kmsg.send_message`` per id, all on one pooled producer connection."""
        if not message_ids:
            return
        queue = queue_for(priority)
        with self.app.producer_or_acquire() as producer:
            for message_id in message_ids:
                kwargs = {"message_id": message_id}
                self.app.send_task(
                    TASK_NAMES["send"],
                    kwargs=kwargs,
                    queue=queue,
                    countdown=countdown,
                    producer=producer,
                    headers=_correlation(kwargs),
                )

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        """Enqueue one ``kmsg.send_chunk`` per chunk: the payload is ``(batch_id, chunk)`` only."""
        if not chunks:
            return
        with self.app.producer_or_acquire() as producer:
            for number in chunks:
                kwargs = {"batch_id": batch_id, "chunk": int(number)}
                self.app.send_task(
                    TASK_NAMES["chunk"],
                    kwargs=kwargs,
                    queue=QUEUES["bulk"],
                    countdown=countdown,
                    producer=producer,
                    headers=_correlation(kwargs),
                )


def _correlation(kwargs: Mapping[str, Any]) -> dict[str, str] | None:
    """The message header that carries the correlation id into the worker (it binds it in its logs)."""
    correlation = correlation_for_publish(kwargs)
    return {CORRELATION_HEADER: correlation} if correlation else None
