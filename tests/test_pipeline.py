"""The worker pipeline on the embedded SQLite and on the real PostgreSQL (no broker: a recording
dispatcher stands in for Celery; the Celery wiring is covered by tests/e2e)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, ClassVar

import pytest

from kmsg_worker.delivery import deliver
from kmsg_worker.errors import (
    IdempotencyConflictError,
    InvalidStateError,
    MessageNotFoundError,
    ValidationError,
)
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.providers.registry import PROVIDER_ALIASES, register_provider
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import MessageStatus as S
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.sweeps import sweep
from kmsg_worker.tracking import poll_statuses
from tests.conftest import Clock, RecordingDispatcher


class BackupMock(MockProvider):
    """A second mock provider, to exercise failover between providers."""

    name: ClassVar[str] = "mock_b"


if "mock_b" not in PROVIDER_ALIASES:
    register_provider("mock_b", "tests.test_pipeline:BackupMock")


def mock_of(rt: Runtime, name: str = "mock") -> MockProvider:
    provider = rt.provider(name)
    assert isinstance(provider, MockProvider)
    return provider


def status(rt: Runtime, message_id: str) -> str:
    row = rt.store.get(message_id)
    assert row is not None
    return row.status


def test_send_stores_then_enqueues_only_the_id(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    receipt = kmsg.send(to="010-1234-5678", text="hello", priority="high")
    assert receipt.status == "queued"
    assert dispatcher.sends == [(receipt.message_id, "high", None)]
    row = runtime.store.get(receipt.message_id)
    assert row is not None and row.recipient == "01012345678" and row.route == ["mock"]


def test_invalid_input_leaves_no_row_and_no_task(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    with pytest.raises(ValidationError) as info:
        kmsg.send(to="010-1234-5678", type="SMS", text="가" * 46)
    assert info.value.field == "text"
    with pytest.raises(ValidationError):
        kmsg.send(to="010-1234-5678", text="hi", provider_id="nope")
    assert runtime.store.count_by_status() == {}
    assert dispatcher.sends == []


def test_deliver_sends_once_and_a_second_run_is_a_no_op(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(to="01012345678", text="hello")
    first = deliver(runtime, receipt.message_id)
    second = deliver(runtime, receipt.message_id)
    assert (first.action, second.action) == ("sent", "not_claimed")
    assert mock_of(runtime).calls_for(receipt.message_id) == 1
    info = kmsg.get(receipt.message_id)
    assert info.status == "sent" and info.provider_message_id
    assert [a.outcome for a in info.attempts] == ["accepted"]


def test_a_message_is_found_by_the_provider_s_own_id(
    kmsg: KMsg,
    runtime: Runtime,
    clock: Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    import json
    import os

    from kmsg_worker.cli import main

    first = kmsg.send(to="01012345678", text="hello")
    other = kmsg.send(to="01087654321", text="hello")
    for receipt in (first, other):
        deliver(runtime, receipt.message_id)
    pmid = kmsg.get(first.message_id).provider_message_id
    assert pmid
    # By the provider's id: exactly that message, as get() shows it
    found = kmsg.find_by_provider_id(pmid)
    assert [(i.id, i.provider_message_id) for i in found] == [(first.message_id, pmid)]
    assert found[0] == kmsg.get(first.message_id)
    assert kmsg.find_by_provider_id(pmid, provider="mock") == found
    # another provider's id space, or an id nobody gave: nothing
    assert kmsg.find_by_provider_id(pmid, provider="mock_b") == []
    assert kmsg.find_by_provider_id("no-such-id") == []
    # and from the command line
    for key in list(os.environ):
        if key.startswith("KMSG_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KMSG_DATABASE_URL", runtime.settings.database_url)
    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path / "cli"))
    assert main(["get", "--provider-id", pmid, "--provider", "mock"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == first.message_id and shown["to"] == "010****5678"
    assert main(["get", "--provider-id", "no-such-id"]) == 3
    assert "no message known to any configured provider as 'no-such-id'" in capsys.readouterr().err
    assert main(["get", first.message_id, "--provider-id", pmid]) == 2
    assert main(["get", first.message_id, "--provider", "mock"]) == 2


def test_mark_sent_writes_the_row_and_its_attempt_together_only_from_sending(
    kmsg: KMsg, runtime: Runtime, clock: Clock
) -> None:
    receipt = kmsg.send(to="01012345678", text="hello")
    store = runtime.store
    now = clock.now

    def mark(attempt_no: int, latency_ms: float | None) -> bool:
        return store.mark_sent(
            receipt.message_id,
            now=now,
            provider="mock",
            provider_message_id="pm-1",
            attempt_no=attempt_no,
            provider_attempts=attempt_no,
            next_check_at=now + timedelta(minutes=1),
            native_fallback=False,
            warnings=[{"code": "W1", "message": "note", "details": {}}],
            attempt_outcome="reconciled_sent",
            latency_ms=latency_ms,
        )

    assert mark(1, None) is False  # still queued: neither the row nor an attempt is written
    assert status(runtime, receipt.message_id) == "queued" and store.attempts(receipt.message_id) == []
    assert store.claim_for_send(receipt.message_id, now=now, lease=timedelta(seconds=30)) is not None
    assert mark(1, None) is True  # no latency (a reconciliation): a NULL float is accepted
    row = store.get(receipt.message_id)
    assert row is not None
    assert (row.status, row.provider_message_id, row.attempts, row.lease_until) == ("sent", "pm-1", 1, None)
    assert row.warnings == [{"code": "W1", "message": "note", "details": {}}]
    assert [(a.attempt_no, a.outcome, a.latency_ms) for a in store.attempts(receipt.message_id)] == [
        (1, "reconciled_sent", None)
    ]
    assert mark(2, 3.5) is False  # already sent: a late duplicate changes nothing
    assert len(store.attempts(receipt.message_id)) == 1


def test_retryable_errors_back_off_then_succeed(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    receipt = kmsg.send(to="01012345678", text="hi", provider_options={"mock": {"fail_times": 2}})
    mid = receipt.message_id
    assert deliver(runtime, mid).action == "retry"
    row = runtime.store.get(mid)
    assert row is not None and row.status == S.RETRYING and row.next_attempt_at is not None
    delay = (row.next_attempt_at - clock.now).total_seconds()
    assert 0 < delay <= runtime.settings.retry.max_countdown
    assert dispatcher.sends[-1][2] == pytest.approx(delay)
    # not due yet: a redelivered task must not send early
    assert deliver(runtime, mid).action == "not_claimed"
    clock.advance(delay)
    assert deliver(runtime, mid).action == "retry"
    clock.advance(60)
    assert deliver(runtime, mid).action == "sent"
    assert [a.outcome for a in kmsg.get(mid).attempts] == ["retryable", "retryable", "accepted"]


def test_message_caused_rejection_fails_without_failover(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    runtime.router.providers.append("mock_b")
    runtime.router._types["mock_b"] = BackupMock.capabilities.types
    script = {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT", "provider_code": "3008"}]}
    receipt = kmsg.send(to="01012345678", text="hi", provider_options={"mock": script})
    assert deliver(runtime, receipt.message_id).action == "failed"
    info = kmsg.get(receipt.message_id)
    assert (info.status, info.error_code) == ("failed", "INVALID_RECIPIENT")
    assert "3008" in (info.error_message or "")


def test_provider_caused_rejection_fails_over_to_the_next_provider(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    runtime.router.providers.append("mock_b")
    runtime.router._types["mock_b"] = BackupMock.capabilities.types
    script = {"script": [{"outcome": "failure", "code": "INSUFFICIENT_BALANCE"}]}
    receipt = kmsg.send(to="01012345678", text="hi", provider_options={"mock": script})
    assert receipt.route == ("mock", "mock_b")
    assert deliver(runtime, receipt.message_id).action == "failover"
    assert dispatcher.ids.count(receipt.message_id) == 2
    # mock_b has its own call log: the script's first step is consumed again there, so give it a clean run
    mock_b = runtime.provider("mock_b")
    assert isinstance(mock_b, BackupMock)
    mock_b._log_path = None
    mock_b.calls.append({"message_id": receipt.message_id, "accepted": False})
    assert deliver(runtime, receipt.message_id).action == "sent"
    info = kmsg.get(receipt.message_id)
    assert info.provider == "mock_b"
    assert [(a.provider, a.outcome) for a in info.attempts] == [("mock", "rejected"), ("mock_b", "accepted")]


def test_exhausted_retries_fail(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(to="01012345678", text="hi", provider_options={"mock": {"fail_times": 99}})
    for _ in range(runtime.settings.retry.max_attempts):
        deliver(runtime, receipt.message_id)
        clock.advance(700)
    info = kmsg.get(receipt.message_id)
    assert info.status == "failed"
    assert len(info.attempts) == runtime.settings.retry.max_attempts


def test_lost_response_is_reconciled_not_resent(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(
        to="01012345678", text="hi", provider_options={"mock": {"script": [{"outcome": "lost_response"}]}}
    )
    mid = receipt.message_id
    assert deliver(runtime, mid).action == "reconcile"  # waits as retrying; looked up before any resend
    assert mock_of(runtime).calls_for(mid) == 1
    clock.advance(5)
    assert deliver(runtime, mid).action == "reconciled_sent"
    assert mock_of(runtime).calls_for(mid) == 1  # never sent twice
    assert [a.outcome for a in kmsg.get(mid).attempts] == ["timeout", "reconciled_sent"]


def test_expired_lease_is_reconciled_before_any_resend(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    # Given two messages claimed by a worker that then died: one after the provider took it, one before.
    took, never = kmsg.send(to="01011112222", text="a"), kmsg.send(to="01033334444", text="b")
    for receipt in (took, never):
        assert runtime.store.claim_for_send(receipt.message_id, now=clock.now, lease=timedelta(seconds=5))
    msg = kmsg.get(took.message_id)
    assert msg.status == "sending"
    mock_of(runtime).send(KMsg(runtime=runtime).validate(to="01011112222", text="a", id=took.message_id))
    # When the lease expires and the sweep runs
    clock.advance(runtime.settings.lease_seconds + 1)
    report = sweep(runtime)
    # Then the one the provider has is marked sent without a resend, the other is re-queued once.
    assert report.leases == 2
    assert status(runtime, took.message_id) == "sent"
    assert mock_of(runtime).calls_for(took.message_id) == 1
    assert status(runtime, never.message_id) == "queued"
    assert dispatcher.ids.count(never.message_id) == 2
    assert deliver(runtime, never.message_id).action == "sent"


def test_poison_message_becomes_dead(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(to="01012345678", text="hi")
    with runtime.store.sessions.begin() as s:
        row = s.get(MessageRow, receipt.message_id)
        assert row is not None
        row.deliveries = runtime.settings.max_deliveries
    assert deliver(runtime, receipt.message_id).action == "dead"
    info = kmsg.get(receipt.message_id)
    assert (info.status, info.error_code) == ("dead", "POISON_MESSAGE")
    assert mock_of(runtime).calls_for(receipt.message_id) == 0


def test_idempotency_key(kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher) -> None:
    first = kmsg.send(to="01012345678", text="hi", idempotency_key="order-7")
    again = kmsg.send(to="010-1234-5678", text="hi", idempotency_key="order-7")
    assert again.message_id == first.message_id and again.duplicate
    assert dispatcher.ids == [first.message_id]
    with pytest.raises(IdempotencyConflictError):
        kmsg.send(to="01012345678", text="different", idempotency_key="order-7")
    # another tenant may use the same key
    other = kmsg.send(to="01012345678", text="hi", idempotency_key="order-7", tenant="shop-b")
    assert other.message_id != first.message_id
    clock.advance(runtime.settings.idempotency_ttl.total_seconds() + 1)
    later = kmsg.send(to="01012345678", text="hi", idempotency_key="order-7")
    assert later.message_id != first.message_id and not later.duplicate


def test_idempotency_key_under_concurrency(kmsg: KMsg, runtime: Runtime) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            results.append(kmsg.send(to="01012345678", text="race", idempotency_key="race-1").message_id)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert sum(runtime.store.count_by_status().values()) == 1


def test_schedule_and_cancel(kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher) -> None:
    later = kmsg.schedule(to="01012345678", text="hi", at=clock.now + timedelta(days=90))
    soon = kmsg.schedule(to="01012345678", text="hi", at=clock.now + timedelta(minutes=1))
    assert later.status == soon.status == "scheduled"
    assert dispatcher.sends == []
    assert kmsg.cancel(later.message_id).status == "cancelled"
    clock.advance(61)
    assert sweep(runtime).scheduled == 1
    assert dispatcher.ids == [soon.message_id]
    assert deliver(runtime, soon.message_id).action == "sent"
    with pytest.raises(InvalidStateError, match="already sent"):
        kmsg.cancel(soon.message_id)
    with pytest.raises(MessageNotFoundError):
        kmsg.cancel("missing")


def test_terminal_states_never_regress(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(to="01012345678", text="hi")
    deliver(runtime, receipt.message_id)
    assert runtime.store.transition(receipt.message_id, S.DELIVERED, now=clock.now) == 1
    for target in (S.FAILED, S.QUEUED, S.SENDING, S.UNKNOWN, S.CANCELLED, S.DEAD):
        assert runtime.store.transition(receipt.message_id, target, now=clock.now) == 0
    assert status(runtime, receipt.message_id) == "delivered"


def test_stale_queued_messages_are_re_enqueued(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    receipt = kmsg.send(to="01012345678", text="hi")
    assert sweep(runtime).stale_queued == 0
    clock.advance(runtime.settings.stale_queued_seconds + 1)
    assert sweep(runtime).stale_queued == 1
    assert dispatcher.ids == [receipt.message_id, receipt.message_id]


def test_tracking_delivers_and_alimtalk_fallback_is_created_once(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    sms = kmsg.send(to="01012345678", text="hi")
    ata = kmsg.send(
        type="ALIMTALK",
        to="01099998888",
        template_id="T1",
        failover={"content": "fallback text"},
        provider_options={"mock": {"deliver": "FAILED:3104"}},
    )
    for r in (sms, ata):
        deliver(runtime, r.message_id)
    clock.advance(runtime.settings.tracking.first_check)
    reports = []
    # two sweeps at the same moment: the claim gives each row to one of them
    threads = [threading.Thread(target=lambda: reports.append(poll_statuses(runtime))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.claimed for r in reports) == 2
    assert status(runtime, sms.message_id) == "delivered"
    info = kmsg.get(ata.message_id)
    assert (info.status, info.error_code) == ("failed", "NOT_KAKAO_USER")
    assert info.children == [f"{ata.message_id}:fallback"]
    child = kmsg.get(info.children[0])
    assert (child.type, child.parent_id, child.status) == ("SMS", ata.message_id, "queued")
    assert dispatcher.ids.count(child.id) == 1
    # running the sweep again changes nothing
    clock.advance(3600)
    poll_statuses(runtime)
    assert kmsg.get(ata.message_id).children == [child.id]


def test_tracking_timeout_marks_unknown(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.send(to="01012345678", text="hi", provider_options={"mock": {"deliver": "PENDING"}})
    deliver(runtime, receipt.message_id)
    checks = 0
    while status(runtime, receipt.message_id) == "sent" and checks < 100:
        clock.advance(7200)
        poll_statuses(runtime)
        checks += 1
    info = kmsg.get(receipt.message_id)
    assert (info.status, info.error_code) == ("unknown", "TRACKING_TIMEOUT")
    assert 10 <= checks <= 14  # 24 h of checks at the 7,200 s ceiling


def test_send_many_simple(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    rows: list[dict[str, Any]] = [{"to": f"0101234{i:04d}", "variables": {"n": i}} for i in range(25)]
    rows.append({"to": "bad"})
    with pytest.raises(ValidationError) as info:
        kmsg.send_many(rows, defaults={"text": "hello #{n}"})
    assert "row 26" in str(info.value)
    assert runtime.store.count_by_status() == {}
    receipt = kmsg.send_many(rows, defaults={"text": "hello #{n}"}, on_invalid="skip")
    assert len(receipt.message_ids) == 25 and [e.row for e in receipt.invalid] == [26]
    assert runtime.store.count_by_status() == {"queued": 25}
    assert kmsg.get(receipt.message_ids[3]).batch_id == receipt.batch_id
