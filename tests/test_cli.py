"""The ``kmsg`` command line through click's test runner, on the embedded SQLite and on PostgreSQL.

Every command runs against a real database (the ``backend_url`` fixture) configured the way an
operator configures it, through ``KMSG_*`` variables; data must come on stdout, notes and progress
on stderr, and every mistake must end in one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from kmsg_worker.cli import app, cli, main
from kmsg_worker.delivery import deliver, process_chunk
from kmsg_worker.message import Priority
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.status import MessageStatus as S
from kmsg_worker.storage.models import DeadLetter, MessageRow
from tests.conftest import ROOT, RecordingDispatcher, scratch_pg_database


@pytest.fixture
def env(backend_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``KMSG_*`` of an operator's shell: this test's database, everything else the defaults."""
    for key in list(os.environ):
        if key.startswith("KMSG_"):
            monkeypatch.delenv(key)
    values = {"KMSG_DATABASE_URL": backend_url, "KMSG_VAR_DIR": str(tmp_path / "var")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def dispatcher(monkeypatch: pytest.MonkeyPatch) -> RecordingDispatcher:
    """What the commands publish, recorded instead of sent to a broker."""
    recorded = RecordingDispatcher()
    monkeypatch.setattr(app, "producer", lambda: KMsg(dispatcher=recorded))
    return recorded


@pytest.fixture
def kmsg(env: dict[str, str]) -> Iterator[KMsg]:
    """A producer on the same database as the commands, for setting up and checking."""
    with KMsg(Settings.from_env(env), dispatcher=RecordingDispatcher()) as producer:
        yield producer


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="kmsg", catch_exceptions=False)


