"""Scheduled sends: stored in the database at any horizon, dispatched by beat when due, cancellable
until dispatch, and never a long Celery ETA. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config.beat import beat_schedule
from kmsg_worker.delivery import deliver
from kmsg_worker.dispatch import QUEUES, TASK_NAMES, CeleryDispatcher
from kmsg_worker.errors import InvalidStateError, ValidationError
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.sweeps import dispatch_scheduled, sweep
from kmsg_worker.tracking import poll_statuses
from tests.conftest import ROOT, Clock, RecordingDispatcher

SEOUL = ZoneInfo("Asia/Seoul")


def test_schedule_times_are_zone_aware_and_naive_means_seoul(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    naive = kmsg.schedule(to="01012345678", text="hi", at="2026-12-01 09:00")
    aware = kmsg.schedule(to="01012345678", text="hi", at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    as_text = kmsg.schedule(to="01012345678", text="hi", at="2026-12-01T09:00:00-05:00")
    assert kmsg.get(naive.message_id).scheduled_at == datetime(2026, 12, 1, 9, 0, tzinfo=SEOUL)
    assert kmsg.get(naive.message_id).scheduled_at == datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    assert kmsg.get(aware.message_id).scheduled_at == datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert kmsg.get(as_text.message_id).scheduled_at == datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
    assert {naive.status, aware.status, as_text.status} == {"scheduled"}
    assert dispatcher.sends == []
    # A time in the past beyond the clock-skew tolerance is a clear error, and nothing is stored
    with pytest.raises(ValidationError) as info:
        kmsg.schedule(to="01012345678", text="hi", at=clock.now - timedelta(minutes=5))
    assert (info.value.field, info.value.rule) == ("scheduled_at", "in_past")
    assert runtime.store.count_by_status() == {"scheduled": 3}
    # within the tolerance it is simply sent now
    late = kmsg.schedule(to="01012345678", text="hi", at=clock.now - timedelta(seconds=20))
    assert late.status == "queued" and dispatcher.ids == [late.message_id]


def test_any_horizon_waits_in_the_database_and_leaves_when_due(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    next_year = kmsg.schedule(to="01012345678", text="a", at=clock.now + timedelta(days=365))
    soon = kmsg.schedule(to="01012345678", text="b", at=clock.now + timedelta(seconds=10))
    cancelled = kmsg.schedule(to="01012345678", text="c", at=clock.now + timedelta(seconds=10))
    assert kmsg.cancel(cancelled.message_id).status == "cancelled"
    clock.advance(9)
    assert dispatch_scheduled(runtime) == 0
    clock.advance(1)
    assert dispatch_scheduled(runtime) == 1
    assert dispatch_scheduled(runtime) == 0  # already claimed
    assert dispatcher.sends == [(soon.message_id, "normal", None)]  # no countdown, no ETA
    assert kmsg.get(soon.message_id).status == "queued"
    assert deliver(runtime, soon.message_id).action == "sent"
    clock.advance(365 * 86400)
    assert sweep(runtime).scheduled == 1  # the maintenance sweep is a backstop
    assert dispatcher.ids == [soon.message_id, next_year.message_id]
    assert kmsg.get(cancelled.message_id).status == "cancelled"
    assert deliver(runtime, cancelled.message_id).action == "not_claimed"


def test_cancel_works_until_dispatch_then_says_it_was_sent(kmsg: KMsg, runtime: Runtime, clock: Clock) -> None:
    receipt = kmsg.schedule(to="01012345678", text="hi", at=clock.now + timedelta(seconds=5))
    clock.advance(5)
    assert dispatch_scheduled(runtime) == 1
    # dispatched to the queue but not yet to the provider: still cancellable, and the task does nothing
    queued = kmsg.schedule(to="01012345678", text="hi", at=clock.now + timedelta(seconds=1))
    clock.advance(1)
    dispatch_scheduled(runtime)
    assert kmsg.cancel(queued.message_id).status == "cancelled"
    assert deliver(runtime, queued.message_id).action == "not_claimed"
    # once the provider has it, a clear error
    assert deliver(runtime, receipt.message_id).action == "sent"
    with pytest.raises(InvalidStateError, match="already sent to the provider"):
        kmsg.cancel(receipt.message_id)
    clock.advance(30)
    poll_statuses(runtime)
    with pytest.raises(InvalidStateError, match="already sent to the provider .status delivered"):
        kmsg.cancel(receipt.message_id)
    with pytest.raises(InvalidStateError, match="it is already cancelled"):
        kmsg.cancel(queued.message_id)


def test_a_scheduled_bulk_batch_is_dispatched_by_chunks_when_due(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    at = clock.now + timedelta(hours=2)
    rows = [{"to": f"0101234{i:04d}", "variables": {"n": i}} for i in range(30)]
    receipt = kmsg.send_many(rows, defaults={"text": "hello #{n}", "scheduled_at": at}, chunk_size=10)
    assert runtime.store.count_by_status(receipt.message_ids) == {"scheduled": 30}
    assert dispatcher.chunks == [] and dispatcher.sends == []
    clock.advance(7200)
    assert dispatch_scheduled(runtime) == 3
    assert sorted(c for _, c, _ in dispatcher.chunks) == sorted({c for _, c, _ in dispatcher.chunks})
    assert {(b, countdown) for b, _, countdown in dispatcher.chunks} == {(receipt.batch_id, None)}
    assert runtime.store.count_by_status(receipt.message_ids) == {"queued": 30}
    assert kmsg.get(receipt.message_ids[0]).scheduled_at == at


def test_concurrent_dispatchers_enqueue_each_message_once(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    ids = [
        kmsg.schedule(to="01012345678", text=f"{i}", at=clock.now + timedelta(seconds=3)).message_id for i in range(40)
    ]
    clock.advance(3)
    counts: list[int] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait(timeout=10)
        counts.append(dispatch_scheduled(runtime))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(counts) == 40
    assert sorted(dispatcher.ids) == sorted(ids)


def test_beat_dispatches_schedules_every_second_and_every_entry_expires() -> None:
    schedule = beat_schedule(Settings.from_env({}))
    entry = schedule["kmsg-dispatch-scheduled"]
    assert (entry["task"], entry["schedule"]) == (TASK_NAMES["schedule"], 1.0)
    assert entry["options"] == {"queue": QUEUES["maintenance"], "expires": 2.0}
    assert all("expires" in e["options"] and "countdown" not in e["options"] for e in schedule.values())
    # when the sweep itself runs that often, it dispatches schedules alone
    fast = beat_schedule(Settings.from_env({"KMSG_SWEEP_INTERVAL_SECONDS": "1"}))
    assert "kmsg-dispatch-scheduled" not in fast


# -- no long ETA ever reaches the broker ----------------------------------------------------------


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Every task published in this process: name, countdown in seconds from the publish (ETA)."""
    from celery.signals import before_task_publish

    seen: list[dict[str, Any]] = []

    def record(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        eta = (headers or {}).get("eta")
        ahead = (datetime.fromisoformat(eta) - datetime.now(UTC)).total_seconds() if eta else None
        seen.append({"task": sender, "ahead": ahead})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def test_no_countdown_or_eta_beyond_max_countdown_is_ever_published(
    backend_url: str, settings_factory: Any, published: list[dict[str, Any]]
) -> None:
    from celery import Celery

    # Given the real Celery publishing path (an in-memory broker) and long retry backoffs
    settings = settings_factory(
        backend_url, KMSG_RETRY_BASE_SECONDS="50", KMSG_RETRY_MAX_SECONDS="400", KMSG_RETRY_JITTER="0"
    )
    app = Celery("eta-check", broker="memory://", set_as_current=False)
    clock = Clock()
    rt = Runtime(settings, dispatcher=CeleryDispatcher(app), clock=clock)
    try:
        kmsg = KMsg(runtime=rt)
        # When messages are scheduled at every horizon, and one needs retries of 50, 100, 200 and 400 s
        for delta in (timedelta(seconds=5), timedelta(hours=3), timedelta(days=30), timedelta(days=180)):
            kmsg.schedule(to="01012345678", text="later", at=clock.now + delta)
        flaky = kmsg.send(to="01012345678", text="flaky", provider_options={"mock": {"fail_times": 4}}).message_id
        kmsg.send_many(
            [{"to": "01011112222"}], defaults={"text": "bulk", "scheduled_at": clock.now + timedelta(days=2)}
        )
        for _ in range(10):
            clock.advance(120)
            sweep(rt)
            deliver(rt, flaky)
        for _ in range(8):
            clock.advance(30 * 86400)
            dispatch_scheduled(rt)
        # Then everything was published, and nothing ever waited in the broker beyond max_countdown
        assert kmsg.get(flaky).status == "sent"
        assert rt.store.count_by_status() == {"queued": 5, "sent": 1}
        limit = settings.retry.max_countdown
        waits = [p["ahead"] for p in published if p["ahead"] is not None]
        assert waits and max(waits) <= limit + 1  # the 50 s retry rode a countdown
        assert len(published) >= 10
        assert {p["task"] for p in published} <= set(TASK_NAMES.values())
    finally:
        rt.close()


# -- the command line ------------------------------------------------------------------------------


def _kmsg_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsg_worker.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kmsg_cancel_on_the_command_line(tmp_path: Path) -> None:
    # Given a scheduled message and one the provider already has, in an embedded database
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update({"KMSG_VAR_DIR": str(tmp_path / "var"), "KMSG_DATABASE_URL": f"sqlite:///{tmp_path / 'k.sqlite'}"})
    env["PYTHONPATH"] = str(ROOT)
    settings = Settings.from_env(env)
    rt = Runtime(settings, clock=Clock())
    try:
        kmsg = KMsg(runtime=rt)
        waiting = kmsg.schedule(to="01012345678", text="later", at=rt.now() + timedelta(days=1)).message_id
        sent = kmsg.send(to="01012345678", text="now").message_id
        assert deliver(rt, sent).action == "sent"
        # When `kmsg cancel` is run on each
        ok = _kmsg_cli(env, "cancel", waiting)
        refused = _kmsg_cli(env, "cancel", sent)
        missing = _kmsg_cli(env, "cancel", "no-such-id")
        # Then the first is cancelled, the second is a clear error, the third is not found
        assert (ok.returncode, ok.stdout.strip()) == (0, f"{waiting} cancelled")
        assert refused.returncode == 3
        assert f"error: message {sent} was already sent to the provider (status sent)" in refused.stderr
        assert missing.returncode == 3 and "no message with id 'no-such-id'" in missing.stderr
        assert kmsg.get(waiting).status == "cancelled" and kmsg.get(sent).status == "sent"
    finally:
        rt.close()


def test_a_burst_larger_than_one_claim_leaves_in_one_dispatch(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    # Given claims of 10 rows, 35 single messages and a 45-row batch (3 chunks) due at the same time
    clock = Clock()
    rt = Runtime(settings_factory(backend_url, KMSG_SWEEP_BATCH="10"), dispatcher=dispatcher, clock=clock)
    try:
        kmsg = KMsg(runtime=rt)
        at = clock.now + timedelta(minutes=1)
        singles = [kmsg.schedule(to="01012345678", text=f"{i}", at=at).message_id for i in range(35)]
        rows = [{"to": f"0101234{i:04d}"} for i in range(45)]
        batch = kmsg.send_many(rows, defaults={"text": "hello", "scheduled_at": at}, chunk_size=20)
        clock.advance(60)
        # When one dispatch runs
        assert dispatch_scheduled(rt) == 35 + 3
        # Then every single message was enqueued once, and each chunk was published once, whole
        assert sorted(dispatcher.ids) == sorted(singles)
        assert sorted(c for _, c, _ in dispatcher.chunks) == [0, 1, 2]
        assert rt.store.count_by_status(singles + batch.message_ids) == {"queued": 80}
    finally:
        rt.close()
