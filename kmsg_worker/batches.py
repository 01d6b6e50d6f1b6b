"""A batch after intake: its summary (from the database) and cancelling it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kmsg_worker.logging import get_logger
from kmsg_worker.pricing import unit_prices
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import FINAL, MessageStatus
from kmsg_worker.storage.batches import batch_counts, cancel_message_of_batch, cancel_unsent

__all__ = ["BatchSummary", "batch_summary", "cancel_batch", "cancel_batch_message"]

S = MessageStatus
log = get_logger("kmsg.batches")


def cancel_batch(rt: Runtime, batch_id: str) -> int:
    """Cancel every message of a batch that was not dispatched yet; returns how many.

    Chunks whose request is in flight are left to finish (what is sent stays sent); their run then
    sees the batch cancelled and cancels whatever it did not send.
    """
    cancelled, busy = cancel_unsent(rt.store, batch_id, now=rt.now())
    log.info("batch.cancelled", batch_id=batch_id, cancelled=cancelled, chunks_in_flight=busy)
    return cancelled


def cancel_batch_message(rt: Runtime, message_id: str, batch_id: str, chunk: int) -> int:
    """Cancel one message of a batch unless its chunk is in flight; returns 1 if it was cancelled."""
    return cancel_message_of_batch(rt.store, message_id, batch_id, chunk, now=rt.now())


@dataclass
class BatchSummary:
    """The standard bulk result summary (numbers come from the database)."""

    batch_id: str
    status: str
    total: int
    invalid: int
    by_status: dict[str, int] = field(default_factory=dict)
    by_provider: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    by_error_code: dict[str, int] = field(default_factory=dict)
    cost_estimate_krw: float = 0.0
    created_at: datetime | None = None
    first_sent_at: datetime | None = None
    last_sent_at: datetime | None = None
    finished_at: datetime | None = None
    throughput_per_s: float | None = None
    cancelled_at: datetime | None = None

    @property
    def suppressed(self) -> int:
        """Rows not sent because the recipient is on the tenant's suppression list."""
        return self.by_status.get(S.SUPPRESSED.value, 0)

    @property
    def deferred(self) -> int:
        """Advertising rows waiting for their sending window to open (ours, or the provider's).

        Their error code says so while they wait; a send clears it.
        """
        codes = self.by_error_code
        return codes.get("NIGHT_DEFERRED", 0) + codes.get("OUTSIDE_SEND_WINDOW", 0)

    @property
    def done(self) -> bool:
        """Every message reached ``sent`` or a final state."""
        pending = sum(self.by_status.get(s.value, 0) for s in (S.SCHEDULED, S.QUEUED, S.SENDING, S.RETRYING))
        return pending == 0


def batch_summary(rt: Runtime, batch_id: str) -> BatchSummary:
    """Compute the summary of ``batch_id`` from the message rows."""
    counts = batch_counts(rt.store, batch_id)
    prices = unit_prices(rt.settings.unit_prices)
    summary = BatchSummary(
        batch_id=batch_id,
        status=counts.status,
        total=counts.total,
        invalid=counts.invalid,
        by_status=counts.by_status,
        by_provider=counts.by_provider,
        by_type=counts.by_type,
        by_error_code=counts.by_error_code,
        cost_estimate_krw=round(sum(prices.get(t, 0.0) * n for t, n in counts.billed.items()), 1),
        created_at=counts.created_at,
        first_sent_at=counts.first_sent_at,
        last_sent_at=counts.last_sent_at,
        cancelled_at=counts.cancelled_at,
    )
    final_count = sum(n for st, n in counts.by_status.items() if MessageStatus(st) in FINAL)
    if final_count == summary.total and counts.last_final_at is not None:
        summary.finished_at = counts.last_final_at
    sent = sum(counts.billed.values())
    if sent and counts.last_sent_at is not None and counts.created_at is not None:
        span = (counts.last_sent_at - counts.created_at).total_seconds()
        summary.throughput_per_s = round(sent / span, 1) if span > 0 else None
    return summary
