"""A bulk's rate with and without a subscribed webhook endpoint, measured in the same invocation.

    python -m bench.webhooks                       # 100,000 messages, runs off/on/off/on
    python -m bench.webhooks --rounds 3            # the first on-run waits for every event, the
                                                   # others for every message.sent (--full-rounds)

Each run: the same processes (a bulk worker, a worker for kmsg.poll/kmsg.maintenance, one for
kmsg.webhooks, beat; the fake providers in their own process), the same ``send_many`` of
``--count`` rows, timed until every row was accepted by the fake Solapi (as ``bench.run`` times a bulk). The only
difference: in an "on" run tenant ``default`` has one endpoint subscribed to ``message.sent`` and
``message.delivered``, so every transition also writes its outbox rows and the dispatcher POSTs
them to a receiver in this process (which verifies every signature). After an "on" run the
receiver must get every event: one ``message.sent`` and one ``message.delivered`` per message
(tracking polls the fake, which reports delivery at once; at 100,000 that takes minutes, so only
the first ``--full-rounds`` on-runs wait for the delivered ones).

Target: the "on" rate is at least 80 % of the "off" rate (medians over the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import redis
from sqlalchemy import text

from bench.run import REDIS_URL, RESULTS, Env, log, scratch_database, wait_settled
from kmsg_worker.webhooks.signing import SignatureError, new_secret, verify

#: Webhook settings of every run (the "off" runs have no endpoint, so they never apply).
WEBHOOK_ENV = {
    "KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
    "KMSG_WEBHOOK_INTERVAL_SECONDS": "0.5",
    "KMSG_TRACKING_FIRST_CHECK_SECONDS": "2",
    "KMSG_TRACKING_BACKOFF": "2",
    "KMSG_SWEEP_INTERVAL_SECONDS": "1",
}


class Receiver:
    """Counts distinct events per type; every request's signature is verified."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.lock = threading.Lock()
        self.ids: dict[str, set[str]] = {}
        self.requests = 0
        self.bad = 0
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def count(self, event_type: str) -> int:
        with self.lock:
            return len(self.ids.get(event_type, ()))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    verify(receiver.secret, {k.lower(): v for k, v in self.headers.items()}, body, now=time.time())
                except SignatureError:
                    with receiver.lock:
                        receiver.bad += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                events = orjson.loads(body)["events"]
                with receiver.lock:
                    receiver.requests += 1
                    for event in events:
                        receiver.ids.setdefault(event["type"], set()).add(event["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _reset(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE kmsg_attempts, kmsg_messages, kmsg_batches, kmsg_chunks, kmsg_webhook_events, "
                "kmsg_webhook_attempts, kmsg_webhook_endpoints"
            )
        )
    redis.Redis.from_url(REDIS_URL).flushdb()


