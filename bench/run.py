"""End-to-end benchmarks, each compared with a baseline measured in the same invocation.

    python -m bench.run              # naive baseline, bulk 100k at 0 ms and 20 ms, single-send latency
    python -m bench.run --long       # also worker RSS over a 1,000,000-message run
    python -m bench.run --matrix     # provider x text x latency matrix vs a per-message baseline

Everything runs on this machine: the fake provider servers in their own process on 127.0.0.1,
Redis, PostgreSQL (a scratch database created and dropped here), and real Celery worker processes.
Results are printed and written as JSON under bench/results/. Targets are checked here,
never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("KMSG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("KMSG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
FAKE_PORT = int(os.environ.get("KMSG_BENCH_FAKE_PORT", "18480"))
#: Rows per chunk in the bulk runs (None: the library's default, capped by the provider's limit).
CHUNK_SIZE = int(os.environ["KMSG_BENCH_CHUNK_SIZE"]) if os.environ.get("KMSG_BENCH_CHUNK_SIZE") else None


def log(msg: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


@contextmanager
def scratch_database() -> Any:
    from kmsg_worker.storage.db import create_schema, make_engine

    name = f"kmsg_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE bench_naive (id text PRIMARY KEY, recipient text, body text, status text, pmid text)")
        )
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Env:
    """Processes of one benchmark run (fakes, workers) and their environment."""

    def __init__(self, db_url: str) -> None:
        from kmsg_worker.testing.servers import SENDER, SOLAPI_KEY, SOLAPI_SECRET

        self.var = Path(f"/tmp/kmsg-bench-{os.getpid()}")
        self.var.mkdir(exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
        self.fake_url = f"http://127.0.0.1:{FAKE_PORT}"
        self.env.update(
            {
                "KMSG_BROKER_URL": REDIS_URL,
                "KMSG_DATABASE_URL": db_url,
                "KMSG_VAR_DIR": str(self.var),
                "KMSG_PROVIDERS": "solapi",
                "KMSG_SOLAPI_BASE_URL": self.fake_url,
                "KMSG_SOLAPI_API_KEY": SOLAPI_KEY,
                "KMSG_SOLAPI_API_SECRET": SOLAPI_SECRET,
                "KMSG_SOLAPI_DEFAULT_FROM": SENDER,
                "KMSG_DEFAULT_SENDER": SENDER,
                "KMSG_LOG_LEVEL": "WARNING",
                "KMSG_TRACKING_FIRST_CHECK_SECONDS": "86400",
                "PYTHONPATH": str(ROOT),
            }
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        out = open(self.var / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def start_fakes(self) -> None:
        self.start([sys.executable, "-m", "kmsg_worker.cli", "fake-providers", "--port", str(FAKE_PORT)], "fakes")
        wait_port(FAKE_PORT)

    def fake_faults(self, **faults: Any) -> None:
        httpx.post(f"{self.fake_url}/_fake/faults", json=faults, timeout=5).raise_for_status()

    def fake_reset(self) -> None:
        httpx.post(f"{self.fake_url}/_fake/reset", timeout=5).raise_for_status()

    def worker(
        self, app: str, queues: str, concurrency: int, name: str, extra: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        return self.start(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                f"{name}-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=WARNING",
                *extra,
            ],
            name,
        )

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        for proc in procs if procs is not None else self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs if procs is not None else self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rss_by_process(proc: subprocess.Popen[bytes]) -> dict[str, float]:
    """Resident memory (MB) of a process (``main``) and each of its children (by pid)."""
    out = subprocess.run(
        ["ps", "-o", "pid=,rss=", "--ppid", str(proc.pid), "-p", str(proc.pid)], capture_output=True, text=True
    )
    sizes: dict[str, float] = {}
    for line in out.stdout.splitlines():
        pid, rss = line.split()
        sizes["main" if int(pid) == proc.pid else pid] = round(int(rss) / 1024, 1)
    return sizes


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """Resident memory of a process and its children, in MB."""
    return sum(rss_by_process(proc).values())


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on the machine, by pid, with its role."""
    tick = os.sysconf("SC_CLK_TCK")
    snap: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry)
        role = _role(pid, me, args)
        if role:
            snap[pid] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return snap


