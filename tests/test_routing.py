"""Routing: precedence, validation at start, and round robin / weights that hold across processes
through the shared Redis counter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmsg_worker.errors import ConfigurationError, ValidationError
from kmsg_worker.message import Message, normalize
from kmsg_worker.routing import Router
from kmsg_worker.settings import Settings
from tests.conftest import ROOT, truncate

PROVIDERS = ["solapi", "iwinv", "aligo"]


def msg(**fields: Any) -> Message:
    base: dict[str, Any] = {"to": "01012345678", "text": "hi", "sender": "0212345678"}
    return normalize({**base, **fields})


def voice() -> Message:
    return msg(type="VOICE", voice={"voice_type": "FEMALE"})


def redis_counter(redis_url: str) -> Callable[[str], int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    namespace = f"test:route:{uuid.uuid4().hex[:8]}:"
    return lambda key: int(client.incr(namespace + key)) - 1


# -- precedence -----------------------------------------------------------------------------------


def test_explicit_provider_is_the_whole_route() -> None:
    router = Router(PROVIDERS, {"SMS": ["iwinv"]}, "aligo")
    assert router.route(msg(provider_id="solapi")) == ["solapi"]


@pytest.mark.parametrize(
    ("provider_id", "rule"),
    [("nope", "unknown_provider"), ("iwinv", "unsupported_type")],
)
def test_explicit_unknown_or_incapable_provider_is_refused_at_the_producer(provider_id: str, rule: str) -> None:
    router = Router(PROVIDERS)
    message = voice() if rule == "unsupported_type" else msg()
    with pytest.raises(ValidationError) as info:
        router.route(Message(**{**message.__dict__, "provider_id": provider_id}))
    assert (info.value.field, info.value.rule) == ("provider_id", rule)


def test_rule_then_default_then_every_capable_provider() -> None:
    router = Router(PROVIDERS, {"SMS": ["aligo", "iwinv"], "LMS": "iwinv"}, "iwinv")
    assert router.route(msg()) == ["aligo", "iwinv", "solapi"]
    assert router.route(msg(type="LMS", subject="s")) == ["iwinv", "solapi", "aligo"]
    # No rule for MMS: the default provider first, then KMSG_PROVIDERS order
    assert router.route(msg(type="MMS", image_url="https://x.test/a.jpg")) == ["iwinv", "solapi", "aligo"]
    # VOICE: only Solapi can; the default provider is skipped because it cannot
    assert router.route(voice()) == ["solapi"]


def test_no_capable_provider_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        Router(["iwinv", "aligo"]).route(voice())
    assert info.value.rule == "no_provider"


@pytest.mark.parametrize(
    ("routing", "fragment"),
    [
        ({"TELEGRAM": "solapi"}, "unknown message type"),
        ({"SMS": "mock"}, "not enabled"),
        ({"VOICE": ["iwinv"]}, "does not support VOICE"),
        ({"SMS": {"providers": ["solapi"], "strategy": "random"}}, "unknown strategy"),
        ({"SMS": {"providers": {"solapi": 0}, "strategy": "weighted"}}, "greater than 0"),
        ({"SMS": {"providers": {"solapi": "lots"}, "strategy": "weighted"}}, "numbers"),
        ({"SMS": {"provider": ["solapi"]}}, "a rule is"),
        ({"SMS": []}, "no providers"),
        ({"SMS": 5}, "a rule is"),
    ],
)
def test_invalid_routing_stops_the_start_naming_the_variable(routing: dict[str, Any], fragment: str) -> None:
    env = {"KMSG_PROVIDERS": ",".join(PROVIDERS), "KMSG_ROUTING": json.dumps(routing)}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert info.value.variable == "KMSG_ROUTING" and fragment in str(info.value)


# -- round robin ----------------------------------------------------------------------------------

RR = {"SMS": {"providers": ["solapi", "iwinv"], "strategy": "round_robin"}}


def test_round_robin_in_one_process_alternates_and_keeps_the_other_as_failover() -> None:
    router = Router(PROVIDERS, RR)
    routes = [router.route(msg()) for _ in range(6)]
    firsts = [r[0] for r in routes]
    assert firsts[0::2] == [firsts[0]] * 3 and firsts[1::2] == [firsts[1]] * 3 and firsts[0] != firsts[1]
    assert all(sorted(r[:2]) == ["iwinv", "solapi"] and r[2] == "aligo" for r in routes)


def test_per_process_counters_would_not_alternate_overall() -> None:
    # The control for the next test: two processes with their own counters, interleaved, do not
    # give a,b,a,b overall (each alternates on its own).
    local_a, local_b = iter(range(100)), iter(range(100))
    one = Router(PROVIDERS, RR, counter=lambda _key: next(local_a))
    two = Router(PROVIDERS, RR, counter=lambda _key: next(local_b))
    firsts = [(one if i % 2 == 0 else two).route(msg())[0] for i in range(8)]
    assert firsts == ["solapi", "solapi", "iwinv", "iwinv"] * 2


PRODUCER = """
import sys
from kmsg_worker import KMsg
from kmsg_worker.dispatch import NullDispatcher

