"""Admission: may these rows go out now, and to which provider?

Right before a provider call, for a single send and a chunk's rows alike:

- **Circuit breakers** (:mod:`kmsg_worker.circuit`): a row whose provider's circuit is open moves on
  to the next provider of its route whose circuit is closed (one ``circuit_open`` attempt row per
  provider skipped, no call made); when every remaining provider is open it waits for the first
  cool-down, or fails once it is older than its maximum age.
- **Rate limits** (:mod:`kmsg_worker.ratelimit`): one token request per provider call; a refusal
  gives the rows back as ``retrying`` for the limiter's wait, spread a little so they do not all
  return together.

- **The advertising window** (:func:`admit_window`): an advertising message due outside its window
  (21:00-08:00 Korean time; FriendTalk 20:50-08:00) waits as ``retrying`` until the window opens,
  unless it carries the recipient's night consent. A chunk claimed at night therefore holds every
  advertising row until the morning: a campaign running at 21:00 stops there and resumes at 08:00.

None of them spends a retry, since nothing was sent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kmsg_worker import circuit, ratelimit
from kmsg_worker.delivery.record import Applied, log_final
from kmsg_worker.delivery.record import hold as hold_rows
from kmsg_worker.errors import ErrorCode
from kmsg_worker.logging import get_logger
from kmsg_worker.message.advertising import next_allowed
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import AttemptOutcome, DeliveryAction, MessageStatus
from kmsg_worker.storage.messages import Transition, attempt_row, insert_attempts, record_transitions
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.rows import SendRow

__all__ = ["Admitted", "admit_circuits", "admit_window", "throttle"]

S = MessageStatus
A = DeliveryAction
log = get_logger("kmsg.delivery")


@dataclass
class Admitted:
    """The rows that may be sent now (their ``route_index`` moved past open circuits), and what became of the others."""

    ready: list[SendRow] = field(default_factory=list)
    applied: Applied = field(default_factory=Applied)


def admit_window(rt: Runtime, rows: Sequence[SendRow], *, now: datetime, expect: Sequence[MessageStatus]) -> Admitted:
    """Hold advertising rows due outside their sending window until it opens (no retry spent).

    Rows that are informational, or carry the recipient's night consent, pass. The others wait in
    the database (``next_attempt_at`` = the window's opening, error code ``NIGHT_DEFERRED``) and
    are picked up by the retry sweep then, or by a countdown when the opening is seconds away.
    """
    admitted = Admitted()
    waiting: dict[datetime, list[SendRow]] = {}
    consented: list[SendRow] = []
    for row in rows:
        message = row.message
        if message.purpose is None:
            admitted.ready.append(row)
            continue
        opening = next_allowed(now, message.type)
        if opening is None:
            admitted.ready.append(row)
        elif message.night_consent:
            consented.append(row)
            admitted.ready.append(row)
        else:
            waiting.setdefault(opening, []).append(row)
    if consented:
        log.info(
            "advertising.night_consent_used",
            count=len(consented),
            message_id=consented[0].id,
            batch_id=consented[0].batch_id,
        )
    for opening, group in waiting.items():
        delay = max((opening - now).total_seconds(), 0.0)
        log.info(
            "advertising.deferred",
            count=len(group),
            message_id=group[0].id,
            batch_id=group[0].batch_id,
            until=opening.isoformat(),
        )
        reason = (
            ErrorCode.NIGHT_DEFERRED.value,
            f"advertising outside its sending window: held until {opening.isoformat()}",
        )
        admitted.applied.merge(
            hold_rows(rt, group, delay=delay, now=now, expect=expect, action=A.DEFERRED, reason=reason)
        )
    return admitted


def admit_circuits(rt: Runtime, rows: Sequence[SendRow], *, now: datetime, expect: Sequence[MessageStatus]) -> Admitted:
    """Move rows past providers whose circuit is open; hold or fail the rows with no provider left.

    Each provider's breaker is asked once per call (in half-open, asking takes a probe permit).
    """
    allowed: dict[str, bool] = {}

    def allow(name: str) -> bool:
        if name not in allowed:
            allowed[name] = circuit.allow(rt, name)
        return allowed[name]

    admitted = Admitted()
    moved: dict[tuple[int, int], list[SendRow]] = {}
    stuck: dict[tuple[str, ...], list[SendRow]] = {}
    for row in rows:
        index = row.route_index
        while index < len(row.route) and not allow(row.route[index]):
            index += 1
        if index >= len(row.route):
            stuck.setdefault(tuple(row.route[row.route_index :]), []).append(row)
        elif index != row.route_index:
            moved.setdefault((row.route_index, index), []).append(row)
        else:
            admitted.ready.append(row)
    if moved:
        admitted.ready.extend(_skip_open(rt, moved, now, expect))
    for names, group in stuck.items():
        admitted.applied.merge(_all_open(rt, list(names), group, now, expect))
    return admitted


def _skip_open(
    rt: Runtime, moved: dict[tuple[int, int], list[SendRow]], now: datetime, expect: Sequence[MessageStatus]
) -> list[SendRow]:
    """Fail over past providers whose circuit is open, one attempt row per skipped provider."""
    updates: list[tuple[list[str], dict[str, Any]]] = []
    attempts: list[dict[str, Any]] = []
    ready: list[SendRow] = []
    for (start, index), group in moved.items():
        skipped = index - start
        for row in group:
            for offset, name in enumerate(row.route[start:index], start=1):
                attempts.append(
                    attempt_row(
                        row,
                        AttemptOutcome.CIRCUIT_OPEN,
                        now,
                        provider=name,
                        attempt_no=row.attempts + offset,
                        error_code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE.value,
                        detail=f"{name}: circuit open, skipped without a call",
                    )
                )
            log.info(
                "failover.circuit_open",
                message_id=row.id,
                skipped=row.route[start:index],
                to_provider=row.route[index],
            )
            row.route_index, row.provider_attempts, row.attempts = index, 0, row.attempts + skipped
            ready.append(row)
        # No status change: the rows stay held (sending, or under the chunk's lease) and go out now.
        updates.append(
            (
                [r.id for r in group],
                {"route_index": index, "provider_attempts": 0, "attempts": MessageRow.attempts + skipped},
            )
        )
    with rt.store.sessions.begin() as s:
        insert_attempts(rt.store, s, attempts)
        for ids, values in updates:
            rt.store.update_fields(ids, expect=expect, now=now, session=s, **values)
    return ready


def _all_open(
    rt: Runtime, names: list[str], rows: list[SendRow], now: datetime, expect: Sequence[MessageStatus]
) -> Applied:
    """Every provider left in the route is open: wait for the first cool-down (or give up when too old)."""
    too_old: list[SendRow] = []
    waiting: list[SendRow] = []
    for row in rows:
        policy = rt.settings.retry_for(row.message.type.value, row.message.priority.value)
        (too_old if (now - row.created_at).total_seconds() >= policy.max_age else waiting).append(row)
    applied = Applied()
    if too_old:
        by_provider: dict[str, list[SendRow]] = {}
        for row in too_old:
            by_provider.setdefault(row.provider, []).append(row)
            log_final("message.failed", row, ErrorCode.RETRIES_EXHAUSTED.value)
        record_transitions(
            rt.store,
            [
                Transition(
                    [r.id for r in group],
                    S.FAILED,
                    {
                        "provider": provider,
                        "error_code": ErrorCode.RETRIES_EXHAUSTED.value,
                        "error_message": f"circuit open for {', '.join(names)} until the message's maximum age",
                    },
                )
                for provider, group in by_provider.items()
            ],
            [],
            now=now,
            expect=expect,
        )
        applied.counts[A.FAILED] += len(too_old)
    if waiting:
        # Until the first circuit may half-open; while a probe is out (half-open), a fraction of the
        # cool-down, so waiting messages poll the breaker gently instead of every fraction of a second.
        cooldown = rt.circuits.policy.cooldown
        delay = max(circuit.retry_in(rt, names), cooldown / 4, 0.5) * random.uniform(1.0, 1.5)
        log.warning("circuit.all_open", providers=names, count=len(waiting), delay=round(delay, 3))
        applied.merge(hold_rows(rt, waiting, delay=delay, now=now, expect=expect, action=A.CIRCUIT_OPEN))
    return applied


def throttle(
    rt: Runtime,
    provider: str,
    rows: Sequence[SendRow],
    *,
    hold: Sequence[SendRow] | None = None,
    now: datetime,
    expect: Sequence[MessageStatus],
) -> Applied | None:
    """Take the rate-limit tokens for one call of ``rows`` to ``provider``; ``None`` when it may go out.

    Otherwise the rows (or ``hold``, when given) are given back for the limiter's wait, spread a
    little so they do not all return together, and what was done is returned.
    """
    messages = [r.message for r in rows]
    wait = ratelimit.acquire(
        rt, provider, messages[0] if len(messages) == 1 else messages, max_wait=rt.settings.rate_limit_inline_wait
    )
    if wait <= 0:
        return None
    delay = wait * random.uniform(1.0, 1.25)
    held = rows if hold is None else hold
    log.info("ratelimit.throttled", provider=provider, count=len(held), wait=round(wait, 3), delay=round(delay, 3))
    return hold_rows(rt, held, delay=delay, now=now, expect=expect, action=A.THROTTLED)
