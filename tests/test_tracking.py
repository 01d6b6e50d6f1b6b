"""Delivery tracking and the AlimTalk -> SMS/LMS fallback, on SQLite and PostgreSQL.

The providers are the fake Solapi, IWINV and Aligo servers over real HTTP (their statuses progress
by :class:`~kmsg_worker.testing.fakeserver.DeliveryRule`) and the in-process mock; the runtime's clock
is controllable, so backoff and the 24 h timeout are tested without waiting.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kmsg_worker.delivery import deliver
from kmsg_worker.errors import ErrorCode, ProviderTransientError, ValidationError
from kmsg_worker.message import Failover, Message, MessageType, Priority, count_bytes
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.aligo import AligoProvider
from kmsg_worker.providers.base import DeliveryState, StatusQuery, StatusReport
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings, TrackingPolicy
from kmsg_worker.status import MessageStatus as S
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.testing.fake_iwinv import not_kakao_user_rule
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from kmsg_worker.tracking import fallback_message, is_not_kakao_user, poll_statuses
from tests.conftest import RecordingDispatcher, truncate

pytestmark = pytest.mark.integration


class Clock:
    """A controllable clock starting at the real time (the fakes' statuses progress in real time)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_rt(
    backend_url: str,
    settings_factory: Any,
    dispatcher: RecordingDispatcher,
    fakes: dict[str, FakeProviderServer],
    clock: Clock,
) -> Iterator[Any]:
    """Build runtimes on the fakes (extra ``KMSG_*`` variables per test); closed at the end."""
    made: list[Runtime] = []

    def make(**env: str) -> Runtime:
        base = {**fake_env(fakes), "KMSG_PROVIDERS": "solapi,iwinv,aligo,mock"}
        rt = Runtime(settings_factory(backend_url, **{**base, **env}), dispatcher=dispatcher, clock=clock)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()
    for server in fakes.values():
        server.ledger.reset()
        server.set_faults()


@pytest.fixture
def rt(make_rt: Any) -> Runtime:
    runtime: Runtime = make_rt()
    return runtime


def row_of(rt: Runtime, message_id: str) -> MessageRow:
    row = rt.store.get(message_id)
    assert row is not None
    return row


def send_now(rt: Runtime, **fields: Any) -> str:
    """Store and send one message through the pipeline; it ends ``sent``."""
    receipt = KMsg(runtime=rt).send(**fields)
    result = deliver(rt, receipt.message_id)
    assert result.action == "sent", result
    return receipt.message_id


def settle(rt: Runtime, clock: Clock, seconds: float | None = None) -> Any:
    """Let the first check come due and run one sweep."""
    clock.advance(rt.settings.tracking.first_check if seconds is None else seconds)
    return poll_statuses(rt)


# -- checks, backoff and the 24 h timeout ----------------------------------------------------------


def test_checks_back_off_30_120_600_1800_7200_then_unknown_after_24h(rt: Runtime, clock: Clock) -> None:
    # Given a message the provider never reports as final
    sent_at = clock.now
    mid = send_now(
        rt, to="01020000001", text="pending", provider_id="mock", provider_options={"mock": {"deliver": "PENDING"}}
    )
    assert row_of(rt, mid).next_check_at == sent_at + timedelta(seconds=30)
    # When every check runs exactly when it is due
    gaps: list[float] = []
    checks: list[float] = []
    for _ in range(40):
        row = row_of(rt, mid)
        if row.status != "sent":
            break
        assert row.next_check_at is not None
        gaps.append((row.next_check_at - clock.now).total_seconds())
        clock.now = row.next_check_at
        checks.append((clock.now - sent_at).total_seconds())
        poll_statuses(rt)
    # Then the gaps follow the ladder, and the first check after 24 h gives up (t = 88,980 s)
    assert gaps[:7] == [30, 30, 120, 600, 1800, 7200, 7200]
    assert set(gaps[5:]) == {7200}
    row = row_of(rt, mid)
    assert (row.status, row.error_code) == ("unknown", "TRACKING_TIMEOUT")
    assert checks[-1] == 88_980 and checks[-2] < 86_400
    assert row.provider_status_code == "SENT"  # the provider's last word is kept


