"""A bulk chunk: claim the chunk's lease, settle unknown outcomes, admit, call per provider, record.

A chunk task (:func:`process_chunk`) claims its rows with one lease row, makes as few provider
calls as the provider allows (one ``send_batch`` per ``send_batch_limit`` rows; the adapter splits a
call into requests by its own rules and runs them through its in-flight window), and records
every recipient's result with one statement per outcome kind, through the same steps as a single
send. When a bulk call partly fails, only the failed recipients are retried; recipients that were
accepted are never sent again. Running a chunk twice is harmless: the second claim finds the lease
held, or nothing left to send.

Routing is decided per chunk (round robin and weights then spread chunks, not rows, across
providers): per-row routing would cost a Redis round trip per message.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kmsg_worker.delivery.admission import admit_circuits, admit_window
from kmsg_worker.delivery.call import Called, call_provider
from kmsg_worker.delivery.record import Applied
from kmsg_worker.delivery.recovery import reconcile
from kmsg_worker.errors import ErrorCode
from kmsg_worker.logging import get_logger
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import event_mark
from kmsg_worker.status import DeliveryAction, MessageStatus
from kmsg_worker.storage import chunks as chunk_store
from kmsg_worker.storage.messages import Transition, record_transitions
from kmsg_worker.storage.rows import SendRow

__all__ = ["ChunkResult", "process_chunk"]

S = MessageStatus
A = DeliveryAction
log = get_logger("kmsg.delivery")
#: States a row of a claimed chunk is in while its request is in flight (the chunk holds the lease).
HELD = (S.QUEUED, S.RETRYING)


@dataclass
class ChunkResult:
    """What one chunk run did."""

    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    unknown: int = 0
    failed_over: int = 0
    dead: int = 0
    cancelled: int = 0
    #: Vendor requests made (an adapter may split a call into several).
    requests: int = 0
    throttled: int = 0
    #: Advertising rows held until their sending window opens.
    deferred: int = 0
    #: Countdowns (seconds; 0 = now) at which the chunk must run again, published after its lease is released.
    republish: list[float] = field(default_factory=list)

    def again(self, delay: float) -> None:
        """Run the chunk again after ``delay`` seconds (once this run has let go of the lease)."""
        if delay not in self.republish:
            self.republish.append(delay)

    def add(self, applied: Applied) -> None:
        """Count what a step did, and the runs it asks for."""
        c = applied.counts
        self.sent += c[A.SENT] + c[A.RECONCILED_SENT]
        self.retrying += c[A.RETRY] + c[A.RECONCILE] + c[A.RECONCILE_DEFERRED] + c[A.CIRCUIT_OPEN]
        self.throttled += c[A.THROTTLED]
        self.deferred += c[A.DEFERRED]
        self.failed += c[A.FAILED]
        self.unknown += c[A.UNKNOWN]
        self.failed_over += c[A.FAILOVER]
        for _, delay in applied.wakes:
            self.again(delay)


def process_chunk(rt: Runtime, batch_id: str, chunk: int) -> ChunkResult:
    """Claim and send one chunk of a batch (the body of ``kmsg.send_chunk``).

    Running it twice is harmless: the second run finds the lease held, or the rows already sent.
    """
    now = rt.now()
    claim = chunk_store.claim_chunk(
        rt.store, batch_id, chunk, now=now, lease=timedelta(seconds=rt.settings.lease_seconds)
    )
    if claim is None:
        return ChunkResult()
    result = ChunkResult(claimed=len(claim.rows))
    if claim.deliveries > rt.settings.max_deliveries:
        values = {"error_code": ErrorCode.POISON_MESSAGE.value, "error_message": "claimed too often"}
        record_transitions(rt.store, [Transition([r.id for r in claim.rows], S.DEAD, values)], [], now=now, expect=HELD)
        result.dead = len(claim.rows)
    elif claim.cancelled:
        _cancel_claimed(rt, (batch_id, chunk), claim.rows, now, result)
    elif claim.rows:
        _send_claimed(rt, (batch_id, chunk), claim.rows, now, result)
    # Every outcome is recorded: free the lease, then ask for the runs this one decided on (a run
    # published before the release would find the lease held and do nothing).
    chunk_store.release_chunk(rt.store, batch_id, chunk, now=rt.now())
    for delay in result.republish:
        rt.dispatcher.chunk(batch_id, [chunk], countdown=min(delay, rt.settings.retry.max_countdown) or None)
    return result


def _cancel_claimed(
    rt: Runtime, chunk: tuple[str, int], rows: list[SendRow], now: datetime, result: ChunkResult
) -> None:
    """The batch was cancelled while this chunk was in flight or waiting: settle and cancel its rows."""
    # Rows whose last request has an unknown outcome are looked up first: what was sent stays sent.
    unknown = [r for r in rows if r.outcome_unknown]
    rest = [r for r in rows if not r.outcome_unknown]
    if unknown:
        settled = reconcile(rt, unknown, now=now, expect=HELD, chunk=chunk)
        result.add(settled.applied)
        rest.extend(settled.missing)
    if rest:
        record_transitions(
            rt.store,
            [Transition([r.id for r in rest], S.CANCELLED, {"error_code": "CANCELLED"})],
            [],
            now=now,
            expect=HELD,
        )
        result.cancelled += len(rest)


def _send_claimed(rt: Runtime, chunk: tuple[str, int], rows: list[SendRow], now: datetime, result: ChunkResult) -> None:
    """One ``send_batch`` call per provider (split further only by what one call takes)."""
    sendable = [r for r in rows if not r.outcome_unknown]
    unknown = [r for r in rows if r.outcome_unknown]
    if unknown:
        settled = reconcile(rt, unknown, now=now, expect=HELD, chunk=chunk)
        result.add(settled.applied)
        sendable.extend(settled.missing)
    window = admit_window(rt, sendable, now=now, expect=HELD)
    result.add(window.applied)
    admitted = admit_circuits(rt, window.ready, now=now, expect=HELD)
    result.add(admitted.applied)
    by_provider: dict[str, list[SendRow]] = defaultdict(list)
    for row in admitted.ready:
        by_provider[row.provider].append(row)
    for name, group in by_provider.items():
        limit = rt.provider(name).send_batch_limit
        for start in range(0, len(group), limit):
            piece = group[start : start + limit]
            called = call_provider(rt, name, piece, expect=HELD, chunk=chunk, hold_on_throttle=group[start:])
            result.add(called)
            if called.latency_ms is None:
                break  # throttled: the rest of the group waits with this piece
            result.requests += called.requests
            _log_request(chunk, name, piece, called)


def _log_request(chunk: tuple[str, int], name: str, piece: Sequence[SendRow], called: Called) -> None:
    """One event per provider call (``send_batch``), labelled for metrics (provider, type, tenant, latency).

    ``requests`` is the vendor requests the adapter made for the call (it may split one call into
    several and run them concurrently); ``latency_ms`` is the whole call's.
    """
    counts = called.counts
    log.info(
        "batch.chunk_sent",
        batch_id=chunk[0],
        chunk=chunk[1],
        provider=name,
        type=piece[0].message.type.value,
        tenant=piece[0].message.tenant,
        claimed=len(piece),
        sent=counts.get(A.SENT, 0),
        retrying=counts.get(A.RETRY, 0) + counts.get(A.RECONCILE, 0),
        failed=counts.get(A.FAILED, 0),
        requests=called.requests,
        latency_ms=round(called.latency_ms or 0.0, 2),
        **event_mark(piece[0].message),  # a chunk is one batch's: one key, live or test
    )
