"""Korean advertising rules: the (광고) format, lookalikes, AlimTalk refusal, night-time deferral in the
one engine (single, scheduled, retried, fallback and bulk sends), and the opt-out suppression list.

Clock instants are Asia/Seoul wall-clock times: 20:59:59 and 21:00:00, 07:59:59 and 08:00:00.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kmsg_worker import adrules
from kmsg_worker.delivery import deliver, process_chunk
from kmsg_worker.errors import ErrorCode, ValidationError
from kmsg_worker.message import Message, MessageType, count_bytes, normalize
from kmsg_worker.message import advertising as ads
from kmsg_worker.message.model import Failover
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.providers.solapi import SOLAPI_CODES
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage import advertising as ad_store
from kmsg_worker.storage.rows import new_message_row
from kmsg_worker.sweeps import dispatch_scheduled, sweep
from kmsg_worker.tracking import fallback_message
from tests.conftest import Clock, RecordingDispatcher

SEOUL = ZoneInfo("Asia/Seoul")
SENDER = "0212345678"
PROFILE = ads.AdvertiserProfile(name="가나다마트", opt_out="080-123-4567")


def seoul(hh: int, mm: int, ss: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, hh, mm, ss, tzinfo=SEOUL)


@pytest.fixture
def runtime(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    # PostgreSQL deployments must give the suppression list its key (a file per host would differ).
    rt = Runtime(settings_factory(backend_url, KMSG_SUPPRESSION_KEY="test-key-0123456789"), dispatcher=dispatcher)
    ad_store.set_advertiser(
        rt.store, "default", SENDER, name=PROFILE.name, opt_out=PROFILE.opt_out, contact=None, now=rt.now()
    )
    yield rt
    rt.close()


def mock(rt: Runtime) -> MockProvider:
    provider = rt.provider("mock")
    assert isinstance(provider, MockProvider)
    return provider


def ad(**fields: Any) -> dict[str, Any]:
    return {"to": "01012345678", "sender": SENDER, "text": "겨울 세일 30%", "purpose": "advertising", **fields}


# -- format ----------------------------------------------------------------------------------------


def test_auto_composes_head_and_footer_once() -> None:
    text = ads.compose("겨울 세일", PROFILE, sender=SENDER)
    assert text == "(광고)가나다마트\n겨울 세일\n무료수신거부 080-123-4567"
    assert ads.compose(text, PROFILE, sender=SENDER) == text  # composing twice changes nothing
    ads.check(text, PROFILE, sender=SENDER)
    # A contact that is not the sending number goes into the head
    with_contact = ads.AdvertiserProfile(name="가나다마트", opt_out="0801234567", contact="02-999-8888")
    assert ads.compose("x", with_contact, sender=SENDER).startswith("(광고)가나다마트 02-999-8888\n")
    assert ads.compose("x", with_contact, sender="029998888").startswith("(광고)가나다마트\n")


def test_a_message_is_composed_through_normalize_with_the_tenants_profile() -> None:
    message = normalize(ad(), advertiser=lambda tenant, sender: PROFILE if sender == SENDER else None)
    assert message.text == "(광고)가나다마트\n겨울 세일 30%\n무료수신거부 080-123-4567"
    assert message.purpose == "advertising" and message.content()["purpose"] == "advertising"
    # No profile for the sender: auto cannot compose, and says how to fix it
    with pytest.raises(ValidationError) as info:
        normalize(ad(sender="0311112222"), advertiser=lambda tenant, sender: PROFILE if sender == SENDER else None)
    assert (info.value.field, info.value.rule) == ("purpose", "advertiser_profile")
    # Informational (the default) is stored as before: no purpose key at all
    assert "purpose" not in normalize({"to": "01012345678", "text": "hi"}).content(full=True)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("겨울 세일\n무료수신거부 080-123-4567", "ad_head"),
        ("(광고) \n겨울 세일\n무료수신거부 080-123-4567", "ad_name"),
        ("(광고)다른상호\n겨울 세일\n무료수신거부 080-123-4567", "ad_name"),
        ("(광고)가나다마트\n겨울 세일", "ad_opt_out"),
        ("(광고)가나다마트\n겨울 세일\n무료수신거부 080-555-0000", "ad_opt_out"),
        ("[광고]가나다마트\n겨울 세일\n무료수신거부 080-123-4567", "ad_lookalike"),
    ],
)
def test_check_mode_refuses_naming_the_missing_part(text: str, rule: str) -> None:
    with pytest.raises(ValidationError) as info:
        normalize(ad(text=text, compose="check"), advertiser=lambda tenant, sender: PROFILE)
    assert (info.value.field, info.value.rule) == ("text", rule)
    # Without a profile, the shape is still checked
    if rule in ("ad_head", "ad_lookalike") or text.endswith("세일"):
        with pytest.raises(ValidationError):
            normalize(ad(text=text, compose="check"))


def test_check_mode_accepts_a_complete_text() -> None:
    text = "(광고)가나다마트\n겨울 세일\n무료거부 0801234567"
    assert normalize(ad(text=text, compose="check"), advertiser=lambda t, s: PROFILE).text == text
    assert normalize(ad(text=text, compose="check")).text == text


@pytest.mark.parametrize(
    "head",
    ["[광고]", "(광 고)", "(광.고)", "(광/고)", "（광고）", "<광고>", "【광고】", "(대출광고)", '("광고")', "광고)"],
)
def test_lookalike_heads_are_refused_for_advertising_and_informational_texts(head: str) -> None:
    assert ads.find_lookalike(f"{head}가나다마트 세일") is not None
    with pytest.raises(ValidationError) as info:
        normalize(ad(text=f"{head}가나다마트 세일\n무료수신거부 080-123-4567", compose="check"))
    assert info.value.rule == "ad_lookalike"
    with pytest.raises(ValidationError) as info:
        normalize({"to": "01012345678", "text": f"{head}가나다마트 세일"})
    assert info.value.rule == "ad_lookalike"


def test_ordinary_texts_mentioning_advertising_pass() -> None:
    for text in ("광고 문의는 02-123-4567", "TV 광고를 보셨나요?", "인증번호 [123456]"):
        assert ads.find_lookalike(text) is None
        assert normalize({"to": "01012345678", "text": text}).text == text


def test_an_informational_text_may_not_start_with_the_advertising_head() -> None:
    with pytest.raises(ValidationError) as info:
        normalize({"to": "01012345678", "text": "(광고)가나다마트 세일"})
    assert (info.value.field, info.value.rule) == ("purpose", "ad_head")


def test_alimtalk_may_not_carry_advertising() -> None:
    with pytest.raises(ValidationError) as info:
        normalize(
            {
                "type": "ALIMTALK",
                "to": "01012345678",
                "template_id": "T1",
                "text": "(광고)가나다마트 x\n무료수신거부 080-123-4567",
                "kakao": {"profile_id": "pf"},
                "purpose": "advertising",
                "compose": "check",
            }
        )
    assert (info.value.field, info.value.rule) == ("purpose", "not_allowed")
    assert "ALIMTALK" in info.value.detail


def test_byte_counts_are_decided_on_the_composed_text() -> None:
    body = "Winter sale: 30% off all items this week only, ends Sunday"  # 58 bytes: an SMS on its own
    assert normalize({"to": "01012345678", "text": body}).type is MessageType.SMS
    message = normalize(ad(text=body), advertiser=lambda t, s: PROFILE)
    assert count_bytes(message.text or "") > 90
    assert message.type is MessageType.LMS
    # An explicit SMS that only fits before composition is refused with the composed size
    with pytest.raises(ValidationError) as info:
        normalize(ad(text=body, type="SMS"), advertiser=lambda t, s: PROFILE)
    assert (info.value.field, info.value.rule) == ("text", "max_bytes")


def test_profile_rules() -> None:
    with pytest.raises(ValidationError) as info:
        ads.AdvertiserProfile(name="가나다마트", opt_out="02-123-4567")
    assert (info.value.field, info.value.rule) == ("opt_out", "format")
    with pytest.raises(ValidationError):
        ads.AdvertiserProfile(name="[광고]가나다", opt_out="0801234567")
    assert ads.AdvertiserProfile(name=" 가나다 ", opt_out="08012345678").opt_out == "080-1234-5678"


# -- the window (pure) -----------------------------------------------------------------------------


def test_window_edges_in_seoul_time() -> None:
    assert ads.next_allowed(seoul(20, 59, 59), MessageType.SMS) is None
    assert ads.next_allowed(seoul(21, 0, 0), MessageType.SMS) == seoul(8, 0, 0, day=2)
    assert ads.next_allowed(seoul(7, 59, 59, day=2), MessageType.SMS) == seoul(8, 0, 0, day=2)
    assert ads.next_allowed(seoul(8, 0, 0, day=2), MessageType.SMS) is None
    assert ads.next_allowed(seoul(0, 0, 0, day=2), MessageType.LMS) == seoul(8, 0, 0, day=2)
    # Kakao's FriendTalk window closes at 20:50
    assert ads.next_allowed(seoul(20, 49, 59), MessageType.FRIENDTALK) is None
    assert ads.next_allowed(seoul(20, 50, 0), MessageType.FRIENDTALK) == seoul(8, 0, 0, day=2)
    # The same instant given in UTC
    assert ads.next_allowed(seoul(21, 0, 0).astimezone(ZoneInfo("UTC")), "SMS") == seoul(8, 0, 0, day=2)


def test_solapi_codes_for_opt_out_and_the_window() -> None:
    assert SOLAPI_CODES["1061"].code is ErrorCode.AD_OPTED_OUT
    assert SOLAPI_CODES["2061"].code is ErrorCode.AD_OPTED_OUT
    assert SOLAPI_CODES["3108"].code is ErrorCode.OUTSIDE_SEND_WINDOW


# -- the engine: single sends ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "sent"),
    [((20, 59, 59), True), ((21, 0, 0), False), ((7, 59, 59), False), ((8, 0, 0), True)],
)
def test_single_send_at_the_window_edges(
    kmsg: KMsg, runtime: Runtime, clock: Clock, at: tuple[int, int, int], sent: bool
) -> None:
    clock.now = seoul(*at)
    receipt = kmsg.send(ad())
    result = deliver(runtime, receipt.message_id)
    info = kmsg.get(receipt.message_id)
    if sent:
        assert result.action == "sent" and info.status == "sent"
        return
    # Held, not sent and not dropped: no provider call, nothing spent
    assert result.action == "deferred" and info.status == "retrying"
    assert mock(runtime).calls_for(receipt.message_id) == 0
    assert info.error_code == "NIGHT_DEFERRED" and info.attempts == []
    row = runtime.store.get(receipt.message_id)
    assert row is not None and row.next_attempt_at == seoul(8, 0, 0, day=2 if at[0] == 21 else 1)


def test_a_night_deferred_single_send_goes_out_at_eight_exactly_once(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(21, 0, 0)
    receipt = kmsg.send(ad())
    assert deliver(runtime, receipt.message_id).action == "deferred"
    dispatcher.sends.clear()
    # A stray task in the night (Celery redelivers) cannot claim it before it is due
    clock.now = seoul(3, 0, 0, day=2)
    assert deliver(runtime, receipt.message_id).action == "not_claimed"
    assert mock(runtime).calls_for(receipt.message_id) == 0
    # Nothing wakes it during the night (no countdown of eleven hours in the broker)
    clock.now = seoul(7, 59, 59, day=2)
    sweep(runtime)
    assert dispatcher.ids == []
    clock.now = seoul(8, 0, 0, day=2)
    sweep(runtime)
    assert dispatcher.ids == [receipt.message_id]
    assert deliver(runtime, receipt.message_id).action == "sent"
    assert mock(runtime).calls_for(receipt.message_id) == 1


def test_seconds_before_eight_wake_by_countdown(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(7, 59, 59)
    receipt = kmsg.send(ad())
    dispatcher.sends.clear()
    assert deliver(runtime, receipt.message_id).action == "deferred"
    assert dispatcher.sends == [(receipt.message_id, "normal", 1.0)]
    clock.now = seoul(8, 0, 0)
    assert deliver(runtime, receipt.message_id).action == "sent"


def test_night_consent_sends_at_night_and_is_recorded(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    clock.now = seoul(23, 30)
    consented = kmsg.send(ad(night_consent=True))
    informational = kmsg.send(to="01012345678", text="배송이 시작되었습니다")
    assert deliver(runtime, consented.message_id).action == "sent"
    assert deliver(runtime, informational.message_id).action == "sent"
    row = runtime.store.get(consented.message_id)
    assert row is not None and row.content["night_consent"] is True
    with pytest.raises(ValidationError) as info:
        kmsg.send(to="01012345678", text="hi", night_consent=True)
    assert (info.value.field, info.value.rule) == ("night_consent", "not_allowed")


def test_friendtalk_advertising_follows_kakaos_window(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    ft = ad(type="FRIENDTALK", kakao={"profile_id": "pf"})
    clock.now = seoul(20, 49, 59)
    early = kmsg.send(ft)
    assert deliver(runtime, early.message_id).action == "sent"
    clock.now = seoul(20, 50, 0)
    late = kmsg.send(ft)
    sms = kmsg.send(ad())
    assert deliver(runtime, late.message_id).action == "deferred"
    assert deliver(runtime, sms.message_id).action == "sent"  # SMS advertising still has ten minutes


@pytest.mark.parametrize(("at", "sent"), [((20, 59, 59), True), ((21, 0, 0), False)])
def test_scheduled_send_at_the_window_edges(
    kmsg: KMsg, runtime: Runtime, clock: Clock, at: tuple[int, int, int], sent: bool
) -> None:
    clock.now = seoul(12, 0)
    receipt = kmsg.schedule(ad(), at=seoul(*at))
    clock.now = seoul(*at)
    assert dispatch_scheduled(runtime) == 1
    result = deliver(runtime, receipt.message_id)
    assert result.action == ("sent" if sent else "deferred")
    if not sent:
        clock.now = seoul(8, 0, 0, day=2)
        sweep(runtime)
        assert deliver(runtime, receipt.message_id).action == "sent"
    assert mock(runtime).calls_for(receipt.message_id) == 1


def test_scheduled_for_the_night_goes_out_at_eight(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    clock.now = seoul(12, 0)
    receipt = kmsg.schedule(ad(), at=seoul(7, 59, 59, day=2))
    clock.now = seoul(7, 59, 59, day=2)
    dispatch_scheduled(runtime)
    assert deliver(runtime, receipt.message_id).action == "deferred"
    clock.now = seoul(8, 0, 0, day=2)
    assert deliver(runtime, receipt.message_id).action == "sent"


def test_a_retry_that_falls_due_at_night_waits_for_the_morning(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(20, 59, 59)
    receipt = kmsg.send(ad(provider_options={"mock": {"fail_times": 1}}))
    assert deliver(runtime, receipt.message_id).action == "retry"
    row = runtime.store.get(receipt.message_id)
    assert row is not None and row.next_attempt_at is not None and row.next_attempt_at >= seoul(21, 0, 0)
    clock.now = row.next_attempt_at
    assert deliver(runtime, receipt.message_id).action == "deferred"
    assert mock(runtime).calls_for(receipt.message_id) == 1
    clock.now = seoul(8, 0, 0, day=2)
    sweep(runtime)
    assert deliver(runtime, receipt.message_id).action == "sent"
    info = kmsg.get(receipt.message_id)
    assert mock(runtime).calls_for(receipt.message_id) == 2 and len(info.attempts) == 2


@pytest.mark.parametrize(("at", "sent"), [((20, 59, 59), True), ((21, 0, 0), False), ((8, 0, 0), True)])
def test_an_alimtalk_fallback_child_inherits_the_purpose_and_the_window(
    runtime: Runtime, clock: Clock, at: tuple[int, int, int], sent: bool
) -> None:
    # AlimTalk itself is refused for advertising at the producer; a parent that carries the purpose
    # anyway (stored before the rule, or built by hand) still hands it on to its SMS fallback.
    parent = Message(
        id="p1",
        type=MessageType.ALIMTALK,
        to="01012345678",
        sender=SENDER,
        template_id="T1",
        text="x",
        purpose="advertising",
        failover=Failover(content="(광고)가나다마트\n겨울 세일\n무료수신거부 080-123-4567"),
    )
    child = fallback_message(parent)
    assert child is not None and child.purpose == "advertising" and child.type is MessageType.SMS
    informational = fallback_message(
        Message(id="p2", type=MessageType.ALIMTALK, to="01012345678", template_id="T1", failover=Failover(content="x"))
    )
    assert informational is not None and informational.purpose is None
    clock.now = seoul(*at)
    runtime.store.insert_messages([new_message_row(child, ["mock"], clock.now, parent_id="p1")], now=clock.now)
    assert deliver(runtime, child.id).action == ("sent" if sent else "deferred")


def test_a_failover_to_the_next_provider_at_nine_waits_for_the_morning(
    kmsg: KMsg, runtime: Runtime, clock: Clock
) -> None:
    from tests.test_pipeline import BackupMock  # registers mock_b

    runtime.router.providers.append("mock_b")
    runtime.router._types["mock_b"] = BackupMock.capabilities.types
    clock.now = seoul(20, 59, 59)
    script = {"mock": {"script": [{"outcome": "failure", "code": "INSUFFICIENT_BALANCE"}]}}
    receipt = kmsg.send(ad(provider_options=script))
    assert receipt.route == ("mock", "mock_b")
    assert deliver(runtime, receipt.message_id).action == "failover"
    backup = runtime.provider("mock_b")
    assert isinstance(backup, MockProvider)
    # mock_b would replay the script's first step: give it a clean run (as tests/test_pipeline.py does)
    backup._log_path = None
    backup.calls.append({"message_id": receipt.message_id, "accepted": False})
    # The run on the next provider comes at 21:00:00: held, mock_b not called
    clock.now = seoul(21, 0, 0)
    assert deliver(runtime, receipt.message_id).action == "deferred"
    assert mock(runtime).calls_for(receipt.message_id) == 1 and backup.calls_for(receipt.message_id) == 1
    clock.now = seoul(8, 0, 0, day=2)
    sweep(runtime)
    assert deliver(runtime, receipt.message_id).action == "sent"
    assert backup.calls_for(receipt.message_id) == 2
    info = kmsg.get(receipt.message_id)
    assert info.provider == "mock_b"
    assert [(a.provider, a.outcome) for a in info.attempts] == [("mock", "rejected"), ("mock_b", "accepted")]


# -- the engine: bulk ------------------------------------------------------------------------------


def test_a_campaign_straddling_nine_resumes_at_eight_nothing_lost_nothing_twice(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(20, 59, 59)
    rows = [{"to": f"010{i:08d}", "variables": {"name": f"고객{i}"}} for i in range(300)]
    receipt = kmsg.send_many(
        rows, defaults={"text": "#{name}님 세일", "sender": SENDER, "purpose": "advertising"}, chunk_size=100
    )
    chunks = [c for _, c, _ in dispatcher.chunks]
    assert chunks == [0, 1, 2]
    # The first chunk runs before nine
    assert process_chunk(runtime, receipt.batch_id, 0).sent == 100
    # At 21:00:00 the campaign stops: the remaining chunks take no rows to the provider
    clock.now = seoul(21, 0, 0)
    requests = mock(runtime).requests
    for chunk in (1, 2):
        result = process_chunk(runtime, receipt.batch_id, chunk)
        assert result.deferred == 100 and result.sent == 0 and result.requests == 0
    assert mock(runtime).requests == requests
    summary = kmsg.batch_summary(receipt.batch_id)
    assert summary.by_status == {"sent": 100, "retrying": 200} and summary.deferred == 200 and not summary.done
    # Nothing is published during the night; the sweep at 07:59:59 still finds nothing due
    dispatcher.chunks.clear()
    clock.now = seoul(7, 59, 59, day=2)
    sweep(runtime)
    assert dispatcher.chunks == []
    # At 08:00:00 the sweep publishes both chunks and they go out
    clock.now = seoul(8, 0, 0, day=2)
    sweep(runtime)
    assert sorted(c for _, c, _ in dispatcher.chunks) == [1, 2]
    for _, chunk, _ in list(dispatcher.chunks):
        process_chunk(runtime, receipt.batch_id, chunk)
    summary = kmsg.batch_summary(receipt.batch_id)
    assert summary.by_status == {"sent": 300} and summary.deferred == 0 and summary.done
    # Every recipient reached the provider exactly once
    ids = receipt.message_ids
    assert [mock(runtime).calls_for(i) for i in ids] == [1] * 300
    sent_times = {runtime.store.get(i).sent_at for i in ids}  # type: ignore[union-attr]
    assert all(t is not None and not ads.in_quiet_hours(t, "SMS") for t in sent_times)


def test_a_bulk_chunk_at_seven_fifty_nine_resumes_by_countdown(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(7, 59, 59)
    receipt = kmsg.send_many(
        [{"to": f"010{i:08d}"} for i in range(5)], defaults={"text": "세일", "sender": SENDER, "purpose": "advertising"}
    )
    dispatcher.chunks.clear()
    result = process_chunk(runtime, receipt.batch_id, 0)
    assert result.deferred == 5 and dispatcher.chunks == [(receipt.batch_id, 0, 1.0)]
    clock.now = seoul(8, 0, 0)
    assert process_chunk(runtime, receipt.batch_id, 0).sent == 5


def test_bulk_rows_compose_like_single_sends(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    clock.now = seoul(12, 0)
    receipt = kmsg.send_many(
        [{"to": "01000000001", "variables": {"n": "김"}}],
        defaults={"text": "#{n}님 세일", "sender": SENDER, "purpose": "advertising"},
    )
    single = kmsg.validate(ad(text="#{n}님 세일", variables={"n": "김"}))
    row = runtime.store.get(receipt.message_ids[0])
    assert row is not None and row.content["text"] == single.text and row.content["purpose"] == "advertising"
    # A variable may not smuggle a disguised head into an advertising or informational text
    bad = kmsg.send_many(
        [{"to": "01000000002", "variables": {"n": "[광고]"}}],
        defaults={"text": "#{n}님 세일", "sender": SENDER},
        on_invalid="skip",
    )
    assert [(e.field, e.rule) for e in bad.invalid] == [("text", "ad_lookalike")]


def test_alimtalk_advertising_is_refused_for_a_batch_too(kmsg: KMsg) -> None:
    from kmsg_worker.errors import BatchValidationError

    with pytest.raises((BatchValidationError, ValidationError)):
        kmsg.send_many(
            [{"to": "01012345678"}],
            defaults={"type": "ALIMTALK", "template_id": "T", "kakao": {"profile_id": "pf"}, "purpose": "advertising"},
        )


# -- suppression -----------------------------------------------------------------------------------


def test_a_single_advertising_send_to_a_suppressed_number_is_refused(kmsg: KMsg, runtime: Runtime) -> None:
    assert (
        adrules.suppress(runtime.settings, runtime.store, "default", ["01012345678"], source="cli", now=runtime.now())
        == 1
    )
    # Adding again adds nothing; the table holds no number
    assert (
        adrules.suppress(runtime.settings, runtime.store, "default", ["01012345678"], source="cli", now=runtime.now())
        == 0
    )
    exported = list(ad_store.export_suppressions(runtime.store, "default"))
    assert len(exported) == 1 and b"01012345678" not in exported[0].digest and len(exported[0].digest) == 16
    with pytest.raises(ValidationError) as info:
        kmsg.send(ad())
    assert (info.value.field, info.value.rule) == ("to", "suppressed")
    assert runtime.store.count_by_status() == {}
    # Informational messages and other tenants are not affected
    kmsg.send(to="01012345678", text="배송 안내")
    ad_store.set_advertiser(
        runtime.store, "shop2", "*", name="다른가게", opt_out="0809998888", contact=None, now=runtime.now()
    )
    kmsg.send(ad(tenant="shop2"))
    assert adrules.unsuppress(runtime.settings, runtime.store, "default", ["01012345678"]) == 1
    kmsg.send(ad())


def test_bulk_rows_to_suppressed_numbers_end_suppressed_and_are_counted(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    clock.now = seoul(12, 0)
    numbers = [f"010{i:08d}" for i in range(10)]
    adrules.suppress(runtime.settings, runtime.store, "default", numbers[:3], source="import", now=clock.now)
    receipt = kmsg.send_many(
        [{"to": n} for n in numbers], defaults={"text": "세일", "sender": SENDER, "purpose": "advertising"}
    )
    assert len(receipt.message_ids) == 10
    for _, chunk, _ in list(dispatcher.chunks):
        process_chunk(runtime, receipt.batch_id, chunk)
    summary = kmsg.batch_summary(receipt.batch_id)
    assert summary.by_status == {"sent": 7, "suppressed": 3} and summary.suppressed == 3 and summary.done
    assert summary.by_error_code == {"SUPPRESSED": 3}
    for message_id in receipt.message_ids[:3]:
        info = kmsg.get(message_id)
        assert info.status == "suppressed" and info.final and mock(runtime).calls_for(message_id) == 0
    # The same numbers in an informational batch are sent
    plain = kmsg.send_many([{"to": n} for n in numbers[:3]], defaults={"text": "안내", "sender": SENDER})
    assert runtime.store.count_by_status().get("queued") == 3 and len(plain.message_ids) == 3


def test_the_delivery_report_counts_suppressed_rows(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    from datetime import timedelta

    from kmsg_worker.report import build_report, render_text

    clock.now = seoul(12, 0)
    adrules.suppress(runtime.settings, runtime.store, "default", ["01000000001"], source="cli", now=clock.now)
    kmsg.send_many(
        [{"to": "01000000001"}, {"to": "01000000002"}],
        defaults={"text": "세일", "sender": SENDER, "purpose": "advertising"},
    )
    report = build_report(runtime.engine, clock.now - timedelta(hours=1), clock.now + timedelta(hours=1))
    assert report.overall.by_status == {"queued": 1, "suppressed": 1}
    assert "suppressed 1" in render_text(report)


def test_a_provider_refusal_for_opt_out_adds_the_number_with_its_code(
    kmsg: KMsg, runtime: Runtime, clock: Clock
) -> None:
    clock.now = seoul(12, 0)
    script = {"mock": {"script": [{"outcome": "failure", "code": "AD_OPTED_OUT", "provider_code": "1061"}]}}
    receipt = kmsg.send(ad(provider_options=script))
    assert deliver(runtime, receipt.message_id).action == "failed"
    assert kmsg.get(receipt.message_id).error_code == "AD_OPTED_OUT"
    [entry] = list(ad_store.export_suppressions(runtime.store, "default"))
    assert entry.source == "provider:mock" and entry.provider_code == "1061"
    with pytest.raises(ValidationError) as info:
        kmsg.send(ad())
    assert info.value.rule == "suppressed"


def test_a_chunks_opt_out_refusals_are_all_listed(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    clock.now = seoul(12, 0)
    refuse = {"mock": {"script": [{"outcome": "failure", "code": "AD_OPTED_OUT", "provider_code": "1061"}]}}
    rows = [{"to": f"0107000000{i}", "provider_options": refuse if i < 3 else {}} for i in range(5)]
    receipt = kmsg.send_many(rows, defaults={"text": "세일", "sender": SENDER, "purpose": "advertising"})
    result = process_chunk(runtime, receipt.batch_id, 0)
    assert (result.sent, result.failed) == (2, 3)
    listed = list(ad_store.export_suppressions(runtime.store, "default"))
    assert len(listed) == 3 and {(e.source, e.provider_code) for e in listed} == {("provider:mock", "1061")}
    for i in range(5):
        if i < 3:
            with pytest.raises(ValidationError):
                kmsg.send(ad(to=f"0107000000{i}"))
        else:
            assert kmsg.send(ad(to=f"0107000000{i}")).message_id  # accepted: not listed


def test_a_delivery_report_of_an_opt_out_adds_the_number_too(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    from kmsg_worker.tracking import poll_statuses

    clock.now = seoul(12, 0)
    receipt = kmsg.send(ad(provider_options={"mock": {"deliver": "FAILED:2061"}}))
    assert deliver(runtime, receipt.message_id).action == "sent"
    clock.now = seoul(12, 10)
    assert poll_statuses(runtime).failed == 1
    info = kmsg.get(receipt.message_id)
    assert (info.status, info.error_code) == ("failed", "AD_OPTED_OUT")
    [entry] = list(ad_store.export_suppressions(runtime.store, "default"))
    assert (entry.source, entry.provider_code) == ("provider:mock", "2061")
    with pytest.raises(ValidationError):
        kmsg.send(ad())


def test_a_provider_refusal_outside_its_window_defers_instead_of_failing(
    kmsg: KMsg, runtime: Runtime, clock: Clock
) -> None:
    clock.now = seoul(20, 30)
    script = {"mock": {"script": [{"outcome": "failure", "code": "OUTSIDE_SEND_WINDOW", "provider_code": "3108"}]}}
    receipt = kmsg.send(ad(provider_options=script))
    assert deliver(runtime, receipt.message_id).action == "deferred"
    row = runtime.store.get(receipt.message_id)
    assert row is not None and row.status == "retrying" and row.error_code == "OUTSIDE_SEND_WINDOW"
    assert row.next_attempt_at == seoul(8, 0, 0, day=2) and row.provider_attempts == 0
    clock.now = seoul(8, 0, 0, day=2)
    sweep(runtime)
    assert deliver(runtime, receipt.message_id).action == "sent"


def test_the_suppression_key_is_required_on_postgresql(pg_url: str, settings_factory: Any) -> None:
    from kmsg_worker.errors import ConfigurationError

    rt = Runtime(settings_factory(pg_url))
    try:
        with pytest.raises(ConfigurationError) as info:
            adrules.hasher_for(rt.settings, rt.store)
        assert info.value.variable == "KMSG_SUPPRESSION_KEY"
    finally:
        rt.close()
    assert "test-key" not in repr(settings_factory(pg_url, KMSG_SUPPRESSION_KEY="test-key-x"))


# -- registered sender numbers ---------------------------------------------------------------------


def test_an_unregistered_sender_is_refused_at_the_producer_naming_sender_and_provider(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    settings = settings_factory(backend_url, KMSG_REGISTERED_SENDERS="mock=0212345678")
    with KMsg(runtime=Runtime(settings, dispatcher=dispatcher)) as kmsg:
        assert kmsg.send(to="01012345678", sender="02-1234-5678", text="hi").status == "queued"
        with pytest.raises(ValidationError) as info:
            kmsg.send(to="01012345678", sender="031-111-2222", text="hi")
        assert (info.value.field, info.value.rule) == ("sender", "not_registered")
        assert "0311112222" in info.value.detail and "mock" in info.value.detail
        # A batch asks once, not per row, and refuses its rows with the same error
        asked: list[str] = []
        registry = adrules.SenderRegistry(settings, lambda name: asked.append(name) or frozenset({"0212345678"}))
        kmsg.runtime._senders = registry
        receipt = kmsg.send_many([{"to": f"010{i:08d}"} for i in range(500)], defaults={"text": "hi", "sender": SENDER})
        assert len(receipt.message_ids) == 500 and asked == ["mock"]
        bad = kmsg.send_many(
            [{"to": f"010{i:08d}"} for i in range(3)],
            defaults={"text": "hi", "sender": "0311112222"},
            on_invalid="skip",
        )
        assert [(e.field, e.rule) for e in bad.invalid] == [("sender", "not_registered")] * 3
        assert asked == ["mock"]  # still cached (TTL)


def test_the_sender_cache_expires_and_an_unanswering_provider_is_not_a_refusal() -> None:
    from kmsg_worker.errors import ProviderTransientError
    from kmsg_worker.settings import Settings

    now = [0.0]
    answers: list[frozenset[str] | Exception] = [
        frozenset({"0212345678"}),
        ProviderTransientError("down", provider="x"),
    ]

    def fetch(name: str) -> frozenset[str] | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    registry = adrules.SenderRegistry(Settings.from_env({}, sender_cache_ttl=60.0), fetch, clock=lambda: now[0])
    with pytest.raises(ValidationError):
        registry.check("solapi", "0311112222")
    now[0] = 59.0
    with pytest.raises(ValidationError):
        registry.check("solapi", "0311112222")  # cached: not asked again
    now[0] = 61.0
    registry.check("solapi", "0311112222")  # the provider could not answer: not refused
    assert answers == []


def test_suppression_look_ups_keep_the_rows_order_across_slices(
    kmsg: KMsg, runtime: Runtime, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmsg_worker.intake as intake

    monkeypatch.setattr(intake, "SLICE", 7)  # several look-ups in flight one after another
    clock.now = seoul(12, 0)
    numbers = [f"010{i:08d}" for i in range(30)]
    listed = {0, 6, 7, 15, 29}
    adrules.suppress(
        runtime.settings, runtime.store, "default", [numbers[i] for i in listed], source="cli", now=clock.now
    )
    # Informational and advertising rows mixed: an informational row to a listed number is sent
    ad_text = {"purpose": "advertising", "text": "(광고)가나다마트 세일\n무료거부 080-123-4567", "compose": "check"}
    rows = [{"to": n, **(ad_text if i % 3 else {"text": "배송 안내"})} for i, n in enumerate(numbers)]
    receipt = kmsg.send_many(rows)
    assert [runtime.store.get(i).recipient for i in receipt.message_ids] == numbers  # type: ignore[union-attr]
    statuses = [runtime.store.get(i).status for i in receipt.message_ids]  # type: ignore[union-attr]
    expected = ["suppressed" if i in listed and i % 3 else "queued" for i in range(30)]
    assert statuses == expected


def test_a_variable_cannot_complete_a_head_the_shared_text_started(kmsg: KMsg) -> None:
    bad = kmsg.send_many(
        [{"to": "01000000001", "variables": {"x": "고)"}}, {"to": "01000000002", "variables": {"x": "!"}}],
        defaults={"text": "(광#{x} 세일"},
        on_invalid="skip",
    )
    assert [(e.row, e.field, e.rule) for e in bad.invalid] == [(1, "purpose", "ad_head")]
    assert len(bad.message_ids) == 1


def test_an_opt_out_that_cannot_be_listed_does_not_break_the_run(
    pg_url: str, settings_factory: Any, dispatcher: RecordingDispatcher, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import truncate

    truncate(pg_url)
    # PostgreSQL without KMSG_SUPPRESSION_KEY: the list cannot be written, the refusal is still recorded
    with KMsg(runtime=Runtime(settings_factory(pg_url), dispatcher=dispatcher)) as kmsg:
        script = {"mock": {"script": [{"outcome": "failure", "code": "AD_OPTED_OUT", "provider_code": "1061"}]}}
        receipt = kmsg.send(to="01012345678", text="안내", provider_options=script)
        assert deliver(kmsg.runtime, receipt.message_id).action == "failed"
        assert kmsg.get(receipt.message_id).error_code == "AD_OPTED_OUT"
    assert '"advertising.suppress_failed"' in capsys.readouterr().err