def _role(pid: int, me: int, args: str) -> str | None:
    if pid == me:
        return "producer"
    if args.startswith("postgres"):
        return "postgres"
    if "redis-server" in args:
        return "redis"
    if "fake-providers" in args:
        return "fake provider"
    if "celery" in args and "worker" in args:
        return "workers"
    return None


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots (processes that started in between count whole)."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        used[role] = round(used.get(role, 0.0) + seconds - start, 2)
    return used


def wait_count(engine: Any, sql: str, params: dict[str, Any], target: int, timeout: float) -> float:
    """Poll until the count reaches ``target``; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.monotonic()
        with engine.connect() as conn:
            n = conn.execute(text(sql), params).scalar_one()
        if n >= target:
            return time.monotonic()
        # At most ~10 % of a core for the poll: counting the 1,000,000-row run's pending rows took
        # ~0.5 s while most were pending, every 0.1 s. The count gets cheaper as rows finish, so the
        # interval shrinks near the end, where it sets the measurement's resolution: 20 ms (a 0.1 s
        # floor added 50 ms on average to a 4 s run, 1 % of its rate, always against us).
        time.sleep(max(0.02, 9 * (time.monotonic() - asked)))
    raise RuntimeError(f"timed out: {n}/{target} after {timeout}s ({sql})")


def wait_settled(engine: Any, count: int, timeout: float) -> float:
    """Poll until none of the run's ``count`` messages is queued, sending or retrying; returns when.

    It counts what is still pending (each of those states has a small partial index; the scratch
    database holds only this run's rows), not what is sent: counting 100,000 sent rows every 0.1 s
    took a third of a core from the run being measured.
    """
    pending = " - ".join(
        f"(SELECT count(*) FROM kmsg_messages WHERE status = '{s}')" for s in ("queued", "sending", "retrying")
    )
    return wait_count(engine, f"SELECT :n - {pending}", {"n": count}, count, timeout)


def bench_naive(env: Env, count: int) -> dict[str, Any]:
    from kmsg_worker.storage.db import make_engine

    engine = make_engine(env.env["KMSG_DATABASE_URL"])
    redis.Redis.from_url(REDIS_URL).flushdb()
    ids = [uuid.uuid4().hex for _ in range(count)]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO bench_naive (id, recipient, body, status) VALUES (:id, :r, :b, 'queued')"),
            [{"id": i, "r": f"010{n:08d}", "b": "[bench] naive message"} for n, i in enumerate(ids)],
        )
    worker = env.worker("bench.naive", "celery", 2, "naive")
    time.sleep(4)
    os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
    from bench.naive import app, naive_send

    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for i in ids:
            naive_send.apply_async((i,), producer=producer)
    done = wait_count(engine, "SELECT count(*) FROM bench_naive WHERE status = 'sent'", {}, count, 600)
    env.stop([worker])
    rate = count / (done - started)
    log(f"naive: {count} messages in {done - started:.2f}s = {rate:,.0f} msg/s")
    return {"messages": count, "seconds": round(done - started, 3), "msgs_per_s": round(rate, 1)}


def bench_bulk(
    env: Env,
    count: int,
    latency_ms: float,
    single_sends: int = 0,
    on_invalid: str = "reject",
    *,
    defaults: dict[str, Any] | None = None,
    rows: Any = None,
) -> dict[str, Any]:
    """``send_many`` of ``count`` rows until every row is recorded as accepted by the provider.

    ``on_invalid``: ``"reject"`` (the default of ``send_many``) stores the batch in one transaction
    and queues its chunks after the commit; ``"skip"`` streams it (each slice commits and its chunks
    go out while the rest is stored).
    """
    from kmsg_worker.storage.db import make_engine

    engine = make_engine(env.env["KMSG_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE kmsg_attempts, kmsg_messages, kmsg_batches CASCADE"))
    redis.Redis.from_url(REDIS_URL).flushdb()
    env.fake_reset()
    env.fake_faults(latency_ms=latency_ms)
    bulk_worker = env.worker("config.celery", "kmsg.bulk", 2, "bulk")
    single_worker = env.worker("config.celery", "kmsg.priority,kmsg.send", 2, "single")
    time.sleep(5)
    rss_before = rss_mb(bulk_worker)
    rss_parts_before = rss_by_process(bulk_worker)
    cpu_before = cpu_snapshot()
    os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
    from kmsg_worker.producer import KMsg

    kmsg = KMsg()
    latencies: list[float] = []
    if rows is None:
        rows = ({"to": f"010{i:08d}", "variables": {"n": i}} for i in range(count))
    started = time.monotonic()
    started_wall = time.time()
    # The OTP sender is its own process, started with the bulk (see bench/singles.py).
    # Twice the light-load rate, for twice the count: about 200 of them land while the bulk runs
    # (~6 s), which is what the p99 is computed over.
    singles = start_singles(env, single_sends * 2, interval=0.025) if single_sends else None
    receipt = kmsg.send_many(
        rows,
        defaults=defaults or {"text": "[bench] 겨울 세일 쿠폰 #{n}", "sender": "0212345678"},
        chunk_size=CHUNK_SIZE,
        on_invalid=on_invalid,
    )
    accepted = time.monotonic()
    done = wait_settled(engine, count, 900)
    with engine.connect() as conn:
        sent = conn.execute(
            text("SELECT count(*) FROM kmsg_messages WHERE batch_id = :b AND status = 'sent'"), {"b": receipt.batch_id}
        ).scalar_one()
    if sent != count:
        raise RuntimeError(f"only {sent} of {count} messages were sent")
    provider_ms: list[float] = []
    if singles is not None:
        single_ids = finish_singles(singles)
        # Only the sends accepted while the bulk was still running count (the sender goes on for
        # 10 s; a fast bulk is over before that).
        latencies = single_latencies(engine, single_ids, between=(started_wall, started_wall + done - started))
        provider_ms = provider_latencies(engine, single_ids)
    rss_after = rss_mb(bulk_worker)
    rss_parts_after = rss_by_process(bulk_worker)
    cpu = cpu_used(cpu_before, cpu_snapshot())
    stats = httpx.get(f"{env.fake_url}/_fake/stats", timeout=30).json()
    env.stop([bulk_worker, single_worker])
    kmsg.close()
    rate = count / (done - started)
    result = {
        "messages": count,
        "provider_latency_ms": latency_ms,
        "on_invalid": on_invalid,
        "intake_seconds": round(accepted - started, 3),
        "seconds": round(done - started, 3),
        "msgs_per_s": round(rate, 1),
        "fake_accepted": stats["accepted"],
        "fake_max_per_recipient": stats["max_per_recipient"],
        # Messages accepted more than once (by our id): the real duplicate check.
        "fake_duplicated_messages": len(stats["duplicates"]),
        "worker_rss_mb_before": round(rss_before, 1),
        "worker_rss_mb_after": round(rss_after, 1),
        # Per process (the Celery main process and each pool child, by pid): where growth is.
        "worker_rss_mb_by_process": {"before": rss_parts_before, "after": rss_parts_after},
        # Where the two cores went: CPU seconds per role over the run (wall time x 2 is the ceiling).
        "cpu_seconds": cpu,
    }
    if on_invalid == "reject":
        # An atomic batch sends nothing before send_many returns: the rate of its send phase alone.
        result["send_phase_msgs_per_s"] = round(count / (done - accepted), 1)
    if latencies:
        result["single_p50_ms"] = round(percentile(latencies, 50), 1)
        result["single_p99_ms"] = round(percentile(latencies, 99), 1)
        result["single_count"] = len(latencies)  # sent while the bulk ran
        result["single_provider_call_p50_ms"] = round(percentile(provider_ms, 50), 1)
        result["single_provider_call_p99_ms"] = round(percentile(provider_ms, 99), 1)
    log(
        f"bulk {count} @ {latency_ms:g} ms, on_invalid={on_invalid}: intake {accepted - started:.2f}s, "
        f"all accepted in {done - started:.2f}s "
        f"= {rate:,.0f} msg/s (fake accepted {stats['accepted']}, max per recipient {stats['max_per_recipient']}); "
        f"CPU s: {cpu}"
    )
    return result


def start_singles(env: Env, count: int, interval: float = 0.05) -> subprocess.Popen[bytes]:
    """Start ``bench.singles`` sending ``count`` messages ``interval`` seconds apart, after 5 warm-up sends."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.singles", "--count", str(count), "--interval", str(interval)],
        env=env.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )


