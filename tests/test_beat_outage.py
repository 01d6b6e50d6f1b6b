"""Beat reports a broker outage once, not a traceback per tick (config.beat.OutageQuietScheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from structlog.testing import capture_logs

from config.beat import OutageQuietScheduler
from tests.faults.infra import free_port


@pytest.fixture
def scheduler(tmp_path: Path) -> Any:
    # A broker nobody listens on: every publish fails with a connection error.
    app = Celery("beat-outage", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    app.conf.task_publish_retry = False
    app.conf.broker_connection_max_retries = 1
    sched = OutageQuietScheduler(app, schedule_filename=str(tmp_path / "schedule"), lazy=True)
    yield sched
    sched.close()


def test_an_outage_is_one_warning_and_its_end_another(scheduler: Any, caplog: pytest.LogCaptureFixture) -> None:
    entry = scheduler.Entry(name="kmsg-test", task="kmsg.sweep", schedule=1, app=scheduler.app)
    with capture_logs() as events:
        scheduler.apply_entry(entry)  # a real publish to a closed port (redis-py retries: ~6 s)

        def refused(*args: Any, **kwargs: Any) -> None:
            # The next ticks fail the same way, without waiting for redis-py's retries again.
            raise OperationalError("Error 111 connecting to 127.0.0.1. Connection refused.")

        scheduler.apply_async = refused
        scheduler.apply_entry(entry)
        scheduler.apply_entry(entry)
        scheduler.apply_async = lambda *args, **kwargs: None  # the broker is back
        scheduler.apply_entry(entry)
    names = [e["event"] for e in events]
    assert names == ["beat.broker_unreachable", "beat.broker_reachable"], events
    assert events[1]["skipped_runs"] == 3
    assert "Traceback" not in caplog.text and "Message Error" not in caplog.text


def test_other_errors_keep_celerys_own_report(scheduler: Any, caplog: pytest.LogCaptureFixture) -> None:
    entry = scheduler.Entry(name="kmsg-test", task="kmsg.sweep", schedule=1, app=scheduler.app)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug, not an outage")

    scheduler.apply_async = broken
    with capture_logs() as events:
        scheduler.apply_entry(entry)
    assert events == []
    assert "Message Error" in caplog.text and "a bug, not an outage" in caplog.text