def one_error_line(result: Result, command: str) -> str:
    """The single stderr line of a failed command (no usage block, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# -- the group: version, help and usage errors ----------------------------------------------------


def test_version_and_help() -> None:
    version = run("--version")
    assert version.exit_code == 0 and version.stdout.startswith("kmsg ")
    assert version.stdout.split()[1][0].isdigit()
    shown = run("--help")
    assert shown.exit_code == 0
    for command in ("send", "send-many", "batch", "get", "cancel", "messages", "dead", "demo", "doctor", "report"):
        assert f"  {command} " in shown.stdout


@pytest.mark.parametrize(
    ("args", "command", "fragment"),
    [
        (["send", "--to", "01012345678", "--text", "hi", "--var", "bad"], "kmsg send", "'bad' is not name=value"),
        (["send", "--text", "hi"], "kmsg send", "Missing option '--to'"),
        (["send", "--to", "01012345678", "--priority", "urgent"], "kmsg send", "--priority"),
        (["nosuch"], "kmsg", "No such command 'nosuch'"),
        (["get"], "kmsg get", "give a message id or --provider-id"),
        (["get", "x", "--provider-id", "y"], "kmsg get", "not both"),
        (["get", "x", "--provider", "mock"], "kmsg get", "--provider narrows --provider-id"),
        (["messages", "list", "--status", "lost"], "kmsg messages list", "'lost' is not one of"),
        (["messages", "list", "--since", "yesterday"], "kmsg messages list", "--since"),
        (["messages", "pending", "--older-than", "soon"], "kmsg messages pending", "--older-than"),
        (["send-many", "no-such-file.csv"], "kmsg send-many", "does not exist"),
        (["batch", "pause", "b"], "kmsg batch", "No such command 'pause'"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(
    env: dict[str, str], args: list[str], command: str, fragment: str
) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert fragment in one_error_line(result, command)
    assert result.stdout == ""


def test_invalid_input_and_configuration_exit_2_naming_the_field(env: dict[str, str]) -> None:
    bad_number = run("send", "--to", "12", "--text", "hi")
    assert bad_number.exit_code == 2 and "to: " in one_error_line(bad_number, "kmsg send")
    bad_tenant = run("send", "--to", "01012345678", "--text", "hi", "--tenant", "a b")
    assert bad_tenant.exit_code == 2 and "tenant: " in one_error_line(bad_tenant, "kmsg send")
    os.environ["KMSG_RETRY_MAX_ATTEMPTS"] = "many"
    try:
        bad_setting = run("send", "--to", "01012345678", "--text", "hi")
    finally:
        del os.environ["KMSG_RETRY_MAX_ATTEMPTS"]
    assert bad_setting.exit_code == 2 and "KMSG_RETRY_MAX_ATTEMPTS" in one_error_line(bad_setting, "kmsg send")


def test_the_entry_point_returns_the_exit_code_and_the_module_runs(env: dict[str, str]) -> None:
    assert main(["send", "--to", "01012345678", "--text", "hi", "--var", "bad"]) == 2
    assert main(["--version"]) == 0
    # `python -m kmsg_worker.cli`, as the metrics server and the benchmark start it
    done = subprocess.run(
        [sys.executable, "-m", "kmsg_worker.cli", "send", "--to", "01012345678", "--text", "hi", "--var", "bad"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "kmsg send: error: Invalid value for --var: 'bad' is not name=value (see 'kmsg send --help')"
    ]


# -- send, get, cancel ----------------------------------------------------------------------------


def test_send_stores_the_message_and_prints_its_receipt(
    env: dict[str, str], dispatcher: RecordingDispatcher, kmsg: KMsg
) -> None:
    plain = run("send", "--to", "010-1234-5678", "--text", "#{name}님 안녕하세요", "--var", "name=김민준")
    assert plain.exit_code == 0, plain.output
    message_id, status, mtype, route = plain.stdout.split()
    assert (status, mtype, route) == ("queued", "SMS", "route=mock")
    assert kmsg.get(message_id).status == "queued" and dispatcher.ids == [message_id]
    assert kmsg.runtime.store.get(message_id).content["text"] == "김민준님 안녕하세요"  # type: ignore[union-attr]

    as_json = run("send", "--to", "01012345678", "--text", "hi", "--priority", "high", "--json", "--tenant", "shop.1")
    receipt = json.loads(as_json.stdout)
    assert receipt["status"] == "queued" and receipt["route"] == ["mock"] and not receipt["duplicate"]
    assert dispatcher.sends[-1] == (receipt["message_id"], str(Priority.HIGH), None)
    assert kmsg.runtime.store.get(receipt["message_id"]).tenant == "shop.1"  # type: ignore[union-attr]

    later = run("send", "--to", "01012345678", "--text", "later", "--at", "2099-01-01T09:00", "--json")
    assert json.loads(later.stdout)["status"] == "scheduled"
    again = [run("send", "--to", "01012345678", "--text", "x", "--idempotency-key", "k1", "--json") for _ in "ab"]
    first, second = (json.loads(r.stdout) for r in again)
    assert second["duplicate"] and second["message_id"] == first["message_id"]


def test_get_shows_a_message_masked_as_json_when_piped(env: dict[str, str], kmsg: KMsg) -> None:
    receipt = kmsg.send(to="01012345678", text="secret text")
    deliver(kmsg.runtime, receipt.message_id)
    piped = run("get", receipt.message_id)
    assert piped.exit_code == 0
    shown = json.loads(piped.stdout)
    assert shown["id"] == receipt.message_id and shown["status"] == "sent" and shown["to"] == "010****5678"
    assert "01012345678" not in piped.output and shown["attempts"][0]["outcome"] == "accepted"
    assert json.loads(run("get", receipt.message_id, "--json").stdout) == shown
    # by the provider's id
    by_provider = run("get", "--provider-id", shown["provider_message_id"], "--provider", "mock", "--json")
    assert json.loads(by_provider.stdout)["id"] == receipt.message_id
    missing = run("get", "no-such-id")
    assert missing.exit_code == 3 and "no-such-id" in one_error_line(missing, "kmsg get")


def test_cancel(env: dict[str, str], kmsg: KMsg) -> None:
    waiting = kmsg.schedule(to="01012345678", text="later", at=kmsg.runtime.now() + timedelta(days=1))
    done = run("cancel", waiting.message_id)
    assert (done.exit_code, done.stdout) == (0, f"{waiting.message_id} cancelled\n")
    again = run("cancel", waiting.message_id, "--json")
    assert again.exit_code == 3 and again.stdout == ""
    one_error_line(again, "kmsg cancel")
    other = kmsg.schedule(to="01012345678", text="later", at=kmsg.runtime.now() + timedelta(days=1))
    assert json.loads(run("cancel", other.message_id, "--json").stdout) == {
        "id": other.message_id,
        "status": "cancelled",
    }


# -- messages list / pending ------------------------------------------------------------------------


def test_messages_list_filters_by_status_time_and_batch(env: dict[str, str], kmsg: KMsg) -> None:
    queued = kmsg.send(to="01012345678", text="q").message_id
    sent = kmsg.send(to="01012345679", text="s").message_id
    deliver(kmsg.runtime, sent)
    batch = kmsg.send_many([{"to": "01011112222"}, {"to": "01011113333"}], defaults={"text": "b"})

    table = run("messages", "list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "TYPE", "TO"] and len(lines) == 5
    assert "01012345678" not in table.stdout and "010****5678" in table.stdout

    def ids(*args: str) -> list[str]:
        result = run("messages", "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["id"] for line in result.stdout.splitlines()]

    assert ids("--status", "sent") == [sent]
    assert set(ids("--status", "sent", "--status", "queued")) == {sent, queued, *batch.message_ids}
    assert set(ids("--batch", batch.batch_id)) == set(batch.message_ids)
    assert len(ids("--limit", "2")) == 2
    assert len(ids("--since", "1h")) == 4 and ids("--since", "2099-01-01T00:00") == []


def test_messages_pending_counts_by_state_and_age(env: dict[str, str], kmsg: KMsg) -> None:
    queued = kmsg.send(to="01012345678", text="q").message_id
    kmsg.send(to="01012345678", text="s", scheduled_at="2099-01-01T09:00")
    kmsg.runtime.store.update_fields(
        queued, expect=S.QUEUED, now=kmsg.runtime.now(), created_at=kmsg.runtime.now() - timedelta(minutes=20)
    )
    result = run("messages", "pending", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    states = {s["status"]: s for s in data["states"]}
    assert list(states) == ["scheduled", "queued", "sending", "retrying", "sent"]
    assert states["queued"]["count"] == 1 and 20 * 60 <= states["queued"]["oldest_age"] < 21 * 60
    # a send planned for 2099 is not late
    assert states["scheduled"]["count"] == 1 and states["scheduled"]["oldest_age"] == 0
    # the check: exit 1 when a message waits longer than the threshold
    late = run("messages", "pending", "--older-than", "10m")
    assert late.exit_code == 1
    assert late.stdout.splitlines()[0].split() == ["STATE", "COUNT", "OLDEST", "OLDER"]
    assert "1 message(s) waiting longer than 10m00s" in late.stderr
    fine = run("messages", "pending", "--older-than", "1h", "--json")
    assert fine.exit_code == 0 and json.loads(fine.stdout)["older"] == 0


# -- dead -------------------------------------------------------------------------------------------


def test_dead_list_and_retry(env: dict[str, str], dispatcher: RecordingDispatcher, kmsg: KMsg) -> None:
    poison = kmsg.send(to="01012345678", text="p").message_id
    now = kmsg.runtime.now()
    assert kmsg.runtime.store.update_fields(poison, expect=S.QUEUED, now=now, status=S.DEAD, deliveries=6) == 1
    with kmsg.runtime.store.sessions.begin() as s:
        s.add(DeadLetter(task_name="kmsg.send_message", reason="malformed payload", created_at=now))
    listed = run("dead", "list", "--json")
    assert listed.exit_code == 0
    data = json.loads(listed.stdout)
    assert [m["id"] for m in data["messages"]] == [poison] and data["messages"][0]["deliveries"] == 6
    assert data["dead_letters"][0]["task"] == "kmsg.send_message"
    table = run("dead", "list")
    assert "dead messages" in table.stdout and poison in table.stdout and "malformed payload" in table.stdout

    retried = run("dead", "retry", poison)
    assert (retried.exit_code, retried.stdout) == (0, f"{poison} requeued\n")
    assert dispatcher.ids == [poison]
    row = kmsg.runtime.store.get(poison)
    assert row is not None and (row.status, row.deliveries) == ("queued", 0)
    not_dead = run("dead", "retry", poison)
    assert not_dead.exit_code == 2 and "is not dead" in one_error_line(not_dead, "kmsg dead retry")


# -- send-many and batch ----------------------------------------------------------------------------


class InlineDispatcher:
    """Runs what would be published at once, in this process (a worker's work, without a worker)."""

    def __init__(self) -> None:
        self.rt: Runtime | None = None

    def send(self, message_ids: Sequence[str], *, priority: Any, countdown: float | None = None) -> None:
        assert self.rt is not None
        for message_id in message_ids:
            deliver(self.rt, message_id)

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        assert self.rt is not None
        for number in chunks:
            process_chunk(self.rt, batch_id, number)


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("to,name\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_send_many_follows_the_batch_with_progress_on_stderr_and_data_on_stdout(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kmsg: KMsg
) -> None:
    inline = InlineDispatcher()

    def producer() -> KMsg:
        made = KMsg(dispatcher=inline)
        inline.rt = made.runtime
        return made

    monkeypatch.setattr(app, "producer", producer)
    csv_file = write_csv(tmp_path / "r.csv", ["01011112222,kim", "01011113333,lee", "01011114444,park"])
    result = run("send-many", str(csv_file), "--text", "#{name}님 안녕하세요", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is one JSON document: nothing else was mixed in
    assert data["accepted"] == 3 and data["done"] and data["summary"]["by_status"] == {"sent": 3}
    assert f"batch {data['batch_id']}: 3 accepted, 0 invalid" in result.stderr
    assert "3 accepted | 3 sent" in result.stderr  # the progress line, not a terminal: plain text
    shown = run("batch", "status", data["batch_id"])
    assert shown.exit_code == 0 and "3 accepted | 3 sent | 0 failed" in shown.stdout


def test_send_many_refuses_or_skips_invalid_rows_and_times_out_with_exit_3(
    env: dict[str, str], dispatcher: RecordingDispatcher, tmp_path: Path, kmsg: KMsg
) -> None:
    csv_file = write_csv(tmp_path / "r.csv", ["01011112222,kim", "12,lee"])
    refused = run("send-many", str(csv_file), "--text", "hi #{name}")
    assert refused.exit_code == 2 and "rows[2].to" in one_error_line(refused, "kmsg send-many")
    accepted = run("send-many", str(csv_file), "--text", "hi #{name}", "--skip-invalid", "--no-wait", "--json")
    assert accepted.exit_code == 0
    data = json.loads(accepted.stdout)
    assert data["accepted"] == 1 and data["invalid"][0]["row"] == 2 and "row 2: to:" in accepted.stderr
    assert dispatcher.chunks and dispatcher.chunks[0][0] == data["batch_id"]
    # Followed without a worker: not done in time, exit 3, the summary still on stdout
    bad_tenant = run("send-many", str(csv_file), "--text", "hi", "--tenant", "a\tb")
    assert bad_tenant.exit_code == 2 and "tenant: " in one_error_line(bad_tenant, "kmsg send-many")
    tenant = run("send-many", str(csv_file), "--text", "hi", "--skip-invalid", "--no-wait", "--tenant", "shop.1")
    with kmsg.runtime.store.sessions() as s:
        where = MessageRow.batch_id == tenant.stdout.strip()
        assert set(s.scalars(select(MessageRow.tenant).where(where))) == {"shop.1"}
    waited = run("send-many", str(csv_file), "--text", "hi", "--skip-invalid", "--timeout", "0")
    assert waited.exit_code == 3
    assert waited.stdout.startswith("batch ") and "1 accepted | 0 sent" in waited.stdout
    assert "not done after 0s" in waited.stderr


def test_batch_status_and_cancel(env: dict[str, str], kmsg: KMsg) -> None:
    receipt = kmsg.send_many([{"to": "01011112222"}, {"to": "01011113333"}], defaults={"text": "b"})
    status = run("batch", "status", receipt.batch_id, "--json")
    assert status.exit_code == 0
    data = json.loads(status.stdout)
    assert data["total"] == 2 and data["by_status"] == {"queued": 2} and data["done"] is False
    cancelled = run("batch", "cancel", receipt.batch_id)
    assert cancelled.exit_code == 0 and "2 cancelled | 0 pending" in cancelled.stdout
    assert json.loads(run("batch", "status", receipt.batch_id, "--json").stdout)["done"] is True
    missing = run("batch", "status", "no-such-batch")
    assert missing.exit_code == 3 and "no batch" in one_error_line(missing, "kmsg batch status")


# -- operations ---------------------------------------------------------------------------------------


def test_migrate_on_postgresql_and_the_note_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kmsg_worker.storage.migrate import head_revision

    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path / "var"))
    with scratch_pg_database("kmsg_cli_migrate") as url:  # empty: never migrated
        monkeypatch.setenv("KMSG_DATABASE_URL", url)
        result = run("migrate")
        assert result.exit_code == 0, result.output
        assert result.stdout == f"database is at the latest revision ({head_revision()})\n"
        assert json.loads(run("migrate", "--json").stdout) == {"migrated": True, "revision": head_revision()}
    monkeypatch.setenv("KMSG_DATABASE_URL", f"sqlite:///{tmp_path / 'k.sqlite'}")
    embedded = run("migrate")
    assert embedded.exit_code == 0 and embedded.stdout == "" and "migrations are for PostgreSQL" in embedded.stderr
    assert json.loads(run("migrate", "--json").stdout)["migrated"] is False