def one_run(env: Env, engine: Any, count: int, receiver: Receiver | None, *, full: bool = True) -> dict[str, Any]:
    """One bulk of ``count`` rows; with ``receiver``, an endpoint subscribed to sent and delivered.

    ``full``: wait until the receiver has every event, delivered ones included (those wait for
    tracking, minutes at 100,000); otherwise until it has every ``message.sent``.
    """
    from kmsg_worker.storage.db import make_sessionmaker
    from kmsg_worker.storage.webhooks import add_endpoint, subscribed

    _reset(engine)
    env.fake_reset()
    env.fake_faults(latency_ms=0)
    if receiver is not None:
        add_endpoint(
            make_sessionmaker(engine),
            {
                "id": "whe_bench",
                "tenant": "default",
                "url": receiver.url,
                "events": subscribed(["message.sent", "message.delivered"]),
                "include_phone": False,
                "secret": receiver.secret,
                "created_at": datetime.now(UTC),
                "failures": 0,
            },
        )
    bulk = env.worker("config.celery", "kmsg.bulk", 2, "bulk")
    side = env.worker("config.celery", "kmsg.poll,kmsg.maintenance", 1, "side")
    # The dispatcher gets a worker of its own: sharing one process with a long status poll, its
    # 1 s beat tasks expired unrun for as long as tracking had rows to settle.
    hooks = env.worker("config.celery", "kmsg.webhooks", 1, "hooks")
    beat = env.start(
        [sys.executable, "-m", "celery", "-A", "config.celery", "beat", "--schedule", str(env.var / "beat-schedule")],
        "beat",
    )
    time.sleep(5)
    from kmsg_worker.producer import KMsg

    kmsg = KMsg()
    rows = ({"to": f"010{i:08d}", "variables": {"n": i}} for i in range(count))
    started = time.monotonic()
    kmsg.send_many(rows, defaults={"text": "[bench] 겨울 세일 쿠폰 #{n}", "sender": "0212345678"})
    done = wait_settled(engine, count, 900)
    seconds = done - started
    result: dict[str, Any] = {
        "webhooks": receiver is not None,
        "messages": count,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(count / seconds, 1),
    }
    if receiver is not None:
        deadline = time.monotonic() + 1800
        sent_at: float | None = None
        while time.monotonic() < deadline:
            if sent_at is None and receiver.count("message.sent") >= count:
                sent_at = time.monotonic()
            if sent_at is not None and (not full or receiver.count("message.delivered") >= count):
                break
            time.sleep(0.5)
        result.update(
            # Until the receiver had every message.sent event, then every event (delivered ones wait
            # for tracking's status polls, which settle one row per statement).
            sent_events_seconds=round(sent_at - started, 1) if sent_at is not None else None,
            events_seconds=round(time.monotonic() - started, 1),
            received_sent=receiver.count("message.sent"),
            received_delivered=receiver.count("message.delivered"),
            requests=receiver.requests,
            bad_signatures=receiver.bad,
        )
        with engine.connect() as conn:
            result["outbox_rows"] = conn.execute(text("SELECT count(*) FROM kmsg_webhook_events")).scalar_one()
    env.stop([bulk, side, hooks, beat])
    kmsg.close()
    log(f"webhooks={'on' if receiver else 'off'}: {json.dumps(result)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000, help="messages per bulk")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternated")
    parser.add_argument(
        "--full-rounds", type=int, default=1, help="on-runs (the first ones) that wait for every delivered event too"
    )
    args = parser.parse_args()
    from kmsg_worker.storage.db import make_engine

    runs: list[dict[str, Any]] = []
    with scratch_database() as db_url:
        env = Env(db_url)
        env.env.update(WEBHOOK_ENV)
        os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
        engine = make_engine(db_url)
        receiver = Receiver(new_secret())
        try:
            env.start_fakes()
            for n in range(args.rounds):
                runs.append(one_run(env, engine, args.count, None))
                fresh = Receiver(receiver.secret)
                runs.append(one_run(env, engine, args.count, fresh, full=n < args.full_rounds))
                fresh.server.shutdown()
        finally:
            env.stop()
            engine.dispose()
    off = statistics.median(r["msgs_per_s"] for r in runs if not r["webhooks"])
    on = statistics.median(r["msgs_per_s"] for r in runs if r["webhooks"])
    full = [r for r in runs if r["webhooks"]][: args.full_rounds]
    every_event = all(r["received_sent"] == args.count and r["bad_signatures"] == 0 for r in runs if r["webhooks"])
    every_event = every_event and all(r["received_delivered"] == args.count for r in full)
    summary = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "median_off_msgs_per_s": off,
        "median_on_msgs_per_s": on,
        "ratio_on_vs_off": round(on / off, 3),
        "targets": {"on >= 80 % of off": on >= 0.8 * off, "receiver got every event": every_event},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"webhooks-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nratio with/without webhooks: {summary['ratio_on_vs_off']} -> {out}")
    for name, ok in summary["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")


if __name__ == "__main__":
    main()
