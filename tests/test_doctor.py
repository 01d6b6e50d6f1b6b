"""``kmsg doctor`` against real failures: a Redis stopped under it, a wrong provider secret on the fake
Solapi server, a database never migrated, workers that stopped consuming, a beat that never ran."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from kmsg_worker.cli import main
from kmsg_worker.doctor import DoctorOptions, DoctorReport, Status, _celery_ping, _check_clock, _check_ping, run_doctor
from kmsg_worker.heartbeat import record_heartbeat
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import NEW_MESSAGE_STATE, Base, MessageRow
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from tests.conftest import PG_ADMIN_URL, _port_open, need

FAST = DoctorOptions(timeout=2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded(tmp_path: Path, **env: str) -> Settings:
    """Settings for the embedded default, with the schema, the broker folder and fresh heartbeats."""
    values = {"KMSG_VAR_DIR": str(tmp_path / "var"), "KMSG_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'k.sqlite'}"}
    values.update(env)
    settings = Settings.from_env(values)
    rt = Runtime(settings)
    now = datetime.now(UTC)
    record_heartbeat(rt.engine, "sweep", now)
    record_heartbeat(rt.engine, "poll", now)
    rt.close()
    (settings.var_dir / "broker" / "queue").mkdir(parents=True, exist_ok=True)
    return settings


def checks(report: DoctorReport) -> dict[str, Status]:
    return {c.name: c.status for c in report.checks}


def result(report: DoctorReport, name: str) -> Any:
    return next(c for c in report.checks if c.name == name)


def test_a_healthy_embedded_install_passes(tmp_path: Path) -> None:
    report = run_doctor(embedded(tmp_path), FAST)
    assert checks(report) == {
        "database": Status.OK,
        "migrations": Status.OK,
        "broker": Status.OK,
        "consumption": Status.OK,
        "beat": Status.OK,
        "webhooks": Status.OK,
        "provider:mock": Status.OK,
        "senders:mock": Status.SKIP,
        "suppression-key": Status.OK,
        "clock": Status.SKIP,
    }
    assert report.exit_code == 0
    assert "all 10 checks passed" in report.render()


def test_a_sender_in_use_that_is_not_registered_fails_naming_it_and_the_provider(tmp_path: Path) -> None:
    from kmsg_worker.storage.advertising import set_advertiser

    settings = embedded(tmp_path, KMSG_REGISTERED_SENDERS="mock=0212345678", KMSG_DEFAULT_SENDER="02-1234-5678")
    assert checks(run_doctor(settings, FAST))["senders:mock"] is Status.OK
    rt = Runtime(settings)
    set_advertiser(
        rt.store, "shop", "0311112222", name="가게", opt_out="080-123-4567", contact=None, now=datetime.now(UTC)
    )
    rt.close()
    report = run_doctor(settings, FAST)
    found = result(report, "senders:mock")
    assert found.status is Status.FAIL and "0311112222" in found.detail and "mock" in found.detail
    assert report.exit_code == 1


def test_workers_that_stopped_consuming_and_a_dead_beat_fail(tmp_path: Path) -> None:
    settings = embedded(tmp_path)
    now = datetime.now(UTC)
    engine = make_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM kmsg_heartbeats WHERE name = 'poll'"))
        conn.execute(
            MessageRow.__table__.insert(),
            {
                "id": "stuck",
                "tenant": "default",
                "type": "SMS",
                "recipient": "01012345678",
                "status": "queued",
                "priority": "high",
                "route": ["mock"],
                **NEW_MESSAGE_STATE,
                "content": {},
                "created_at": now - timedelta(minutes=10),
                "updated_at": now,
                "queued_at": now - timedelta(minutes=10),
            },
        )
    engine.dispose()
    report = run_doctor(settings, FAST)
    consumption, beat = result(report, "consumption"), result(report, "beat")
    assert consumption.status is Status.FAIL and "kmsg.priority 600 s" in consumption.detail
    assert "inspect ping" in consumption.hint
    assert beat.status is Status.FAIL and "never ran: poll" in beat.detail and "beat" in beat.hint
    assert report.exit_code == 1
    rendered = report.render()
    assert "FAIL  consumption" in rendered and "-> workers are not consuming" in rendered


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a spare loopback port, so the test may stop it."""
    binary = shutil.which("redis-server")
    need("redis-server binary", binary is not None)
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.05)
    yield port, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_a_stopped_redis_fails_the_broker_check(tmp_path: Path, own_redis: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, proc = own_redis
    settings = embedded(tmp_path, KMSG_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    # Given a running Redis, the broker check passes
    before = run_doctor(settings, FAST)
    assert result(before, "broker").status is Status.OK
    assert "maxmemory-policy noeviction" in result(before, "broker").detail
    # When Redis stops
    proc.terminate()
    proc.wait(10)
    started = time.monotonic()
    after = run_doctor(settings, FAST)
    # Then the broker check fails with the next step, quickly, and the exit code says so
    broker = result(after, "broker")
    assert broker.status is Status.FAIL
    assert f"127.0.0.1:{port}" in broker.detail and "redis-cli" in broker.hint
    assert after.exit_code == 1
    assert time.monotonic() - started < 15
    assert result(after, "database").status is Status.OK  # the other checks still ran


@pytest.fixture
def solapi() -> Iterator[FakeSolapiServer]:
    fake = FakeSolapiServer("127.0.0.1", 0, api_key="doctor-key", api_secret="doctor-secret").start()
    yield fake
    fake.stop()


def _solapi_env(fake: FakeSolapiServer, secret: str) -> dict[str, str]:
    return {
        "KMSG_PROVIDERS": "solapi",
        "KMSG_SOLAPI_BASE_URL": fake.url,
        "KMSG_SOLAPI_API_KEY": "doctor-key",
        "KMSG_SOLAPI_API_SECRET": secret,
    }


def test_a_wrong_provider_secret_fails_the_authenticated_probe(tmp_path: Path, solapi: FakeSolapiServer) -> None:
    wrong = run_doctor(embedded(tmp_path, **_solapi_env(solapi, "not-the-secret")), FAST)
    probe = result(wrong, "provider:solapi")
    assert probe.status is Status.FAIL
    assert "authentication failed" in probe.detail or "signature" in probe.detail.lower()
    assert "KMSG_SOLAPI_API_KEY" in probe.hint
    assert "not-the-secret" not in wrong.render()
    assert wrong.exit_code == 1

    right = run_doctor(embedded(tmp_path / "ok", **_solapi_env(solapi, "doctor-secret")), FAST)
    probe = result(right, "provider:solapi")
    assert probe.status is Status.OK and "authenticated" in probe.detail
    # The fake's Date header is a clock reference
    clock = result(right, "clock")
    assert clock.status is Status.OK and "solapi" in clock.detail
    assert right.exit_code == 0


def test_a_missing_credential_names_the_variable(tmp_path: Path) -> None:
    report = run_doctor(embedded(tmp_path, KMSG_PROVIDERS="solapi", KMSG_SOLAPI_API_KEY="k"), FAST)
    probe = result(report, "provider:solapi")
    assert probe.status is Status.FAIL and "KMSG_SOLAPI_API_SECRET" in probe.detail + probe.hint


def test_clock_skew_thresholds() -> None:
    cases = [
        ({"database": 1000.0}, Status.FAIL),
        ({"solapi": -45.0}, Status.WARN),
        ({"db": 0.3}, Status.OK),
        ({}, Status.SKIP),
    ]
    for skews, expected in cases:
        report = DoctorReport()
        _check_clock(report, DoctorOptions(), skews)
        assert report.checks[0].status is expected, skews
    report = DoctorReport()
    _check_clock(report, DoctorOptions(), {"database": 1000.0})
    assert "15 minutes" in report.checks[0].hint


def test_postgres_migrations_must_be_current(tmp_path: Path) -> None:
    need("PostgreSQL on 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    from kmsg_worker.storage.migrate import head_revision, upgrade

    name = f"kmsg_doctor_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = embedded(tmp_path, KMSG_DATABASE_URL=url)  # creates tables but no Alembic revision
        never = run_doctor(settings, FAST)
        assert result(never, "migrations").status is Status.FAIL
        assert "kmsg migrate" in result(never, "migrations").hint
        # The database clock is a reference
        assert "database" in result(never, "clock").detail
        engine = make_engine(url)
        Base.metadata.drop_all(engine)  # every table create_tables made, so the migrations start clean
        engine.dispose()
        upgrade(url)
        record_heartbeat(make_engine(url), "sweep", datetime.now(UTC))
        current = run_doctor(settings, FAST)
        migrations = result(current, "migrations")
        assert migrations.status is Status.OK and str(head_revision()) in migrations.detail
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_cli_exit_code_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in list(os.environ):
        if key.startswith("KMSG_"):
            monkeypatch.delenv(key)
    settings = embedded(tmp_path)
    monkeypatch.setenv("KMSG_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("KMSG_DATABASE_URL", settings.database_url)
    assert main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{") :])
    assert data["ok"] is True and {c["name"] for c in data["checks"]} >= {"database", "beat", "broker"}
    monkeypatch.setenv("KMSG_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["doctor", "--timeout", "1"]) == 1
    assert "FAIL  broker" in capsys.readouterr().out
    monkeypatch.setenv("KMSG_RETRY_MAX_ATTEMPTS", "many")
    assert main(["doctor"]) == 1
    assert "KMSG_RETRY_MAX_ATTEMPTS" in capsys.readouterr().out


@pytest.mark.integration
def test_ping_asks_celery_without_importing_the_app(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library never imports config.celery: --ping runs `celery -A config.celery inspect ping`
    # in a child process. With no worker on this (private) broker, nobody answers: an empty list,
    # which the check reports as a failure with the next step.
    monkeypatch.setenv("KMSG_BROKER_URL", redis_url)
    monkeypatch.setenv("KMSG_BROKER_KEY_PREFIX", f"doctor-ping-{uuid.uuid4().hex[:8]}:")
    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path))
    assert _celery_ping(0.5) == []
    report = DoctorReport()
    _check_ping(report, DoctorOptions(ping=_celery_ping, timeout=0.5))
    [check] = report.checks
    assert (check.name, check.status) == ("workers", Status.FAIL)
    assert "no worker answered" in check.detail


def test_a_disabled_webhook_endpoint_is_a_warning_naming_it(tmp_path: Path) -> None:
    from kmsg_worker.storage.models import WebhookEndpoint

    settings = embedded(tmp_path)
    rt = Runtime(settings)
    now = datetime.now(UTC)
    with rt.store.sessions.begin() as s:
        s.add(
            WebhookEndpoint(
                id="whe_down",
                tenant="shop-a",
                url="https://hooks.example.com/x",
                events=",message.sent,",
                include_phone=False,
                secret="whsec_AAAA",
                created_at=now,
                failures=40,
                disabled_at=now,
                disabled_reason="failing since 2026-12-07T00:00:00Z: HTTP 503",
            )
        )
    rt.close()
    report = run_doctor(settings, FAST)
    webhooks = result(report, "webhooks")
    assert webhooks.status is Status.WARN
    assert "whe_down" in webhooks.detail and "HTTP 503" in webhooks.detail and "kmsg webhooks enable" in webhooks.hint
