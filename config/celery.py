"""The Celery application: ``celery -A config.celery worker`` / ``beat``.

Settings are read once from the environment at import; an invalid value stops the worker here,
with a message naming the variable.
"""

from __future__ import annotations

from celery import Celery

from config.beat import beat_schedule
from config.celeryconfig import build_config
from kmsg_worker.dispatch import CeleryDispatcher
from kmsg_worker.logging import add_event_counter
from kmsg_worker.observability.events import metrics_processor
from kmsg_worker.settings import Settings

__all__ = ["app", "dispatcher", "settings"]

settings = Settings.from_env()
settings.var_dir.mkdir(parents=True, exist_ok=True)

app = Celery(
    "kmsg",
    include=[
        "tasks.send",
        "tasks.bulk",
        "tasks.tracking",
        "tasks.scheduling",
        "tasks.maintenance",
        "tasks.templates",
        "tasks.webhooks",
        "tasks.signals",
    ],
)
app.config_from_object(build_config(settings))
app.conf.beat_schedule = beat_schedule(settings)

# Every process that loads the app (workers and the producers that publish through it) counts its log
# events into the Prometheus metrics; the worker's own hooks are in tasks/signals.py.
add_event_counter(metrics_processor)


def dispatcher() -> CeleryDispatcher:
    """The dispatcher :class:`kmsg_worker.KMsg` uses by default (``KMSG_DISPATCHER``)."""
    return CeleryDispatcher(app)