def test_a_provider_scheduled_send_is_first_checked_after_its_time(rt: Runtime, clock: Clock) -> None:
    # Given a message sent to the provider before its scheduled time (a provider-side reservation)
    kmsg = KMsg(runtime=rt)
    at = clock.now + timedelta(hours=1)
    mid = kmsg.schedule(to="01020000002", text="reserved", at=at).message_id
    assert rt.store.transition(mid, S.QUEUED, now=clock.now, queued_at=clock.now) == 1
    assert deliver(rt, mid).action == "sent"
    # Then its first check is the scheduled time plus 120 s, not 30 s after the send
    assert row_of(rt, mid).next_check_at == at + timedelta(seconds=120)


def test_delivered_keeps_the_providers_code_text_and_time(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    fakes["solapi"].ledger.set_rule("01020000003", DeliveryRule("DELIVERED", "4000", "수신 완료"))
    mid = send_now(rt, to="01020000003", text="hello")
    report = settle(rt, clock)
    row = row_of(rt, mid)
    assert report.delivered == 1
    assert (row.status, row.provider_status_code, row.provider_status_message) == ("delivered", "4000", "수신 완료")
    assert row.delivered_at is not None and abs((row.delivered_at - datetime.now(UTC)).total_seconds()) < 60
    assert row.check_count == 1 and row.error_code is None


def test_failed_keeps_the_providers_code_text_and_failure_time(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    fakes["solapi"].ledger.set_rule("01020000004", DeliveryRule("FAILED", "3059", "변작된 발신번호."))
    mid = send_now(rt, to="01020000004", text="hello")
    assert settle(rt, clock).failed == 1
    info = KMsg(runtime=rt).get(mid)
    row = row_of(rt, mid)
    assert (info.status, info.error_code, info.provider_status_code) == ("failed", "DELIVERY_FAILED", "3059")
    assert row.provider_status_message == "변작된 발신번호." and info.error_message == "변작된 발신번호."
    assert row.failed_at is not None and info.failed_at == row.failed_at
    assert row.failed_at <= datetime.now(UTC) and row.final_at == clock.now
    # a final state never changes again, whatever a later sweep would say
    clock.advance(7200)
    assert poll_statuses(rt).claimed == 0
    assert rt.store.transition(mid, S.DELIVERED, now=clock.now) == 0


def test_a_failing_status_api_delays_only_its_own_rows(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given messages at Solapi, whose status API is down, and at IWINV, whose API works
    at_solapi = [send_now(rt, to=f"0102000010{i}", text="s") for i in range(3)]
    at_iwinv = [send_now(rt, to=f"0102000011{i}", text="i", provider_id="iwinv") for i in range(2)]
    fakes["solapi"].set_faults(error_rate=1.0)
    solapi_requests = fakes["solapi"].ledger.requests
    # When the sweep runs
    report = settle(rt, clock)
    # Then IWINV's rows are settled, Solapi's back off keeping the error, after one request only
    assert report.claimed == 5 and report.delivered == 2 and report.pending == 3 and report.query_errors == 1
    assert fakes["solapi"].ledger.requests - solapi_requests == 1
    assert {row_of(rt, m).status for m in at_iwinv} == {"delivered"}
    for mid in at_solapi:
        row = row_of(rt, mid)
        assert (row.status, row.check_count) == ("sent", 1)
        assert row.error_code == "NETWORK_SERVICE_UNAVAILABLE" and "status query failed" in (row.error_message or "")
        assert row.next_check_at == clock.now + timedelta(seconds=30)
    # and when Solapi is back, the next check settles them and clears the error
    fakes["solapi"].set_faults()
    assert settle(rt, clock, 30).delivered == 3
    assert {(row_of(rt, m).status, row_of(rt, m).error_code) for m in at_solapi} == {("delivered", None)}


def test_a_status_query_refused_for_good_ends_unknown_at_once_with_the_providers_code(
    make_rt: Any, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    # Given IWINV without the company id its SMS history API needs (no retry can fix that)
    rt = make_rt(KMSG_IWINV_SMS_COMPANY_ID="")
    refused = [send_now(rt, to=f"0102000015{i}", text="i", provider_id="iwinv") for i in range(2)]
    requests = fakes["iwinv"].ledger.requests
    # When the first check comes due
    report = settle(rt, clock)
    # Then the rows end unknown now, with the code and the reason, instead of polling for 24 hours
    assert report.unknown == 2 and report.pending == 0 and report.query_errors == 1
    for mid in refused:
        row = row_of(rt, mid)
        assert (row.status, row.error_code) == ("unknown", "UNSUPPORTED")
        assert "status query refused" in (row.error_message or "") and "KMSG_IWINV_SMS_COMPANY_ID" in (
            row.error_message or ""
        )
    # (refused by the adapter itself: nothing was asked of the provider)
    assert fakes["iwinv"].ledger.requests == requests
    # and the next sweep leaves them alone
    assert settle(rt, clock, 7200).claimed == 0


def test_a_status_query_refused_by_the_provider_ends_unknown_and_a_retryable_one_backs_off(
    make_rt: Any, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    rt = make_rt()
    mid = send_now(rt, to="01020000161", text="s")
    # A busy status API: the row backs off, still sent
    fakes["solapi"].set_faults(error_rate=1.0)
    assert settle(rt, clock).pending == 1 and row_of(rt, mid).status == "sent"
    # The provider then refuses the query as unauthenticated (a worker with a wrong key): unknown
    # at once, with its code
    fakes["solapi"].set_faults()
    report = settle(make_rt(KMSG_SOLAPI_API_KEY="wrong-key"), clock, 30)
    row = row_of(rt, mid)
    assert report.unknown == 1 and (row.status, row.error_code) == ("unknown", "AUTHENTICATION_FAILED")
    assert "status query refused (provider code" in (row.error_message or "")


class BrokenStatusMock(MockProvider):
    """A mock whose status API has a bug (raises something that is not a ProviderError)."""

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        raise KeyError("statusCode")


def test_an_adapter_bug_or_a_missing_provider_does_not_stop_the_sweep(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    broken = send_now(rt, to="01020000201", text="m", provider_id="mock")
    gone = send_now(rt, to="01020000202", text="m", provider_id="mock")
    fine = send_now(rt, to="01020000203", text="s", provider_id="solapi")
    rt.set_provider("mock", BrokenStatusMock(rt.settings.provider_config("mock")))
    with rt.store.sessions.begin() as s:
        row = s.get(MessageRow, gone)
        assert row is not None
        row.provider = "no_such_provider"
    report = settle(rt, clock)
    assert report.delivered == 1 and report.pending == 2 and report.query_errors == 2
    assert row_of(rt, fine).status == "delivered"
    assert row_of(rt, broken).error_code == "UNKNOWN_ERROR" and "KeyError" in (row_of(rt, broken).error_message or "")
    assert row_of(rt, gone).status == "sent" and row_of(rt, gone).check_count == 1


def test_a_blank_provider_message_id_is_unknown_at_the_first_check(rt: Runtime, clock: Clock) -> None:
    mid = send_now(rt, to="01020000301", text="m")
    assert rt.store.update_fields(mid, expect=S.SENT, now=clock.now, provider_message_id="  ") == 1
    assert settle(rt, clock).unknown == 1
    row = row_of(rt, mid)
    assert (row.status, row.error_code) == ("unknown", "MISSING_PROVIDER_MESSAGE_ID")


def test_a_sweep_past_its_deadline_gives_back_the_rows_it_did_not_reach(make_rt: Any, clock: Clock) -> None:
    # Given a sweep whose claim hold (and so its deadline) is shorter than one status request
    rt: Runtime = make_rt(KMSG_TRACKING_CLAIM_SECONDS="0.000001")
    ids = [send_now(rt, to=f"0102000040{i}", text="m") for i in range(3)]
    clock.advance(30)
    report = poll_statuses(rt)
    # Then it queries nothing and the rows are due again at once, unchanged
    assert (report.claimed, report.released, report.pending) == (3, 3, 0)
    for mid in ids:
        row = row_of(rt, mid)
        assert (row.status, row.check_count, row.next_check_at) == ("sent", 0, clock.now)
    # and a sweep with time to work settles them
    assert poll_statuses(make_rt()).delivered == 3


def test_a_claim_holds_rows_away_from_another_sweep_until_the_hold_ends(rt: Runtime, clock: Clock) -> None:
    mid = send_now(rt, to="01020000501", text="m")
    clock.advance(30)
    claimed = rt.store.claim_due_checks(now=clock.now, hold=timedelta(seconds=120), limit=10)
    assert [r.id for r in claimed] == [mid]
    assert poll_statuses(rt).claimed == 0  # held by the first claim
    clock.advance(121)  # that sweep died: the hold ends and the row is due again
    assert poll_statuses(rt).delivered == 1


def test_aligo_sms_is_tracked_to_delivered(rt: Runtime, clock: Clock) -> None:
    mid = send_now(rt, to="01020000600", text="aligo", provider_id="aligo")
    assert settle(rt, clock).delivered == 1
    assert row_of(rt, mid).status == "delivered"


def test_providers_without_a_status_api(make_rt: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    # A provider without a delivery-status API (Aligo made so here): by default the message is
    # unknown at its first check
    monkeypatch.setattr(AligoProvider, "capabilities", replace(AligoProvider.capabilities, status_query=False))
    rt: Runtime = make_rt()
    mid = send_now(rt, to="01020000601", text="aligo", provider_id="aligo")
    assert settle(rt, clock).unknown == 1
    assert (row_of(rt, mid).status, row_of(rt, mid).error_code) == ("unknown", "UNSUPPORTED")
    # or, with KMSG_TRACKING_NO_STATUS_API=wait, it is kept until the tracking timeout
    waiting: Runtime = make_rt(KMSG_TRACKING_NO_STATUS_API="wait")
    other = send_now(waiting, to="01020000602", text="aligo", provider_id="aligo")
    assert settle(waiting, clock).pending == 1
    clock.advance(86_400)
    assert poll_statuses(waiting).unknown == 1
    assert row_of(waiting, other).error_code == "TRACKING_TIMEOUT"


# -- AlimTalk failover at send time: warnings ------------------------------------------------------

ALIMTALK = {"type": "ALIMTALK", "template_id": "T_ORDER", "variables": {"name": "김민준"}}


def test_failover_warnings_are_stored_and_visible_through_get(rt: Runtime) -> None:
    kmsg = KMsg(runtime=rt)
    failover = {"content": "주문이 출고되었습니다"}
    solapi = send_now(rt, to="01020000701", provider_id="solapi", failover=failover, **ALIMTALK)
    mock = send_now(rt, to="01020000702", provider_id="mock", failover=failover, **ALIMTALK)
    iwinv = send_now(rt, to="01020000703", provider_id="iwinv", failover=failover, **ALIMTALK)
    plain = send_now(rt, to="01020000704", provider_id="solapi", **ALIMTALK)
    assert [w["code"] for w in kmsg.get(solapi).warnings] == ["FAILOVER_PARTIAL_PROVIDER"]
    assert "fallbackChannel" in kmsg.get(solapi).warnings[0]["details"]["unsupportedFields"]
    assert [w["code"] for w in kmsg.get(mock).warnings] == ["FAILOVER_UNSUPPORTED_PROVIDER"]
    assert kmsg.get(iwinv).warnings == []  # IWINV maps every failover field onto reSend
    assert kmsg.get(plain).warnings == []  # no failover asked, no warning
    # and the adapters that fall back themselves say so on the row
    assert row_of(rt, solapi).native_fallback and row_of(rt, iwinv).native_fallback
    assert not row_of(rt, mock).native_fallback


# -- AlimTalk failover from tracking ---------------------------------------------------------------


def test_a_non_kakao_user_gets_the_sms_fallback_exactly_once_over_http(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer], dispatcher: RecordingDispatcher
) -> None:
    # Given an AlimTalk through IWINV with its own re-send switched off, to a number without KakaoTalk
    to = "01020000801"
    fakes["iwinv"].ledger.set_rule(to, not_kakao_user_rule())
    kmsg = KMsg(runtime=rt)
    parent = send_now(
        rt,
        to=to,
        provider_id="iwinv",
        provider_options={"reSend": "N"},
        failover={"content": "주문이 출고되었습니다"},
        **ALIMTALK,
    )
    assert not row_of(rt, parent).native_fallback
    # When tracking sees the failure
    report = settle(rt, clock)
    child_id = f"{parent}:fallback"
    assert report.fallbacks == [child_id]
    info = kmsg.get(parent)
    assert (info.status, info.error_code, info.provider_status_code) == ("failed", "NOT_KAKAO_USER", "3019")
    assert info.children == [child_id] and info.fallback_state == "created"
    # Then the child is an ordinary SMS routed to the first SMS provider, enqueued once
    child = kmsg.get(child_id)
    assert (child.type, child.status, child.parent_id, child.route[0]) == ("SMS", "queued", parent, "solapi")
    assert dispatcher.ids.count(child_id) == 1
    assert deliver(rt, child_id).action == "sent"
    assert settle(rt, clock).delivered == 1
    assert kmsg.get(child_id).status == "delivered"
    # and it reached the recipient once, at Solapi, with the fallback text; never again
    assert fakes["solapi"].ledger.per_reference[child_id] == 1
    assert fakes["iwinv"].ledger.per_recipient[to] == 1
    [entry] = fakes["solapi"].ledger.by_reference(child_id)
    assert (entry.type, entry.text) == ("SMS", "주문이 출고되었습니다")
    clock.advance(86_400)
    poll_statuses(rt)
    assert kmsg.get(parent).children == [child_id] and dispatcher.ids.count(child_id) == 1


@pytest.mark.parametrize(
    ("failover", "expected_type", "subject"),
    [
        (Failover(content="짧은 안내"), MessageType.SMS, None),
        (Failover(content="짧은 안내", channel="lms"), MessageType.LMS, None),
        (Failover(content="가" * 46), MessageType.LMS, None),  # 92 bytes: longer than an SMS
        (Failover(content="가" * 46, channel="sms"), MessageType.LMS, None),  # cannot be an SMS
        (Failover(content="짧은 안내", title="배송 안내"), MessageType.LMS, "배송 안내"),
        (Failover(content="짧은 안내", title="배송 안내", channel="sms"), MessageType.SMS, None),
        (Failover(content="  "), None, None),
        (Failover(content=None), None, None),
        (Failover(enabled=False, content="짧은 안내"), None, None),
    ],
)
def test_the_fallback_is_sms_or_lms(failover: Failover, expected_type: MessageType | None, subject: str | None) -> None:
    parent = Message(
        id="p1",
        type=MessageType.ALIMTALK,
        to="01012345678",
        sender="0212345678",
        template_id="T",
        failover=failover,
        priority=Priority.HIGH,
        custom_fields={"order": "7"},
    )
    child = fallback_message(parent)
    if expected_type is None:
        assert child is None
        return
    assert child is not None
    assert (child.id, child.type, child.subject, child.to, child.sender) == (
        "p1:fallback",
        expected_type,
        subject,
        "01012345678",
        "0212345678",
    )
    assert child.text == (failover.content or "").strip() and count_bytes(child.text) <= 2000
    assert child.priority is Priority.HIGH and child.custom_fields == {"order": "7"}


def test_a_fallback_text_over_the_lms_limit_is_invalid() -> None:
    parent = Message(id="p2", type=MessageType.ALIMTALK, to="01012345678", failover=Failover(content="가" * 1001))
    with pytest.raises(ValidationError) as info:
        fallback_message(parent)
    assert (info.value.field, info.value.rule) == ("text", "max_bytes")


@pytest.mark.parametrize(
    ("fields", "expected_state"),
    [
        ({"provider_id": "mock"}, None),  # no failover asked: nothing to record
        ({"provider_id": "mock", "failover": {"enabled": True}}, "skipped:no_fallback_content"),
        ({"provider_id": "mock", "failover": {"content": "가" * 1001}}, "skipped:invalid:text:max_bytes"),
    ],
)
def test_a_fallback_that_cannot_be_made_is_recorded_with_its_reason(
    rt: Runtime, clock: Clock, dispatcher: RecordingDispatcher, fields: dict[str, Any], expected_state: str | None
) -> None:
    script = {"mock": {"deliver": "FAILED:3104"}}
    parent = send_now(rt, to="01020000901", provider_options=script, **ALIMTALK, **fields)
    report = settle(rt, clock)
    info = KMsg(runtime=rt).get(parent)
    assert (report.failed, report.fallbacks) == (1, [])
    assert (info.status, info.error_code, info.fallback_state, info.children) == (
        "failed",
        "NOT_KAKAO_USER",
        expected_state,
        [],
    )
    assert f"{parent}:fallback" not in dispatcher.ids


def test_no_fallback_when_the_provider_falls_back_itself(
    rt: Runtime, clock: Clock, fakes: dict[str, FakeProviderServer]
) -> None:
    # Solapi sends its own SMS replacement when failover is asked (disableSms=false): a child would be a duplicate
    fakes["solapi"].fail_alimtalk_for(["01020001001"], code="3107")
    parent = send_now(rt, to="01020001001", provider_id="solapi", failover={"content": "안내"}, **ALIMTALK)
    assert settle(rt, clock).fallbacks == []
    info = KMsg(runtime=rt).get(parent)
    assert (info.status, info.error_code, info.provider_status_code) == ("failed", "NOT_KAKAO_USER", "3107")
    assert (info.fallback_state, info.children) == ("skipped:native_fallback", [])


def test_other_alimtalk_failures_get_no_fallback(rt: Runtime, clock: Clock) -> None:
    script = {"mock": {"deliver": "FAILED:3015"}}  # template not found: an SMS would not help
    parent = send_now(
        rt, to="01020001101", provider_id="mock", provider_options=script, failover={"content": "안내"}, **ALIMTALK
    )
    assert settle(rt, clock).fallbacks == []
    info = KMsg(runtime=rt).get(parent)
    assert (info.error_code, info.fallback_state, info.children) == ("DELIVERY_FAILED", None, [])


def test_configured_codes_and_texts_also_trigger_the_fallback(make_rt: Any, clock: Clock) -> None:
    rt: Runtime = make_rt(KMSG_FALLBACK_CODES="K105, E907", KMSG_FALLBACK_TEXTS="no kakao account")
    parent = send_now(
        rt,
        to="01020001201",
        provider_id="mock",
        provider_options={"mock": {"deliver": "FAILED:E907"}},
        failover={"content": "안내"},
        **ALIMTALK,
    )
    assert settle(rt, clock).fallbacks == [f"{parent}:fallback"]
    policy = rt.settings.tracking
    failed = DeliveryState.FAILED
    assert is_not_kakao_user(StatusReport("x", failed, code="K105"), policy)
    assert is_not_kakao_user(StatusReport("x", failed, code="X1", description="recipient has no kakao account"), policy)
    assert not is_not_kakao_user(StatusReport("x", failed, code="K105"))  # not configured


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        ("3104", None, True),  # Solapi: not a KakaoTalk user
        ("3107", None, True),  # Solapi: no KakaoTalk use lately / AlimTalk blocked
        ("3018", None, True),  # Kakao NoSendAvailableException
        ("3019", None, True),  # Kakao MessageNoUserException
        ("3020", None, True),  # Kakao: AlimTalk receipt blocked
        ("E999", "카카오톡 미사용자", True),  # any provider's text
        ("K", "카카오 계정 미사용", True),  # IWINV's rule: 카카오 and 미사용
        ("3015", "템플릿 없음", False),
        ("3059", "변작된 발신번호.", False),
        (None, None, False),
    ],
)
def test_which_failures_mean_not_a_kakao_user(code: str | None, text: str | None, expected: bool) -> None:
    report = StatusReport("m", DeliveryState.FAILED, code=code, description=text)
    assert is_not_kakao_user(report, TrackingPolicy()) is expected
    # only a failure triggers a fallback, never a delivery or a pending report
    assert not is_not_kakao_user(StatusReport("m", DeliveryState.DELIVERED, code=code, description=text))


def test_the_fallback_child_is_retried_and_tracked_like_any_message(rt: Runtime, clock: Clock) -> None:
    # the child of a mock AlimTalk whose first SMS attempt hits a 5xx: retried, then delivered
    parent = send_now(
        rt,
        to="01020001301",
        provider_id="mock",
        provider_options={"mock": {"deliver": "FAILED:3019"}},
        failover={"content": "안내", "channel": "lms", "title": "알림"},
        **ALIMTALK,
    )
    [child_id] = settle(rt, clock).fallbacks
    assert child_id == f"{parent}:fallback"
    solapi = rt.provider("solapi")
    original = solapi.send_batch

    def flaky_once(messages: Sequence[Message]) -> Any:
        solapi.send_batch = original  # type: ignore[method-assign]
        raise ProviderTransientError("injected 503", provider="solapi", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE)

    solapi.send_batch = flaky_once  # type: ignore[method-assign]
    assert deliver(rt, child_id).action == "retry"
    clock.advance(60)
    assert deliver(rt, child_id).action == "sent"
    assert settle(rt, clock).delivered == 1
    child = KMsg(runtime=rt).get(child_id)
    assert (child.type, child.status) == ("LMS", "delivered")
    assert [a.outcome for a in child.attempts] == ["retryable", "accepted"]


# -- two sweeps in two processes -------------------------------------------------------------------


@dataclass
class FileDispatcher:
    """Appends every published id to a file (one line per publish), shared across processes."""

    path: str

    def send(self, message_ids: Sequence[str], *, priority: Any, countdown: float | None = None) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(f"{m}\n" for m in message_ids)

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        raise AssertionError("no chunks here")


def _sweeper(env: dict[str, str], out_path: str, now_iso: str, overlap: bool, barrier: Any, results: Any) -> None:
    """Child process: wait for the other one, then sweep until nothing is due."""
    from sqlalchemy import select

    settings = Settings.from_env(env)
    now = datetime.fromisoformat(now_iso)
    runtime = Runtime(settings, dispatcher=FileDispatcher(out_path), clock=lambda: now, create_tables=False)
    if overlap:
        # The worst case the claim is there to prevent: both sweeps hold the same rows at once (a
        # hold that ran out under a paused process). Both load every due row before either starts.
        with runtime.store.sessions() as s:
            snapshot = list(s.scalars(select(MessageRow).where(MessageRow.status == "sent")))
        handed = iter([snapshot])

        def same_rows_for_both(*, now: datetime, hold: timedelta, limit: int) -> list[MessageRow]:
            return next(handed, [])

        runtime.store.claim_due_checks = same_rows_for_both  # type: ignore[method-assign]
    barrier.wait(timeout=30)
    claimed, fallbacks = 0, []
    for _ in range(10):
        report = poll_statuses(runtime, limit=25)
        claimed += report.claimed
        fallbacks += report.fallbacks
        if report.claimed == 0:
            break
    results.put({"claimed": claimed, "fallbacks": fallbacks})
    runtime.close()


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True], ids=["skip-locked-claim", "both-see-every-row"])
def test_two_sweeps_in_two_processes_create_each_fallback_exactly_once(
    pg_url: str, tmp_path: Path, overlap: bool
) -> None:
    # Given 60 AlimTalks that failed because the recipients do not use KakaoTalk, all due for a check
    truncate(pg_url)
    env = {"KMSG_DATABASE_URL": pg_url, "KMSG_VAR_DIR": str(tmp_path / "var"), "KMSG_PROVIDERS": "mock"}
    settings = Settings.from_env(env)
    clock = Clock()
    rt = Runtime(settings, clock=clock)
    parents = [
        send_now(
            rt,
            to=f"0103000{i:04d}",
            provider_options={"mock": {"deliver": "FAILED:3104"}},
            failover={"content": f"안내 {i}"},
            **ALIMTALK,
        )
        for i in range(60)
    ]
    rt.close()
    clock.advance(30)
    # When two processes sweep at the same moment
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    out = tmp_path / "published.txt"
    procs = [
        ctx.Process(target=_sweeper, args=(env, str(out), clock.now.isoformat(), overlap, barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    # Then every parent has exactly one child, created by one of them and published once
    children = sorted(f"{p}:fallback" for p in parents)
    made = [c for r in got for c in r["fallbacks"]]
    assert sorted(made) == children
    assert sorted(out.read_text().split()) == children
    rt = Runtime(settings, create_tables=False)
    try:
        assert rt.store.count_by_status(parents) == {"failed": 60}
        assert rt.store.count_by_status(children) == {"queued": 60}
        assert all(row_of(rt, p).fallback_state == "created" for p in parents)
    finally:
        rt.close()
    claimed = [r["claimed"] for r in got]
    if overlap:
        assert claimed == [60, 60]  # both really worked on every row
    else:
        assert sum(claimed) == 60  # the claim gave each row to one of them
