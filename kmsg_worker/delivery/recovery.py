"""Recovery of unknown outcomes: did the provider already get these messages?

A request that timed out, or whose worker died mid-call, may or may not have reached the provider.
Before anything is sent again the provider is asked (by our ids, in pages), for all such rows of a
run at once: :func:`reconcile` is the one implementation, used before a single send's retry, before
a chunk's retry, for a cancelled chunk, for an expired single-send lease (:func:`reconcile_expired`)
and for a chunk whose worker died (:func:`recover_chunks`).

- found at the provider -> recorded ``sent`` (attempt ``reconciled_sent``), never sent again;
- not found -> an attempt row ``reconciled_missing``, and the row is sendable again;
- the provider cannot be asked -> final ``unknown`` rather than risk a duplicate;
- the look-up fails or cannot decide -> the rows wait and are asked again later (still marked
  unknown), after doubling waits, until ``KMSG_RECONCILE_MAX_CHECKS``: then final ``unknown``
  (``OUTCOME_UNDECIDED``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kmsg_worker.delivery.outcome import RECONCILE_DELAY
from kmsg_worker.delivery.record import Applied, hold, log_final
from kmsg_worker.errors import ErrorCode, ProviderError
from kmsg_worker.logging import get_logger
from kmsg_worker.providers.base import LookupHint, ProviderLookupUndecided, SendOutcome
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import AttemptOutcome, DeliveryAction, MessageStatus
from kmsg_worker.storage import chunks as chunk_store
from kmsg_worker.storage.messages import (
    Transition,
    attempt_row,
    count_undecided,
    insert_attempts,
    record_sent,
    record_transitions,
)
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.rows import SendRow

__all__ = ["LeaseReport", "Reconciled", "RecoveryReport", "reconcile", "reconcile_expired", "recover_chunks"]

S = MessageStatus
A = DeliveryAction
log = get_logger("kmsg.delivery")

#: The longest wait between two look-ups of one message.
UNDECIDED_MAX_DELAY = 600.0


@dataclass
class Reconciled:
    """What :func:`reconcile` established."""

    #: Rows the provider never got: sendable again (or re-queued, with ``requeue``).
    missing: list[SendRow] = field(default_factory=list)
    applied: Applied = field(default_factory=Applied)


def reconcile(
    rt: Runtime,
    rows: Sequence[SendRow],
    *,
    now: datetime,
    expect: Sequence[MessageStatus],
    chunk: tuple[str, int] | None = None,
    requeue: bool = False,
    why: str = "its last request timed out",
) -> Reconciled:
    """Ask each provider once (in pages) whether it got ``rows``, and record what it says.

    Args:
        rt: The runtime.
        rows: Rows whose outcome is unknown.
        now: The time of the run.
        expect: The states the rows are held in.
        chunk: The ``(batch_id, chunk)`` they belong to, if one.
        requeue: Move the rows the provider never got back to ``queued`` (an expired lease, whose
            run is over) instead of leaving them held for this run to send.
        why: Why the outcome is unknown (stored on rows that end ``unknown``).
    """
    out = Reconciled()
    by_provider: dict[str, list[SendRow]] = defaultdict(list)
    for row in rows:
        by_provider[row.provider].append(row)
    for name, group in by_provider.items():
        provider = rt.provider(name)
        if not provider.capabilities.lookup_by_reference:
            record_transitions(
                rt.store,
                [
                    Transition(
                        [r.id for r in group],
                        S.UNKNOWN,
                        {
                            "provider": name,
                            "error_code": ErrorCode.OUTCOME_UNKNOWN.value,
                            "error_message": f"{why}; {name} cannot be asked whether it got the message",
                        },
                    )
                ],
                [],
                now=now,
                expect=expect,
            )
            out.applied.counts[A.UNKNOWN] += len(group)
            continue
        # What we know narrows the provider's search: recipient, sender, type, and a window that
        # starts no later than the request could have (the message's acceptance).
        hints = {r.id: LookupHint.for_message(r.message, r.created_at) for r in group}
        undecided: set[str] = set()
        try:
            found: Mapping[str, SendOutcome] = provider.lookup([r.id for r in group], hints)
        except ProviderLookupUndecided as exc:
            # What it found is certain; the rest of what it could not decide waits like any undecided look-up.
            found, undecided, lookup_error = exc.found, set(exc.undecided), exc
        except ProviderError as exc:
            # Cannot tell yet: the rows wait (still marked unknown) and are asked again, never resent blindly.
            out.applied.merge(_undecided(rt, group, exc, now=now, expect=expect))
            continue
        hits = [r for r in group if r.id in found and found[r.id].accepted]
        record_sent(
            rt.store,
            hits,
            found,
            now=now,
            next_check_at=now + timedelta(seconds=rt.settings.tracking.first_check),
            latency_ms=None,
            attempt_outcome=AttemptOutcome.RECONCILED_SENT,
            expect=expect,
            chunk=chunk,
        )
        out.applied.counts[A.RECONCILED_SENT] += len(hits)
        hit_ids = {r.id for r in hits}
        if undecided - hit_ids:
            waiting = [r for r in group if r.id in undecided and r.id not in hit_ids]
            out.applied.merge(_undecided(rt, waiting, lookup_error, now=now, expect=expect))
            hit_ids |= undecided
        missing = [r for r in group if r.id not in hit_ids]
        _record_missing(rt, missing, now, expect, requeue, why)
        out.missing.extend(missing)
        if requeue:
            out.applied.counts[A.REQUEUED] += len(missing)
    return out


def _undecided(
    rt: Runtime, rows: list[SendRow], error: ProviderError, *, now: datetime, expect: Sequence[MessageStatus]
) -> Applied:
    """A look-up that settled nothing: ask again later, backing off, until the checks or the age run out.

    Then the message ends ``unknown`` (``OUTCOME_UNDECIDED``): it is never resent (the provider may
    have it) and never looked up again.
    """
    applied = Applied()
    counts = count_undecided(rt.store, [r.id for r in rows], now=now, expect=expect)
    limit = rt.settings.reconcile_max_checks
    give_up: list[SendRow] = []
    waits: dict[float, list[SendRow]] = defaultdict(list)
    for row in rows:
        if row.id not in counts:
            continue  # moved on meanwhile
        checks = counts[row.id]
        policy = rt.settings.retry_for(row.message.type.value, row.message.priority.value)
        too_old = (now - row.created_at).total_seconds() >= policy.max_age
        log.warning(
            "message.reconcile_undecided",
            message_id=row.id,
            provider=row.provider,
            checks=checks,
            error_code=error.code.value,
        )
        if checks >= limit or too_old:
            give_up.append(row)
        else:
            waits[undecided_delay(checks)].append(row)
    if give_up:
        text = (
            f"{rows[0].provider} could not say whether it got the message ({error.code.value}); "
            "not resent, to avoid a duplicate"
        )
        values = {"error_code": ErrorCode.OUTCOME_UNDECIDED.value, "error_message": text, "provider": rows[0].provider}
        record_transitions(
            rt.store, [Transition([r.id for r in give_up], S.UNKNOWN, values)], [], now=now, expect=expect
        )
        for row in give_up:
            log_final("message.unknown", row, ErrorCode.OUTCOME_UNDECIDED.value)
        applied.counts[A.UNKNOWN] += len(give_up)
    for delay, group in waits.items():
        applied.merge(
            hold(
                rt,
                group,
                delay=delay,
                now=now,
                expect=expect,
                action=A.RECONCILE_DEFERRED,
                outcome_unknown=True,
                error=error,
            )
        )
    return applied


def undecided_delay(checks: int) -> float:
    """Seconds before look-up number ``checks + 1`` after ``checks`` undecided ones: doubling, capped."""
    return float(min(RECONCILE_DELAY * 2**checks, UNDECIDED_MAX_DELAY))


def _record_missing(
    rt: Runtime, rows: list[SendRow], now: datetime, expect: Sequence[MessageStatus], requeue: bool, why: str
) -> None:
    """The provider never got these: an audit attempt row each, and sendable again."""
    if not rows:
        return
    attempts = [
        attempt_row(r, AttemptOutcome.RECONCILED_MISSING, now, detail=f"{why}; the provider never received it")
        for r in rows
    ]
    values = {"attempts": MessageRow.attempts + 1, "outcome_unknown": False, "check_count": 0}
    if requeue:
        transition = Transition([r.id for r in rows], S.QUEUED, {**values, "queued_at": now, "lease_until": None})
        record_transitions(rt.store, [transition], attempts, now=now, expect=expect)
    else:
        with rt.store.sessions.begin() as s:
            insert_attempts(rt.store, s, attempts)
            rt.store.update_fields([r.id for r in rows], expect=expect, now=now, session=s, **values)
    for row in rows:
        row.attempts += 1
        row.outcome_unknown = False


# -- expired single-send leases ---------------------------------------------------------------------


@dataclass
class LeaseReport:
    """What :func:`reconcile_expired` did."""

    reconciled_sent: int = 0
    requeued: int = 0
    unknown: int = 0
    deferred: int = 0


def reconcile_expired(rt: Runtime, ids: Sequence[str]) -> LeaseReport:
    """Settle messages whose worker died while ``sending`` (lease expired), many at a time.

    The outcome of the interrupted call is unknown, so each provider is asked once for all of its
    messages; a message is sent again only if the provider never got it.
    """
    now = rt.now()
    rows = chunk_store.load_sending(rt.store, ids)
    done = reconcile(rt, rows, now=now, expect=(S.SENDING,), requeue=True, why="worker lost while sending")
    counts = done.applied.counts
    report = LeaseReport(
        reconciled_sent=counts[A.RECONCILED_SENT],
        requeued=counts[A.REQUEUED],
        unknown=counts[A.UNKNOWN],
        deferred=counts[A.RECONCILE_DEFERRED],
    )
    _wake_requeued(rt, done.missing)
    _wake(rt, rows, done.applied.wakes)
    if ids:
        log.info(
            "lease.reconciled",
            expired=len(ids),
            reconciled_sent=report.reconciled_sent,
            requeued=report.requeued,
            unknown=report.unknown,
            deferred=report.deferred,
        )
    return report


def _wake_requeued(rt: Runtime, rows: Sequence[SendRow]) -> None:
    """Publish re-queued rows: a single message's own task, or its chunk's."""
    singles: dict[str, list[str]] = defaultdict(list)
    chunks: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        if row.batch_id is not None and row.chunk is not None:
            chunks[row.batch_id].add(row.chunk)
        else:
            singles[row.priority].append(row.id)
            log.warning("lease.requeued", message_id=row.id, provider=row.provider, deliveries=row.deliveries)
    for priority, ids in singles.items():
        rt.dispatcher.send(ids, priority=priority)
    for batch_id, numbers in chunks.items():
        rt.dispatcher.chunk(batch_id, sorted(numbers))


def _wake(rt: Runtime, rows: Sequence[SendRow], wakes: Sequence[tuple[list[str], float]]) -> None:
    """Publish the tasks of rows that wait a short while (the others wait for the sweep)."""
    by_id = {r.id: r for r in rows}
    for ids, delay in wakes:
        woken = [by_id[i] for i in ids if i in by_id]
        singles = [r for r in woken if r.batch_id is None]
        for priority in {r.priority for r in singles}:
            rt.dispatcher.send(
                [r.id for r in singles if r.priority == priority], priority=priority, countdown=delay or None
            )
        chunks = {(r.batch_id, r.chunk) for r in woken if r.batch_id is not None and r.chunk is not None}
        for batch_id, number in chunks:
            assert batch_id is not None and number is not None
            rt.dispatcher.chunk(batch_id, [number], countdown=delay or None)


# -- chunks whose worker died -----------------------------------------------------------------------


@dataclass
class RecoveryReport:
    """What :func:`recover_chunks` did."""

    chunks: int = 0
    reconciled_sent: int = 0
    deferred: int = 0
    unknown: int = 0


def recover_chunks(rt: Runtime, *, now: datetime | None = None, limit: int = 100) -> RecoveryReport:
    """Take over chunks whose worker died with their request in flight (lease expired, still in flight).

    Each is held for another lease while every row it did not record is looked up at the provider:
    the ones the provider has are recorded ``sent`` and never sent again; the rest stay sendable.
    Then the chunk is freed and published again. The maintenance sweep runs this under its own time
    limit, so a slow look-up cannot turn a chunk into poison.
    """
    now = now or rt.now()
    report = RecoveryReport()
    hold_until = now + timedelta(seconds=rt.settings.lease_seconds)
    for batch_id, chunk in chunk_store.expired_chunks(rt.store, now=now, limit=limit):
        rows = chunk_store.take_expired_chunk(rt.store, batch_id, chunk, now=now, hold=hold_until)
        if rows is None:
            continue
        report.chunks += 1
        done = reconcile(
            rt,
            rows,
            now=now,
            expect=(S.QUEUED, S.RETRYING),
            chunk=(batch_id, chunk),
            why="worker lost while sending",
        )
        counts = done.applied.counts
        report.reconciled_sent += counts[A.RECONCILED_SENT]
        report.deferred += counts[A.RECONCILE_DEFERRED]
        report.unknown += counts[A.UNKNOWN]
        # Not a completed run: the poison count stands until a run of the chunk finishes.
        chunk_store.release_chunk(rt.store, batch_id, chunk, now=rt.now(), completed=False)
        log.warning(
            "batch.chunk_recovered",
            batch_id=batch_id,
            chunk=chunk,
            rows=len(rows),
            reconciled_sent=counts[A.RECONCILED_SENT],
            deferred=counts[A.RECONCILE_DEFERRED],
            unknown=counts[A.UNKNOWN],
        )
        rt.dispatcher.chunk(batch_id, [chunk])
    return report
