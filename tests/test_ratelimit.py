"""Global rate limits: settings, bucket arithmetic (in-process on a controllable clock, and the Lua
script in real Redis), and a throttled message waiting without spending a retry."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kmsg_worker import ratelimit
from kmsg_worker.delivery import deliver
from kmsg_worker.errors import ConfigurationError
from kmsg_worker.message import Message, normalize
from kmsg_worker.producer import KMsg
from kmsg_worker.ratelimit import LocalRateLimiter, RedisRateLimiter, buckets_for, parse_rate_limits
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.status import MessageStatus as S
from tests.conftest import RecordingDispatcher
from tests.scripted import ScriptedProvider, calls_to


def sms(**extra: Any) -> Message:
    return normalize({"to": "01012345678", "text": "hi", "type": "SMS", **extra})


def lms(**extra: Any) -> Message:
    return normalize({"to": "01012345678", "text": "long text", "type": "LMS", "subject": "s", **extra})


# -- settings -------------------------------------------------------------------------------------


def test_limits_parse_providers_senders_and_tenants() -> None:
    raw = '{"solapi": 100, "iwinv": 50.5, "sender:0212345678": 10, "tenant:shop-a": 20}'
    assert parse_rate_limits(raw, ["solapi", "iwinv"]) == {
        "solapi": 100.0,
        "iwinv": 50.5,
        "sender:0212345678": 10.0,
        "tenant:shop-a": 20.0,
    }
    assert parse_rate_limits(None, ["solapi"]) == {} and parse_rate_limits(" ", ["solapi"]) == {}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"aligo": 5}', "not an enabled provider"),
        ('{"region:x": 5}', "sender:<number> or tenant:<name>"),
        ('{"sender:": 5}', "sender:<number> or tenant:<name>"),
        ('{"solapi": 0}', "number > 0"),
        ('{"solapi": -3}', "number > 0"),
        ('{"solapi": true}', "number > 0"),
        ('{"solapi": "100"}', "number > 0"),
    ],
)
def test_invalid_limits_name_the_variable(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KMSG_PROVIDERS": "solapi", "KMSG_RATE_LIMITS": raw})
    assert info.value.variable == "KMSG_RATE_LIMITS" and fragment in str(info.value)


def test_a_message_costs_its_parts_in_every_bucket_that_applies() -> None:
    limits = {"solapi": 100.0, "sender:0212345678": 10.0, "tenant:shop-a": 20.0}
    # An SMS from the default sender, tenant shop-a: three buckets, one unit each
    assert buckets_for(limits, "solapi", [sms(tenant="shop-a")], "0212345678") == {
        "solapi": (100.0, 1.0),
        "sender:0212345678": (10.0, 1.0),
        "tenant:shop-a": (20.0, 1.0),
    }
    # An LMS costs three units; another sender and another tenant have no bucket
    assert buckets_for(limits, "solapi", [lms(sender="0311112222")], "0212345678") == {"solapi": (100.0, 3.0)}
    # A bulk call takes the sum at once
    assert buckets_for(limits, "solapi", [sms(), lms(), sms()], None) == {"solapi": (100.0, 5.0)}
    assert buckets_for(limits, "iwinv", [sms()], None) == {}
    assert buckets_for({}, "solapi", [sms()], "0212345678") == {}


# -- bucket arithmetic ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_local_bucket_holds_one_second_and_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock)
    wanted = {"p": (10.0, 1.0)}
    # A fresh (or long idle) bucket holds exactly one second of capacity
    assert [limiter.try_acquire(wanted) for _ in range(10)] == [0.0] * 10
    assert limiter.try_acquire(wanted) == pytest.approx(0.1)
    clock.t += 60  # idle for a minute: still only one second's worth
    assert sum(limiter.try_acquire(wanted) == 0 for _ in range(15)) == 10
    clock.t += 0.25
    assert sum(limiter.try_acquire(wanted) == 0 for _ in range(5)) == 2


def test_local_bucket_takes_all_or_nothing() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock)
    assert limiter.try_acquire({"sender:x": (2.0, 2.0)}) == 0
    # The sender bucket is empty: the provider bucket must not be charged for a refused message
    assert limiter.try_acquire({"p": (10.0, 1.0), "sender:x": (2.0, 1.0)}) == pytest.approx(0.5)
    assert [limiter.try_acquire({"p": (10.0, 1.0)}) for _ in range(10)] == [0.0] * 10


def test_local_cost_above_capacity_goes_through_full_and_leaves_a_debt() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock)
    assert limiter.try_acquire({"p": (10.0, 1.0)}) == 0
    # 30 units at 10/s: refused until the bucket is full again, then allowed into debt
    assert limiter.try_acquire({"p": (10.0, 30.0)}) == pytest.approx(0.1)
    clock.t += 0.1
    assert limiter.try_acquire({"p": (10.0, 30.0)}) == 0
    # 20 units of debt: the next single unit waits 2.1 s, so the long-run rate still holds
    assert limiter.try_acquire({"p": (10.0, 1.0)}) == pytest.approx(2.1)


@pytest.fixture
def redis_limiter(redis_url: str) -> Iterator[RedisRateLimiter]:
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"test:rl:{uuid.uuid4().hex[:8]}:"
    yield RedisRateLimiter(client, prefix=prefix)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_bucket_holds_one_second_then_asks_to_wait(redis_limiter: RedisRateLimiter) -> None:
    wanted = {"p": (50.0, 1.0)}
    granted = [redis_limiter.try_acquire(wanted) for _ in range(50)]
    # The 50 calls take well under a second, so at most a few tokens refill meanwhile
    wait = redis_limiter.try_acquire({"p": (50.0, 5.0)})
    assert granted == [0.0] * 50
    assert 0 < wait <= 5 / 50 + 1e-6


def test_redis_bucket_takes_all_or_nothing(redis_limiter: RedisRateLimiter) -> None:
    assert redis_limiter.try_acquire({"sender:x": (1.0, 1.0)}) == 0
    assert redis_limiter.try_acquire({"p": (5.0, 5.0), "sender:x": (1.0, 1.0)}) > 0
    # p was not charged: its whole second of capacity is still there
    assert redis_limiter.try_acquire({"p": (5.0, 5.0)}) == 0


def test_redis_debt_for_a_cost_above_capacity(redis_limiter: RedisRateLimiter) -> None:
    assert redis_limiter.try_acquire({"p": (10.0, 40.0)}) == 0
    assert 2.5 < redis_limiter.try_acquire({"p": (10.0, 1.0)}) <= 3.1


def test_redis_bucket_is_shared_by_concurrent_clients(redis_url: str, redis_limiter: RedisRateLimiter) -> None:
    import redis

    # Given four clients (as four workers) hammering one 100/s bucket for one second
    rate, duration = 100.0, 1.0
    granted: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = RedisRateLimiter(redis.Redis.from_url(redis_url), prefix=redis_limiter.prefix)
        deadline = time.monotonic() + duration
        count = 0
        for _ in range(100_000):  # bounded; the deadline ends it first
            if time.monotonic() >= deadline:
                break
            if mine.try_acquire({"p": (rate, 1.0)}) == 0:
                count += 1
        with lock:
            granted.append(count)

    started = time.monotonic()
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - started
    # Then together they got one second of burst plus the rate for the time they ran, no more
    assert len(granted) == 4
    assert sum(granted) <= rate + rate * elapsed + 1
    assert sum(granted) >= rate * duration * 0.9


# -- acquire() and the pipeline -------------------------------------------------------------------


@pytest.fixture
def rt(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    ScriptedProvider.reset()
    settings = settings_factory(
        backend_url,
        KMSG_PROVIDERS="scripted_a,scripted_b",
        KMSG_RATE_LIMITS='{"scripted_a": 2, "tenant:slow": 1}',
        KMSG_RATE_LIMIT_INLINE_WAIT_SECONDS="0",
    )
    runtime = Runtime(settings, dispatcher=dispatcher)
    yield runtime
    runtime.close()
    ScriptedProvider.reset()


def test_acquire_waits_inline_when_the_wait_is_short(rt: Runtime) -> None:
    slept: list[float] = []
    assert ratelimit.acquire(rt, "scripted_a", [sms(), sms()]) == 0
    # Empty now: without an inline budget it returns the wait, with one it sleeps and takes
    assert ratelimit.acquire(rt, "scripted_a", sms()) > 0
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    assert ratelimit.acquire(rt, "scripted_a", sms(), max_wait=2.0, sleep=sleep) == 0
    assert len(slept) >= 1 and 0 < sum(slept) <= 1.5
    assert ratelimit.acquire(rt, "scripted_b", sms()) == 0  # no limit on scripted_b


def test_acquire_fails_open_when_redis_is_down(tmp_path: Any) -> None:
    settings = Settings.from_env(
        {
            "KMSG_VAR_DIR": str(tmp_path),
            "KMSG_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens on port 1
            "KMSG_PROVIDERS": "mock",
            "KMSG_RATE_LIMITS": '{"mock": 1}',
        }
    )
    rt = Runtime(settings)
    try:
        assert isinstance(rt.rate_limiter, RedisRateLimiter)
        assert [ratelimit.acquire(rt, "mock", sms()) for _ in range(3)] == [0.0, 0.0, 0.0]
    finally:
        rt.close()


def test_a_throttled_message_waits_without_spending_a_retry(rt: Runtime, dispatcher: RecordingDispatcher) -> None:
    kmsg = KMsg(runtime=rt)
    first, second, third = (kmsg.send(to="01012345678", text=f"hi {i}").message_id for i in range(3))
    assert [deliver(rt, m).action for m in (first, second)] == ["sent", "sent"]
    # Given scripted_a's bucket (2/s) is empty, when the third message is delivered
    result = deliver(rt, third)
    # Then it is back to retrying with a countdown of about the bucket's wait, nothing spent
    assert (result.action, result.status) == ("throttled", S.RETRYING)
    row = rt.store.get(third)
    assert row is not None
    assert (row.attempts, row.provider_attempts, row.deliveries, row.error_code) == (0, 0, 0, None)
    assert rt.store.attempts(third) == [] and calls_to("scripted_a") == [first, second]
    (countdown,) = [c for m, _, c in dispatcher.sends if m == third and c is not None]
    assert 0 < countdown <= 0.5 * 1.25 + 0.01 and countdown <= rt.settings.retry.max_countdown
    assert row.retry_task_published
    # When the countdown has passed the message goes out as its first attempt
    time.sleep(countdown)
    assert deliver(rt, third).action == "sent"
    assert [(a.attempt_no, a.outcome) for a in rt.store.attempts(third)] == [(1, "accepted")]


def test_a_tenant_limit_applies_across_providers(rt: Runtime) -> None:
    kmsg = KMsg(runtime=rt)
    a = kmsg.send(to="01012345678", text="a", tenant="slow", provider_id="scripted_b").message_id
    b = kmsg.send(to="01012345678", text="b", tenant="slow", provider_id="scripted_b").message_id
    assert [deliver(rt, m).action for m in (a, b)] == ["sent", "throttled"]
