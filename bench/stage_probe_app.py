"""The worker's Celery app with timestamps at each stage of a single send (``bench.single_stages`` only).

Loaded as ``celery -A bench.stage_probe_app worker``: it is ``config.celery``'s app, plus a line of
JSON per stage (``received`` in the worker's main process, ``prerun`` in the pool child as the task
starts, ``claimed``, ``admitted``, ``answered``) appended to ``$KMSG_BENCH_STAGES_LOG``. Never used
outside the benchmark: it wraps functions of the pipeline in place.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery.signals import task_prerun, task_received

import kmsg_worker.pipeline as pipeline
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


_claim, _admit, _record = Store.claim_for_send, pipeline._admit, pipeline.record_outcome


def _claimed(self: Store, message_id: str, **kw: Any) -> Any:
    claim = _claim(self, message_id, **kw)
    _mark("claimed", message_id)
    return claim


def _admitted(rt: Any, claim: Any, message: Any, now: Any) -> Any:
    result = _admit(rt, claim, message, now)
    _mark("admitted", claim.id)
    return result


def _answered(rt: Any, claim: Any, *args: Any, **kw: Any) -> Any:
    _mark("answered", claim.id)
    return _record(rt, claim, *args, **kw)


Store.claim_for_send = _claimed  # type: ignore[method-assign]
pipeline._admit = _admitted
pipeline.record_outcome = _answered
