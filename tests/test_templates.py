"""Templates on SQLite and PostgreSQL: the registry's states, sending by template, the AlimTalk preflight."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kmsg_worker.delivery import deliver
from kmsg_worker.errors import BatchValidationError, InvalidStateError, ValidationError
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.templates import TemplateStore
from kmsg_worker.sweeps import dispatch_scheduled
from kmsg_worker.templates import Registry, TemplateResolver, template_variables
from tests.conftest import Clock, RecordingDispatcher

BODY = "#{name}님, 주문 #{order}이 발송되었습니다"


def published(kmsg: KMsg, clock: Clock, name: str = "order_shipped", body: str = BODY, **fields: Any) -> str:
    reg = kmsg.templates
    reg.create("default", name, body, now=clock.now, **fields)
    return reg.publish("default", name, now=clock.now).ref


# -- the registry's states ---------------------------------------------------------------------------


def test_variables_come_from_the_body_in_order() -> None:
    assert template_variables("#{b} #{a} #{b}", "제목 #{c}") == ["b", "a", "c"]


def test_create_makes_a_draft_and_a_name_is_taken_once(kmsg: KMsg, clock: Clock) -> None:
    v1 = kmsg.templates.create("default", "order_shipped", BODY, now=clock.now)
    assert (v1.ref, v1.state, v1.variables) == ("order_shipped@1", "draft", ("name", "order"))
    with pytest.raises(ValidationError) as err:
        kmsg.templates.create("default", "order_shipped", "other", now=clock.now)
    assert (err.value.field, err.value.rule) == ("name", "duplicate")
    # Another tenant has its own names.
    assert kmsg.templates.create("acme", "order_shipped", "hi", now=clock.now).ref == "order_shipped@1"


def test_publishing_twice_is_refused(kmsg: KMsg, clock: Clock) -> None:
    ref = published(kmsg, clock)
    assert ref == "order_shipped@1"
    with pytest.raises(InvalidStateError, match="already published|is published"):
        kmsg.templates.publish("default", "order_shipped@1", now=clock.now)
    # By name: there is no draft left, so the newest version (published) is named in the refusal.
    with pytest.raises(InvalidStateError, match="order_shipped@1 is published"):
        kmsg.templates.publish("default", "order_shipped", now=clock.now)


def test_editing_a_published_version_starts_the_next_draft_and_leaves_it_unchanged(kmsg: KMsg, clock: Clock) -> None:
    published(kmsg, clock)
    with pytest.raises(InvalidStateError, match="cannot change"):
        kmsg.templates.edit("default", "order_shipped@1", body="changed", now=clock.now)
    clock.advance(60)
    v2 = kmsg.templates.edit("default", "order_shipped", body="#{name}님, 발송 완료", now=clock.now)
    assert (v2.version, v2.state, v2.variables) == (2, "draft", ("name",))
    # A second edit changes the same draft in place.
    v2b = kmsg.templates.edit("default", "order_shipped", body="#{name}님, 발송 완료!", now=clock.now)
    assert (v2b.version, v2b.body) == (2, "#{name}님, 발송 완료!")
    v1 = kmsg.templates.get("default", "order_shipped@1")
    assert (v1.state, v1.body) == ("published", BODY)
    # Sending by name still uses version 1 until version 2 is published.
    assert kmsg.validate(
        to="01012345678", template="order_shipped", variables={"name": "a", "order": "1"}
    ).template == ("order_shipped@1")
    kmsg.templates.publish("default", "order_shipped", now=clock.now)
    msg = kmsg.validate(to="01012345678", template="order_shipped", variables={"name": "김"})
    assert (msg.template, msg.text) == ("order_shipped@2", "김님, 발송 완료!")


def test_archive_then_archive_again_and_drafts_cannot_be_sent(kmsg: KMsg, clock: Clock) -> None:
    kmsg.templates.create("default", "t", "hi #{n}", now=clock.now)
    with pytest.raises(ValidationError) as err:
        kmsg.validate(to="01012345678", template="t", variables={"n": "1"})
    assert (err.value.field, err.value.rule) == ("template", "not_published")
    with pytest.raises(ValidationError) as err:
        kmsg.validate(to="01012345678", template="t@1", variables={"n": "1"})
    assert err.value.rule == "not_published"
    kmsg.templates.publish("default", "t", now=clock.now)
    archived = kmsg.templates.archive("default", "t", now=clock.now)
    assert archived.state == "archived" and archived.archived_at is not None
    with pytest.raises(InvalidStateError, match="archived"):
        kmsg.templates.archive("default", "t@1", now=clock.now)
    with pytest.raises(InvalidStateError):
        kmsg.templates.publish("default", "t@1", now=clock.now)
    with pytest.raises(ValidationError) as err:
        kmsg.validate(to="01012345678", template="t@1", variables={"n": "1"})
    assert err.value.rule == "archived"


def test_archiving_a_version_in_use_by_scheduled_messages_keeps_their_version(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    published(kmsg, clock)
    at = clock.now + timedelta(hours=2)
    single = kmsg.schedule(to="01012345678", template="order_shipped", variables={"name": "김", "order": "7"}, at=at)
    batch = kmsg.send_many(
        [{"to": "01000000001", "variables": {"name": "이", "order": "8"}}],
        defaults={"template": "order_shipped", "scheduled_at": at},
    )
    kmsg.templates.edit("default", "order_shipped", body="changed #{name}", now=clock.now)
    kmsg.templates.publish("default", "order_shipped", now=clock.now)
    kmsg.templates.archive("default", "order_shipped@1", now=clock.now)
    for message_id, text in (
        (single.message_id, "김님, 주문 7이 발송되었습니다"),
        (batch.message_ids[0], "이님, 주문 8이 발송되었습니다"),
    ):
        row = runtime.store.get(message_id)
        assert row is not None and row.status == "scheduled"
        assert (row.content["template"], row.content["text"]) == ("order_shipped@1", text)
    clock.advance(3 * 3600)
    assert dispatch_scheduled(runtime) >= 1
    assert single.message_id in dispatcher.ids
    deliver(runtime, single.message_id)
    row = runtime.store.get(single.message_id)
    assert row is not None and row.status in ("sent", "delivered")
    assert row.content["template"] == "order_shipped@1"


# -- sending by template -----------------------------------------------------------------------------


def test_send_by_template_records_the_version_and_renders_the_text(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    with pytest.raises(ValidationError) as err:
        kmsg.templates.create("default", "x", "hi", subject="[#{order}]", type="LMS", now=clock.now)
    assert (err.value.field, err.value.rule) == ("subject", "no_variables")
    published(kmsg, clock, subject="[주문] 발송", type="LMS")
    receipt = kmsg.send(to="01012345678", template="order_shipped@1", variables={"name": "김", "order": "7"})
    row = runtime.store.get(receipt.message_id)
    assert row is not None
    assert row.content["template"] == "order_shipped@1"
    assert row.content["text"] == "김님, 주문 7이 발송되었습니다"
    assert row.content["subject"] == "[주문] 발송"
    assert receipt.type == "LMS"


@pytest.mark.parametrize(
    ("variables", "rule", "named"),
    [({"name": "김"}, "missing", "order"), ({"name": "김", "order": "1", "coupon": "x"}, "unknown", "coupon")],
)
def test_missing_or_unknown_variables_are_refused_naming_them(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, variables: Any, rule: str, named: str
) -> None:
    published(kmsg, clock)
    with pytest.raises(ValidationError) as err:
        kmsg.send(to="01012345678", template="order_shipped", variables=variables)
    assert (err.value.field, err.value.rule) == ("variables", rule)
    assert named in err.value.detail
    assert dispatcher.ids == [] and runtime.store.count_by_status() == {}


def test_text_and_template_together_and_an_unknown_template_are_refused(kmsg: KMsg, clock: Clock) -> None:
    published(kmsg, clock)
    with pytest.raises(ValidationError) as err:
        kmsg.validate(to="01012345678", text="hi", template="order_shipped", variables={"name": "a", "order": "1"})
    assert (err.value.field, err.value.rule) == ("text", "not_allowed")
    with pytest.raises(ValidationError) as err:
        kmsg.validate(to="01012345678", template="nope", variables={})
    assert (err.value.field, err.value.rule) == ("template", "unknown")


def test_a_template_bulk_renders_each_row_and_reports_bad_rows_under_on_invalid(
    kmsg: KMsg, runtime: Runtime, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    published(kmsg, clock)
    calls: list[Any] = []
    real = Registry.resolve

    def counting(self: Registry, tenant: str, ref: object) -> Any:
        calls.append(ref)
        return real(self, tenant, ref)

    monkeypatch.setattr(Registry, "resolve", counting)
    rows = [{"to": f"010000000{i:02d}", "variables": {"name": f"고객{i}", "order": str(i)}} for i in range(20)]
    rows[3] = {"to": "01000000003", "variables": {"name": "x"}}  # order missing
    rows[5] = {"to": "01000000005", "variables": {"name": "x", "order": "1", "zzz": "1"}}  # unknown
    rows[7] = {"to": "01000000007", "variables": {"name": "x", "order": "1"}, "priority": "bulk"}  # slow path
    rows[8] = {"to": "01000000008", "variables": {"name": "x"}, "priority": "bulk"}  # slow path, missing
    with pytest.raises(BatchValidationError) as err:
        kmsg.send_many(rows, defaults={"template": "order_shipped"})
    assert [(e.row, e.field, e.rule) for e in err.value.errors] == [
        (4, "variables", "missing"),
        (6, "variables", "unknown"),
        (9, "variables", "missing"),
    ]
    receipt = kmsg.send_many(rows, defaults={"template": "order_shipped"}, on_invalid="skip")
    assert [e.row for e in receipt.invalid] == [4, 6, 9]
    assert len(receipt.message_ids) == 17
    # One resolution per batch, never one per row.
    assert calls == ["order_shipped", "order_shipped"]
    row = runtime.store.get(receipt.message_ids[0])
    assert row is not None
    assert (row.content["text"], row.content["template"]) == ("고객0님, 주문 0이 발송되었습니다", "order_shipped@1")


def test_a_batch_naming_an_unknown_template_reports_every_row(kmsg: KMsg, clock: Clock) -> None:
    receipt = kmsg.send_many(
        [{"to": "01012345678"}, {"to": "01012345679"}], defaults={"template": "x"}, on_invalid="skip"
    )
    assert [(e.row, e.field, e.rule) for e in receipt.invalid] == [
        (1, "template", "unknown"),
        (2, "template", "unknown"),
    ]


def test_rows_may_name_their_own_templates(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    published(kmsg, clock, name="a", body="A #{x}")
    published(kmsg, clock, name="b", body="B #{y}")
    receipt = kmsg.send_many(
        [
            {"to": "01012345678", "template": "a", "variables": {"x": "1"}},
            {"to": "01012345679", "template": "b@1", "variables": {"y": "2"}},
        ]
    )
    texts = [runtime.store.get(i).content["text"] for i in receipt.message_ids]  # type: ignore[union-attr]
    assert texts == ["A 1", "B 2"]


def test_preview_shows_bytes_and_sms_or_lms_and_takes_composing_steps(kmsg: KMsg, clock: Clock) -> None:
    kmsg.templates.create("default", "p", "#{name}님 안녕하세요", now=clock.now)
    short = kmsg.templates.preview("default", "p", {"name": "김"})
    assert (short.text, short.bytes, short.type, short.missing) == ("김님 안녕하세요", 15, "SMS", [])
    long = kmsg.templates.preview("default", "p", {"name": "가" * 50, "extra": "1"})
    assert (long.type, long.unknown) == ("LMS", ["extra"])
    missing = kmsg.templates.preview("default", "p")
    assert (missing.text, missing.missing) == ("#{name}님 안녕하세요", ["name"])
    composed = kmsg.templates.preview("default", "p", {"name": "김"}, compose=[("prefix", lambda t: "(광고)" + t)])
    assert (composed.text, composed.steps, composed.bytes) == ("(광고)김님 안녕하세요", ["prefix"], 21)


def test_resolver_reads_each_reference_once(kmsg: KMsg, clock: Clock) -> None:
    published(kmsg, clock)
    resolver = TemplateResolver(kmsg.templates)
    first = resolver.version("default", "order_shipped")
    kmsg.templates.archive("default", "order_shipped@1", now=clock.now)
    assert resolver.version("default", "order_shipped") is first


# -- AlimTalk preflight ------------------------------------------------------------------------------

APPROVED = {
    "code": "TPL_SHIP",
    "channel": "",
    "name": "ship",
    "body": "#{고객}님, 주문 #{주문번호} 발송",
    "variables": ["고객", "주문번호"],
    "buttons": [{"name": "배송조회", "type": "DS"}],
    "approval": "approved",
    "provider_status": "APR",
}


def seed(runtime: Runtime, *templates: dict[str, Any], provider: str = "mock") -> None:
    TemplateStore(runtime.engine).replace_provider_templates(provider, list(templates), now=runtime.now())


def ata(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "ALIMTALK",
        "to": "01012345678",
        "template_id": "TPL_SHIP",
        "variables": {"주문번호": "A-1", "고객": "김"},
    }
    base.update(fields)
    return base


def test_preflight_completes_text_buttons_and_variable_order(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    seed(runtime, APPROVED)
    receipt = kmsg.send(ata())
    row = runtime.store.get(receipt.message_id)
    assert row is not None
    assert row.content["text"] == "김님, 주문 A-1 발송"
    assert row.content["buttons"] == [{"name": "배송조회", "type": "DS"}]
    assert list(row.content["variables"]) == ["고객", "주문번호"]
    # Buttons given by the caller win.
    own = kmsg.send(ata(buttons=[{"name": "홈", "type": "WL", "url_mobile": "https://example.com"}]))
    assert runtime.store.get(own.message_id).content["buttons"][0]["name"] == "홈"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stored", "message", "field", "rule"),
    [
        (APPROVED, ata(template_id="NOPE"), "template_id", "unknown_template"),
        ({**APPROVED, "approval": "inspecting"}, ata(), "template_id", "not_approved"),
        ({**APPROVED, "approval": "rejected"}, ata(), "template_id", "not_approved"),
        (APPROVED, ata(variables={"고객": "김"}), "variables", "missing"),
        (APPROVED, ata(variables={"고객": "김", "주문번호": "1", "쿠폰": "x"}), "variables", "unknown"),
        (APPROVED, ata(text="김님, 주문 A-1 발송!"), "text", "template_mismatch"),
        ({**APPROVED, "channel": "@shop"}, ata(kakao={"profile_id": "@other"}), "kakao", "channel_mismatch"),
    ],
)
def test_each_preflight_failure_names_its_cause_and_nothing_is_queued(
    kmsg: KMsg,
    runtime: Runtime,
    dispatcher: RecordingDispatcher,
    stored: dict[str, Any],
    message: dict[str, Any],
    field: str,
    rule: str,
) -> None:
    seed(runtime, stored)
    with pytest.raises(ValidationError) as err:
        kmsg.send(message)
    assert (err.value.field, err.value.rule) == (field, rule)
    assert dispatcher.ids == [] and runtime.store.count_by_status() == {}
    # The same check per row of a batch.
    receipt = kmsg.send_many([message, ata()], on_invalid="skip")
    assert [(e.row, e.field, e.rule) for e in receipt.invalid][:1] == [(1, field, rule)]


def test_a_deleted_template_is_refused(kmsg: KMsg, runtime: Runtime) -> None:
    seed(runtime, APPROVED, {**APPROVED, "code": "OTHER"})
    seed(runtime, {**APPROVED, "code": "OTHER"})
    with pytest.raises(ValidationError) as err:
        kmsg.send(ata())
    assert (err.value.field, err.value.rule) == ("template_id", "deleted")


def test_preflight_modes(runtime: Runtime, settings_factory: Any, dispatcher: RecordingDispatcher) -> None:
    # Never synced: "auto" sends on trust, "required" refuses.
    assert KMsg(runtime=runtime).send(ata(text="anything")).status == "queued"
    strict = Runtime(
        settings_factory(runtime.settings.database_url, KMSG_ALIMTALK_PREFLIGHT="required"), dispatcher=dispatcher
    )
    try:
        with pytest.raises(ValidationError) as err:
            KMsg(runtime=strict).send(ata())
        assert err.value.rule == "not_synced"
        seed(strict, APPROVED)
        assert KMsg(runtime=strict).send(ata()).status == "queued"
    finally:
        strict.close()
    off = Runtime(settings_factory(runtime.settings.database_url, KMSG_ALIMTALK_PREFLIGHT="off"), dispatcher=dispatcher)
    try:
        assert KMsg(runtime=off).send(ata(text="not the template")).status == "queued"
    finally:
        off.close()
