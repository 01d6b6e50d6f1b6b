"""``kmsg advertisers`` and ``kmsg suppressions`` through click's runner, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmsg_worker.errors import ValidationError
from kmsg_worker.producer import KMsg
from kmsg_worker.settings import Settings
from tests.conftest import RecordingDispatcher
from tests.test_cli import env, one_error_line, run  # noqa: F401 - env is a fixture

__all__ = ["env"]


@pytest.fixture
def ad_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:  # noqa: F811
    monkeypatch.setenv("KMSG_SUPPRESSION_KEY", "cli-test-key")
    return {**env, "KMSG_SUPPRESSION_KEY": "cli-test-key"}


def test_an_advertiser_profile_is_configured_once_and_composes_sends(ad_env: dict[str, str]) -> None:
    bad = run("advertisers", "set", "--name", "가나다마트", "--opt-out", "02-123-4567")
    assert bad.exit_code == 2 and "080" in one_error_line(bad, "kmsg advertisers set")
    made = run(
        "advertisers", "set", "--sender", "02-1234-5678", "--name", "가나다마트", "--opt-out", "0801234567", "--json"
    )
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["opt_out"] == "080-123-4567"
    listed = json.loads(run("advertisers", "list", "--json").stdout)
    assert [(p["tenant"], p["sender"], p["name"]) for p in listed] == [("default", "0212345678", "가나다마트")]
    with KMsg(Settings.from_env(ad_env), dispatcher=RecordingDispatcher()) as kmsg:
        message = kmsg.validate(to="01012345678", sender="0212345678", text="세일", purpose="advertising")
        assert message.text == "(광고)가나다마트\n세일\n무료수신거부 080-123-4567"
    assert run("advertisers", "remove", "--sender", "0212345678").exit_code == 0
    assert json.loads(run("advertisers", "list", "--json").stdout) == []


def test_suppressions_add_import_export_remove(ad_env: dict[str, str], tmp_path: Path) -> None:
    added = run("suppressions", "add", "010-1111-2222", "01033334444", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout) == {"tenant": "default", "given": 2, "added": 2}
    csv_file = tmp_path / "optouts.csv"
    csv_file.write_text("phone,name\n010-1111-2222,a\n01055556666,b\n\n01077778888,c\n", encoding="utf-8")
    imported = run("suppressions", "import", str(csv_file), "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout) == {"tenant": "default", "given": 3, "added": 2}
    assert json.loads(run("suppressions", "count", "--json").stdout)["count"] == 4
    # A bad line stops the import before anything is stored, naming the line
    broken = tmp_path / "broken.csv"
    broken.write_text("01099990000\nnot-a-number\n", encoding="utf-8")
    failed = run("suppressions", "import", str(broken))
    assert failed.exit_code == 2 and "line 2" in one_error_line(failed, "kmsg suppressions import")
    assert json.loads(run("suppressions", "count", "--json").stdout)["count"] == 4
    # The export holds hashes and where each came from, never the numbers
    exported = run("suppressions", "export")
    assert exported.exit_code == 0, exported.output
    lines = exported.stdout.strip().splitlines()
    assert lines[0] == "digest,source,provider_code,created_at" and len(lines) == 5
    for number in ("01011112222", "01033334444", "01055556666", "01077778888"):
        assert number not in exported.stdout
    assert sorted(line.split(",")[1] for line in lines[1:]) == ["cli", "cli", "import", "import"]
    # A suppressed number is refused for advertising, until removed
    with KMsg(Settings.from_env(ad_env), dispatcher=RecordingDispatcher()) as kmsg:
        fields = {"to": "01055556666", "text": "(광고)가나다 세일\n무료거부 0801234567", "purpose": "advertising"}
        with pytest.raises(ValidationError) as info:
            kmsg.send(fields, compose="check")
        assert info.value.rule == "suppressed"
        removed = run("suppressions", "remove", "01055556666", "--json")
        assert json.loads(removed.stdout)["removed"] == 1
        assert kmsg.send(fields, compose="check").status == "queued"


def test_send_and_send_many_take_the_purpose(
    ad_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.cli import app
    from kmsg_worker.storage.db import make_engine
    from kmsg_worker.storage.repo import Store

    monkeypatch.setattr(app, "producer", lambda: KMsg(dispatcher=RecordingDispatcher()))
    assert run("advertisers", "set", "--name", "가나다마트", "--opt-out", "0801234567").exit_code == 0
    sent = run(
        "send", "--to", "010-1234-5678", "--from", "0212345678", "--text", "세일", "--purpose", "advertising", "--json"
    )
    assert sent.exit_code == 0, sent.output
    store = Store(make_engine(Settings.from_env(ad_env).database_url))
    row = store.get(json.loads(sent.stdout)["message_id"])
    assert row is not None and row.content["text"].startswith("(광고)가나다마트\n")
    checked = run("send", "--to", "01012345678", "--text", "세일", "--purpose", "advertising", "--compose", "check")
    assert checked.exit_code == 2 and "ad_head" in one_error_line(checked, "kmsg send")
    assert run("suppressions", "add", "01000000001").exit_code == 0
    rows = tmp_path / "rows.csv"
    rows.write_text("to\n01000000001\n01000000002\n", encoding="utf-8")
    batch = run(
        "send-many",
        str(rows),
        "--text",
        "세일",
        "--from",
        "0212345678",
        "--purpose",
        "advertising",
        "--night-consent",
        "--no-wait",
        "--json",
    )
    assert batch.exit_code == 0, batch.output
    status = run("batch", "status", json.loads(batch.stdout)["batch_id"], "--json")
    assert json.loads(status.stdout)["suppressed"] == 1
    assert json.loads(status.stdout)["by_status"] == {"queued": 1, "suppressed": 1}


@pytest.mark.parametrize("command", ["add", "remove", "count", "export"])
def test_every_list_command_checks_the_tenant_name_before_touching_the_list(
    ad_env: dict[str, str], command: str
) -> None:
    numbers = ("01011112222",) if command in ("add", "remove") else ()
    bad = run("suppressions", command, "--tenant", "no spaces allowed", *numbers)
    assert bad.exit_code == 2, bad.output
    assert "tenant" in one_error_line(bad, f"kmsg suppressions {command}")
    assert json.loads(run("suppressions", "count", "--json").stdout) == {"tenant": "default", "count": 0}
