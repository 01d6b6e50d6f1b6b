"""The Celery application: ``celery -A config.celery worker`` / ``beat``.

Settings are read once from the environment at import; an invalid value stops the worker here,
with a message naming the variable.
"""

from __future__ import annotations

from celery import Celery

from config import observability
from config.beat import beat_schedule
from config.celeryconfig import build_config
from kmsg_worker.dispatch import CeleryDispatcher
from kmsg_worker.settings import Settings

__all__ = ["app", "dispatcher", "settings"]

settings = Settings.from_env()
settings.var_dir.mkdir(parents=True, exist_ok=True)

app = Celery(
    "kmsg",
    include=["tasks.send", "tasks.bulk", "tasks.tracking", "tasks.scheduling", "tasks.maintenance", "tasks.signals"],
)
app.config_from_object(build_config(settings))
app.conf.beat_schedule = beat_schedule(settings)

# Event counters and the publish hook (correlation header) in every process that loads the app;
# the metrics hooks in workers.
observability.install(settings)


def dispatcher() -> CeleryDispatcher:
    """The dispatcher :class:`kmsg_worker.KMsg` uses by default (``KMSG_DISPATCHER``)."""
    return CeleryDispatcher(app)
