"""Circuit breakers: transitions on a controllable clock (in-process and in real Redis, same
bodies), what counts as a failure, and the pipeline skipping an open provider without spending an
attempt."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kmsg_worker import circuit
from kmsg_worker.circuit import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    CircuitPolicy,
    LocalCircuitBreaker,
    RedisCircuitBreaker,
)
from kmsg_worker.delivery import deliver
from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import MessageStatus as S
from tests.conftest import RecordingDispatcher
from tests.scripted import ScriptedProvider, calls_to, error

POLICY = CircuitPolicy(window=10.0, min_requests=4, error_rate=0.5, consecutive_failures=3, cooldown=5.0)


class Clock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["local", "redis"])
def breaker(request: pytest.FixtureRequest, clock: Clock) -> Iterator[CircuitBreaker]:
    """The same test body against the in-process breaker and the Redis scripts."""
    if request.param == "local":
        yield LocalCircuitBreaker(POLICY, clock=clock)
        return
    import redis

    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    prefix = f"test:cb:{uuid.uuid4().hex[:8]}:"
    yield RedisCircuitBreaker(client, POLICY, prefix=prefix, clock=clock)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def fail(b: CircuitBreaker, times: int, *, timeout: bool = False, name: str = "p") -> str:
    state = CLOSED
    for _ in range(times):
        state, _ = b.record(name, ok=False, timeout=timeout)
    return state


def open_it(b: CircuitBreaker, name: str = "p") -> None:
    assert fail(b, POLICY.consecutive_failures, timeout=True, name=name) == OPEN


# -- transitions ----------------------------------------------------------------------------------


def test_a_new_provider_is_closed_and_allowed(breaker: CircuitBreaker) -> None:
    assert breaker.allow("p")
    assert breaker.snapshot("p").state == CLOSED


def test_error_rate_opens_only_once_the_window_has_enough_calls(breaker: CircuitBreaker) -> None:
    # Given non-timeout failures (they do not extend a consecutive run) below min_requests
    assert fail(breaker, 3) == CLOSED
    assert breaker.snapshot("p").failures == 3
    # When the fourth call fails too: 4 calls, 100 % failed, min_requests reached
    state, changed = breaker.record("p", ok=False)
    # Then the circuit opens, once
    assert (state, changed) == (OPEN, True)
    assert not breaker.allow("p")


def test_a_healthy_share_keeps_it_closed(breaker: CircuitBreaker) -> None:
    for _ in range(6):
        breaker.record("p", ok=True)
    # 5 failures out of 11 calls is below 50 %
    assert fail(breaker, 5) == CLOSED
    assert breaker.snapshot("p").requests == 11
    assert breaker.record("p", ok=False)[0] == OPEN  # 6 of 12: the threshold is inclusive


def test_consecutive_timeouts_open_before_min_requests(breaker: CircuitBreaker) -> None:
    assert fail(breaker, 2, timeout=True) == CLOSED
    assert breaker.snapshot("p").consecutive == 2
    assert breaker.record("p", ok=False, timeout=True) == (OPEN, True)


def test_a_success_breaks_the_consecutive_run(breaker: CircuitBreaker) -> None:
    for _ in range(6):  # enough successes to keep the error rate below 50 % throughout
        breaker.record("p", ok=True)
    fail(breaker, 2, timeout=True)
    breaker.record("p", ok=True)
    assert fail(breaker, 2, timeout=True) == CLOSED
    assert breaker.snapshot("p").consecutive == 2


def test_old_failures_slide_out_of_the_window(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.advance(POLICY.window + 1)
    assert breaker.snapshot("p").requests == 0
    # Three fresh failures: 3 calls in the window, below min_requests again
    assert fail(breaker, 3) == CLOSED


def test_open_until_the_cooldown_then_one_probe(breaker: CircuitBreaker, clock: Clock) -> None:
    open_it(breaker)
    clock.advance(POLICY.cooldown - 0.5)
    assert not breaker.allow("p")
    assert breaker.snapshot("p").retry_in == pytest.approx(0.5)
    clock.advance(0.5)
    # Cool-down over: the next call is a probe; a second concurrent one is held back
    assert breaker.allow("p")
    assert breaker.snapshot("p").state == HALF_OPEN
    assert not breaker.allow("p")


def test_a_successful_probe_closes_and_clears(breaker: CircuitBreaker, clock: Clock) -> None:
    open_it(breaker)
    clock.advance(POLICY.cooldown)
    assert breaker.allow("p")
    assert breaker.record("p", ok=True) == (CLOSED, True)
    snap = breaker.snapshot("p")
    assert (snap.state, snap.requests, snap.consecutive) == (CLOSED, 0, 0)
    assert breaker.allow("p") and breaker.allow("p")


def test_a_failed_probe_reopens_for_a_fresh_cooldown(breaker: CircuitBreaker, clock: Clock) -> None:
    open_it(breaker)
    clock.advance(POLICY.cooldown)
    assert breaker.allow("p")
    clock.advance(1)
    assert breaker.record("p", ok=False, timeout=True) == (OPEN, True)
    clock.advance(POLICY.cooldown - 0.1)
    assert not breaker.allow("p")
    clock.advance(0.1)
    assert breaker.allow("p")


def test_a_probe_that_never_reports_back_is_replaced_after_a_cooldown(breaker: CircuitBreaker, clock: Clock) -> None:
    open_it(breaker)
    clock.advance(POLICY.cooldown)
    assert breaker.allow("p")  # this probe's worker dies: no record() ever comes
    clock.advance(POLICY.cooldown - 0.1)
    assert not breaker.allow("p")
    clock.advance(0.1)
    assert breaker.allow("p")


def test_answers_arriving_while_open_change_nothing(breaker: CircuitBreaker, clock: Clock) -> None:
    open_it(breaker)
    opened = breaker.snapshot("p").opened_at
    clock.advance(1)
    assert breaker.record("p", ok=True) == (OPEN, False)
    assert breaker.record("p", ok=False, timeout=True) == (OPEN, False)
    assert breaker.snapshot("p").opened_at == opened


def test_providers_are_independent(breaker: CircuitBreaker) -> None:
    open_it(breaker, "a")
    assert not breaker.allow("a")
    assert breaker.allow("b")
    breaker.reset("a")
    assert breaker.allow("a")


def test_workers_share_one_circuit_through_redis(redis_url: str, clock: Clock) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"test:cb:{uuid.uuid4().hex[:8]}:"
    # Two breakers on two connections stand for two worker processes
    one = RedisCircuitBreaker(client, POLICY, prefix=prefix, clock=clock)
    other = RedisCircuitBreaker(redis.Redis.from_url(redis_url), POLICY, prefix=prefix, clock=clock)
    one.record("p", ok=False, timeout=True)
    other.record("p", ok=False, timeout=True)
    assert one.record("p", ok=False, timeout=True)[0] == OPEN
    assert not other.allow("p")
    clock.advance(POLICY.cooldown)
    # Exactly one probe between them
    assert [one.allow("p"), other.allow("p")] == [True, False]
    client.delete(*client.scan_iter(f"{prefix}*"))


def test_redis_time_drives_the_cooldown_without_a_test_clock(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"test:cb:{uuid.uuid4().hex[:8]}:"
    fast = CircuitPolicy(consecutive_failures=1, cooldown=0.3)
    b = RedisCircuitBreaker(client, fast, prefix=prefix)
    assert b.record("p", ok=False, timeout=True) == (OPEN, True)
    assert not b.allow("p")
    assert 0 < b.snapshot("p").retry_in <= 0.3
    time.sleep(0.35)
    assert b.allow("p")
    client.delete(*client.scan_iter(f"{prefix}*"))


# -- what counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (None, (True, False)),
        (ProviderRejected("x", code=ErrorCode.INVALID_RECIPIENT, blame="message"), (True, False)),
        (ProviderRejected("x", code=ErrorCode.AUTHENTICATION_FAILED, status_code=401), (False, False)),
        (ProviderRejected("x", code=ErrorCode.INSUFFICIENT_BALANCE), (False, False)),
        (ProviderTransientError("x", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=503), (False, True)),
        (ProviderTransientError("x", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE), (False, True)),  # "busy" in a 200
        (ProviderTransientError("x", code=ErrorCode.PROVIDER_ERROR), (False, False)),
        (ProviderTimeout("x", code=ErrorCode.NETWORK_TIMEOUT), (False, True)),
        (ProviderConnectionError("x", code=ErrorCode.NETWORK_ERROR), (False, True)),
        (ProviderRateLimited("x", code=ErrorCode.RATE_LIMIT_EXCEEDED, status_code=429), None),
    ],
)
def test_health_of_an_outcome(exc: Any, expected: tuple[bool, bool] | None) -> None:
    assert circuit.health(exc) == expected


def test_policy_from_the_environment() -> None:
    env = {"KMSG_CIRCUIT_COOLDOWN_SECONDS": "2", "KMSG_CIRCUIT_ERROR_RATE": "0.25", "KMSG_CIRCUIT_ENABLED": "off"}
    policy = CircuitPolicy.from_env(env)
    assert (policy.cooldown, policy.error_rate, policy.enabled) == (2.0, 0.25, False)
    assert CircuitPolicy.from_env({}) == CircuitPolicy()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KMSG_CIRCUIT_ERROR_RATE", "1.5"),
        ("KMSG_CIRCUIT_MIN_REQUESTS", "many"),
        ("KMSG_CIRCUIT_COOLDOWN_SECONDS", "0"),
        ("KMSG_CIRCUIT_ENABLED", "perhaps"),
    ],
)
def test_invalid_policy_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CircuitPolicy.from_env({name: value})
    assert info.value.variable == name


# -- in the pipeline ------------------------------------------------------------------------------


class DbClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def rt(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    ScriptedProvider.reset()
    settings = settings_factory(
        backend_url,
        KMSG_PROVIDERS="scripted_a,scripted_b",
        KMSG_CIRCUIT_CONSECUTIVE_FAILURES="2",
        KMSG_CIRCUIT_COOLDOWN_SECONDS="30",
    )
    runtime = Runtime(settings, dispatcher=dispatcher)
    runtime.now = DbClock()
    yield runtime
    runtime.close()
    ScriptedProvider.reset()


def send(rt: Runtime, **fields: Any) -> str:
    return KMsg(runtime=rt).send(to="01012345678", text="hi", **fields).message_id


def test_an_open_provider_is_skipped_at_once_without_spending_an_attempt(rt: Runtime) -> None:
    # Given scripted_a's circuit is open (as another worker found out)
    assert isinstance(rt.circuits, LocalCircuitBreaker)
    for _ in range(2):
        rt.circuits.record("scripted_a", ok=False, timeout=True)
    mid = send(rt)
    # When the worker delivers
    result = deliver(rt, mid)
    # Then scripted_b sends it in the same run, and scripted_a was never called
    assert (result.action, result.provider) == ("sent", "scripted_b")
    assert calls_to("scripted_a") == [] and calls_to("scripted_b") == [mid]
    row = rt.store.get(mid)
    assert row is not None and row.provider == "scripted_b" and row.route_index == 1
    hops = [(a.attempt_no, a.provider, a.outcome) for a in rt.store.attempts(mid)]
    assert hops == [(1, "scripted_a", "circuit_open"), (2, "scripted_b", "accepted")]


def test_failures_open_the_circuit_and_later_messages_skip_the_provider(rt: Runtime) -> None:
    down = error(ProviderTransientError, "scripted_a", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=503)
    ScriptedProvider.down["scripted_a"] = down
    first, second = send(rt), send(rt)
    assert deliver(rt, first).action == "retry"
    assert deliver(rt, second).action == "retry"
    assert rt.circuits.snapshot("scripted_a").state == OPEN
    # The first message comes back for its retry: it goes to scripted_b without calling scripted_a
    rt.now.now += timedelta(seconds=10)  # type: ignore[attr-defined]
    assert deliver(rt, first).provider == "scripted_b"
    third = send(rt)
    assert deliver(rt, third).provider == "scripted_b"
    assert calls_to("scripted_a") == [first, second]
    assert sorted(calls_to("scripted_b")) == sorted([first, third])


def test_when_every_provider_is_open_the_message_waits_without_failing(
    rt: Runtime, dispatcher: RecordingDispatcher
) -> None:
    for name in ("scripted_a", "scripted_b"):
        for _ in range(2):
            rt.circuits.record(name, ok=False, timeout=True)
    mid = send(rt)
    result = deliver(rt, mid)
    assert (result.action, result.status) == ("circuit_open", S.RETRYING)
    row = rt.store.get(mid)
    assert row is not None
    assert (row.attempts, row.provider_attempts, row.route_index, row.deliveries) == (0, 0, 0, 0)
    assert rt.store.attempts(mid) == [] and ScriptedProvider.calls == []
    # It waits roughly until the first cool-down ends, published as a countdown only when short
    at = row.next_attempt_at
    wait = ((at if at.tzinfo else at.replace(tzinfo=UTC)) - rt.now()).total_seconds()
    assert 30 * 0.9 <= wait <= 30 * 1.5 + 1
    published = [c for m, _, c in dispatcher.sends if m == mid and c is not None]
    assert published == ([] if wait > rt.settings.retry.max_countdown else [pytest.approx(wait)])


def test_a_message_past_its_age_fails_instead_of_waiting_for_a_circuit(rt: Runtime) -> None:
    for name in ("scripted_a", "scripted_b"):
        for _ in range(2):
            rt.circuits.record(name, ok=False, timeout=True)
    mid = send(rt, priority="high")  # high priority gives up after 300 s by default
    rt.now.now += timedelta(seconds=301)  # type: ignore[attr-defined]
    result = deliver(rt, mid)
    assert (result.action, result.status) == ("failed", S.FAILED)
    row = rt.store.get(mid)
    assert row is not None and row.error_code == ErrorCode.RETRIES_EXHAUSTED.value


def test_exhausted_retries_fail_over_and_the_next_provider_is_not_dead(rt: Runtime) -> None:
    # Circuit out of the way: this is about the retry budget and the poison-message guard
    rt.settings = rt.settings.with_overrides(circuit=CircuitPolicy(enabled=False))
    rt._circuits = None
    down = error(ProviderTransientError, "scripted_a", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=503)
    ScriptedProvider.down["scripted_a"] = down
    mid = send(rt)
    for _ in range(rt.settings.retry.max_attempts):
        rt.now.now += timedelta(seconds=700)  # type: ignore[attr-defined]
        deliver(rt, mid)
    # Five claims on scripted_a, then the sixth goes to scripted_b (more than max_deliveries claims)
    rt.now.now += timedelta(seconds=1)  # type: ignore[attr-defined]
    result = deliver(rt, mid)
    assert (result.action, result.provider) == ("sent", "scripted_b")
    outcomes = [(a.provider, a.outcome) for a in rt.store.attempts(mid)]
    assert outcomes == [("scripted_a", "retryable")] * 5 + [("scripted_b", "accepted")]


# -- kmsg circuits --------------------------------------------------------------------------------


def test_kmsg_circuits_shows_what_the_workers_share(
    redis_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    from kmsg_worker.cli import main

    for key in [k for k in os.environ if k.startswith("KMSG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("KMSG_REDIS_URL", redis_url)
    monkeypatch.setenv("KMSG_PROVIDERS", "mock,solapi")
    # The deployment's namespace (shared with the broker's keys) keeps other test sessions out
    prefix = f"test{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv("KMSG_BROKER_KEY_PREFIX", prefix)
    client = redis.Redis.from_url(redis_url)
    workers = RedisCircuitBreaker(client, CircuitPolicy(), prefix=f"{prefix}kmsg:cb:")
    for _ in range(CircuitPolicy().consecutive_failures):
        workers.record("solapi", ok=False, timeout=True)
    try:
        assert main(["circuits"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["PROVIDER", "STATE", "WINDOW", "CONSECUTIVE", "OPENED_AT", "RETRY_IN"]
        assert table[1].split()[:2] == ["mock", "closed"] and table[2].split()[:2] == ["solapi", "open"]
        assert main(["circuits", "--json"]) == 0
        states = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(s["provider"], s["state"]) for s in states] == [("mock", "closed"), ("solapi", "open")]
        assert 0 < states[1]["retry_in"] <= CircuitPolicy().cooldown
    finally:
        workers.reset("solapi")
        client.close()


def test_shared_state_lives_in_the_deployment_namespace(redis_url: str, tmp_path: Any) -> None:
    import redis

    from kmsg_worker.settings import Settings

    prefix = f"test{uuid.uuid4().hex[:8]}:"
    env = {"KMSG_VAR_DIR": str(tmp_path), "KMSG_REDIS_URL": redis_url, "KMSG_BROKER_KEY_PREFIX": prefix}
    rt = Runtime(Settings.from_env({**env, "KMSG_RATE_LIMITS": '{"mock": 5}'}))
    client = redis.Redis.from_url(redis_url)
    try:
        rt.circuits.record("mock", ok=False, timeout=True)
        rt.rate_limiter.try_acquire({"mock": (5.0, 1.0)})
        rt.router.counter("rr:SMS")
        keys = sorted(k.decode() for k in client.scan_iter(f"{prefix}*"))
        assert keys == [
            f"{prefix}kmsg:cb:mock",
            f"{prefix}kmsg:cb:mock:window",
            f"{prefix}kmsg:rl:mock",
            f"{prefix}kmsg:rr:SMS",
        ]
    finally:
        rt.close()
        client.delete(*client.scan_iter(f"{prefix}*"))
        client.close()
