"""Celery settings derived from :class:`kmsg_worker.settings.Settings`.

Why each non-default value:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies is redelivered
  (B3); safe because the send claim is a conditional UPDATE and a delivery counter turns a message
  that keeps killing workers into ``dead``.
* ``worker_prefetch_multiplier = 1``: a worker never hoards tasks another could run (B4).
* ``task_ignore_result``: outcomes live in the database; a result backend costs 18-32 % (B11).
* ``visibility_timeout`` set in both transport-option places, and every countdown and time limit
  stays far below it, so Redis never redelivers a task that is still running (B1, B2, B12).
* Separate queues for priority sends, normal sends, bulk chunks, polls and maintenance, so a
  million-message campaign never delays a one-time password.
* Task events on, so Flower and exporters see every task (C.1, C.2).
* ``worker_consumer`` and ``beat_scheduler``: Celery's own, except that a broker outage never
  ends a worker (:class:`tasks.signals.OutageSafeConsumer`) and beat logs it once per outage
  instead of a traceback per tick (:class:`config.beat.OutageQuietScheduler`).
"""

from __future__ import annotations

from typing import Any

from kombu import Queue  # type: ignore[attr-defined,unused-ignore]

from kmsg_worker.dispatch import QUEUES, TASK_NAMES
from kmsg_worker.settings import Settings

__all__ = ["build_config"]


def build_config(settings: Settings) -> dict[str, Any]:
    """Return the Celery configuration mapping for ``settings``."""
    vt = settings.visibility_timeout
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis", "rediss", "sentinel")):
        transport = {"visibility_timeout": vt, "health_check_interval": 25}
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    elif settings.broker_url.startswith("filesystem"):
        folder = settings.var_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # One folder for in and out (a single machine); processed files are moved within the
        # same file system, which is an atomic rename: exactly one consumer gets each message.
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Without this kombu writes its control files into the current directory.
            "control_folder": str(folder / "control"),
            "store_processed": True,
            "polling_interval": 0.1,
        }
    # kombu's SQLAlchemy transport hands every transport option to create_engine(): give it none.
    # Sends: the hard time limit is shorter than the message lease, so a worker that stalls
    # mid-call (frozen, swapping) is killed by its parent before the lease expires and no other
    # worker can re-send a message the stalled one might still send. Sweeps and polls hold no
    # message lease and get the general limit. All stay far below the visibility timeout (B1, B2).
    general_limit = min(300, vt // 2)
    send_limit = max(4, min(int(settings.lease_seconds * 0.75), general_limit))
    send_limits = {"time_limit": send_limit, "soft_time_limit": max(2, int(send_limit * 0.8))}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": 10,
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_max_tasks_per_child": 20000,
        "worker_max_memory_per_child": 400_000,
        "worker_send_task_events": True,
        # No "task-sent" event: it is a second Redis publish (and client) on every send, ~0.5 ms
        # of each single send's latency; Flower still shows every task from the workers' events.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # Our logs are already structured JSON on stderr; do not re-wrap them as WARNING lines.
        "worker_redirect_stdouts": False,
        "task_time_limit": general_limit,
        "task_soft_time_limit": general_limit - 30,
        "task_annotations": {TASK_NAMES["send"]: send_limits, TASK_NAMES["chunk"]: send_limits},
        "task_default_queue": QUEUES["send"],
        "task_queues": [Queue(name) for name in QUEUES.values()],
        "task_routes": {
            TASK_NAMES["send"]: {"queue": QUEUES["send"]},
            TASK_NAMES["chunk"]: {"queue": QUEUES["bulk"]},
            TASK_NAMES["poll"]: {"queue": QUEUES["poll"]},
            TASK_NAMES["sweep"]: {"queue": QUEUES["maintenance"]},
            TASK_NAMES["schedule"]: {"queue": QUEUES["maintenance"]},
            TASK_NAMES["template_sync"]: {"queue": QUEUES["maintenance"]},
            TASK_NAMES["webhooks"]: {"queue": QUEUES["webhooks"]},
        },
        # Publishing itself retries briefly; a broker outage longer than this is covered by the
        # stale-queued sweep (the row was committed before we published).
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "beat_max_loop_interval": 5,
        "beat_scheduler": "config.beat:OutageQuietScheduler",
        "worker_consumer": "tasks.signals:OutageSafeConsumer",
    }