def finish_singles(proc: subprocess.Popen[bytes]) -> list[str]:
    """The ids the singles process sent (it stops by itself after at most 300 s)."""
    out, _ = proc.communicate(timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.singles failed with exit code {proc.returncode}")
    ids: list[str] = json.loads(out.decode().strip().splitlines()[-1])
    return ids


def single_latencies(
    engine: Any, ids: list[str], timeout: float = 60, *, between: tuple[float, float] | None = None
) -> list[float]:
    """Milliseconds from acceptance (created_at) to provider acceptance (sent_at) for ``ids``.

    ``between``: only the sends accepted inside this window (epoch seconds), e.g. while a bulk ran.
    """
    if not ids:
        return []
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT created_at, sent_at FROM kmsg_messages WHERE id = ANY(:ids) AND sent_at IS NOT NULL"),
                {"ids": ids},
            ).all()
        if len(rows) == len(ids):
            break
        time.sleep(0.2)
    if between is not None:
        rows = [r for r in rows if between[0] <= r.created_at.timestamp() <= between[1]]
    return [(r.sent_at - r.created_at).total_seconds() * 1000 for r in rows]


def provider_latencies(engine: Any, ids: list[str]) -> list[float]:
    """The provider call's own share (attempt ``latency_ms``) of each accepted single send."""
    with engine.connect() as conn:
        return [
            float(v)
            for v in conn.execute(
                text("SELECT latency_ms FROM kmsg_attempts WHERE message_id = ANY(:ids) AND outcome = 'accepted'"),
                {"ids": ids},
            ).scalars()
            if v is not None
        ]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def bench_single_light(env: Env, count: int) -> dict[str, Any]:
    from kmsg_worker.storage.db import make_engine

    engine = make_engine(env.env["KMSG_DATABASE_URL"])
    # An empty broker database: tasks left queued by an earlier, interrupted run would be worked
    # through first and measured as latency.
    redis.Redis.from_url(REDIS_URL).flushdb()
    env.fake_reset()
    worker = env.worker("config.celery", "kmsg.priority,kmsg.send", 2, "single-light")
    time.sleep(4)
    os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
    ids = finish_singles(start_singles(env, count))
    lat = single_latencies(engine, ids)
    provider_ms = provider_latencies(engine, ids)
    env.stop([worker])
    result = {
        "count": len(lat),
        "p50_ms": round(percentile(lat, 50), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "mean_ms": round(statistics.fmean(lat), 1),
        # The provider call's own share (the fake on loopback); the rest is ours.
        "provider_call_p50_ms": round(percentile(provider_ms, 50), 1),
    }
    log(
        f"single send at light load: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms over {len(lat)}"
        f" (provider call p50 {result['provider_call_p50_ms']} ms)"
    )
    return result


STAGES = (
    "naive",
    "bulk_0ms",
    "bulk_0ms_streamed",
    "bulk_20ms",
    "bulk_20ms_streamed",
    "single_light",
    "single_during_bulk",
    "bulk_1m",
)
#: The 100,000-message runs checked against the 25,000/s target.
BULK_STAGES = ("bulk_0ms", "bulk_0ms_streamed", "bulk_20ms", "bulk_20ms_streamed")


def check_targets(results: dict[str, Any]) -> dict[str, bool]:
    """The bulk and single-send targets, for the stages that ran."""
    targets: dict[str, bool] = {}
    if "naive" in results and "bulk_0ms" in results:
        results["ratio_bulk_vs_naive"] = round(results["bulk_0ms"]["msgs_per_s"] / results["naive"]["msgs_per_s"], 1)
        targets["bulk >= 30x naive"] = results["ratio_bulk_vs_naive"] >= 30
    for stage in BULK_STAGES:
        if stage in results:
            targets[f"{stage} >= 25000/s"] = results[stage]["msgs_per_s"] >= 25_000
    if "single_light" in results:
        targets["single p50 <= 10 ms (light)"] = results["single_light"]["p50_ms"] <= 10
        targets["single p99 <= 50 ms (light)"] = results["single_light"]["p99_ms"] <= 50
    if "single_during_bulk" in results:
        targets["single p99 <= 100 ms (during bulk)"] = results["single_during_bulk"].get("single_p99_ms", 1e9) <= 100
    bulk_runs = [k for k in (*BULK_STAGES, "single_during_bulk", "bulk_1m") if k in results]
    if bulk_runs:
        targets["no message accepted twice"] = all(results[k]["fake_duplicated_messages"] == 0 for k in bulk_runs)
    if "bulk_1m" in results:
        growth = results["bulk_1m"]["worker_rss_mb_after"] - results["bulk_1m"]["worker_rss_mb_before"]
        targets["worker RSS growth < 50 MB over 1M"] = growth < 50
    return targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive", type=int, default=3000, help="messages for the naive baseline")
    parser.add_argument("--bulk", type=int, default=100_000, help="messages per bulk run")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--long", action="store_true", help="also a 1,000,000-message run for worker RSS")
    parser.add_argument(
        "--only",
        choices=STAGES,
        action="append",
        help="run only these stages (repeatable; for profiling: the targets need every stage)",
    )
    parser.add_argument("--matrix", action="store_true", help="run the provider matrix (bench/matrix.py) instead")
    parser.add_argument("--matrix-count", type=int, default=50_000, help="messages per matrix cell")
    parser.add_argument(
        "--matrix-baseline-count", type=int, default=None, help="messages per baseline run (default: the cell count)"
    )
    parser.add_argument("--matrix-providers", default="solapi,iwinv,aligo", help="comma-separated subset")
    parser.add_argument("--matrix-texts", default="same,personalised", help="comma-separated subset")
    parser.add_argument("--matrix-latencies", default="0,20", help="fake latencies in ms, comma-separated")
    args = parser.parse_args()
    if args.matrix:
        from bench.matrix import run_matrix

        def listed(value: str) -> tuple[str, ...]:
            return tuple(p.strip() for p in value.split(",") if p.strip())

        run_matrix(
            args.matrix_count,
            args.matrix_baseline_count or args.matrix_count,
            listed(args.matrix_providers),
            texts=listed(args.matrix_texts),
            latencies=tuple(float(v) for v in listed(args.matrix_latencies)),
        )
        return
    stages = args.only or [s for s in STAGES if s != "bulk_1m" or args.long]
    results: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": os.uname().nodename}
    with scratch_database() as db_url:
        env = Env(db_url)
        try:
            env.start_fakes()
            runs = {
                "naive": lambda: bench_naive(env, args.naive),
                "bulk_0ms": lambda: bench_bulk(env, args.bulk, 0),
                "bulk_0ms_streamed": lambda: bench_bulk(env, args.bulk, 0, on_invalid="skip"),
                "bulk_20ms": lambda: bench_bulk(env, args.bulk, 20),
                "bulk_20ms_streamed": lambda: bench_bulk(env, args.bulk, 20, on_invalid="skip"),
                "single_light": lambda: bench_single_light(env, args.singles),
                "single_during_bulk": lambda: bench_bulk(env, args.bulk, 0, single_sends=args.singles),
                "bulk_1m": lambda: bench_bulk(env, 1_000_000, 0),
            }
            for stage in stages:
                results[stage] = runs[stage]()
        finally:
            env.stop()
    targets = check_targets(results)
    results["targets"] = targets
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\nratio bulk/naive (0 ms): {results.get('ratio_bulk_vs_naive')}x  -> {out}")
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")


if __name__ == "__main__":
    main()
