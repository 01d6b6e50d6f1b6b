"""Real Celery worker and beat processes on the real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.providers.mock import read_call_log
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FINAL = {"delivered", "failed", "cancelled", "unknown", "dead"}


def store_for(cluster: Cluster) -> Store:
    return Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))


def statuses(store: Store, ids: list[str]) -> dict[str, str]:
    out = {}
    for mid in ids:
        row = store.get(mid)
        out[mid] = row.status if row else "missing"
    return out


def test_delay_from_another_process_is_delivered_by_a_worker(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_beat()
    # Given a producer process that only imports the task
    result = cluster.run_python(
        "from tasks import send_message\n"
        "r = send_message.delay(to='010-1234-5678', text='hello from another process')\n"
        "print(r.id)\n"
    )
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip().splitlines()[-1]
    store = store_for(cluster)
    # Then a worker process sends it and tracking records the delivery
    wait_until(lambda: statuses(store, [message_id])[message_id] == "delivered", 60, what="delivery")
    row = store.get(message_id)
    assert row is not None and row.provider == "mock" and row.provider_message_id
    assert [a.outcome for a in store.attempts(message_id)] == ["accepted"]


def test_delay_with_invalid_input_raises_in_the_producer(cluster: Cluster) -> None:
    result = cluster.run_python(
        "from tasks import send_message\n"
        "from kmsg_worker import ValidationError\n"
        "try:\n"
        "    send_message.delay(to='010-1234-5678', type='SMS', text='가' * 46)\n"
        "except ValidationError as exc:\n"
        "    print('REJECTED', exc.field, exc.rule)\n"
    )
    assert "REJECTED text max_bytes" in result.stdout, result.stderr
    store = store_for(cluster)
    assert store.count_by_status() == {}
    import redis

    broker = redis.Redis.from_url(cluster.env["KMSG_BROKER_URL"])
    assert broker.llen(cluster.key("kmsg.send")) == 0


def test_task_payload_carries_only_the_id(cluster: Cluster) -> None:
    # No worker: inspect what sits in the broker.
    result = cluster.run_python(
        "from tasks import send_message\nsend_message.delay(to='010-9876-5432', text='secret text 1234')\n"
    )
    assert result.returncode == 0, result.stderr
    import redis

    broker = redis.Redis.from_url(cluster.env["KMSG_BROKER_URL"])
    raw = b"".join(broker.lrange(cluster.key("kmsg.send"), 0, -1))
    assert raw, "the task should be queued"
    envelope = json.loads(broker.lrange(cluster.key("kmsg.send"), 0, 0)[0])
    import base64

    decoded = base64.b64decode(envelope["body"])
    # The body is base64 inside the envelope: look at both. Four digits alone could be part of a hex id,
    # so a partial leak is the middle block next to the prefix or the last four.
    for text in (raw, decoded):
        assert not re.search(rb"010\D?9876|9876\D?5432", text), text
        assert b"secret text" not in text
    body = json.loads(decoded)
    assert body[1] == {"message_id": body[1]["message_id"]}


def _send_many(cluster: Cluster, count: int, script: dict[str, Any]) -> list[str]:
    code = (
        "import json\n"
        "from kmsg_worker import KMsg\n"
        "k = KMsg()\n"
        f"ids = [k.send(to='0101000%04d' % i, text='kill test', provider_options={{'mock': {json.dumps(script)}}})"
        f".message_id for i in range({count})]\n"
        "print(json.dumps(ids))\n"
    )
    result = cluster.run_python(code)
    assert result.returncode == 0, result.stderr
    ids: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return ids


@pytest.mark.slow
def test_sigkill_mid_task_loses_nothing_and_never_sends_twice(cluster: Cluster) -> None:
    # Given 12 messages whose provider call takes 1.5 s, and one worker busy with them
    ids = _send_many(cluster, 12, {"script": [{"outcome": "delay", "duration_ms": 1500}]})
    worker = cluster.start_worker("victim", concurrency=2)
    store = store_for(cluster)
    wait_until(lambda: "sending" in statuses(store, ids).values(), 60, what="a message in flight")
    time.sleep(0.8)
    # When the whole worker is killed without warning in the middle of provider calls
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    in_flight = [m for m, s in statuses(store, ids).items() if s == "sending"]
    assert in_flight, "the kill should have caught messages in flight"
    # and a new worker and beat take over
    cluster.start_worker("rescuer", concurrency=2)
    cluster.start_beat()
    wait_until(lambda: set(statuses(store, ids).values()) <= FINAL, 120, interval=0.5, what="every message final")
    # Then every message is delivered, and none reached the provider twice once it had been accepted
    assert set(statuses(store, ids).values()) == {"delivered"}
    accepted = Counter(r["message_id"] for r in read_call_log(cluster.var_dir / "mock-calls.jsonl") if r["accepted"])
    assert all(accepted[m] == 1 for m in ids), accepted
    reconciled = [a.outcome for m in in_flight for a in store.attempts(m)]
    assert any(o.startswith("reconciled") for o in reconciled), reconciled


def test_malformed_tasks_are_dead_lettered_and_the_worker_keeps_consuming(cluster: Cluster) -> None:
    cluster.start_worker()
    result = cluster.run_python(
        "from config.celery import app\n"
        "app.send_task('kmsg.send_message', kwargs={'junk': 1}, queue='kmsg.send')\n"
        "app.send_task('kmsg.send_message', kwargs={'message_id': 'does-not-exist'}, queue='kmsg.send')\n"
        "app.send_task('kmsg.send_message', args=[1, 2, 3], queue='kmsg.send')\n"
        "from tasks import send_message\n"
        "print(send_message.delay(to='01012345678', text='after the junk').id)\n"
    )
    assert result.returncode == 0, result.stderr
    good = result.stdout.strip().splitlines()[-1]
    store = store_for(cluster)
    wait_until(lambda: statuses(store, [good])[good] in {"sent", "delivered"}, 60, what="the good message")
    wait_until(lambda: len(store.dead_letters()) == 3, 30, what="three dead letters")
    reasons = sorted(d.reason for d in store.dead_letters())
    assert reasons == [
        "malformed payload: expected only message_id",
        "unexpected positional arguments",
        "unknown message id",
    ]


def test_worker_refuses_to_start_with_an_invalid_setting(cluster: Cluster) -> None:
    cluster.env["KMSG_RETRY_MAX_ATTEMPTS"] = "many"
    worker = cluster.start_worker("bad")
    assert worker.wait(60) != 0
    assert "KMSG_RETRY_MAX_ATTEMPTS" in cluster.logs()


def test_settings_name_the_missing_provider_credential() -> None:
    with pytest.raises(Exception) as info:
        Settings.from_env({"KMSG_PROVIDERS": "mock,solapi"}).check_providers()
    assert "KMSG_SOLAPI_API_KEY" in str(info.value)


def _niceness_of_worker(proc: Any) -> list[int]:
    """Niceness of a worker's main process and of each pool child, once the children are up."""
    children: list[int] = []

    def forked() -> bool:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        children[:] = [int(pid) for pid in out.split()]
        return len(children) == 2

    wait_until(forked, timeout=60, what="the worker's two pool children")
    return [os.getpriority(os.PRIO_PROCESS, pid) for pid in (proc.pid, *children)]


def test_a_bulk_only_worker_yields_the_cpu_and_a_single_send_worker_does_not(cluster: Cluster) -> None:
    mine = os.nice(0)
    bulk = cluster.start_worker("bulk", queues="kmsg.bulk")
    single = cluster.start_worker("single", queues="kmsg.priority,kmsg.send")
    both = cluster.start_worker("both", queues="kmsg.send,kmsg.bulk")
    assert _niceness_of_worker(bulk) == [max(mine, 10)] * 3
    assert _niceness_of_worker(single) == [mine] * 3
    assert _niceness_of_worker(both) == [mine] * 3
    if mine < 10:
        assert "worker.bulk_niceness" in cluster.logs()


def test_bulk_worker_niceness_setting_parses_and_names_a_bad_value() -> None:
    assert Settings.from_env({}).bulk_worker_nice == 10
    assert Settings.from_env({"KMSG_BULK_WORKER_NICE": "0"}).bulk_worker_nice == 0
    for bad in ("20", "-1", "low"):
        with pytest.raises(ConfigurationError) as info:
            Settings.from_env({"KMSG_BULK_WORKER_NICE": bad})
        assert info.value.variable == "KMSG_BULK_WORKER_NICE"
