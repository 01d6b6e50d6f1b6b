"""Celery wiring of the observability: the correlation header and the worker's Prometheus endpoint.

Imported by :mod:`config.celery`, so the publish hook is connected in every process that publishes
(producers included), and the worker hooks in every worker.

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

from kmsg_worker.logging import CORRELATION_HEADER, correlation_for_publish, get_logger
from kmsg_worker.metrics import mark_process_dead, node_dir, prepare_multiprocess_dir, spawn_metrics_server

__all__: list[str] = []

log = get_logger("kmsg.observability")
_server: subprocess.Popen[bytes] | None = None


@signals.before_task_publish.connect
def _add_correlation_header(body: Any = None, headers: Any = None, **_: Any) -> None:
    if not isinstance(headers, dict) or headers.get(CORRELATION_HEADER):
        return
    # Protocol 2 body: (args, kwargs, embed). Only ids are ever in kwargs.
    kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 and isinstance(body[1], dict) else None
    correlation = correlation_for_publish(kwargs)
    if correlation:
        headers[CORRELATION_HEADER] = correlation


@signals.worker_init.connect
def _start_worker_metrics(sender: Any = None, **_: Any) -> None:
    global _server
    from config.celery import settings

    node = str(getattr(sender, "hostname", "") or f"worker-{os.getpid()}")
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = prepare_multiprocess_dir(Path(explicit) if explicit else node_dir(settings, node))
    if settings.metrics_port and _server is None:
        # A taken port makes the server exit with metrics.server_failed; the worker sends regardless.
        _server = spawn_metrics_server(settings.metrics_port, settings.metrics_addr, folder)
        log.info("metrics.server_spawned", pid=_server.pid, port=settings.metrics_port, node=node, folder=str(folder))


@signals.worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_: Any) -> None:
    mark_process_dead(pid or os.getpid())


@signals.worker_shutdown.connect
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
