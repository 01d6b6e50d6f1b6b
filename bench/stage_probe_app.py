"""The worker's Celery app with timestamps at each stage of a single send (``bench.single_stages`` only).

Loaded as ``celery -A bench.stage_probe_app worker``: it is ``config.celery``'s app, plus a line of
JSON per stage (``received`` in the worker's main process, ``prerun`` in the pool child as the task
starts, ``claimed``, ``admitted``, ``answered``) appended to ``$KMSG_BENCH_STAGES_LOG``. Never used
outside the benchmark: it wraps functions of the delivery engine in place.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery.signals import task_prerun, task_received

import kmsg_worker.delivery.call as call
import kmsg_worker.delivery.single as single
from config.celery import app
from kmsg_worker.storage.repo import Store

__all__ = ["app"]

_LOG = os.environ.get("KMSG_BENCH_STAGES_LOG", "/tmp/kmsg-stages.jsonl")
_out: list[Any] = []


def _mark(stage: str, message_id: Any) -> None:
    if not _out:
        _out.append(open(_LOG, "a", buffering=1))  # noqa: SIM115 - open for the process's life
    _out[0].write(json.dumps({"stage": stage, "t": time.time(), "id": message_id}) + "\n")


@task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    _mark("received", (request.kwargs or {}).get("message_id"))


@task_prerun.connect
def _prerun(kwargs: Any = None, **_: Any) -> None:
    _mark("prerun", (kwargs or {}).get("message_id"))


_claim, _admit, _decide = Store.claim_for_send, single.admit_circuits, call.decide_outcomes


def _claimed(self: Store, message_id: str, **kw: Any) -> Any:
    claim = _claim(self, message_id, **kw)
    _mark("claimed", message_id)
    return claim


def _admitted(rt: Any, rows: Any, **kw: Any) -> Any:
    result = _admit(rt, rows, **kw)
    for row in rows:
        _mark("admitted", row.id)
    return result


def _answered(rows: Any, *args: Any, **kw: Any) -> Any:
    for row in rows:
        _mark("answered", row.id)
    return _decide(rows, *args, **kw)


Store.claim_for_send = _claimed  # type: ignore[method-assign]
single.admit_circuits = _admitted
call.decide_outcomes = _answered
