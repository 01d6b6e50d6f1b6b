"""Delivery tracking: poll providers for messages that are ``sent``, apply results monotonically.

The sweep claims due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) by pushing their
``next_check_at`` forward, so two sweeps running at once never poll the same message. Results only
move a message ``sent -> delivered | failed | unknown``; a final state never changes again.

When an ALIMTALK fails because the recipient is not a Kakao user and the caller asked for a
fallback the provider did not perform natively, the SMS/LMS child is created **exactly once**: it
gets the deterministic id ``<parent>:fallback`` (a primary key), and only the sweep whose
conditional ``sent -> failed`` update succeeded inserts it, in the same transaction.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kmsg_worker.errors import ErrorCode, ProviderError
from kmsg_worker.logging import get_logger
from kmsg_worker.message import Message, MessageType, count_bytes
from kmsg_worker.providers.base import DeliveryState, StatusQuery, StatusReport
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.models import MessageRow

__all__ = ["PollReport", "fallback_message", "poll_statuses"]

S = MessageStatus
log = get_logger("kmsg.tracking")
NON_KAKAO_CODES = frozenset({"3104", "3107", "3018", "3019", "3020"})


@dataclass
class PollReport:
    """What one tracking sweep did."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    unknown: int = 0
    pending: int = 0
    fallbacks: list[str] = field(default_factory=list)


def _backoff(rt: Runtime, check_count: int) -> float:
    ladder = rt.settings.tracking.backoff
    return ladder[min(check_count, len(ladder) - 1)]


def _is_not_kakao_user(report: StatusReport) -> bool:
    if report.not_kakao_user or (report.code or "") in NON_KAKAO_CODES:
        return True
    text = f"{report.code or ''} {report.description or ''}"
    return "미사용자" in text or ("카카오" in text and "미사용" in text)


def fallback_message(parent: Message) -> Message | None:
    """The SMS/LMS child of an ALIMTALK, or ``None`` when no fallback text was given."""
    failover = parent.failover
    if failover is None or not failover.enabled or not (failover.content and failover.content.strip()):
        return None
    text = failover.content
    if failover.channel == "lms" or count_bytes(text) > 90 or failover.title:
        mtype = MessageType.LMS
    else:
        mtype = MessageType.SMS
    return Message(
        id=f"{parent.id}:fallback",
        type=mtype,
        to=parent.to,
        sender=parent.sender,
        text=text,
        subject=failover.title if mtype is MessageType.LMS else None,
        tenant=parent.tenant,
        priority=parent.priority,
        custom_fields=dict(parent.custom_fields),
    )


def _create_fallback(rt: Runtime, s: Session, row: MessageRow, now: datetime) -> str | None:
    parent = Message.from_content(row.content)
    if parent.type is not MessageType.ALIMTALK or parent.failover is None or not parent.failover.enabled:
        return None
    if row.native_fallback:
        row_state = "skipped:native_fallback"
        s.query(MessageRow).filter(MessageRow.id == row.id).update({"fallback_state": row_state})
        return None
    child = fallback_message(parent)
    if child is None:
        s.query(MessageRow).filter(MessageRow.id == row.id).update({"fallback_state": "skipped:no_fallback_content"})
        log.info("failover.skipped", message_id=row.id, reason="no_fallback_content")
        return None
    route = rt.router.route(child)
    try:
        with s.begin_nested():
            s.add(
                MessageRow(
                    id=child.id,
                    tenant=child.tenant,
                    parent_id=row.id,
                    type=child.type.value,
                    recipient=child.to,
                    status=S.QUEUED,
                    priority=child.priority.value,
                    route=route,
                    route_index=0,
                    content=child.content(),
                    created_at=now,
                    updated_at=now,
                    queued_at=now,
                )
            )
    except IntegrityError:
        return None  # created by someone else already: exactly once
    s.query(MessageRow).filter(MessageRow.id == row.id).update({"fallback_state": "created"})
    return child.id


