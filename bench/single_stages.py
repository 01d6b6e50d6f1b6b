"""Where a single send's latency goes at light load, stage by stage (p50 and mean of each).

    python -m bench.single_stages [--count 200] [--interval 0.05] [-- extra worker args, e.g. -P threads]

The same set-up as ``bench.run``'s light-load stage (fake Solapi over HTTP, Redis, a scratch
PostgreSQL database, a real worker on ``kmsg.priority,kmsg.send`` with concurrency 2), with the
worker loaded from :mod:`bench.stage_probe_app` and the producer's INSERT and publish timed in this
process. The stages add up to ``sent_at - created_at``, the figure ``bench.run`` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench.run import REDIS_URL, Env, scratch_database
from kmsg_worker.logging import configure_logging

STAGES = (
    ("producer INSERT (from created_at)", "start", "inserted"),
    ("Celery publish", "inserted", "published"),
    ("Redis to the worker", "published", "received"),
    ("hand-off to the pool child", "received", "prerun"),
    ("claim", "prerun", "claimed"),
    ("admission (circuit check)", "claimed", "admitted"),
    ("provider call", "admitted", "answered"),
)


def _timed_sends(count: int, interval: float) -> dict[str, dict[str, float]]:
    """Send ``count`` messages (after 5 warm-up sends); the INSERT and publish end times of each."""
    from kmsg_worker.producer import KMsg

    kmsg = KMsg()
    store, dispatcher = kmsg.runtime.store, kmsg.runtime.dispatcher
    insert, publish = store.insert_messages, dispatcher.send
    marks: dict[str, float] = {}

    def timed_insert(*args: Any, **kw: Any) -> Any:
        result = insert(*args, **kw)
        marks["inserted"] = time.time()
        return result

    def timed_publish(*args: Any, **kw: Any) -> None:
        publish(*args, **kw)
        marks["published"] = time.time()

    store.insert_messages = timed_insert  # type: ignore[method-assign]
    dispatcher.send = timed_publish  # type: ignore[method-assign]
    sent: dict[str, dict[str, float]] = {}
    for n in range(count + 5):
        marks.clear()
        receipt = kmsg.send(to="01099990000", text="[bench] OTP 123456", priority="high")
        if n >= 5:
            sent[receipt.message_id] = dict(marks)
        time.sleep(interval)
    kmsg.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("worker_args", nargs="*", help="extra arguments for the worker (after --)")
    args = parser.parse_args()
    # The producer's info lines (one per accepted message) would bury the report.
    configure_logging("WARNING")
    log = Path(f"/tmp/kmsg-stages-{os.getpid()}.jsonl")
    redis.Redis.from_url(REDIS_URL).flushdb()
    with scratch_database() as db_url:
        env = Env(db_url)
        env.env["KMSG_BENCH_STAGES_LOG"] = str(log)
        try:
            env.start_fakes()
            env.worker("bench.stage_probe_app", "kmsg.priority,kmsg.send", 2, "stages", args.worker_args)
            time.sleep(5)
            os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
            sent = _timed_sends(args.count, args.interval)
            time.sleep(2)
        finally:
            env.stop()
        from kmsg_worker.storage.db import make_engine

        engine = make_engine(db_url)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, created_at, sent_at FROM kmsg_messages WHERE id = ANY(:ids)"), {"ids": list(sent)}
            ).all()
        engine.dispose()
    worker: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        mark = json.loads(line)
        worker.setdefault(mark["id"], {})[mark["stage"]] = mark["t"]
    log.unlink()
    spans: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    totals: list[float] = []
    for row in rows:
        times = {"start": row.created_at.timestamp(), **sent[row.id], **worker.get(row.id, {})}
        if row.sent_at is None or not all(a in times and b in times for _, a, b in STAGES):
            continue
        for name, a, b in STAGES:
            spans[name].append((times[b] - times[a]) * 1000)
        totals.append((row.sent_at.timestamp() - times["start"]) * 1000)
    print(f"{len(totals)} sends, {args.interval * 1000:g} ms apart; p50 / mean in ms")
    for name, values in spans.items():
        print(f"  {name:36s} {statistics.median(values):6.2f} / {statistics.fmean(values):6.2f}")
    print(f"  {'created_at -> sent_at':36s} {statistics.median(totals):6.2f} / {statistics.fmean(totals):6.2f}")


if __name__ == "__main__":
    main()
