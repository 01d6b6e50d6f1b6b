"""The HTTP API's intake against the producer it wraps, measured in the same invocation.

* single messages: ``KMsg.send`` called in a loop in one process, against ``POST /v1/messages``
  from one keep-alive client with 8 requests in flight (and the latency at light load, one in flight);
* a streamed batch: ``KMsg.send_many`` of N rows, against the same rows uploaded as NDJSON.

Both sides store in the same scratch PostgreSQL database and publish to the same Redis broker (no
worker consumes: this is the intake, not the delivery). The API runs as one uvicorn process.

    python -m bench.api [--count 1000] [--rows 20000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("KMSG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("KMSG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _body(i: int) -> dict[str, Any]:
    return {"to": f"0105{i % 10_000_000:07d}", "text": f"[bench] 인증번호 {i:06d}", "sender": "0212345678"}


def _kmsg_loop(env: dict[str, str], count: int) -> float:
    from kmsg_worker import KMsg
    from kmsg_worker.settings import Settings

    with KMsg(Settings.from_env(env)) as kmsg:
        kmsg.send(_body(0))  # connections and the Celery app warmed up, as the server's are
        started = time.perf_counter()
        for i in range(1, count + 1):
            kmsg.send(_body(i))
        return count / (time.perf_counter() - started)


def _post_rate(client: httpx.Client, key: dict[str, str], count: int, in_flight: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def run() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            answer = client.post("/v1/messages", json=_body(10_000_000 + i), headers=key)
            elapsed = time.perf_counter() - started
            if answer.status_code != 202:
                raise RuntimeError(f"POST answered {answer.status_code}: {answer.text[:200]}")
            with lock:
                latencies.append(elapsed)

    failures: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failures.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(in_flight)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return count / (time.perf_counter() - started), latencies


def _rows(count: int, offset: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {"to": f"0106{offset + i:07d}", "variables": {"n": i}}


def _ndjson(count: int, offset: int) -> Iterator[bytes]:
    import orjson

    for row in _rows(count, offset):
        yield orjson.dumps(row) + b"\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="single messages per side")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the streamed batch per side")
    args = parser.parse_args()

    import redis

    from kmsg_worker.api import admin
    from kmsg_worker.logging import configure_logging
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.db import make_engine
    from kmsg_worker.storage.models import Base

    # The same log level as the server's (KMSG_LOG_LEVEL=WARNING): no line per message on either side.
    configure_logging("WARNING", metrics=False)
    name = f"kmsg_bench_api_{os.getpid()}"
    admin_engine = make_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    prefix = f"kmsgbenchapi{uuid.uuid4().hex[:6]}:"
    var = Path(tempfile.mkdtemp(prefix="kmsg-bench-api-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update(
        {
            "KMSG_DATABASE_URL": db_url,
            "KMSG_BROKER_URL": REDIS,
            "KMSG_BROKER_KEY_PREFIX": prefix,
            "KMSG_VAR_DIR": str(var),
            "KMSG_LOG_LEVEL": "WARNING",
            "KMSG_API_RATE_LIMIT": "1000000",
            "PYTHONPATH": str(ROOT),
        }
    )
    server = None
    try:
        engine = make_engine(db_url)
        Base.metadata.create_all(engine)
        engine.dispose()
        settings = Settings.from_env(env)
        admin.create_tenant("bench", settings=settings)
        key = {"Authorization": f"Bearer {admin.create_key('bench', settings=settings).token}"}
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "kmsg_worker.api:create_app"]
            + ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
            env=env,
            cwd=ROOT,
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=httpx.Limits(max_connections=8))
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not become ready")
            time.sleep(0.2)
        for i in range(20):  # warm-up: connections, first imports in the server's threads
            client.post("/v1/messages", json=_body(20_000_000 + i), headers=key)

        loop_rate = _kmsg_loop(env, args.count)
        post_rate, post_lat = _post_rate(client, key, args.count, 8)
        _, light_lat = _post_rate(client, key, min(300, args.count), 1)

        from kmsg_worker import KMsg

        defaults = {"text": "[bench] 쿠폰 #{n}", "sender": "0212345678"}
        # Both inputs are built before the clock starts: the figures are the intake's, not the
        # client's (this process would otherwise render the NDJSON on the cores the server uses).
        rows = list(_rows(args.rows, 0))
        body = b"".join(_ndjson(args.rows, 5_000_000))
        with KMsg(settings) as kmsg:
            started = time.perf_counter()
            kmsg.send_many(rows, defaults=defaults, on_invalid="skip")
            many_rate = args.rows / (time.perf_counter() - started)
        import orjson

        started = time.perf_counter()
        answer = client.post(
            "/v1/batches",
            params={"defaults": orjson.dumps(defaults).decode(), "on_invalid": "skip"},
            content=body,
            headers={**key, "Content-Type": "application/x-ndjson"},
        )
        upload_rate = args.rows / (time.perf_counter() - started)
        if answer.status_code != 202 or answer.json()["accepted"] != args.rows:
            raise RuntimeError(f"upload answered {answer.status_code}: {answer.text[:200]}")

        ms = 1000.0
        print(f"singles ({args.count} per side, PostgreSQL + Redis broker, one uvicorn process)")
        print(f"  KMsg.send loop, one process     {loop_rate:8.1f} msg/s")
        print(
            f"  POST /v1/messages, 8 in flight  {post_rate:8.1f} msg/s  ({post_rate / loop_rate:.0%} of the loop)"
            f"  p50 {statistics.median(post_lat) * ms:.1f} ms  p99 {_percentile(post_lat, 0.99) * ms:.1f} ms"
        )
        print(
            f"  POST, 1 in flight (light load)  p50 {statistics.median(light_lat) * ms:.1f} ms"
            f"  p99 {_percentile(light_lat, 0.99) * ms:.1f} ms"
        )
        print(f"streamed batch ({args.rows} rows per side, on_invalid=skip)")
        print(f"  KMsg.send_many                  {many_rate:8.1f} rows/s")
        print(f"  POST /v1/batches NDJSON         {upload_rate:8.1f} rows/s  ({upload_rate / many_rate:.0%})")
        client.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        client_r = redis.Redis.from_url(REDIS)
        stale = list(client_r.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            client_r.delete(*stale)
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()


if __name__ == "__main__":
    main()
