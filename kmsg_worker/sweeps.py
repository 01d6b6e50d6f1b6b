"""The maintenance sweep run by beat: nothing accepted is ever left behind.

* scheduled rows whose time has come -> ``queued`` and enqueued (never a long Celery ETA);
* retries that wait in the database (longer than a countdown) -> ``queued`` and enqueued;
* rows left ``queued`` too long (their task was lost with Redis) -> enqueued again;
* rows stuck in ``sending`` past their lease (a worker died) -> reconciled, then re-sent only if
  the provider never got them; batch chunks still in flight past their lease likewise;
* expired idempotency keys -> deleted.

Every step claims its rows with a conditional update, so two beats or an overlapping run do no
harm: a message is enqueued twice at worst, and the send claim makes the second task a no-op.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from kmsg_worker.delivery import reconcile_expired, recover_chunks
from kmsg_worker.heartbeat import record_heartbeat
from kmsg_worker.logging import get_logger
from kmsg_worker.runtime import Runtime

__all__ = ["SweepReport", "dispatch_scheduled", "sweep"]

log = get_logger("kmsg.sweeps")
#: Claim rounds of one schedule dispatch (``KMSG_SWEEP_BATCH`` rows each) while they come back full.
SCHEDULE_ROUNDS = 20


@dataclass
class SweepReport:
    """Counts of what one sweep did."""

    scheduled: int = 0
    retries: int = 0
    stale_queued: int = 0
    leases: int = 0
    chunks_recovered: int = 0
    idempotency_purged: int = 0
    broker_files_pruned: int = 0


def prune_processed(folder: Path, older_than: float = 600.0) -> int:
    """Delete consumed message files of the embedded filesystem broker (kombu keeps them)."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for entry in os.scandir(folder):
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue  # another sweep removed it
    return removed


def _enqueue(rt: Runtime, claimed: Sequence[tuple[str, str]]) -> None:
    by_priority: dict[str, list[str]] = defaultdict(list)
    for message_id, priority in claimed:
        by_priority[priority].append(message_id)
    for priority, ids in by_priority.items():
        rt.dispatcher.send(ids, priority=priority)


def _enqueue_chunks(rt: Runtime, chunks: set[tuple[str, int]]) -> None:
    by_batch: dict[str, list[int]] = defaultdict(list)
    for batch_id, chunk in chunks:
        by_batch[batch_id].append(chunk)
    for batch_id, numbers in by_batch.items():
        rt.dispatcher.chunk(batch_id, sorted(numbers))


def dispatch_scheduled(rt: Runtime, *, now: datetime | None = None) -> int:
    """Enqueue every scheduled message whose time has come: single sends and batch chunks.

    Beat runs this every ``KMSG_SCHEDULE_INTERVAL_SECONDS`` (1 s) so that a scheduled send leaves
    within about a second of its time, whatever the maintenance sweep's period; the sweep calls it
    too, as a backstop. Rows move ``scheduled -> queued`` in one conditional UPDATE whose sub-select
    takes ``FOR UPDATE SKIP LOCKED``, so two beats never dispatch a row twice, and a cancelled row is
    never dispatched. With nothing due it is two probes of the partial index
    ``ix_kmsg_messages_due_schedule``, however many messages wait for later.

    A burst (a campaign scheduled for 09:00) is claimed in rounds of ``KMSG_SWEEP_BATCH`` rows, up to
    :data:`SCHEDULE_ROUNDS` per run; a batch's chunks are published once, after all their due rows
    are ``queued``, so each chunk still goes out as one provider request.

    Args:
        rt: The process's runtime.
        now: The time to compare ``scheduled_at`` with (default: the runtime's clock).

    Returns:
        How many messages and batch chunks were enqueued.
    """
    now = now or rt.now()
    limit = rt.settings.sweep_batch
    messages = 0
    for _ in range(SCHEDULE_ROUNDS):
        due = rt.store.claim_due_scheduled(now=now, limit=limit)
        _enqueue(rt, due)
        messages += len(due)
        if len(due) < limit:
            break
    chunks: set[tuple[str, int]] = set()
    for _ in range(SCHEDULE_ROUNDS):
        claimed = rt.store.claim_due_scheduled_chunks(now=now, limit=limit)
        if not claimed:
            break
        chunks |= claimed
    _enqueue_chunks(rt, chunks)
    if messages or chunks:
        log.info("schedule.dispatched", messages=messages, chunks=len(chunks))
    return messages + len(chunks)


def sweep(rt: Runtime) -> SweepReport:
    """Run every maintenance step once."""
    settings = rt.settings
    now = rt.now()
    limit = settings.sweep_batch
    report = SweepReport()

    # Scheduled sends have their own, faster beat entry; this is the backstop if it is late.
    report.scheduled = dispatch_scheduled(rt, now=now)

    # How long a row may wait for its task before the sweep enqueues it again (due retries whose
    # countdown task was lost, and rows left queued).
    stale_after = timedelta(seconds=settings.stale_queued_seconds)
    retries = rt.store.claim_due_retries(now=now, grace=stale_after, limit=limit)
    _enqueue(rt, retries)
    retry_chunks = rt.store.claim_due_retry_chunks(now=now, grace=stale_after, limit=limit)
    _enqueue_chunks(rt, retry_chunks)
    report.retries = len(retries) + len(retry_chunks)

    # Chunks whose worker died mid-request: settled at the provider and published again (before the
    # stale-chunk step, which would only publish a chunk its task cannot take yet).
    report.chunks_recovered = recover_chunks(rt, now=now, limit=limit).chunks

    stale = rt.store.claim_stale_queued(now=now, older_than=stale_after, limit=limit)
    _enqueue(rt, stale)
    stale_chunks = rt.store.claim_stale_chunks(now=now, older_than=stale_after, limit=limit)
    _enqueue_chunks(rt, stale_chunks)
    report.stale_queued = len(stale) + len(stale_chunks)

    leases = rt.store.claim_expired_leases(now=now, extend=timedelta(seconds=settings.lease_seconds), limit=limit)
    # One provider lookup for all expired leases, not one per message (a whole chunk may be in flight).
    reconcile_expired(rt, [message_id for message_id, _ in leases])
    report.leases = len(leases)

    report.idempotency_purged = rt.store.purge_idempotency(now)
    if settings.broker_url.startswith("filesystem"):
        report.broker_files_pruned = prune_processed(settings.var_dir / "broker" / "processed")
    if report.scheduled or report.retries or report.stale_queued or report.leases:
        log.info(
            "maintenance.swept",
            scheduled=report.scheduled,
            retries=report.retries,
            stale_queued=report.stale_queued,
            leases=report.leases,
        )
    # Last, so a fresh heartbeat means a whole sweep ran (beat fired and a worker consumed the queue).
    record_heartbeat(rt.engine, "sweep", now)
    return report
