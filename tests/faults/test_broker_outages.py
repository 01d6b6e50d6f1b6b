"""Repeated broker outages while tasks are in flight: the workers live through every one.

Runs real worker and beat processes on a ``redis-server`` of the test's own (the shared Redis is
never stopped), stops and restarts it again and again while sends are in flight (the fake Solapi
answers slowly, so each worker holds unacknowledged tasks at the moment the broker goes), and
checks the three promises: the worker processes are still the ones started, every message ends
final and none was accepted twice, and beat logs each outage as a few lines, not a traceback per
tick.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from kmsg_worker.testing.fakeserver import FakeProviderServer
from tests.conftest import Cluster, wait_until
from tests.faults.infra import PrivateRedis
from tests.faults.test_faults import all_done, counts, duplicates, figures, producer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

#: Outages per run; each is a stop with tasks in flight, a few seconds down, a start.
OUTAGES = int(os.environ.get("KMSG_FAULT_BROKER_OUTAGES", "6"))


def test_workers_survive_repeated_broker_outages_with_tasks_in_flight(
    cluster: Cluster, solapi: FakeProviderServer, tmp_path: Path
) -> None:
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    try:
        cluster.env.update({"KMSG_BROKER_URL": broker.url, "KMSG_REDIS_URL": broker.url})
        # 400 ms a request: with 2 x 2 pool processes, sends are always in flight when Redis goes.
        solapi.set_faults(latency_ms=400)
        kmsg = producer(cluster)
        workers = [cluster.start_worker(f"w{i}", concurrency=2) for i in range(2)]
        beat = cluster.start_beat()
        ids: list[str] = []
        exits: list[tuple[int, int | None]] = []
        started = time.monotonic()
        for outage in range(OUTAGES):
            ids.extend(kmsg.send(to=f"0105{outage:03d}{i:04d}", text="[fault] broker").message_id for i in range(12))
            wait_until(lambda: counts(kmsg, ids=ids).get("sending", 0) >= 1, 30, interval=0.05, what="a send in flight")
            broker.stop()
            time.sleep(3.0)
            broker.start()
            time.sleep(2.0)
            exits += [(n, w.poll()) for n, w in enumerate(workers) if w.poll() is not None]
        wait_until(lambda: all_done(kmsg, len(ids), ids=ids), 180, interval=1, what="every message final")
        final = counts(kmsg, ids=ids)
        dup = duplicates(solapi, ids)
        beat_log = (cluster.var_dir / "beat.log").read_text(errors="replace")
        beat_tracebacks = beat_log.count("Traceback (most recent call last)")
        figures(
            "broker_outages",
            outages=OUTAGES,
            messages=len(ids),
            statuses=final,
            duplicated=len(dup),
            worker_exits=len(exits),
            beat_tracebacks=beat_tracebacks,
            beat_outage_warnings=len(re.findall(r"beat\.broker_unreachable", beat_log)),
            seconds=round(time.monotonic() - started, 1),
        )
        assert exits == [], cluster.logs()
        assert all(w.poll() is None for w in [*workers, beat]), cluster.logs()
        assert "Unrecoverable error" not in cluster.logs()
        assert sum(final.values()) == len(ids) and set(final) <= {"sent"}, final
        assert dup == {}
        assert beat_tracebacks == 0, beat_log[-4000:]
    finally:
        broker.close()