def test_circuits_without_redis_says_there_is_nothing_shared(env: dict[str, str]) -> None:
    result = run("circuits", "--json")
    assert result.exit_code == 0 and result.stdout == "" and "no KMSG_REDIS_URL" in result.stderr


def test_fake_providers_serves_until_terminated(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsg_worker.cli", "fake-providers", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("}"):
                break
        urls = json.loads("".join(lines))
        assert set(urls) == {"solapi", "iwinv", "aligo"}
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    shown = run("fake-providers", "--help")
    assert "/_fake/faults" in shown.stdout


def test_doctor_and_report_take_json(env: dict[str, str], kmsg: KMsg) -> None:
    kmsg.send(to="01012345678", text="hi")
    report = run("report", "--since", "1h", "--json", "--no-html")
    assert report.exit_code == 0 and json.loads(report.stdout)["overall"]["total"] == 1
    doctor = run("doctor", "--json", "--no-probe", "--timeout", "1")
    assert doctor.exit_code in (0, 1)  # no worker or beat runs here: their checks may fail
    out = doctor.stdout
    data = json.loads(out[out.index("{") :])
    assert {c["name"] for c in data["checks"]} >= {"database", "broker"}


def test_circuits_shows_what_the_workers_share_in_redis(
    env: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.circuit import CircuitPolicy, RedisCircuitBreaker

    prefix = f"kmsgclitest{os.getpid()}:"
    monkeypatch.setenv("KMSG_REDIS_URL", redis_url)
    monkeypatch.setenv("KMSG_BROKER_KEY_PREFIX", prefix)
    monkeypatch.setenv("KMSG_PROVIDERS", "mock")
    import redis

    client = redis.Redis.from_url(redis_url)
    shared = RedisCircuitBreaker(client, CircuitPolicy(consecutive_failures=2), prefix=f"{prefix}kmsg:cb:")
    try:
        for _ in range(2):
            shared.record("mock", ok=False, timeout=True)
        lines = run("circuits", "--json").stdout.splitlines()
        assert [json.loads(line)["state"] for line in lines] == ["open"]
        table = run("circuits").stdout.splitlines()
        assert table[0].split() == ["PROVIDER", "STATE", "WINDOW", "CONSECUTIVE", "OPENED_AT", "RETRY_IN"]
        assert table[1].split()[:2] == ["mock", "open"]
    finally:
        shared.reset("mock")
        client.close()


def test_metrics_server_serves_until_terminated(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update({"KMSG_VAR_DIR": str(tmp_path / "var"), "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsg_worker.cli", "metrics-server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("serving http://127.0.0.1:"), first
        import httpx

        url = first.split()[1]
        assert "kmsg_" in httpx.get(url, timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_prints_the_final_table_on_stdout_and_progress_on_stderr(tmp_path: Path) -> None:
    # A real worker and beat (subprocesses of the command), on the embedded default in tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    done = subprocess.run(
        [sys.executable, "-m", "kmsg_worker.cli", "demo", "--json"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(done.stdout)  # nothing but the JSON document on stdout
    assert data["final"] is True and len(data["messages"]) == 7  # six sent, one fallback child
    assert "kmsg demo: broker=filesystem://" in done.stderr and "accepted" in done.stderr
