"""Shared fixtures: real PostgreSQL and Redis (skipped on a laptop without them, a failure under CI),
a runtime per backend, a recording dispatcher, and Celery worker processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from kmsg_worker.logging import add_event_counter, configure_logging
from kmsg_worker.message import Priority
from kmsg_worker.observability.events import Metrics, metrics_processor, use_metrics
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import Base

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("KMSG_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("KMSG_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("KMSG_TEST_REDIS_DB", "9"))


def need(service: str, reachable: bool) -> None:
    """Skip on a developer's laptop, fail under CI, when a required server is down."""
    if reachable:
        return
    message = f"{service} is not reachable"
    if CI:
        pytest.fail(f"{message} (CI=true: tests that need it must run)")
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class RecordingDispatcher:
    """Collects what would have been published."""

    sends: list[tuple[str, str, float | None]] = field(default_factory=list)
    chunks: list[tuple[str, int, float | None]] = field(default_factory=list)

    def send(self, message_ids: Sequence[str], *, priority: Priority | str, countdown: float | None = None) -> None:
        self.sends.extend((m, str(priority), countdown) for m in message_ids)

    def chunk(self, batch_id: str, chunks: Sequence[int], *, countdown: float | None = None) -> None:
        self.chunks.extend((batch_id, c, countdown) for c in chunks)

    @property
    def ids(self) -> list[str]:
        return [m for m, _, _ in self.sends]


@contextmanager
def scratch_pg_database(prefix: str) -> Iterator[str]:
    """An empty PostgreSQL database (no tables) for the block, dropped afterwards."""
    need("PostgreSQL on 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def scratch_pg_schema(prefix: str) -> Iterator[str]:
    """Like :func:`scratch_pg_database`, with every table created."""
    with scratch_pg_database(prefix) as url:
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with scratch_pg_schema("kmsg_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis, on a database index reserved for tests."""
    need(f"Redis on {REDIS_HOST}:{REDIS_PORT}", _port_open(REDIS_HOST, REDIS_PORT))
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


def truncate(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test on the embedded SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kmsg.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    truncate(url)
    return url


@pytest.fixture
def settings_factory(tmp_path: Path) -> Any:
    def make(database_url: str, **env: str) -> Settings:
        base = {"KMSG_VAR_DIR": str(tmp_path / "var"), "KMSG_DATABASE_URL": database_url}
        base.update(env)
        return Settings.from_env(base)

    return make


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


class Clock:
    """A controllable clock for ``Runtime.now``: starts at a fixed instant, moves only when told."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(runtime: Runtime) -> Clock:
    """Install a :class:`Clock` on the test's runtime."""
    c = Clock()
    runtime.now = c
    return c


@pytest.fixture
def kmsg(runtime: Runtime) -> KMsg:
    """A producer on the test's runtime."""
    return KMsg(runtime=runtime)


@pytest.fixture
def runtime(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    rt = Runtime(settings_factory(backend_url), dispatcher=dispatcher)
    yield rt
    rt.close()


# -- Celery worker processes ----------------------------------------------------------------------

QUEUE_LIST = "kmsg.priority,kmsg.send,kmsg.bulk,kmsg.poll,kmsg.maintenance,kmsg.webhooks"


@dataclass
class Cluster:
    """Worker and beat processes sharing one environment."""

    env: dict[str, str]
    var_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str = "w1", concurrency: int = 2, queues: str = QUEUE_LIST) -> subprocess.Popen[bytes]:
        log = open(self.var_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config.celery",
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                f"{name}-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=INFO",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        log = open(self.var_dir / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config.celery",
                "beat",
                "--schedule",
                str(self.var_dir / f"{name}-schedule"),
                "--loglevel=INFO",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run_python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run code in a separate producer process with the cluster's environment."""
        return subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def key(self, name: str) -> str:
        """The Redis key of broker queue ``name`` (queues are prefixed per test session)."""
        return self.env.get("KMSG_BROKER_KEY_PREFIX", "") + name

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.var_dir.glob("*.log")))


@pytest.fixture
def cluster(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Environment for real workers on Redis + PostgreSQL (empty tables, empty broker)."""
    import redis

    truncate(pg_url)
    # Broker keys are namespaced per test session, so concurrent test runs sharing this Redis
    # (two developers, or a developer and CI) never consume each other's tasks.
    prefix = f"kmsgtest{os.getpid()}:"
    client = redis.Redis.from_url(redis_url)
    stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if stale:
        client.delete(*stale)
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update(
        {
            "KMSG_BROKER_URL": redis_url,
            "KMSG_BROKER_KEY_PREFIX": prefix,
            "KMSG_DATABASE_URL": pg_url,
            "KMSG_VAR_DIR": str(var_dir),
            "KMSG_SWEEP_INTERVAL_SECONDS": "1",
            "KMSG_TRACKING_FIRST_CHECK_SECONDS": "1",
            "KMSG_TRACKING_BACKOFF": "1",
            "KMSG_RETRY_BASE_SECONDS": "0.3",
            "KMSG_LEASE_SECONDS": "5",
            "KMSG_STALE_QUEUED_SECONDS": "5",
            "KMSG_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    c = Cluster(env, var_dir)
    yield c
    c.stop()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(cluster: Cluster) -> Iterator[Any]:
    """A real ``uvicorn`` process of the HTTP API on the cluster's environment, once ``/readyz`` answers.

    Yields an ``httpx.Client`` on its base URL; the process is stopped with the cluster's.
    """
    import httpx

    port = free_port()
    log = open(cluster.var_dir / "api.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "kmsg_worker.api:create_app"]
        + ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env=cluster.env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster.procs.append(proc)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def ready() -> bool:
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 30, what="the API to be ready")
        yield client
    finally:
        client.close()


def wait_until(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (robust to labels added later)."""
    found = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found += sample.value
    return found


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    # What config/celery.py does where the app is configured.
    add_event_counter(metrics_processor)
    configure_logging("INFO")
    with use_metrics(Metrics()) as fresh:
        yield fresh
