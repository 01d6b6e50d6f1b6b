"""``kmsg.sync_templates``: pull the providers' AlimTalk templates for the preflight (beat, hourly)."""

from __future__ import annotations

from config.celery import app
from kmsg_worker.dispatch import TASK_NAMES
from kmsg_worker.templates import sync_all_providers
from tasks.context import get_runtime

__all__ = ["sync_templates"]


@app.task(name=TASK_NAMES["template_sync"], acks_late=False, ignore_result=True)
def sync_templates() -> dict[str, dict[str, int]]:
    """Sync every configured provider that has an AlimTalk template API."""
    return {name: vars(counts) for name, counts in sync_all_providers(get_runtime()).items()}
