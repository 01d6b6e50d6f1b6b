"""Celery wiring of the observability: event counters, the correlation header and the worker's Prometheus endpoint.

:func:`install` is called by :mod:`config.celery` with its settings, so in every process that loads
the app (producers included) the log events are counted into the Prometheus metrics
(:func:`kmsg_worker.logging.add_event_counter`) and the publish hook is connected, and in every
worker the worker hooks. This module never imports :mod:`config.celery` (no import cycle).

* ``before_task_publish``: adds the ``kmsg_correlation_id`` header (see
  :func:`kmsg_worker.logging.correlation_for_publish`); ``tasks.signals`` binds it in ``task_prerun``.
* ``worker_init`` (main process, before the pool forks): empties this worker's metric folder
  ``<var>/metrics/<node>`` (or ``PROMETHEUS_MULTIPROC_DIR`` when the operator set one), switches
  prometheus-client to multiprocess mode so every prefork child writes its own files there, and, when
  ``KMSG_METRICS_PORT`` is set, spawns ``kmsg metrics-server`` for that folder as a child *process*
  (a scrape thread in the main process could hold an import lock while the pool forks, and the new
  child would deadlock on it; it did, in the end-to-end test).
* ``worker_process_shutdown``: a child that exits drops its live-gauge files.
* ``worker_shutdown``: the metrics server is stopped (it also exits on its own if the worker dies).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from celery import signals

from kmsg_worker.logging import CORRELATION_HEADER, add_event_counter, correlation_for_publish, get_logger
from kmsg_worker.observability.events import metrics_processor
from kmsg_worker.observability.multiprocess import mark_process_dead, node_dir, prepare_multiprocess_dir
from kmsg_worker.observability.server import spawn_metrics_server
from kmsg_worker.settings import Settings

__all__ = ["install"]

log = get_logger("kmsg.observability")
_server: subprocess.Popen[bytes] | None = None
#: The app's settings, given to :func:`install` (the worker hooks read the metrics port and folder).
_settings: Settings | None = None


def install(settings: Settings) -> None:
    """Count log events into the metrics and connect the publish and worker hooks (idempotent).

    Args:
        settings: The app's settings (:data:`config.celery.settings`).
    """
    global _settings
    _settings = settings
    add_event_counter(metrics_processor)
    # Module-level receivers: Celery keeps weak references, and these live as long as the module.
    signals.before_task_publish.connect(_add_correlation_header)
    signals.worker_init.connect(_start_worker_metrics)
    signals.worker_process_shutdown.connect(_child_exits)
    signals.worker_shutdown.connect(_stop_worker_metrics)


def _add_correlation_header(body: Any = None, headers: Any = None, **_: Any) -> None:
    if not isinstance(headers, dict) or headers.get(CORRELATION_HEADER):
        return
    # Protocol 2 body: (args, kwargs, embed). Only ids are ever in kwargs.
    kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 and isinstance(body[1], dict) else None
    correlation = correlation_for_publish(kwargs)
    if correlation:
        headers[CORRELATION_HEADER] = correlation


def _start_worker_metrics(sender: Any = None, **_: Any) -> None:
    global _server
    settings = _settings
    if settings is None:  # install() connects this hook, so it has run
        return
    node = str(getattr(sender, "hostname", "") or f"worker-{os.getpid()}")
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = prepare_multiprocess_dir(Path(explicit) if explicit else node_dir(settings, node))
    if settings.metrics_port and _server is None:
        # A taken port makes the server exit with metrics.server_failed; the worker sends regardless.
        _server = spawn_metrics_server(settings.metrics_port, settings.metrics_addr, folder)
        log.info("metrics.server_spawned", pid=_server.pid, port=settings.metrics_port, node=node, folder=str(folder))


def _child_exits(pid: int | None = None, **_: Any) -> None:
    mark_process_dead(pid or os.getpid())


def _stop_worker_metrics(**_: Any) -> None:
    global _server
    if _server is not None:
        _server.terminate()
        try:
            _server.wait(5)
        except subprocess.TimeoutExpired:
            _server.kill()
            _server.wait()
        _server = None
