"""The ``/metrics`` endpoint: a registry that merges every worker's files plus the backlog gauges.

Either each worker serves its own folder (``KMSG_METRICS_PORT``: the worker's main process spawns a
``kmsg metrics-server`` child for it, :func:`spawn_metrics_server`), or one ``kmsg metrics-server``
serves every worker of the host (all node folders) — scrape one or the other, not both, or the
counters are counted twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from kmsg_worker.logging import get_logger
from kmsg_worker.observability.backlog import BacklogCollector
from kmsg_worker.observability.events import Metrics, default_metrics
from kmsg_worker.observability.multiprocess import MultiProcessDirCollector, metrics_dir, multiprocess_dir
from kmsg_worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "MetricsServer",
    "add_subcommand",
    "build_registry",
    "cmd_metrics_server",
    "spawn_metrics_server",
    "start_metrics_server",
]


def build_registry(settings: Settings, *, folder: Path | None = None, backlog: bool = True) -> CollectorRegistry:
    """A registry to expose: merged multiprocess files (or this process's metrics) plus the backlog gauges.

    Args:
        settings: The settings.
        folder: Metric files to merge; default: this process's ``PROMETHEUS_MULTIPROC_DIR`` if set,
            else the in-process metrics.
        backlog: Add :class:`BacklogCollector`.
    """
    registry = CollectorRegistry()
    source = folder or multiprocess_dir()
    if source is not None:
        registry.register(MultiProcessDirCollector(source))
    else:
        registry.register(_Forward(default_metrics))
    if backlog:
        registry.register(BacklogCollector(settings))
    return registry


class _Forward(Collector):
    """Expose the current in-process :class:`Metrics` (which :func:`use_metrics` may swap)."""

    def __init__(self, get: Callable[[], Metrics]) -> None:
        self._get = get

    def collect(self) -> Iterable[Metric]:
        return list(self._get().registry.collect())

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread).

    Attributes:
        port: The bound port (useful when 0 was asked).
        url: ``http://addr:port/metrics``.
    """

    def __init__(self, server: Any, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_address[1])
        self.url = f"http://{addr}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_server(port: int, addr: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr)


# -- command line ---------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    # The worker that spawned us may be SIGKILLed and never stop us: leave with it, freeing the port.
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def cmd_metrics_server(ns: argparse.Namespace) -> int:
    """``kmsg metrics-server``: serve every worker's metrics on this host plus the backlog gauges."""
    settings = Settings.from_env()
    folder = Path(ns.dir) if ns.dir else metrics_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    log = get_logger("kmsg.metrics")
    # Blocked before any thread starts, so SIGTERM waits for sigwait() and the port is released cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        server = start_metrics_server(ns.port, ns.addr, build_registry(settings, folder=folder))
    except OSError as exc:
        log.error("metrics.server_failed", port=ns.port, error=str(exc))
        print(f"error: cannot serve on {ns.addr}:{ns.port}: {exc}", file=sys.stderr)
        return 3
    if ns.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(ns.parent_pid,), daemon=True).start()
    log.info("metrics.server_started", url=server.url, folder=str(folder))
    print(f"serving {server.url} (worker files under {folder})", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.close()
    return 0


def spawn_metrics_server(port: int, addr: str, folder: Path) -> subprocess.Popen[bytes]:
    """Start ``kmsg metrics-server`` for ``folder`` as a child process of this one (the worker's main process).

    A separate process, not a thread: the worker's main process forks pool children for its whole
    life (``worker_max_tasks_per_child``), and a fork while a scrape thread holds an import or
    connection lock leaves the child deadlocked on it (observed: children stuck in an import lock).
    """
    command = [sys.executable, "-m", "kmsg_worker.cli", "metrics-server", "--port", str(port), "--addr", addr]
    command += ["--dir", str(folder), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(command, env=dict(os.environ), stdin=subprocess.DEVNULL)


def add_subcommand(sub: Any) -> None:
    """Register ``kmsg metrics-server`` on the CLI's subparsers."""
    parser = sub.add_parser("metrics-server", help="serve Prometheus metrics of this host's workers and the backlogs")
    parser.add_argument("--port", type=int, default=9808)
    parser.add_argument("--addr", default="127.0.0.1", help="bind address (keep loopback unless scraped remotely)")
    parser.add_argument("--dir", help="worker metric files (default: $KMSG_VAR_DIR/metrics)")
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_metrics_server)
