"""How late does a scheduled message leave? Real worker and beat processes on Redis and PostgreSQL.

Schedules ``--count`` messages at staggered times a few seconds ahead (spread over ``--spread``
seconds, so they fall at every phase of beat's tick), lets a real Celery worker and beat send them to
the fake Solapi server over HTTP, and prints percentiles of

* ``claimed``: ``queued_at - scheduled_at``, when the schedule dispatch claimed the row;
* ``sent``: ``sent_at - scheduled_at``, when the provider accepted it.

It runs two configurations on the same machine: the dedicated 1 s schedule dispatch
(``KMSG_SCHEDULE_INTERVAL_SECONDS=1``, the default) and the maintenance sweep alone
(``KMSG_SCHEDULE_INTERVAL_SECONDS`` = ``KMSG_SWEEP_INTERVAL_SECONDS`` = 5 s, as before it existed).

    python -m bench.schedule_latency [--count 50] [--spread 5] [--only dispatch|sweep]

Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (database ``KMSG_BENCH_REDIS_DB``,
13 by default, flushed at the start).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from bench.tracking_index import scratch_database
from kmsg_worker.dispatch import NullDispatcher
from kmsg_worker.producer import KMsg
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.testing.servers import fake_env, start_fakes

ROOT = Path(__file__).resolve().parent.parent
QUEUES = "kmsg.priority,kmsg.send,kmsg.bulk,kmsg.poll,kmsg.maintenance"
REDIS_URL = f"redis://127.0.0.1:6379/{int(os.environ.get('KMSG_BENCH_REDIS_DB', '13'))}"
#: name -> extra environment of the configuration
CONFIGS = {
    "dispatch": {"KMSG_SWEEP_INTERVAL_SECONDS": "5", "KMSG_SCHEDULE_INTERVAL_SECONDS": "1"},
    "sweep": {"KMSG_SWEEP_INTERVAL_SECONDS": "5", "KMSG_SCHEDULE_INTERVAL_SECONDS": "5"},
}


def _percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {cuts[49]:5.2f} s   p95 {cuts[94]:5.2f} s   p99 {cuts[98]:5.2f} s   max {max(values):5.2f} s"


def _start(env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config.celery", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(store: Store, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [store.get(m) for m in ids]
        if all(r is not None and r.sent_at is not None for r in rows):
            return
        time.sleep(0.2)
    raise SystemExit(f"not every message was sent within {timeout:.0f} s")


def run(name: str, count: int, spread: float) -> dict[str, list[float]]:
    """One configuration: fresh database, broker, worker and beat; returns the lateness samples."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    fakes = start_fakes()
    var = Path(tempfile.mkdtemp(prefix=f"kmsg-schedule-{name}-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with scratch_database() as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
            env.update(fake_env({"solapi": fakes["solapi"]}))
            env.update(
                {
                    "KMSG_BROKER_URL": REDIS_URL,
                    "KMSG_DATABASE_URL": url,
                    "KMSG_VAR_DIR": str(var),
                    "KMSG_PROVIDERS": "solapi",
                    "KMSG_LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(ROOT),
                    **CONFIGS[name],
                }
            )
            procs.append(
                _start(env, ["worker", "-Q", QUEUES, "-c", "2", "--without-mingle", "--without-gossip"], var / "w.log")
            )
            procs.append(_start(env, ["beat", "--schedule", str(var / "beat-schedule")], var / "beat.log"))
            store = Store(make_engine(url))
            kmsg = KMsg(Settings.from_env(env), dispatcher=NullDispatcher())
            # Wait until the worker and beat run: a message due in a second must be sent (this
            # producer publishes nothing: scheduled rows only ever leave through beat).
            probe = kmsg.schedule(to="01050000000", text="probe", at=datetime.now(UTC) + timedelta(seconds=1))
            probe_id = probe.message_id
            _wait(store, [probe_id], 60)
            rng = random.Random(7)
            base = datetime.now(UTC) + timedelta(seconds=3)
            ids = [
                kmsg.schedule(
                    to=f"0105000{i:04d}", text="scheduled", at=base + timedelta(seconds=rng.uniform(0, spread))
                ).message_id
                for i in range(count)
            ]
            _wait(store, ids, spread + 60)
            rows = [store.get(m) for m in ids]
            claimed = [
                (r.queued_at - r.scheduled_at).total_seconds() for r in rows if r and r.queued_at and r.scheduled_at
            ]
            sent = [(r.sent_at - r.scheduled_at).total_seconds() for r in rows if r and r.sent_at and r.scheduled_at]
            kmsg.close()
            store.engine.dispose()
            _stop(procs)
    finally:
        _stop(procs)
        for server in fakes.values():
            server.stop()
    return {"claimed": claimed, "sent": sent}


def main() -> None:
    """Run the configurations and print their lateness percentiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--spread", type=float, default=5.0)
    parser.add_argument("--only", choices=sorted(CONFIGS))
    args = parser.parse_args()
    names = [args.only] if args.only else ["dispatch", "sweep"]
    results = {name: run(name, args.count, args.spread) for name in names}
    for name in names:
        settings = CONFIGS[name]
        print(
            f"\n{name}: schedule dispatch every {settings['KMSG_SCHEDULE_INTERVAL_SECONDS']} s, "
            f"sweep every {settings['KMSG_SWEEP_INTERVAL_SECONDS']} s, {args.count} messages over {args.spread:g} s"
        )
        for key in ("claimed", "sent"):
            values = results[name][key]
            if any(v < 0 for v in values):
                raise SystemExit(f"{name}: a message left before its time ({min(values):.3f} s)")
            print(f"  {key:8s} {_percentiles(values)}")


if __name__ == "__main__":
    main()
