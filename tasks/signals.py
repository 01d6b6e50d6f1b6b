"""Worker lifecycle: fail fast on bad settings, one runtime per child, bound log context per task.

Also the worker's consumer (``worker_consumer``): Celery's own, guarded so that a broker outage
never ends the worker process (see :class:`OutageSafeConsumer`).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from celery import signals
from celery.worker.consumer import Consumer

from config.celery import settings
from kmsg_worker.dispatch import QUEUES
from kmsg_worker.gctune import tune_worker
from kmsg_worker.logging import CORRELATION_HEADER, configure_logging, correlation_for_publish, stdlib_formatter
from kmsg_worker.observability.multiprocess import mark_process_dead, node_dir, prepare_multiprocess_dir
from kmsg_worker.observability.server import spawn_metrics_server
from kmsg_worker.settings import stop_unless_sendable
from tasks.context import get_runtime, reset_runtime

log = structlog.get_logger("kmsg.tasks")


@signals.worker_init.connect
def _check_settings(sender: Any = None, **_: Any) -> None:
    # A missing credential stops the worker at start, naming the variable (not at the first send).
    configure_logging(settings.log_level, json_output=settings.log_json)
    stop_unless_sendable(settings)
    if sender is not None:
        _yield_to_single_sends(sender.app.amqp.queues.consume_from)


def _yield_to_single_sends(consumed: Iterable[str] | None) -> None:
    """Lower a bulk-only worker's CPU priority to ``KMSG_BULK_WORKER_NICE``.

    Runs in the worker's main process before the pool forks, so every pool child inherits it. Only a
    worker whose queues are all the bulk queue is lowered (``consumed`` ``None``: every queue, kept):
    on a machine shared with the single-send workers, a single send then waits less for a core
    while a campaign runs (``bench/run.py``'s single-during-bulk stage on 2 cores, nine alternated
    pairs: p99 mean 99.1 -> 71.4 ms, lower in every pair, the bulk's own rate unchanged). A niceness
    already at or above the setting (``nice -n 15 celery ...``) is left as it is.
    """
    current = os.nice(0)
    names = set(consumed or ())
    if settings.bulk_worker_nice > current and names and names <= {QUEUES["bulk"]}:
        niceness = os.nice(settings.bulk_worker_nice - current)
        log.info("worker.bulk_niceness", niceness=niceness)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _mask_library_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    # Celery's own records (and kombu's, httpx's) get the masking and JSON format of ours.
    if logger is None:
        return
    for handler in logger.handlers:
        handler.setFormatter(stdlib_formatter(json_output=settings.log_json))


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    configure_logging(settings.log_level, json_output=settings.log_json)
    reset_runtime()
    _warm_up()
    # After the warm-up, so the runtime, providers and imports are frozen out of every collection.
    tune_worker(settings.gc_threshold)


def _warm_up() -> None:
    """Open the child's database connection and build its providers now, not on the first task.

    Otherwise the first message a child handles pays for the connection, the HTTP client and the
    provider imports (~300 ms measured): a latency spike for whoever sends the first OTP.
    """
    try:
        runtime = get_runtime()
        with runtime.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        for name in settings.providers:
            runtime.provider(name)
        # Compile (and let psycopg prepare) the single-send claim: an id that cannot exist matches
        # no row, so this changes nothing.
        runtime.store.claim_for_send("kmsg-warm-up", now=runtime.now(), lease=timedelta(seconds=1))
    except Exception as exc:  # noqa: BLE001 - a warm-up failure must not stop the worker; tasks retry
        log.warning("worker.warm_up_failed", error=type(exc).__name__)


@signals.task_prerun.connect
def _bind_context(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    values: dict[str, Any] = {"task_id": task_id, "task": getattr(task, "name", None)}
    if isinstance(kwargs, dict) and isinstance(kwargs.get("message_id"), str):
        values["message_id"] = kwargs["message_id"]
    # The producer's correlation id arrives as a message header (the dispatcher adds it);
    # tasks published without one (another client, an old message) fall back to their message id.
    header = getattr(getattr(task, "request", None), CORRELATION_HEADER, None)
    correlation = header if isinstance(header, str) and header else None
    correlation = correlation or correlation_for_publish(kwargs if isinstance(kwargs, dict) else None)
    if correlation:
        values["correlation_id"] = correlation
    structlog.contextvars.bind_contextvars(**values)


@signals.task_postrun.connect
def _clear_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


class OutageSafeConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, except that closing the lost broker connection can never stop the worker.

    When the connection is lost, Celery first ``collect()`` s it (which detaches kombu's transport
    from the connection: ``transport.client = None``) and then ``close()`` s it. If the default
    channel still holds an unacknowledged task at that point, closing it tries to put the task
    back through a new Redis pool, whose parameters are read from the detached client: an
    ``AttributeError('NoneType' object has no attribute 'hostname')`` that ``ignore_errors`` does
    not ignore, and the worker stops with "Unrecoverable error" and exit code 1. Seen in 1 of 9
    and 2 of 9 Redis stops with tasks in flight (tests/faults/test_broker_outages.py); the same
    failure on a detached transport is https://github.com/celery/kombu/issues/582, and restoring
    unacknowledged messages while closing is https://github.com/celery/kombu/issues/970.

    Only that close is guarded; everything else Celery does after a connection loss (cancelling
    late-acknowledged tasks, reducing the prefetch, reconnecting) runs unchanged. Nothing is lost
    by skipping the restore: the broker is down, so it could not have succeeded either, and the
    task stays in the broker's unacknowledged set until its visibility timeout, while the
    message's own lease and the stale-queued sweep send it well before that.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Guard the close of the lost connection, then let Celery handle the loss."""
        connection = self.connection
        if connection is not None:
            close = connection.close

            def guarded_close() -> None:
                try:
                    close()
                except AttributeError as error:
                    log.warning(
                        "worker.broker_close_failed",
                        error=f"{type(error).__name__}: {error}",
                        detail="unacknowledged tasks stay in the broker until their visibility timeout",
                    )

            # Celery calls ``connection.close`` on this very object next: shadow it for that call.
            connection.close = guarded_close
        super().on_connection_error_after_connected(exc)


# -- the worker's Prometheus metrics -------------------------------------------------------------

_metrics_server: subprocess.Popen[bytes] | None = None


@signals.worker_init.connect
def _start_worker_metrics(sender: Any = None, **_: Any) -> None:
    """Empty this worker's metric folder, switch prometheus-client to multiprocess mode, spawn the server.

    In the main process, before the pool forks: every prefork child then writes its own files in
    ``<var>/metrics/<node>`` (or ``PROMETHEUS_MULTIPROC_DIR``). With ``KMSG_METRICS_PORT`` the metrics
    server is a child *process*: a scrape thread in the main process could hold an import lock while
    the pool forks, and the new child would deadlock on it.
    """
    global _metrics_server
    node = str(getattr(sender, "hostname", "") or f"worker-{os.getpid()}")
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = prepare_multiprocess_dir(Path(explicit) if explicit else node_dir(settings, node))
    if settings.metrics_port and _metrics_server is None:
        # A taken port makes the server exit with metrics.server_failed; the worker sends regardless.
        _metrics_server = spawn_metrics_server(settings.metrics_port, settings.metrics_addr, folder)
        log.info(
            "metrics.server_spawned", pid=_metrics_server.pid, port=settings.metrics_port, node=node, folder=str(folder)
        )


@signals.worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_: Any) -> None:
    mark_process_dead(pid or os.getpid())


@signals.worker_shutdown.connect
def _stop_worker_metrics(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.terminate()
        try:
            _metrics_server.wait(5)
        except subprocess.TimeoutExpired:
            _metrics_server.kill()
            _metrics_server.wait()
        _metrics_server = None
