"""``kmsg templates`` through click's test runner, on SQLite and PostgreSQL, and ``kmsg send --template``."""

from __future__ import annotations

import json

import pytest

from kmsg_worker.producer import KMsg
from kmsg_worker.storage.templates import TemplateStore
from kmsg_worker.testing.fake_templates import FakeTemplate
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import RecordingDispatcher
from tests.test_cli import dispatcher, env, kmsg, one_error_line, run  # noqa: F401 - fixtures


def test_the_registry_from_the_command_line(env: dict[str, str], dispatcher: RecordingDispatcher, kmsg: KMsg) -> None:  # noqa: F811
    created = run("templates", "create", "order_shipped", "--body", "#{name}님, 주문 #{order} 발송", "--json")
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["ref"] == "order_shipped@1"
    preview = run("templates", "preview", "order_shipped", "--var", "name=김", "--json")
    assert json.loads(preview.stdout) | {"steps": []} == {
        "ref": "order_shipped@1",
        "text": "김님, 주문 #{order} 발송",
        "subject": None,
        "bytes": 24,
        "type": "SMS",
        "missing": ["order"],
        "unknown": [],
        "steps": [],
    }
    # A draft cannot be sent: one error line, exit 2.
    refused = run("send", "--to", "01012345678", "--template", "order_shipped", "--var", "name=김", "--var", "order=1")
    assert refused.exit_code == 2
    assert "not_published" in one_error_line(refused, "kmsg send")
    assert run("templates", "publish", "order_shipped").exit_code == 0
    again = run("templates", "publish", "order_shipped@1")
    assert again.exit_code == 3 and "is published" in one_error_line(again, "kmsg templates publish")
    sent = run(
        "send", "--to", "01012345678", "--template", "order_shipped", "--var", "name=김", "--var", "order=1", "--json"
    )
    assert sent.exit_code == 0, sent.output
    message_id = json.loads(sent.stdout)["message_id"]
    assert kmsg.runtime.store.get(message_id).content["template"] == "order_shipped@1"  # type: ignore[union-attr]
    assert run("templates", "edit", "order_shipped", "--body", "#{name}님 발송 완료").exit_code == 0
    shown = json.loads(run("templates", "show", "order_shipped", "--json").stdout)
    assert [(v["version"], v["state"]) for v in shown] == [(1, "published"), (2, "draft")]
    assert run("templates", "archive", "order_shipped@1").exit_code == 0
    listed = json.loads(run("templates", "list", "--json").stdout)
    assert [(v["ref"], v["state"]) for v in listed] == [("order_shipped@2", "draft")]
    table = run("templates", "list")
    assert "order_shipped@2" in table.stdout


def test_sync_from_the_command_line(
    env: dict[str, str],  # noqa: F811
    dispatcher: RecordingDispatcher,  # noqa: F811
    kmsg: KMsg,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fakes = start_fakes()
    try:
        fakes["iwinv"].alimtalk_templates = {"T1": FakeTemplate("T1", "안내 #{x}")}  # type: ignore[attr-defined]
        for key, value in {**fake_env(fakes), "KMSG_PROVIDERS": "iwinv"}.items():
            monkeypatch.setenv(key, value)
        result = run("templates", "sync", "--provider", "iwinv", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == [
            {"provider": "iwinv", "new": 1, "changed": 0, "unchanged": 0, "deleted": 0}
        ]
        stored = TemplateStore(kmsg.runtime.engine).provider_templates("iwinv")
        assert [(t.code, t.approval, t.variables) for t in stored] == [("T1", "approved", ["x"])]
        listed = run("templates", "alimtalk", "--json")
        assert json.loads(listed.stdout)[0]["code"] == "T1"
    finally:
        for server in fakes.values():
            server.stop()


def test_an_advertising_preview_shows_the_composed_text(env: dict[str, str], kmsg: KMsg) -> None:  # noqa: F811
    assert run("templates", "create", "winter_sale", "--body", "#{name}님 겨울 세일 20%").exit_code == 0
    plain = json.loads(run("templates", "preview", "winter_sale", "--var", "name=김", "--json").stdout)
    assert (plain["text"], plain["type"], plain["steps"]) == ("김님 겨울 세일 20%", "SMS", [])
    # no advertiser profile yet: the same refusal an advertising send gets
    refused = run("templates", "preview", "winter_sale", "--var", "name=김", "--purpose", "advertising")
    assert refused.exit_code == 2 and "advertiser_profile" in one_error_line(refused, "kmsg templates preview")
    profile = ("--sender", "02-1234-5678", "--name", "가나다마트", "--opt-out", "080-123-4567")
    assert run("advertisers", "set", *profile).exit_code == 0
    shown = run(
        "templates", "preview", "winter_sale", "--var", "name=김", "--purpose", "advertising", "--sender", "0212345678"
    )
    assert shown.exit_code == 0, shown.output
    composed = json.loads(
        run(
            "templates",
            "preview",
            "winter_sale",
            "--var",
            "name=김",
            "--purpose",
            "advertising",
            "--sender",
            "02-1234-5678",
            "--json",
        ).stdout
    )
    lines = composed["text"].split("\n")
    assert lines[0].startswith("(광고)가나다마트") and lines[1] == "김님 겨울 세일 20%"
    assert lines[-1].startswith("무료수신거부") and "080" in lines[-1]
    assert composed["steps"] == ["advertising"] and composed["bytes"] > plain["bytes"]
    assert composed["type"] == ("LMS" if composed["bytes"] > 90 else "SMS")
