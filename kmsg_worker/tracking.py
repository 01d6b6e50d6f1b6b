"""Delivery tracking: poll providers for messages that are ``sent``, apply results monotonically.

One sweep (:func:`poll_statuses`, run by beat on the ``kmsg.poll`` queue):

1. claims due rows (``status = 'sent' AND next_check_at <= now``, served by the partial index
   ``ix_kmsg_messages_due_check``) with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, by pushing their
   ``next_check_at`` forward by the claim hold (``KMSG_TRACKING_CLAIM_SECONDS``), so two sweeps
   running at once never poll the same message. A sweep stops querying at 3/4 of the hold and
   gives back the rows it did not reach, so its claim never runs out while it works;
2. asks each provider's status API, in bulk where it allows. A provider that fails (or cannot even
   be built) only delays its own rows, which back off and keep the error as ``error_code`` /
   ``error_message`` while they stay ``sent``. A query the provider refuses for good (an
   authentication or request error that asking again cannot fix) ends the rows it asked about
   ``unknown`` at once, with the provider's code;
3. applies every answer with a conditional update, ``sent -> delivered | failed | unknown``,
   keeping the provider's status code, text and delivery/failure times; a final state never
   changes again. Not final yet: the next check backs off along ``KMSG_TRACKING_BACKOFF``
   (30, 120, 600, 1800, 7200 s); still not final ``KMSG_TRACKING_MAX_SECONDS`` (24 h) after the
   send: ``unknown`` with ``TRACKING_TIMEOUT``. A message the provider took without giving an id
   cannot be asked about: ``unknown`` with ``MISSING_PROVIDER_MESSAGE_ID``.

When an ALIMTALK fails because the recipient is not a Kakao user (:func:`is_not_kakao_user`) and
the caller asked for a fallback the provider did not perform natively, the SMS/LMS child is created
**exactly once**: it gets the deterministic id ``<parent>:fallback`` (a primary key), and only the
sweep whose conditional ``sent -> failed`` update succeeded inserts it, in the same transaction.
The child is an ordinary message: routed, sent, retried and tracked like any other, and enqueued
only after the commit (a lost publish is recovered by the stale-queued sweep). A fallback that
cannot be made is recorded on the parent as ``fallback_state = 'skipped:<reason>'``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from kmsg_worker import adrules
from kmsg_worker.errors import ErrorCode, ProviderError, ValidationError
from kmsg_worker.logging import get_logger
from kmsg_worker.message import Message, MessageType, ValidationLimits, count_bytes, normalize
from kmsg_worker.providers.base import DeliveryState, Provider, StatusQuery, StatusReport
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import event_mark, is_sandbox, sandbox_child
from kmsg_worker.settings import TrackingPolicy
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.messages import insert_child, set_fallback_state
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.rows import new_message_row

__all__ = [
    "NON_KAKAO_CODES",
    "PollReport",
    "apply_reports",
    "fallback_message",
    "is_not_kakao_user",
    "poll_statuses",
]

S = MessageStatus
log = get_logger("kmsg.tracking")
#: Status codes meaning "this recipient cannot get AlimTalk": Solapi 3104 (not a KakaoTalk user) and
#: 3107 (no KakaoTalk use lately, or AlimTalk blocked), Kakao 3018 (NoSendAvailable), 3019
#: (MessageNoUser) and 3020 (AlimTalk receipt blocked), from Solapi's and Kakao's published result codes.
NON_KAKAO_CODES = frozenset({"3104", "3107", "3018", "3019", "3020"})
#: Messages per call to a bulk status API (the adapter pages the vendor's own limit itself).
BULK_STATUS_BATCH = 1000
#: Messages per call to a provider that answers one message per request: small, so that the sweep
#: checks its deadline often and a provider outage costs one failed request, not one per row.
SINGLE_STATUS_BATCH = 20
#: Share of the claim hold a sweep may spend working; the rest is margin before another may claim.
DEADLINE_SHARE = 0.75
#: Claim rounds one sweep may run while every round comes back full (a backlog after an outage).
MAX_ROUNDS = 20


@dataclass
class PollReport:
    """What one tracking sweep did.

    Attributes:
        claimed: Rows claimed (all rounds).
        delivered: Rows that became ``delivered``.
        failed: Rows that became ``failed``.
        unknown: Rows that became ``unknown`` (timeout, no status API, no provider message id).
        pending: Rows still ``sent``, checked again later.
        released: Claimed rows given back unchecked because the sweep's deadline came.
        query_errors: Status requests that failed (one per provider and round at most).
        fallbacks: Ids of the SMS/LMS fallback children created.
        early: Delivery reports about messages whose send is not recorded yet (reports only).
    """

    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    unknown: int = 0
    pending: int = 0
    released: int = 0
    query_errors: int = 0
    fallbacks: list[str] = field(default_factory=list)
    early: int = 0


@dataclass(frozen=True)
class _QueryError:
    """Why a status request failed: kept on the rows it delayed."""

    code: str
    message: str
    #: The provider refused the query for good: the rows it asked about end ``unknown`` now.
    final: bool = False


def _backoff(policy: TrackingPolicy, check_count: int) -> float:
    ladder = policy.backoff
    return ladder[min(check_count, len(ladder) - 1)]


def is_not_kakao_user(report: StatusReport, policy: TrackingPolicy | None = None) -> bool:
    """Whether a failed delivery report means "the recipient cannot get AlimTalk".

    True for the adapter's own flag, the codes in :data:`NON_KAKAO_CODES`, a status text with
    ``미사용자`` (Solapi) or with both ``카카오`` and ``미사용`` (IWINV), and the extra codes and
    texts configured with ``KMSG_FALLBACK_CODES`` / ``KMSG_FALLBACK_TEXTS``.

    Args:
        report: A provider's status report.
        policy: Tracking settings (for the configured extra codes and texts).
    """
    if report.state is not DeliveryState.FAILED:
        return False
    code = (report.code or "").strip()
    extra_codes = policy.fallback_codes if policy else frozenset()
    if report.not_kakao_user or code in NON_KAKAO_CODES or code in extra_codes:
        return True
    text = f"{code} {report.description or ''}"
    if "미사용자" in text or ("카카오" in text and "미사용" in text):
        return True
    return any(part in text for part in (policy.fallback_texts if policy else ()))


def fallback_message(parent: Message, *, limits: ValidationLimits | None = None) -> Message | None:
    """Build the SMS/LMS child of an ALIMTALK, validated like any message.

    The child is an LMS when the caller asked for one (``failover.channel = "lms"``), when the text
    is longer than an SMS may be (``limits.auto_lms_bytes``, 90 bytes), or when it has a title and
    no channel was asked for (only an LMS has a subject); otherwise an SMS. Its id is
    ``<parent id>:fallback``, so it can only ever exist once.

    Args:
        parent: The failed ALIMTALK.
        limits: Validation limits (the settings' ones).

    Returns:
        The child, or ``None`` when no fallback was asked for or no fallback text was given.

    Raises:
        ValidationError: The fallback cannot be sent as given (e.g. a text over the LMS limit).
    """
    failover = parent.failover
    if failover is None or not failover.enabled:
        return None
    text = (failover.content or "").strip()
    if not text:
        return None
    limits = limits or ValidationLimits()
    title = (failover.title or "").strip() or None
    long_text = count_bytes(text) > limits.auto_lms_bytes
    lms = failover.channel == "lms" or long_text or (title is not None and failover.channel is None)
    mtype = MessageType.LMS if lms else MessageType.SMS
    child = normalize(
        {
            "type": mtype.value,
            "to": parent.to,
            "sender": parent.sender,
            "text": text,
            "subject": title if lms else None,
            "tenant": parent.tenant,
            "priority": parent.priority.value,
            "custom_fields": dict(parent.custom_fields),
            # The child is under the parent's rules: advertising stays advertising (night window,
            # its text checked as given), and the parent's night consent goes with it.
            "purpose": parent.purpose,
            "compose": "check",
            "night_consent": parent.night_consent or None,
            # A test message's fallback is simulated too: it must never reach a real provider.
            **(sandbox_child() if is_sandbox(parent) else {}),
        },
        limits=limits,
    )
    return child.with_id(f"{parent.id}:fallback")


def _build_fallback(rt: Runtime, row: MessageRow) -> tuple[Message, list[str]] | str | None:
    """The child and its route, ``None`` when no fallback was asked for, or the reason to skip it."""
    parent = Message.from_content(row.content)
    if parent.type is not MessageType.ALIMTALK or parent.failover is None or not parent.failover.enabled:
        return None
    if row.native_fallback:
        # The provider sends its own SMS replacement (Solapi disableSms=false, IWINV reSend=Y,
        # Aligo failover=Y): a child of ours would reach the recipient twice.
        return "native_fallback"
    try:
        child = fallback_message(parent, limits=rt.settings.limits)
    except ValidationError as exc:
        return f"invalid:{exc.field}:{exc.rule}"
    if child is None:
        return "no_fallback_content"
    try:
        return child, rt.router.route(child)
    except ValidationError:
        return "no_route"


def _create_fallback(rt: Runtime, s: Session, row: MessageRow, now: datetime) -> str | None:
    """Insert the fallback child inside the caller's transaction; return its id if this call made it."""
    built = _build_fallback(rt, row)
    if built is None:
        return None
    if isinstance(built, str):
        set_fallback_state(s, row.id, f"skipped:{built}")
        log.info("failover.skipped", message_id=row.id, reason=built)
        return None
    child, route = built
    if not insert_child(s, new_message_row(child, route, now, parent_id=row.id)):
        return None  # created by someone else already: exactly once
    set_fallback_state(s, row.id, "created", child_id=child.id, now=now)
    return child.id


def _reported(value: datetime | None, now: datetime) -> datetime:
    # A naive time from an adapter has no zone we could trust: keep when we learned it instead.
    return value if value is not None and value.tzinfo is not None else now


def _status_values(row: MessageRow, report: StatusReport) -> dict[str, Any]:
    # Keep the last code/text the provider gave when this answer carries none.
    return {
        "check_count": row.check_count + 1,
        "provider_status_code": report.code or row.provider_status_code,
        "provider_status_message": report.description or row.provider_status_message,
    }


def _give_up(rt: Runtime, row: MessageRow, now: datetime, out: PollReport, code: ErrorCode, text: str) -> None:
    if rt.store.transition(row.id, S.UNKNOWN, now=now, expect=[S.SENT], error_code=code.value, error_message=text):
        out.unknown += 1


def _tracking_expired(rt: Runtime, row: MessageRow, now: datetime) -> bool:
    started = row.sent_at or row.created_at
    if row.scheduled_at and row.scheduled_at > started:
        # A provider-side scheduled send is only due at its time (+120 s grace, as in _first_check).
        started = row.scheduled_at + timedelta(seconds=120)
    return (now - started).total_seconds() >= rt.settings.tracking.max_duration


def _not_final(
    rt: Runtime, row: MessageRow, report: StatusReport | None, now: datetime, out: PollReport, error: _QueryError | None
) -> None:
    if error is not None and error.final:
        _give_up(rt, row, now, out, ErrorCode(error.code), error.message)
        return
    if _tracking_expired(rt, row, now):
        reason = "no final delivery report within the tracking window"
        if error is not None:
            reason += f"; last check: {error.message}"
        _give_up(rt, row, now, out, ErrorCode.TRACKING_TIMEOUT, reason)
        return
    values: dict[str, Any] = {
        "check_count": row.check_count + 1,
        "next_check_at": now + timedelta(seconds=_backoff(rt.settings.tracking, row.check_count)),
    }
    if report is not None:
        values.update(_status_values(row, report))
    if error is not None:
        # While the message is still ``sent`` these say why its last status check failed.
        values.update(error_code=error.code, error_message=error.message)
    elif row.error_code is not None:
        values.update(error_code=None, error_message=None)
    rt.store.update_fields(row.id, expect=S.SENT, now=now, **values)
    out.pending += 1


def _failed(rt: Runtime, row: MessageRow, report: StatusReport, now: datetime, out: PollReport) -> None:
    not_kakao = is_not_kakao_user(report, rt.settings.tracking)
    code = ErrorCode.NOT_KAKAO_USER if not_kakao else ErrorCode.DELIVERY_FAILED
    if report.opted_out:
        code = ErrorCode.AD_OPTED_OUT
    with rt.store.sessions.begin() as s:
        changed = rt.store.transition(
            row.id,
            S.FAILED,
            now=now,
            expect=[S.SENT],
            session=s,
            error_code=code.value,
            error_message=report.description or f"provider status {report.code}",
            failed_at=_reported(report.failed_at, now),
            **_status_values(row, report),
        )
        # Only the sweep whose sent -> failed update won creates the child: exactly once.
        child_id = _create_fallback(rt, s, row, now) if changed and not_kakao else None
    if not changed:
        return
    out.failed += 1
    log.info(
        "message.delivery_failed",
        message_id=row.id,
        provider=row.provider,
        type=row.type,
        tenant=row.tenant,
        error_code=code.value,
        provider_code=report.code,
        **event_mark(row.content or {}),
    )
    if report.opted_out:
        # The recipient refused the sender (a 080 opt-out): no advertising to the number again.
        adrules.suppress_refuser(
            rt.settings,
            rt.store,
            tenant=row.tenant,
            numbers=[row.recipient],
            provider=row.provider or "unknown",
            provider_code=report.code,
            message_ids=[row.id],
            now=now,
        )
    if child_id is None:
        return
    out.fallbacks.append(child_id)
    log.info("failover.triggered", message_id=row.id, child_id=child_id, kind="alimtalk_to_sms")
    try:
        rt.dispatcher.send([child_id], priority=row.priority)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the child is committed, the sweep re-enqueues it
        log.warning("failover.enqueue_failed", message_id=child_id, error=type(exc).__name__)


def _apply(
    rt: Runtime,
    row: MessageRow,
    report: StatusReport | None,
    now: datetime,
    out: PollReport,
    error: _QueryError | None = None,
) -> None:
    """Apply one answer (or its absence) to one claimed row, conditionally on it still being ``sent``."""
    if report is not None and report.state is DeliveryState.DELIVERED:
        changed = rt.store.transition(
            row.id,
            S.DELIVERED,
            now=now,
            expect=[S.SENT],
            delivered_at=_reported(report.delivered_at, now),
            error_code=None,
            error_message=None,
            **_status_values(row, report),
        )
        out.delivered += changed
        if changed:
            delivered_at = _reported(report.delivered_at, now)
            log.info(
                "message.delivered",
                message_id=row.id,
                provider=row.provider,
                type=row.type,
                tenant=row.tenant,
                delivery_seconds=round((delivered_at - row.created_at).total_seconds(), 3),
                **event_mark(row.content or {}),
            )
    elif report is not None and report.state is DeliveryState.FAILED:
        _failed(rt, row, report, now, out)
    else:
        _not_final(rt, row, report, now, out, error)


def apply_reports(rt: Runtime, provider: str, reports: Sequence[tuple[str, StatusReport]]) -> PollReport:
    """Apply a provider's pushed delivery reports exactly as a poll's answers are applied.

    Each report is matched to the ``sent`` row the provider knows by its id, then goes through
    :func:`_apply`: the same conditional ``sent -> delivered | failed`` and the same fallback,
    created exactly once whether a report or a poll saw the failure first. A settled row leaves
    ``sent`` and so the polling index. A report that settles nothing (still sending, an unknown
    id, a row settled already) changes nothing: polling remains the safety net.

    Args:
        rt: The process's runtime.
        provider: The provider that sent them.
        reports: ``(provider message id, report)`` pairs (:meth:`Provider.delivery_reports`).
    """
    out = PollReport()
    final = {DeliveryState.DELIVERED, DeliveryState.FAILED}
    by_pmid = {pmid: report for pmid, report in reports if report.state in final}
    now = rt.now()
    # A report can overtake our own record of the send (the provider answered, the worker has not
    # written ``sent`` yet): such a row is still on its way, and the report must come again. Which
    # rows are on their way is read *before* the sent rows are matched: read after, a row written
    # ``sent`` in between would be neither matched nor on its way, and its report would be lost.
    ours = {r.message_id: pmid for pmid, r in by_pmid.items() if r.message_id}
    on_the_way = rt.store.unsent_ids(list(ours))
    matched: set[str] = set()
    for start in range(0, len(by_pmid), BULK_STATUS_BATCH):
        wanted = list(by_pmid)[start : start + BULK_STATUS_BATCH]
        for row in rt.store.sent_by_provider_ids(provider, wanted):
            out.claimed += 1
            matched.add(row.provider_message_id or "")
            _apply(rt, row, replace(by_pmid[row.provider_message_id or ""], message_id=row.id), now, out)
    out.early = sum(1 for message_id in on_the_way if ours[message_id] not in matched)
    log.info(
        "tracking.reports_applied",
        provider=provider,
        received=len(reports),
        matched=out.claimed,
        delivered=out.delivered,
        failed=out.failed,
        fallbacks=len(out.fallbacks),
        early=out.early,
    )
    return out


def _query_error(exc: Exception) -> _QueryError:
    if isinstance(exc, ProviderError):
        if not exc.retryable:
            # Retrying cannot fix it (bad credentials, a required setting missing, a request the
            # API refuses): polling for 24 hours would only repeat the refusal.
            code = f" (provider code {exc.provider_code})" if exc.provider_code else ""
            return _QueryError(exc.code.value, f"status query refused{code}: {exc}"[:500], final=True)
        return _QueryError(exc.code.value, f"status query failed: {exc}"[:500])
    return _QueryError(ErrorCode.UNKNOWN_ERROR.value, f"status query failed: {type(exc).__name__}: {exc}"[:500])


def _status_query(row: MessageRow) -> StatusQuery:
    return StatusQuery(
        message_id=row.id,
        provider_message_id=row.provider_message_id or "",
        type=MessageType(row.type),
        to=row.recipient,
        requested_at=row.sent_at or row.created_at,
        scheduled_at=row.scheduled_at,
    )


def _no_status_api(
    rt: Runtime, provider: Provider, group: Sequence[MessageRow], now: datetime, out: PollReport
) -> None:
    if rt.settings.tracking.no_status_api == "unknown":
        out.unknown += rt.store.transition(
            [r.id for r in group],
            S.UNKNOWN,
            now=now,
            expect=[S.SENT],
            error_code=ErrorCode.UNSUPPORTED.value,
            error_message=f"{provider.name} has no delivery-status API",
        )
        return
    for row in group:
        _apply(rt, row, None, now, out)


def _poll_provider(
    rt: Runtime,
    name: str,
    group: Sequence[MessageRow],
    *,
    now: datetime,
    held_until: datetime,
    deadline: float,
    out: PollReport,
) -> None:
    error: _QueryError | None = None
    try:
        provider = rt.provider(name)
    except Exception as exc:  # noqa: BLE001 - an unknown or misconfigured provider only delays its own rows
        error = _query_error(exc)
        out.query_errors += 1
        log.error("tracking.provider_unavailable", provider=name, error=str(exc)[:200], count=len(group))
        for row in group:
            _apply(rt, row, None, now, out, error)
        return
    if not provider.capabilities.status_query:
        _no_status_api(rt, provider, group, now, out)
        return
    step = BULK_STATUS_BATCH if provider.capabilities.bulk_status else SINGLE_STATUS_BATCH
    for start in range(0, len(group), step):
        if error is None and time.monotonic() > deadline:
            rest = [r.id for r in group[start:]]
            out.released += rt.store.release_checks(rest, held_until=held_until, due=now)
            log.warning("tracking.deadline_reached", provider=name, released=len(rest))
            return
        part = group[start : start + step]
        reports: dict[str, StatusReport] = {}
        if error is None:
            try:
                reports = {r.message_id: r for r in provider.query_status([_status_query(r) for r in part])}
            except Exception as exc:  # noqa: BLE001 - isolate one provider's failure (or adapter bug) from the rest
                # Stop asking this provider in this sweep: its remaining rows back off with the error.
                error = _query_error(exc)
                out.query_errors += 1
                log.warning("tracking.query_failed", provider=name, error_code=error.code, count=len(group) - start)
        for row in part:
            _apply(rt, row, reports.get(row.id), now, out, error)
        if error is not None and error.final:
            # Only the rows that were asked about end here; the rest, not asked, back off as usual.
            error = replace(error, final=False)


def _poll_round(rt: Runtime, *, limit: int, deadline: float, out: PollReport) -> int:
    """Claim one batch of due rows and settle it; returns how many rows were claimed."""
    now = rt.now()
    held_until = now + timedelta(seconds=rt.settings.tracking.claim_seconds)
    rows = rt.store.claim_due_checks(now=now, hold=held_until - now, limit=limit)
    out.claimed += len(rows)
    by_provider: dict[str, list[MessageRow]] = defaultdict(list)
    for row in rows:
        if (row.provider_message_id or "").strip():
            by_provider[row.provider or row.route[row.route_index]].append(row)
        else:
            _give_up(
                rt,
                row,
                now,
                out,
                ErrorCode.MISSING_PROVIDER_MESSAGE_ID,
                "the provider accepted the message without an id, so its status cannot be asked for",
            )
    for name, group in by_provider.items():
        _poll_provider(rt, name, group, now=now, held_until=held_until, deadline=deadline, out=out)
    return len(rows)


def poll_statuses(rt: Runtime, *, limit: int | None = None) -> PollReport:
    """Run one tracking sweep: claim due ``sent`` rows, query providers in bulk, apply the results.

    Safe to run any number of times at once (two beats, overlapping runs): each row is claimed by
    one sweep, and every state change is conditional on the row still being ``sent``.

    Args:
        rt: The process's runtime.
        limit: Rows per claim (default ``KMSG_SWEEP_BATCH``); while claims come back full, the
            sweep claims again, up to :data:`MAX_ROUNDS` rounds and its deadline.

    Returns:
        What the sweep did.
    """
    limit = limit or rt.settings.sweep_batch
    deadline = time.monotonic() + rt.settings.tracking.claim_seconds * DEADLINE_SHARE
    out = PollReport()
    for _ in range(MAX_ROUNDS):
        if _poll_round(rt, limit=limit, deadline=deadline, out=out) < limit or time.monotonic() > deadline:
            break
    if out.claimed:
        log.info(
            "tracking.swept",
            claimed=out.claimed,
            delivered=out.delivered,
            failed=out.failed,
            unknown=out.unknown,
            pending=out.pending,
            released=out.released,
            query_errors=out.query_errors,
            fallbacks=len(out.fallbacks),
        )
    return out
