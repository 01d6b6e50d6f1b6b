"""AlimTalk templates synced from the fake Solapi, IWINV and Aligo, and the preflight against them.

Real HTTP to the fakes; the fakes apply Kakao's rule themselves (a text that is not the approved
template is refused), so the preflight is checked against the same rule the provider applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import normalize
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.templates import TemplateStore
from kmsg_worker.taxonomy import ErrorCode
from kmsg_worker.templates import sync_provider_templates
from kmsg_worker.testing.fake_templates import FakeTemplate, text_fits
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import RecordingDispatcher

PROVIDERS = ("solapi", "iwinv", "aligo")
BODY = "#{고객}님, 주문 #{주문번호}이 발송되었습니다"


def initial() -> list[FakeTemplate]:
    return [
        FakeTemplate("SHIP", BODY, buttons=[{"name": "배송조회", "type": "DS"}]),
        FakeTemplate("WELCOME", "#{고객}님 가입을 환영합니다"),
        FakeTemplate("PROMO", "이벤트 안내 #{쿠폰}", status="inspecting"),
    ]


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    for server in servers.values():
        server.alimtalk_templates = {t.code: t for t in initial()}  # type: ignore[attr-defined]
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def rt(tmp_path: Path, fakes: dict[str, FakeProviderServer], dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    env = {
        "KMSG_VAR_DIR": str(tmp_path / "var"),
        "KMSG_DATABASE_URL": f"sqlite:///{tmp_path / 'kmsg.sqlite'}",
        "KMSG_PROVIDERS": ",".join(PROVIDERS),
        **fake_env(fakes),
    }
    runtime = Runtime(Settings.from_env(env), dispatcher=dispatcher)
    yield runtime
    runtime.close()


def stored(rt: Runtime, provider: str) -> dict[str, Any]:
    return {t.code: t for t in TemplateStore(rt.engine).provider_templates(provider)}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sync_stores_new_changed_rejected_and_deleted_templates(
    rt: Runtime, fakes: dict[str, FakeProviderServer], provider: str
) -> None:
    counts = sync_provider_templates(rt, provider)
    assert (counts.new, counts.changed, counts.unchanged, counts.deleted) == (3, 0, 0, 0)
    rows = stored(rt, provider)
    assert {c: r.approval for c, r in rows.items()} == {
        "SHIP": "approved",
        "WELCOME": "approved",
        "PROMO": "inspecting",
    }
    assert rows["SHIP"].body == BODY and rows["SHIP"].variables == ["고객", "주문번호"]
    assert rows["SHIP"].buttons == [{"name": "배송조회", "type": "DS"}]
    if provider == "aligo":
        assert rows["SHIP"].channel  # the sender key the list was read for
    # The provider changes: a body edited, a template rejected, one deleted, one new, one approved.
    templates = fakes[provider].alimtalk_templates  # type: ignore[attr-defined]
    templates["SHIP"] = FakeTemplate("SHIP", BODY + " 감사합니다")
    templates["WELCOME"].status = "rejected"
    templates["PROMO"].status = "approved"
    templates["NEW"] = FakeTemplate("NEW", "새 템플릿 #{x}")
    counts = sync_provider_templates(rt, provider)
    assert (counts.new, counts.changed, counts.unchanged, counts.deleted) == (1, 3, 0, 0)
    del templates["NEW"]
    counts = sync_provider_templates(rt, provider)
    assert (counts.new, counts.changed, counts.unchanged, counts.deleted) == (0, 0, 3, 1)
    rows = stored(rt, provider)
    assert rows["SHIP"].body == BODY + " 감사합니다" and rows["SHIP"].buttons == []
    assert (rows["WELCOME"].approval, rows["PROMO"].approval) == ("rejected", "approved")
    assert rows["NEW"].deleted_at is not None
    # A template that comes back is no longer deleted.
    templates["NEW"] = FakeTemplate("NEW", "새 템플릿 #{x}")
    assert sync_provider_templates(rt, provider).changed == 1
    assert stored(rt, provider)["NEW"].deleted_at is None


def test_solapi_sync_pages_through_the_list(rt: Runtime, fakes: dict[str, FakeProviderServer]) -> None:
    fakes["solapi"].alimtalk_templates = {  # type: ignore[attr-defined]
        f"T{i:04d}": FakeTemplate(f"T{i:04d}", f"본문 {i}") for i in range(1203)
    }
    assert sync_provider_templates(rt, "solapi").new == 1203


@pytest.mark.parametrize("provider", PROVIDERS)
def test_preflight_refuses_what_the_provider_would_refuse(
    rt: Runtime, fakes: dict[str, FakeProviderServer], dispatcher: RecordingDispatcher, provider: str
) -> None:
    sync_provider_templates(rt, provider)
    kmsg = KMsg(runtime=rt)
    base = {"type": "ALIMTALK", "to": "01012345678", "provider_id": provider, "template_id": "SHIP"}
    ok = kmsg.send(base, variables={"고객": "김", "주문번호": "A-1"})
    row = rt.store.get(ok.message_id)
    assert row is not None and row.content["text"] == "김님, 주문 A-1이 발송되었습니다"
    cases = [
        ({"template_id": "NOPE", "variables": {"x": "1"}}, "unknown_template"),
        ({"template_id": "PROMO", "variables": {"쿠폰": "1"}}, "not_approved"),
        ({"variables": {"고객": "김"}}, "missing"),
        ({"variables": {"고객": "김", "주문번호": "1"}, "text": "김님, 주문 1이 발송됨"}, "template_mismatch"),
    ]
    for fields, rule in cases:
        with pytest.raises(ValidationError) as err:
            kmsg.send({**base, **fields})
        assert err.value.rule == rule
    assert dispatcher.ids == [ok.message_id]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_fakes_refuse_a_text_that_is_not_the_approved_template(
    rt: Runtime, fakes: dict[str, FakeProviderServer], provider: str
) -> None:
    adapter = rt.provider(provider)

    def send(**fields: Any) -> Any:
        message = normalize({"type": "ALIMTALK", "to": "01012345678", "template_id": "SHIP", **fields})
        return adapter.send(message)

    good = send(variables={"고객": "김", "주문번호": "A-1"}, text="김님, 주문 A-1이 발송되었습니다")
    assert good.accepted, good
    if provider == "iwinv":
        # IWINV takes only the values: a missing one leaves the body unfilled.
        bad = send(variables={"고객": "김"}, text="김님")
    elif provider == "solapi":
        bad = send(variables={"고객": "김"})
    else:
        bad = send(variables={"고객": "김", "주문번호": "A-1"}, text="김님, 주문 A-1이 발송됐어요")
    assert not bad.accepted
    assert bad.error is not None
    assert bad.error.code in (ErrorCode.TEMPLATE_MISMATCH, ErrorCode.TEMPLATE_NOT_FOUND, ErrorCode.INVALID_REQUEST)
    unapproved = send(template_id="PROMO", variables={"쿠폰": "1"}, text="이벤트 안내 1")
    assert not unapproved.accepted


def test_text_fits_takes_any_value_in_place_of_a_variable() -> None:
    assert text_fits(BODY, "김님, 주문 A-1이 발송되었습니다")
    assert text_fits("a #{x} b", "a  b")
    assert not text_fits(BODY, "김님, 주문 A-1이 발송됨")
    assert not text_fits("a.b", "axb")


def test_the_beat_syncs_hourly_by_default_and_not_at_all_at_zero() -> None:
    from config.beat import beat_schedule
    from kmsg_worker.dispatch import QUEUES, TASK_NAMES

    entry = beat_schedule(Settings.from_env({}))["kmsg-sync-templates"]
    assert (entry["task"], entry["schedule"], entry["options"]["queue"]) == (
        TASK_NAMES["template_sync"],
        3600.0,
        QUEUES["maintenance"],
    )
    assert "kmsg-sync-templates" not in beat_schedule(Settings.from_env({"KMSG_TEMPLATE_SYNC_SECONDS": "0"}))


def test_sync_all_skips_a_provider_that_fails_and_syncs_the_others(
    rt: Runtime, fakes: dict[str, FakeProviderServer]
) -> None:
    from kmsg_worker.templates import sync_all_providers

    fakes["aligo"].stop()
    done = sync_all_providers(rt)
    assert sorted(done) == ["iwinv", "solapi"]
    assert all(c.new == 3 for c in done.values())
    assert stored(rt, "aligo") == {}
