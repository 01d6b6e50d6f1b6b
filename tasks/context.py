"""The per-process :class:`~kmsg_worker.runtime.Runtime` used by the tasks.

Built lazily on first use and rebuilt after a fork (``tasks.signals``), so each prefork child has
its own database connections and HTTP client.
"""

from __future__ import annotations

import threading

from config.celery import dispatcher, settings
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime

__all__ = ["get_producer", "get_runtime", "reset_runtime"]

_lock = threading.Lock()
_runtime: Runtime | None = None
_producer: KMsg | None = None


def get_runtime() -> Runtime:
    """The process's runtime (created on first use)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(settings, dispatcher=dispatcher())
        return _runtime


def get_producer() -> KMsg:
    """A :class:`KMsg` sharing the process's runtime (used by ``send_message.delay(...)``)."""
    global _producer
    runtime = get_runtime()
    with _lock:
        if _producer is None or _producer.runtime is not runtime:
            _producer = KMsg(runtime=runtime)
        return _producer


def reset_runtime() -> None:
    """Forget inherited resources after a fork; the child builds its own on first use."""
    global _runtime, _producer
    with _lock:
        if _runtime is not None:
            _runtime.after_fork()
        _producer = None
