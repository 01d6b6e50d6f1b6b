"""The naive baseline: one Celery task per message, one HTTP call, one row update.

This is how most Celery apps send notifications. It uses the same Solapi adapter, the same fake
server, the same Redis and PostgreSQL as the bulk path, so the ratio measures the design only.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import text

from kmsg_worker.message import normalize
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.solapi import SolapiProvider
from kmsg_worker.storage.db import make_engine

app = Celery("naive", broker=os.environ.get("KMSG_BROKER_URL", "redis://127.0.0.1:6379/10"))
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=4, task_acks_late=False)

_state: dict[str, Any] = {}


def _resources() -> tuple[Any, SolapiProvider]:
    if "engine" not in _state:
        _state["engine"] = make_engine(os.environ["KMSG_DATABASE_URL"])
        config = ProviderConfig(
            name="solapi",
            base_url=os.environ["KMSG_SOLAPI_BASE_URL"],
            credentials={
                "api_key": os.environ["KMSG_SOLAPI_API_KEY"],
                "api_secret": os.environ["KMSG_SOLAPI_API_SECRET"],
            },
            options={"default_from": os.environ.get("KMSG_SOLAPI_DEFAULT_FROM", "0212345678")},
        )
        _state["provider"] = SolapiProvider(config, make_http_client())
    return _state["engine"], _state["provider"]


@app.task(name="naive.send")
def naive_send(message_id: str) -> None:
    """Read the row, send it with one HTTP request, write the result."""
    engine, provider = _resources()
    with engine.begin() as conn:
        row = conn.execute(text("SELECT recipient, body FROM bench_naive WHERE id = :id"), {"id": message_id}).one()
    message = normalize({"id": message_id, "to": row.recipient, "text": row.body, "sender": "0212345678"})
    outcome = provider.send(message)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE bench_naive SET status = :s, pmid = :p WHERE id = :id"),
            {"s": "sent" if outcome.accepted else "failed", "p": outcome.provider_message_id, "id": message_id},
        )
