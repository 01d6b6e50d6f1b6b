"""The HTTP API's intake against the producer it wraps, measured in the same invocation.

* single messages: ``KMsg.send`` called in a loop in one process, against ``POST /v1/messages``
  from one keep-alive client with 8 requests in flight (and the latency at light load, one in flight);
* a streamed batch: ``KMsg.send_many`` of N rows, against the same rows uploaded as NDJSON.

Both sides store in the same scratch PostgreSQL database, for the same tenant, and publish to the
same Redis broker (no worker consumes: this is the intake, not the delivery). The API runs as it is
deployed, ``kmsg api --workers 2`` (``--server-workers 1`` measures one process). ``--rounds N``
measures each pair N times, alternating which side goes first, and reports the median of the
per-round ratios, so the machine's drift cancels out.

    python -m bench.api [--count 1000] [--rows 20000] [--rounds 3] [--server-workers 2]
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


TENANT = "bench"


def _body(i: int) -> dict[str, Any]:
    return {"to": f"0105{i % 10_000_000:07d}", "text": f"[bench] 인증번호 {i:06d}", "sender": "0212345678"}


def _kmsg_loop(env: dict[str, str], count: int) -> float:
    from kmsg_worker import KMsg
    from kmsg_worker.settings import Settings

    with KMsg(Settings.from_env(env)) as kmsg:
        kmsg.send({**_body(0), "tenant": TENANT})  # connections and the Celery app warmed up, as the server's are
        started = time.perf_counter()
        for i in range(1, count + 1):
            kmsg.send({**_body(i), "tenant": TENANT})
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


def _compare(
    client: httpx.Client,
    key: dict[str, str],
    env: dict[str, str],
    settings: Any,
    count: int,
    rows_count: int,
    rounds: int,
    server_workers: int,
) -> None:
    """Each comparison ``rounds`` times, alternating which side goes first; prints medians and ratios."""
    import orjson

    from kmsg_worker import KMsg

    defaults = {"text": "[bench] 쿠폰 #{n}", "sender": "0212345678"}
    params = {"defaults": orjson.dumps(defaults).decode(), "on_invalid": "skip"}
    # Both inputs are built before the clock starts: the figures are the intake's, not the
    # client's (this process would otherwise render the NDJSON on the cores the server uses).
    rows = list(_rows(rows_count, 0))
    body = b"".join(_ndjson(rows_count, 5_000_000))
    loop_rates: list[float] = []
    post_rates: list[float] = []
    post_lat: list[float] = []
    many_rates: list[float] = []
    upload_rates: list[float] = []

    def loop() -> None:
        loop_rates.append(_kmsg_loop(env, count))

    def post() -> None:
        rate, latencies = _post_rate(client, key, count, 8)
        post_rates.append(rate)
        post_lat.extend(latencies)

    def many() -> None:
        with KMsg(settings) as kmsg:
            started = time.perf_counter()
            kmsg.send_many(rows, defaults=defaults, on_invalid="skip", tenant=TENANT)
            many_rates.append(rows_count / (time.perf_counter() - started))

    def upload() -> None:
        started = time.perf_counter()
        answer = client.post(
            "/v1/batches", params=params, content=body, headers={**key, "Content-Type": "application/x-ndjson"}
        )
        upload_rates.append(rows_count / (time.perf_counter() - started))
        if answer.status_code != 202 or answer.json()["accepted"] != rows_count:
            raise RuntimeError(f"upload answered {answer.status_code}: {answer.text[:200]}")

    for round_no in range(rounds):
        first = round_no % 2 == 0  # alternate which side runs first
        for step in (loop, post) if first else (post, loop):
            step()
        for step in (many, upload) if first else (upload, many):
            step()
    _, light_lat = _post_rate(client, key, min(300, count), 1)
    single_ratio = statistics.median(p / q for p, q in zip(post_rates, loop_rates, strict=True))
    batch_ratio = statistics.median(u / m for u, m in zip(upload_rates, many_rates, strict=True))

    ms = 1000.0
    processes = "one server process" if server_workers == 1 else f"`kmsg api --workers {server_workers}`"
    print(f"singles ({count} per side and round, {rounds} rounds, PostgreSQL + Redis, {processes})")
    print(f"  KMsg.send loop, one process     {statistics.median(loop_rates):8.1f} msg/s (median)")
    print(
        f"  POST /v1/messages, 8 in flight  {statistics.median(post_rates):8.1f} msg/s  "
        f"median ratio {single_ratio:.0%} of the loop (rounds: "
        + ", ".join(f"{p / q:.0%}" for p, q in zip(post_rates, loop_rates, strict=True))
        + f")  p50 {statistics.median(post_lat) * ms:.1f} ms  p99 {_percentile(post_lat, 0.99) * ms:.1f} ms"
    )
    print(
        f"  POST, 1 in flight (light load)  p50 {statistics.median(light_lat) * ms:.1f} ms"
        f"  p99 {_percentile(light_lat, 0.99) * ms:.1f} ms"
    )
    print(f"streamed batch ({rows_count} rows per side and round, on_invalid=skip)")
    print(f"  KMsg.send_many                  {statistics.median(many_rates):8.1f} rows/s (median)")
    print(
        f"  POST /v1/batches NDJSON         {statistics.median(upload_rates):8.1f} rows/s  "
        f"median ratio {batch_ratio:.0%} (rounds: "
        + ", ".join(f"{u / m:.0%}" for u, m in zip(upload_rates, many_rates, strict=True))
        + ")"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="single messages per side")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the streamed batch per side")
    parser.add_argument("--rounds", type=int, default=3, help="measured pairs per comparison, alternating")
    parser.add_argument(
        "--server-workers",
        type=int,
        default=2,
        help="API server processes (`kmsg api --workers`; docker-compose.yml runs 2, one per core here)",
    )
    args = parser.parse_args()

    import redis

    from kmsg_worker.api import admin
    from kmsg_worker.logging import configure_logging
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.db import make_engine
    from kmsg_worker.storage.models import Base

    # The same log level as the server's (KMSG_LOG_LEVEL=WARNING): no line per message on either side.
    configure_logging("WARNING", counters=False)
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
        admin.create_tenant(TENANT, settings=settings)
        key = {"Authorization": f"Bearer {admin.create_key(TENANT, settings=settings).token}"}
        port = _free_port()
        # The server as it is deployed: the `kmsg api` command, with docker-compose.yml's process count.
        server = subprocess.Popen(
            [sys.executable, "-m", "kmsg_worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
            + ["--workers", str(args.server_workers)],
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

        _compare(client, key, env, settings, args.count, args.rows, args.rounds, args.server_workers)
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
