"""The former single metrics module, now :mod:`kmsg_worker.observability`: names re-exported.

Kept because the command line registers ``kmsg metrics-server`` through ``metrics.add_subcommand``
and operators' apps import ``build_registry`` / ``start_metrics_server`` from here. New code imports
from the ``observability`` modules.
"""

from __future__ import annotations

from kmsg_worker.observability.backlog import BacklogCollector, BacklogSnapshot, read_backlog
from kmsg_worker.observability.events import HANDLERS, Metrics, default_metrics, metrics_processor, use_metrics
from kmsg_worker.observability.multiprocess import (
    MultiProcessDirCollector,
    fold_process_files,
    mark_process_dead,
    metrics_dir,
    multiprocess_dir,
    node_dir,
    prepare_multiprocess_dir,
)
from kmsg_worker.observability.server import (
    MetricsServer,
    add_subcommand,
    build_registry,
    cmd_metrics_server,
    spawn_metrics_server,
    start_metrics_server,
)

__all__ = [
    "HANDLERS",
    "BacklogCollector",
    "BacklogSnapshot",
    "Metrics",
    "MetricsServer",
    "MultiProcessDirCollector",
    "add_subcommand",
    "build_registry",
    "cmd_metrics_server",
    "default_metrics",
    "fold_process_files",
    "mark_process_dead",
    "metrics_dir",
    "metrics_processor",
    "multiprocess_dir",
    "node_dir",
    "prepare_multiprocess_dir",
    "read_backlog",
    "spawn_metrics_server",
    "start_metrics_server",
    "use_metrics",
]
