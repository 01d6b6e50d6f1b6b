"""Prometheus metrics: counters derived from the log events of a known in-process run, scrape-time
gauges from seeded rows and a real Redis, prefork (multiprocess) merging, the log schema and masking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from kmsg_worker.delivery import deliver
from kmsg_worker.logging import configure_logging, get_logger
from kmsg_worker.observability.backlog import BacklogCollector
from kmsg_worker.observability.events import Metrics, metrics_processor
from kmsg_worker.observability.multiprocess import MultiProcessDirCollector
from kmsg_worker.observability.server import build_registry
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.registry import PROVIDER_ALIASES, register_provider
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.tracking import poll_statuses
from tests.conftest import ROOT, RecordingDispatcher, total
from tests.test_pipeline import BackupMock, Clock

if "mock_b" not in PROVIDER_ALIASES:
    register_provider("mock_b", "tests.test_pipeline:BackupMock")


@pytest.fixture
def sqlite_rt(tmp_path: Path, settings_factory: Any) -> Iterator[Runtime]:
    rt = Runtime(settings_factory(f"sqlite:///{tmp_path / 'm.sqlite'}"), dispatcher=RecordingDispatcher())
    clock = Clock()
    rt.now = clock
    yield rt
    rt.close()


def test_counters_after_a_known_run(metrics: Metrics, sqlite_rt: Runtime) -> None:
    rt, clock = sqlite_rt, sqlite_rt.now
    assert isinstance(clock, Clock)
    rt.router.providers.append("mock_b")
    rt.router._types["mock_b"] = BackupMock.capabilities.types
    kmsg = KMsg(runtime=rt)
    # Given 5 plain sends, one refused for the message's fault, one that fails twice then succeeds,
    # one whose provider refuses (balance) so it fails over to mock_b, and an AlimTalk to a non-Kakao user
    ok = [kmsg.send(to=f"0101234{i:04d}", text="hi").message_id for i in range(5)]
    bad = kmsg.send(
        to="01012349999",
        text="x",
        provider_options={"mock": {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT"}]}},
    )
    flaky = kmsg.send(to="01012348888", text="x", provider_options={"mock": {"fail_times": 2}})
    moved = kmsg.send(
        to="01012347777",
        text="x",
        provider_options={"mock": {"script": [{"outcome": "failure", "code": "INSUFFICIENT_BALANCE"}]}},
    )
    ata = kmsg.send(
        type="ALIMTALK",
        to="01012346666",
        template_id="T1",
        failover={"content": "fallback text"},
        provider_options={"mock": {"deliver": "FAILED:3104"}},
    )
    # When the workers' pipeline runs them in-process
    for mid in [*ok, bad.message_id, flaky.message_id, moved.message_id, ata.message_id]:
        deliver(rt, mid)
    for _ in range(2):
        clock.advance(60)
        deliver(rt, flaky.message_id)
    mock_b = rt.provider("mock_b")
    assert isinstance(mock_b, BackupMock)
    mock_b._log_path = None
    mock_b.calls.append({"message_id": moved.message_id, "accepted": False})  # consume the refusing step
    assert deliver(rt, moved.message_id).action == "sent"
    clock.advance(rt.settings.tracking.first_check)
    poll_statuses(rt)

    # Then every counter matches what happened
    reg = metrics.registry
    assert total(reg, "kmsg_messages_accepted_total") == 9
    assert total(reg, "kmsg_messages_accepted_total", type="SMS", provider="mock", tenant="default") == 8
    assert total(reg, "kmsg_messages_accepted_total", type="ALIMTALK") == 1
    assert total(reg, "kmsg_messages_sent_total", provider="mock") == 7  # 5 ok + flaky + alimtalk
    assert total(reg, "kmsg_messages_sent_total", provider="mock_b") == 1
    assert total(reg, "kmsg_messages_failed_total", error_code="INVALID_RECIPIENT") == 1
    assert total(reg, "kmsg_provider_errors_total", provider="mock", error_code="PROVIDER_ERROR") == 2
    assert total(reg, "kmsg_retries_total") == 2
    assert total(reg, "kmsg_failovers_total", kind="provider", from_provider="mock", to_provider="mock_b") == 1
    assert total(reg, "kmsg_failovers_total", kind="alimtalk_to_sms") == 1
    assert total(reg, "kmsg_tracking_results_total", result="delivered") == 7
    assert total(reg, "kmsg_tracking_results_total", result="failed") == 1
    # per-message tracking events carry the labels: 6 delivered on mock, 1 on mock_b, the AlimTalk failed
    assert total(reg, "kmsg_messages_delivered_total", provider="mock", type="SMS", tenant="default") == 6
    assert total(reg, "kmsg_messages_delivered_total", provider="mock_b") == 1
    assert total(reg, "kmsg_messages_failed_total", type="ALIMTALK") == 1
    assert total(reg, "kmsg_log_events_total", event="message.sent", level="info") == 8
    # and the exposition follows Prometheus naming
    text = generate_latest(reg).decode()
    assert 'kmsg_messages_accepted_total{provider="mock",tenant="default",test="false",type="SMS"} 8.0' in text
    assert "# TYPE kmsg_provider_request_seconds histogram" in text


def test_latency_delivery_and_circuit_events_feed_histograms_and_gauges(metrics: Metrics) -> None:
    # Fields the pipeline adds over time (latency_ms, delivery_seconds, circuit transitions) map as documented.
    log = get_logger("test")
    log.info("message.sent", message_id="m1", provider="solapi", type="SMS", tenant="t1", latency_ms=42.0)
    log.info("message.attempt_failed", provider="solapi", error_code="RATE_LIMIT_EXCEEDED", latency_ms=7.0)
    log.info("message.delivered", provider="solapi", type="SMS", tenant="t1", delivery_seconds=12.5)
    log.warning("circuit.opened", provider="iwinv")
    log.info("circuit.closed", provider="aligo")
    log.info("message.throttled", provider="solapi", delay=0.12)
    reg = metrics.registry
    assert total(reg, "kmsg_provider_request_seconds_count", provider="solapi", outcome="accepted") == 1
    assert total(reg, "kmsg_provider_request_seconds_sum", provider="solapi", outcome="accepted") == pytest.approx(
        0.042
    )
    assert total(reg, "kmsg_provider_request_seconds_bucket", provider="solapi", outcome="accepted", le="0.05") == 1
    assert total(reg, "kmsg_rate_limit_throttled_total", provider="solapi", source="provider") == 1
    assert total(reg, "kmsg_rate_limit_throttled_total", provider="solapi", source="local") == 1
    assert total(reg, "kmsg_messages_delivered_total", provider="solapi", type="SMS", tenant="t1") == 1
    assert total(reg, "kmsg_delivery_seconds_sum", provider="solapi") == pytest.approx(12.5)
    assert total(reg, "kmsg_circuit_state", provider="iwinv") == 2
    assert total(reg, "kmsg_circuit_state", provider="aligo") == 0
    assert total(reg, "kmsg_circuit_transitions_total", provider="iwinv", state="open") == 1


def test_quiet_log_level_keeps_counting(metrics: Metrics, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    try:
        get_logger("test").info("message.sent", provider="mock")
        get_logger("test").warning("lease.requeued", provider="mock")
    finally:
        configure_logging("INFO")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines] == ["lease.requeued"]
    assert total(metrics.registry, "kmsg_messages_sent_total", provider="mock") == 1
    assert total(metrics.registry, "kmsg_lease_requeued_total", provider="mock") == 1


def test_a_broken_event_never_breaks_the_caller(metrics: Metrics) -> None:
    event = {"event": "message.sent", "provider": object(), "latency_ms": "fast", "level": "info"}
    assert metrics_processor(None, "info", dict(event))["event"] == "message.sent"
    assert total(metrics.registry, "kmsg_provider_request_seconds_count") == 0


def test_json_logs_are_masked_and_carry_the_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    structlog.contextvars.bind_contextvars(correlation_id="req-7", message_id="m-1")
    try:
        get_logger("test").info("message.accepted", note="to 010-1234-5678 or +82 10 2345 6789", to="01098765432")
    finally:
        structlog.contextvars.clear_contextvars()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "message.accepted" and line["level"] == "info" and line["timestamp"].endswith("Z")
    assert (line["correlation_id"], line["message_id"]) == ("req-7", "m-1")
    assert line["to"] == "010****5432"
    assert "1234-5678" not in line["note"] and "2345 6789" not in line["note"]


def test_test_key_events_are_counted_apart_from_live_ones(metrics: Metrics) -> None:
    log = get_logger("t")
    log.info("message.accepted", provider="mock", type="SMS", tenant="t1", test=True)
    log.info("message.accepted", provider="mock", type="SMS", tenant="t1")
    log.info("message.sent", provider="mock", type="SMS", tenant="t1", test=True)
    log.info("message.delivered", provider="mock", type="SMS", tenant="t1", test=True, delivery_seconds=1.0)
    log.info("message.failed", provider="mock", type="SMS", tenant="t1", error_code="X")
    # a batch reports how many of its rows came from a test key
    log.info("batch.accepted", tenant="t1", total=10, tests=4)
    log.info("batch.accepted", tenant="t1", total=5)
    reg = metrics.registry
    assert total(reg, "kmsg_messages_accepted_total", test="true") == 1 + 4
    assert total(reg, "kmsg_messages_accepted_total", test="false") == 1 + 6 + 5
    assert total(reg, "kmsg_messages_sent_total", test="true") == 1
    assert total(reg, "kmsg_messages_sent_total", test="false") == 0
    assert total(reg, "kmsg_messages_delivered_total", test="true", tenant="t1") == 1
    assert total(reg, "kmsg_messages_failed_total", test="false") == 1
    # a field that is not exactly True never makes a live message a test one
    log.info("message.sent", provider="mock", type="SMS", tenant="t1", test="yes")
    assert total(reg, "kmsg_messages_sent_total", test="false") == 1


def test_producer_events_have_the_documented_fields(sqlite_rt: Runtime) -> None:
    kmsg = KMsg(runtime=sqlite_rt)
    with structlog.testing.capture_logs() as logs:
        receipt = kmsg.send(to="010-1234-5678", text="hello", tenant="shop")
        kmsg.cancel(kmsg.send(to="01012345678", text="later", scheduled_at="2099-01-01T09:00").message_id)
    accepted = [e for e in logs if e["event"] == "message.accepted"][0]
    assert accepted == {
        "event": "message.accepted",
        "log_level": "info",
        "message_id": receipt.message_id,
        "type": "SMS",
        "provider": "mock",
        "tenant": "shop",
    }
    assert [e["event"] for e in logs].count("message.cancelled") == 1
    assert not any("01012345678" in json.dumps(e, default=str) for e in logs)


def _row(mid: str, status: str, now: datetime, **values: Any) -> MessageRow:
    base: dict[str, Any] = {
        "id": mid,
        "tenant": "default",
        "type": "SMS",
        "recipient": "01012345678",
        "status": status,
        "priority": "normal",
        "route": ["mock"],
        "content": {},
        "created_at": now - timedelta(minutes=10),
        "updated_at": now,
    }
    base.update(values)
    return MessageRow(**base)


def test_backlog_gauges_from_seeded_rows(runtime: Runtime) -> None:
    now = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
    with runtime.store.sessions.begin() as s:
        s.add_all(
            [
                _row("q-old", "queued", now, queued_at=now - timedelta(seconds=300)),
                _row("q-new", "queued", now, queued_at=now - timedelta(seconds=5)),
                _row("q-otp", "queued", now, priority="high", queued_at=now - timedelta(seconds=40)),
                _row("s-due", "sent", now, next_check_at=now - timedelta(seconds=90)),
                _row("s-later", "sent", now, next_check_at=now + timedelta(seconds=90)),
                _row("sch-late", "scheduled", now, scheduled_at=now - timedelta(seconds=30)),
                _row("sch-future", "scheduled", now, scheduled_at=now + timedelta(days=1)),
                _row("r-due", "retrying", now, next_attempt_at=now - timedelta(seconds=1)),
                _row("done", "delivered", now),
            ]
        )
    from kmsg_worker.heartbeat import record_heartbeat

    record_heartbeat(runtime.engine, "sweep", now - timedelta(seconds=12))
    registry = CollectorRegistry()
    registry.register(BacklogCollector(runtime.settings, runtime.engine, clock=lambda: now))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("kmsg_queue_oldest_age_seconds", queue="kmsg.send") == 300
    assert value("kmsg_queue_oldest_age_seconds", queue="kmsg.priority") == 40
    assert value("kmsg_queue_oldest_age_seconds", queue="kmsg.bulk") == 0
    assert value("kmsg_queued_messages", queue="kmsg.send") == 2
    assert value("kmsg_messages_in_state", status="sent") == 2
    assert value("kmsg_tracking_backlog_messages") == 1
    assert value("kmsg_tracking_oldest_due_age_seconds") == 90
    assert value("kmsg_scheduled_backlog_messages") == 2
    assert value("kmsg_scheduled_overdue_messages") == 1
    assert value("kmsg_retry_backlog_messages") == 1
    assert value("kmsg_beat_heartbeat_age_seconds", job="sweep") == 12
    assert value("kmsg_backlog_source_up", source="database") == 1


def test_queue_length_reads_redis_including_priority_steps(
    redis_url: str, settings_factory: Any, tmp_path: Path
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    # The broker's global key prefix (the tests use one per session) is honoured.
    prefix = f"kmsgmetrics{os.getpid()}:"
    keys = [prefix + k for k in ("kmsg.send", "kmsg.send\x06\x163", "kmsg.poll")]
    client.delete(*keys)
    try:
        client.lpush(keys[0], b"a", b"b")
        client.lpush(keys[1], b"c")
        client.lpush(keys[2], b"d")
        settings = settings_factory(
            f"sqlite:///{tmp_path / 'q.sqlite'}", KMSG_BROKER_URL=redis_url, KMSG_BROKER_KEY_PREFIX=prefix
        )
        rt = Runtime(settings)
        try:
            registry = CollectorRegistry()
            registry.register(BacklogCollector(settings, rt.engine))
            assert registry.get_sample_value("kmsg_queue_length", {"queue": "kmsg.send"}) == 3
            assert registry.get_sample_value("kmsg_queue_length", {"queue": "kmsg.poll"}) == 1
            assert registry.get_sample_value("kmsg_queue_length", {"queue": "kmsg.bulk"}) == 0
        finally:
            rt.close()
    finally:
        client.delete(*keys)


def test_unreachable_sources_are_reported_as_gauges(settings_factory: Any, tmp_path: Path) -> None:
    settings = settings_factory(
        f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.sqlite'}", KMSG_BROKER_URL="redis://127.0.0.1:1/0"
    )
    registry = build_registry(settings, folder=tmp_path / "none")
    text = generate_latest(registry).decode()  # a scrape must succeed even when everything is down
    assert 'kmsg_backlog_source_up{source="broker"} 0.0' in text
    assert 'kmsg_backlog_source_up{source="database"} 0.0' in text


def test_prefork_children_counts_are_merged(tmp_path: Path) -> None:
    # A separate interpreter: multiprocess mode changes process-wide state (env and prometheus-client's value class).
    folder = tmp_path / "metrics" / "node@host"
    code = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from kmsg_worker.logging import add_event_counter, configure_logging, get_logger
        from kmsg_worker.observability.events import metrics_processor
        from kmsg_worker.observability.multiprocess import prepare_multiprocess_dir, mark_process_dead
        add_event_counter(metrics_processor)
        folder = Path({str(folder)!r})
        folder.mkdir(parents=True)
        (folder / "counter_999999.db").write_bytes(b"stale from a previous run")
        prepare_multiprocess_dir(folder)
        assert not (folder / "counter_999999.db").exists()
        configure_logging("WARNING")
        get_logger("p").info("message.sent", provider="mock", type="SMS", tenant="t")  # the parent counts too
        children = []
        for n in range(3):
            pid = os.fork()
            if pid == 0:
                for _ in range(n + 1):
                    get_logger("c").info("message.sent", provider="mock", type="SMS", tenant="t", latency_ms=5)
                mark_process_dead(os.getpid())
                os._exit(0)
            children.append(pid)
        for pid in children:
            assert os.waitpid(pid, 0)[1] == 0
        print(os.getpid())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # A process that is creating its file right now (empty, not yet sized) is read as nothing yet
    (folder / "counter_424242.db").touch()
    # The exited children's files are folded into one archive: the parent's own and the archive remain
    assert sorted(p.name for p in folder.glob("*.db") if not p.name.startswith("gauge_")) == sorted(
        ["counter_archive.db", "histogram_archive.db", "counter_424242.db", f"counter_{result.stdout.strip()}.db"]
    )
    registry = CollectorRegistry()
    registry.register(MultiProcessDirCollector(tmp_path / "metrics"))
    labels = {"provider": "mock", "type": "SMS", "tenant": "t", "test": "false"}
    assert registry.get_sample_value("kmsg_messages_sent_total", labels) == 1 + 1 + 2 + 3
    assert (
        registry.get_sample_value(
            "kmsg_provider_request_seconds_count", {"provider": "mock", "operation": "send", "outcome": "accepted"}
        )
        == 6
    )


def test_scrapes_never_see_counters_fall_while_exited_children_are_folded(tmp_path: Path) -> None:
    # Children that exit are folded into the archive while the parent scrapes as fast as it can:
    # every scrape must see each child either before or after its fold (a counter that went down, or
    # a file gone between listing and reading, would be a reset or a failed scrape in Prometheus).
    folder = tmp_path / "metrics" / "node@host"
    code = textwrap.dedent(
        f"""
        import json, os, random, time
        from pathlib import Path
        from prometheus_client import CollectorRegistry
        from kmsg_worker.logging import add_event_counter, configure_logging, get_logger
        from kmsg_worker.observability.events import metrics_processor
        from kmsg_worker.observability.multiprocess import (
            MultiProcessDirCollector, prepare_multiprocess_dir, mark_process_dead
        )
        add_event_counter(metrics_processor)
        folder = Path({str(folder)!r})
        prepare_multiprocess_dir(folder)
        configure_logging("WARNING")
        children = []
        for n in range(12):
            pid = os.fork()
            if pid == 0:
                random.seed(n)
                for _ in range(50):
                    get_logger("c").info("message.sent", provider="mock", type="SMS", tenant="t", latency_ms=3)
                time.sleep(random.uniform(0, 0.3))
                mark_process_dead(os.getpid())
                os._exit(0)
            children.append(pid)
        registry = CollectorRegistry()
        registry.register(MultiProcessDirCollector(folder.parent))
        labels = {{"provider": "mock", "type": "SMS", "tenant": "t", "test": "false"}}
        seen = []
        alive = set(children)
        deadline = time.monotonic() + 30
        while alive and time.monotonic() < deadline:
            seen.append(registry.get_sample_value("kmsg_messages_sent_total", labels) or 0.0)
            for pid in list(alive):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert status == 0
                    alive.discard(pid)
        assert not alive
        seen.append(registry.get_sample_value("kmsg_messages_sent_total", labels) or 0.0)
        print(json.dumps({{"seen": seen, "files": sorted(p.name for p in folder.glob("*.db"))}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    seen = report["seen"]
    assert len(seen) > 12  # scrapes overlapped the folding
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] == 12 * 50
    assert report["files"] == ["counter_archive.db", "histogram_archive.db"]


def test_the_app_configuration_installs_the_event_counters(tmp_path: Path) -> None:
    # Logging knows nothing of metrics: a process counts events once it loaded the Celery app
    # (a producer does, to publish), because config/celery.py adds the counter there.
    code = textwrap.dedent(
        """
        from kmsg_worker.logging import get_logger
        from kmsg_worker.observability.events import default_metrics
        sent = lambda: default_metrics().registry.get_sample_value(
            "kmsg_messages_sent_total", {"provider": "mock", "type": "SMS", "tenant": "t", "test": "false"}
        )
        get_logger("p").info("message.sent", provider="mock", type="SMS", tenant="t")
        before = sent()
        import config.celery
        get_logger("p").info("message.sent", provider="mock", type="SMS", tenant="t")
        print(before, sent())
        """
    )
    env = {**os.environ, "KMSG_VAR_DIR": str(tmp_path), "KMSG_LOG_LEVEL": "WARNING"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["None", "1.0"]