def _apply(rt: Runtime, row: MessageRow, report: StatusReport | None, now: datetime, out: PollReport) -> None:
    started = row.sent_at or row.created_at
    if row.scheduled_at and row.scheduled_at > started:
        started = row.scheduled_at + timedelta(seconds=120)
    if report is None or report.state not in (DeliveryState.DELIVERED, DeliveryState.FAILED):
        if (now - started).total_seconds() >= rt.settings.tracking.max_duration:
            rt.store.transition(
                row.id,
                S.UNKNOWN,
                now=now,
                expect=[S.SENT],
                error_code=ErrorCode.TRACKING_TIMEOUT.value,
                error_message="no final delivery report within the tracking window",
            )
            out.unknown += 1
            return
        rt.store.update_fields(
            row.id,
            expect=S.SENT,
            now=now,
            check_count=row.check_count + 1,
            next_check_at=now + timedelta(seconds=_backoff(rt, row.check_count)),
            provider_status_code=report.code if report else row.provider_status_code,
            provider_status_message=report.description if report else row.provider_status_message,
        )
        out.pending += 1
        return
    values: dict[str, Any] = {
        "provider_status_code": report.code,
        "provider_status_message": report.description,
        "check_count": row.check_count + 1,
    }
    if report.state is DeliveryState.DELIVERED:
        rt.store.transition(
            row.id, S.DELIVERED, now=now, expect=[S.SENT], delivered_at=report.delivered_at or now, **values
        )
        out.delivered += 1
        return
    not_kakao = _is_not_kakao_user(report)
    with rt.store.sessions.begin() as s:
        changed = rt.store.transition(
            row.id,
            S.FAILED,
            now=now,
            expect=[S.SENT],
            session=s,
            error_code=(ErrorCode.NOT_KAKAO_USER if not_kakao else ErrorCode.DELIVERY_FAILED).value,
            error_message=report.description or f"provider status {report.code}",
            **values,
        )
        child_id = _create_fallback(rt, s, row, now) if changed and not_kakao else None
    out.failed += 1
    if child_id is not None:
        out.fallbacks.append(child_id)
        log.info("failover.triggered", message_id=row.id, child_id=child_id, kind="alimtalk_to_sms")
        rt.dispatcher.send([child_id], priority=row.priority)


def poll_statuses(rt: Runtime, *, limit: int | None = None) -> PollReport:
    """Run one tracking sweep: claim due ``sent`` rows, query providers in bulk, apply results."""
    now = rt.now()
    limit = limit or rt.settings.sweep_batch
    # Hold the claimed rows long enough for this sweep to finish before another may take them.
    rows = rt.store.claim_due_checks(now=now, hold=timedelta(seconds=rt.settings.lease_seconds), limit=limit)
    out = PollReport(claimed=len(rows))
    by_provider: dict[str, list[MessageRow]] = defaultdict(list)
    for row in rows:
        by_provider[row.provider or row.route[row.route_index]].append(row)
    for name, group in by_provider.items():
        provider = rt.provider(name)
        if not provider.capabilities.status_query:
            for row in group:
                if rt.settings.tracking.no_status_api == "unknown":
                    rt.store.transition(
                        row.id,
                        S.UNKNOWN,
                        now=now,
                        expect=[S.SENT],
                        error_code=ErrorCode.UNSUPPORTED.value,
                        error_message=f"{name} has no delivery-status API",
                    )
                    out.unknown += 1
                else:
                    _apply(rt, row, None, now, out)
            continue
        reports: dict[str, StatusReport] = {}
        step = 1000 if provider.capabilities.bulk_status else 1
        for start in range(0, len(group), step):
            part = group[start : start + step]
            queries = [
                StatusQuery(
                    message_id=r.id,
                    provider_message_id=r.provider_message_id or "",
                    type=MessageType(r.type),
                    to=r.recipient,
                    requested_at=r.sent_at or r.created_at,
                    scheduled_at=r.scheduled_at,
                )
                for r in part
            ]
            try:
                for report in provider.query_status(queries):
                    reports[report.message_id] = report
            except ProviderError as exc:
                log.warning("tracking.query_failed", provider=name, error_code=exc.code.value, count=len(part))
        for row in group:
            _apply(rt, row, reports.get(row.id), now, out)
    if rows:
        log.info(
            "tracking.swept",
            claimed=out.claimed,
            delivered=out.delivered,
            failed=out.failed,
            unknown=out.unknown,
            pending=out.pending,
            fallbacks=len(out.fallbacks),
        )
    return out