kmsg = KMsg(dispatcher=NullDispatcher())
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "send":
        break
    print(kmsg.send(to="01012345678", text="round robin").route[0], flush=True)
"""


@pytest.mark.integration
def test_round_robin_across_two_producer_processes_is_a_b_a_b_overall(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    import redis

    truncate(pg_url)
    # Our own namespace: another test session sharing this Redis must not move our counter
    prefix = f"kmsgtest{os.getpid()}-{uuid.uuid4().hex[:6]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update(
        {
            "KMSG_BROKER_KEY_PREFIX": prefix,
            "KMSG_DATABASE_URL": pg_url,
            "KMSG_REDIS_URL": redis_url,
            "KMSG_VAR_DIR": str(tmp_path / "var"),
            "KMSG_PROVIDERS": "solapi,iwinv",
            "KMSG_ROUTING": json.dumps(RR),
            "KMSG_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # Given two producer processes, when they send in turn
        firsts = []
        for i in range(20):
            proc = procs[i % 2]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("send\n")
            proc.stdin.flush()
            firsts.append(proc.stdout.readline().strip())
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)
    redis.Redis.from_url(redis_url).delete(f"{prefix}kmsg:rr:SMS")
    # Then the shared counter alternates over the whole sequence, not per process
    assert set(firsts) == {"solapi", "iwinv"}
    assert all(a != b for a, b in zip(firsts, firsts[1:], strict=False)), firsts
    assert Counter(firsts) == {"solapi": 10, "iwinv": 10}


# -- weights --------------------------------------------------------------------------------------


def split_error(firsts: list[str], weights: dict[str, float]) -> float:
    """Largest relative difference between a provider's share and its weight's share."""
    total = sum(weights.values())
    counts = Counter(firsts)
    return max(abs(counts[n] / len(firsts) - w / total) / (w / total) for n, w in weights.items())


@pytest.mark.integration
@pytest.mark.parametrize("weights", [{"solapi": 3, "iwinv": 1}, {"solapi": 0.7, "iwinv": 0.2, "aligo": 0.1}])
def test_weighted_split_within_5_percent_over_10000_decisions_from_two_routers(
    redis_url: str, weights: dict[str, float]
) -> None:
    # Two routers sharing the Redis counter stand for two producer processes
    counter = redis_counter(redis_url)
    rules = {"SMS": {"providers": weights, "strategy": "weighted"}}
    routers = [Router(PROVIDERS, rules, counter=counter), Router(PROVIDERS, rules, counter=counter)]
    sms = msg()
    routes = [routers[i % 2].route(sms) for i in range(10_000)]
    error = split_error([r[0] for r in routes], weights)
    print(f"weighted split {weights}: largest relative error {error:.4%} over 10,000 decisions")
    assert error <= 0.05
    # Every route keeps the other weighted providers as its failover chain
    assert all(sorted(r[: len(weights)]) == sorted(weights) for r in routes)


def test_weighted_split_without_redis_is_close_too() -> None:
    weights = {"solapi": 1, "iwinv": 1}
    router = Router(PROVIDERS, {"SMS": {"providers": weights, "strategy": "weighted"}})
    sms = msg()
    assert split_error([router.route(sms)[0] for _ in range(2_000)], weights) <= 0.05


def test_a_redis_outage_does_not_refuse_messages(tmp_path: Path) -> None:
    from kmsg_worker.runtime import Runtime

    settings = Settings.from_env(
        {
            "KMSG_VAR_DIR": str(tmp_path),
            "KMSG_REDIS_URL": "redis://127.0.0.1:1/0",
            "KMSG_PROVIDERS": "solapi,iwinv",
            "KMSG_ROUTING": json.dumps(RR),
        }
    )
    rt = Runtime(settings)
    try:
        firsts = [rt.router.route(msg())[0] for _ in range(4)]
    finally:
        rt.close()
    assert firsts == ["solapi", "iwinv", "solapi", "iwinv"]
