"""Observability with real processes: a prefork worker's /metrics endpoint, the correlation id from a
producer process to the worker's log lines, and Flower seeing tasks that carry ids only."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kmsg_worker.logging import CORRELATION_HEADER
from tests.conftest import ROOT, Cluster, wait_until
from tests.e2e.test_worker_e2e import statuses, store_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(cluster: Cluster, count: int, *, correlation: str | None = None, to: str = "01055501234") -> list[str]:
    bind = f"bind_correlation_id({correlation!r})\n" if correlation else ""
    result = cluster.run_python(
        "import json\n"
        "from kmsg_worker import KMsg\n"
        "from kmsg_worker.logging import bind_correlation_id\n"
        f"{bind}"
        "k = KMsg()\n"
        f"print(json.dumps([k.send(to={to!r}, text='observability secret text').message_id for _ in range({count})]))\n"
    )
    assert result.returncode == 0, result.stderr
    ids: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return ids


def samples(text: str, name: str) -> float:
    """Sum of every sample line of ``name`` in a Prometheus exposition."""
    found = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found += float(line.rsplit(" ", 1)[1])
    return found


def test_prefork_worker_serves_merged_metrics(cluster: Cluster) -> None:
    # Given a producer and a 2-process worker sharing one metrics folder that holds a stale file
    port = free_port()
    folder = cluster.var_dir / "prom"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left over from the previous run")
    cluster.env.update({"KMSG_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    cluster.start_worker(concurrency=2)
    cluster.start_beat()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: _get(url) is not None, 60, what="the worker's metrics endpoint")
    assert not (folder / "counter_1.db").exists(), "the worker must empty its folder at start"
    # When 6 messages go through
    ids = send(cluster, 6)
    store = store_for(cluster)
    wait_until(lambda: set(statuses(store, ids).values()) == {"delivered"}, 90, what="delivery")
    # Then the endpoint shows the producer's and both children's counts, and the backlog gauges
    text = _get(url) or ""
    wait_until(lambda: samples(_get(url) or "", "kmsg_tracking_results_total") >= 6, 30, what="tracking counts")
    text = _get(url) or ""
    assert samples(text, "kmsg_messages_accepted_total") == 6
    assert samples(text, "kmsg_messages_sent_total") == 6
    assert 'kmsg_queue_length{queue="kmsg.send"} 0.0' in text
    assert 'kmsg_queue_oldest_age_seconds{queue="kmsg.send"} 0.0' in text
    assert 'kmsg_beat_heartbeat_age_seconds{job="sweep"}' in text
    assert 'kmsg_backlog_source_up{source="broker"} 1.0' in text
    writers = {p.name.rsplit("_", 1)[1] for p in folder.glob("counter_*.db")}
    assert len(writers) >= 2, writers  # the producer and at least one prefork child


def _get(url: str, **kwargs: Any) -> str | None:
    try:
        response = httpx.get(url, timeout=2, **kwargs)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def test_correlation_id_travels_from_producer_to_worker_logs(cluster: Cluster) -> None:
    import redis

    # Given a producer that binds its request id, with no worker yet
    [mid] = send(cluster, 1, correlation="req-e2e-42")
    [plain] = send(cluster, 1)
    broker = redis.Redis.from_url(cluster.env["KMSG_BROKER_URL"])
    headers = {}
    for raw in broker.lrange(cluster.key("kmsg.send"), 0, -1):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        headers[body[1]["message_id"]] = envelope["headers"].get(CORRELATION_HEADER)
    # Then the broker message carries it (and a message sent without one is correlated by its own id)
    assert headers == {mid: "req-e2e-42", plain: plain}
    # When a worker sends them, every log line of the task carries the correlation id
    cluster.start_worker()
    store = store_for(cluster)
    wait_until(lambda: set(statuses(store, [mid, plain]).values()) <= {"sent", "delivered"}, 60, what="the sends")
    lines = []
    for line in (cluster.var_dir / "w1.log").read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    sent = {e["message_id"]: e for e in lines if e.get("event") == "message.sent"}
    assert sent[mid]["correlation_id"] == "req-e2e-42" and sent[mid]["task"] == "kmsg.send_message"
    assert sent[plain]["correlation_id"] == plain
    assert not any("01055501234" in json.dumps(e) for e in lines)


@pytest.fixture
def flower(cluster: Cluster) -> Iterator[str]:
    port = free_port()
    env = {**cluster.env, "FLOWER_BASIC_AUTH": "ops:test-secret"}
    log = open(cluster.var_dir / "flower.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config.celery", "flower", "--address=127.0.0.1", f"--port={port}"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _get(f"{base}/healthcheck") == "OK", 60, what="Flower to start")
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


_PHONE_PARTS = re.compile(r"010\D?7770|7770\D?1234|010\D?\*+\D?1234")


def _texts(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value, keys included; numbers are not text a person reads."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def test_flower_sees_named_tasks_that_carry_ids_only(cluster: Cluster, flower: str) -> None:
    auth = ("ops", "test-secret")
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401  # the API needs the credentials
    cluster.start_worker()
    sent: list[str] = []

    def seen() -> dict[str, Any] | None:
        # Flower learns tasks from events; the first send may precede its event receiver, so send again.
        if len(sent) < 10:
            sent.extend(send(cluster, 1, to="01077701234"))
        text = _get(f"{flower}/api/tasks?taskname=kmsg.send_message&state=SUCCESS", auth=auth)
        tasks: dict[str, Any] = json.loads(text) if text else {}
        return next((t for t in tasks.values() if any(m in str(t.get("kwargs")) for m in sent)), None)

    wait_until(lambda: seen() is not None, 90, interval=2, what="a succeeded kmsg.send_message in Flower")
    task = seen()
    assert task is not None
    message_id = next(m for m in sent if m in str(task["kwargs"]))
    assert task["name"] == "kmsg.send_message"
    assert task["kwargs"] == repr({"message_id": message_id}) and task["args"] == "()"
    # Four digits alone are no evidence: Flower's floats, hex ids and worker pids hold any of them. A leak
    # of the number, whole or partly masked, keeps its middle block next to the prefix or the last four.
    shown = " ".join(_texts(task))
    assert "observability secret" not in shown
    assert not _PHONE_PARTS.search(shown), _PHONE_PARTS.search(shown)
    types = json.loads(_get(f"{flower}/api/task/types", auth=auth) or "{}")
    assert "kmsg.send_message" in types["task-types"]
