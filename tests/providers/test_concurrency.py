"""Bounded concurrency in the adapters: partial failures inside a window of requests, over real HTTP.

A batch that needs many requests (IWINV SMS with a text per recipient, MMS, several Aligo
``/send_mass/`` requests) runs them at most ``max_in_flight`` at a time. These tests make one
request of a window fail in each way that matters and check, at the fake (its ledger counts every
acceptance per recipient), that:

* what the provider accepted is reported accepted, and never sent again;
* a request that timed out after the provider accepted it is reported *unknown* (reconciled,
  never resent), so it too reaches the recipient exactly once;
* what never left is reported "not sent" (retryable, not unknown), and sending those again
  delivers each exactly once;
* the number of requests in flight never exceeds the bound (the fake records the peak).

Every test ends with the retry a caller would do (only the messages neither accepted nor
unknown) and checks that every recipient got exactly one message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderNotAttempted,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, normalize
from kmsg_worker.providers.aligo import AligoProvider
from kmsg_worker.providers.base import DeliveryState, Provider, ProviderConfig, SendOutcome, counting_requests
from kmsg_worker.providers.base_http import DEFAULT_LIMITS, DEFAULT_MAX_IN_FLIGHT, make_http_client
from kmsg_worker.providers.iwinv import IwinvProvider
from kmsg_worker.settings import Settings
from kmsg_worker.testing.fake_aligo import FakeAligoServer
from kmsg_worker.testing.fake_iwinv import FAKE_API_KEY, FAKE_SMS_API_KEY, FAKE_SMS_AUTH_KEY, FakeIwinvServer
from kmsg_worker.testing.fakeserver import FakeRequest, FakeResponse, parse_multipart

SENDER = "0212345678"
IWINV_KEYS = {"api_key": FAKE_API_KEY, "sms_api_key": FAKE_SMS_API_KEY, "sms_auth_key": FAKE_SMS_AUTH_KEY}
#: Client read timeout in these tests; the "accepted, then silent" request answers after it.
CLIENT_TIMEOUT = 1.0


class Scripted:
    """Per-receiver misbehaviour for a fake: ``fail`` (503, nothing accepted), ``throttle`` (429,
    nothing accepted) or ``accept_then_hang`` (accepted and recorded, answered after the client
    gave up)."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        #: Hold a ``fail``/``throttle`` answer until this many requests were answered normally, so a
        #: test does not depend on where the scripted receiver lands in the window (rows are
        #: claimed in id order, which is random), only on the adapter's stop-after-refusal rule.
        self.hold_until_answered = 0
        self._answered = 0
        self._answered_changed = threading.Condition()

    def before(self, receivers: Sequence[str]) -> FakeResponse | None:
        for receiver in receivers:
            rule = self.rules.get(receiver)
            if rule in ("fail", "throttle"):
                self._hold()
            if rule == "fail":
                return FakeResponse(503, {"message": "scripted failure"})
            if rule == "throttle":
                return FakeResponse(429, {"message": "slow down"}, headers={"Retry-After": "3"})
        return None

    def after(self, receivers: Sequence[str]) -> None:
        if any(self.rules.get(r) == "accept_then_hang" for r in receivers):
            time.sleep(CLIENT_TIMEOUT + 0.5)
        with self._answered_changed:
            self._answered += 1
            self._answered_changed.notify_all()

    def _hold(self) -> None:
        with self._answered_changed:
            # bounded: a test whose batch has fewer requests than asked for fails on its own
            # assertions instead of hanging
            self._answered_changed.wait_for(
                lambda: self._answered >= self.hold_until_answered, timeout=CLIENT_TIMEOUT * 0.8
            )


class ScriptedIwinv(FakeIwinvServer):
    def __init__(self) -> None:
        super().__init__()
        self.script = Scripted()

    def handle(self, request: FakeRequest) -> FakeResponse:
        receivers = _iwinv_receivers(request)
        early = self.script.before(receivers)
        if early is not None:
            return early
        response = super().handle(request)
        self.script.after(receivers)
        return response


class ScriptedAligo(FakeAligoServer):
    def __init__(self) -> None:
        super().__init__(api_key="concurrency-key-4d2f", user_id="concurrency")
        self.script = Scripted()

    def handle(self, request: FakeRequest) -> FakeResponse:
        form = parse_multipart(request)
        receivers = [str(v) for k, v in form.items() if k.startswith("rec_") or k == "receiver"]
        early = self.script.before(receivers)
        if early is not None:
            return early
        response = super().handle(request)
        self.script.after(receivers)
        return response


def _iwinv_receivers(request: FakeRequest) -> list[str]:
    try:
        body = request.json()
    except ValueError:
        return []
    to = body.get("to") if isinstance(body, dict) else None
    return [str(t) for t in to] if isinstance(to, list) else []


@pytest.fixture
def iwinv() -> Iterator[ScriptedIwinv]:
    with ScriptedIwinv() as server:
        yield server


@pytest.fixture
def aligo() -> Iterator[ScriptedAligo]:
    with ScriptedAligo() as server:
        yield server


@pytest.fixture
def clients() -> Iterator[list[httpx.Client]]:
    made: list[httpx.Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def iwinv_provider(iwinv: ScriptedIwinv, clients: list[httpx.Client]) -> Callable[..., IwinvProvider]:
    def make(**options: Any) -> IwinvProvider:
        clients.append(make_http_client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=3.0)))
        config = ProviderConfig(
            name="iwinv", base_url=iwinv.url, credentials=IWINV_KEYS, options={"sender_number": SENDER, **options}
        )
        return IwinvProvider(config, clients[-1])

    return make


@pytest.fixture
def aligo_provider(aligo: ScriptedAligo, clients: list[httpx.Client]) -> Callable[..., AligoProvider]:
    def make(**options: Any) -> AligoProvider:
        clients.append(make_http_client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=3.0)))
        config = ProviderConfig(
            name="aligo",
            base_url=aligo.url,
            credentials={"api_key": aligo.api_key},
            options={"user_id": aligo.user_id, **options},
        )
        return AligoProvider(config, clients[-1])

    return make


def personalised(count: int, prefix: str = "0105") -> list[Message]:
    return [
        normalize({"to": f"{prefix}{i:07d}", "text": f"{i}번 고객님 안내", "type": "SMS", "sender": SENDER})
        for i in range(count)
    ]


def retry_what_never_left(provider: Provider, messages: Sequence[Message], outcomes: Sequence[SendOutcome]) -> None:
    """What a caller does next: resend only the messages neither accepted nor of unknown outcome."""
    again = [
        m
        for m, o in zip(messages, outcomes, strict=True)
        if not o.accepted and not isinstance(o.error, ProviderTimeout)
    ]
    if again:
        assert all(o.accepted for o in provider.send_batch(again))


def assert_each_delivered_once(fake: FakeIwinvServer | FakeAligoServer, messages: Sequence[Message]) -> None:
    per_recipient = fake.ledger.per_recipient
    assert {m.to.replace("+82", "0") for m in messages} == set(per_recipient)
    assert set(per_recipient.values()) == {1}


def assert_partition(outcomes: Sequence[SendOutcome], *, window_error: type[Exception]) -> None:
    """Accepted, the scripted failure, or "not sent"; never an unknown outcome besides a timeout."""
    for outcome in outcomes:
        if outcome.accepted:
            assert outcome.error is None and outcome.provider_message_id
        elif isinstance(outcome.error, ProviderTimeout):
            assert outcome.state is DeliveryState.UNKNOWN
        else:
            assert isinstance(outcome.error, (window_error, ProviderTransientError))
            assert outcome.state is DeliveryState.FAILED


# -- IWINV: a request per text ---------------------------------------------------------------------


def test_one_failing_request_of_a_window(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    # Given 40 personalised SMS (40 requests, 4 in flight) and the 6th request failing with a 503
    messages = personalised(40)
    iwinv.script.rules[messages[5].to] = "fail"
    iwinv.set_faults(latency_ms=20)
    provider = iwinv_provider(max_in_flight=4)

    # When the batch is sent
    outcomes = provider.send_batch(messages)

    # Then the failed one is a retryable error, nothing is of unknown outcome, no request started
    # after the failure, and every accepted message is at the fake once
    failed = outcomes[5]
    assert not failed.accepted and isinstance(failed.error, ProviderTransientError)
    assert failed.error.status_code == 503
    assert_partition(outcomes, window_error=ProviderTransientError)
    accepted = [o for o in outcomes if o.accepted]
    assert 5 <= len(accepted) < 40
    assert iwinv.ledger.per_recipient.total() == len(accepted)
    assert iwinv.peak_in_flight <= 4

    # And when the provider is back and only the rest is sent again, each recipient has one message
    iwinv.script.rules.clear()
    retry_what_never_left(provider, messages, outcomes)
    assert_each_delivered_once(iwinv, messages)


def test_a_request_accepted_then_timed_out_is_unknown_and_never_resent(
    iwinv: ScriptedIwinv, iwinv_provider: Any
) -> None:
    # Given the 3rd request accepted by the provider but answered only after the client's timeout
    # (at 100 ms a request, the other three slots cannot finish the batch while it hangs)
    messages = personalised(60)
    iwinv.script.rules[messages[2].to] = "accept_then_hang"
    iwinv.set_faults(latency_ms=100)
    provider = iwinv_provider(max_in_flight=4)

    outcomes = provider.send_batch(messages)

    # Then it is an unknown outcome (reconciled before any resend) and the requests never started
    # after it are "not sent", not unknown
    unknown = outcomes[2]
    assert isinstance(unknown.error, ProviderTimeout) and unknown.state is DeliveryState.UNKNOWN
    assert [o for o in outcomes if isinstance(o.error, ProviderTimeout)] == [unknown]
    assert_partition(outcomes, window_error=ProviderTransientError)
    assert any(not o.accepted and not isinstance(o.error, ProviderTimeout) for o in outcomes)

    # And resending only what never left gives every recipient exactly one message, the timed-out
    # one included (the provider had it)
    iwinv.script.rules.clear()
    retry_what_never_left(provider, messages, outcomes)
    assert_each_delivered_once(iwinv, messages)


def test_a_throttled_request_stops_the_window_and_nothing_is_lost(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    messages = personalised(30)
    iwinv.script.rules[messages[8].to] = "throttle"
    iwinv.set_faults(latency_ms=10)
    provider = iwinv_provider(max_in_flight=3)

    outcomes = provider.send_batch(messages)

    throttled = outcomes[8]
    assert isinstance(throttled.error, ProviderRateLimited) and throttled.error.retry_after == 3
    # Not started after the 429: held back with the same "rate limited, retry after" answer,
    # never "unknown", and marked as never attempted (no attempt spent)
    unsent = [o for o in outcomes if not o.accepted and o is not throttled]
    assert unsent and all(isinstance(o.error, ProviderNotAttempted) for o in unsent)
    assert all(o.error.code is ErrorCode.RATE_LIMIT_EXCEEDED and o.error.retry_after == 3 for o in unsent)  # type: ignore[union-attr]
    assert_partition(outcomes, window_error=ProviderRateLimited)
    assert iwinv.ledger.per_recipient.total() == sum(o.accepted for o in outcomes)

    iwinv.script.rules.clear()
    retry_what_never_left(provider, messages, outcomes)
    assert_each_delivered_once(iwinv, messages)


def test_a_first_failure_with_nothing_accepted_raises(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    # Every request fails: the caller gets one error for the batch (and its circuit breaker sees it)
    messages = personalised(12)
    iwinv.set_faults(error_rate=1.0, error_status=503)
    with pytest.raises(ProviderTransientError) as info:
        iwinv_provider(max_in_flight=4).send_batch(messages)
    assert info.value.status_code == 503
    assert iwinv.ledger.per_recipient.total() == 0


def test_the_bound_holds_and_is_reached(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    iwinv.set_faults(latency_ms=30)
    outcomes = iwinv_provider(max_in_flight=5).send_batch(personalised(40))
    assert all(o.accepted for o in outcomes)
    assert iwinv.peak_in_flight == 5


def test_the_bound_is_per_process_across_concurrent_batches(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    # Two tasks of one worker process sending through the same adapter share its bound
    iwinv.set_faults(latency_ms=30)
    provider = iwinv_provider(max_in_flight=3)
    batches = [personalised(15, prefix="0106"), personalised(15, prefix="0107")]
    results: list[list[SendOutcome]] = []
    threads = [threading.Thread(target=lambda b=b: results.append(provider.send_batch(b))) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2 and all(o.accepted for r in results for o in r)
    assert iwinv.peak_in_flight == 3
    assert_each_delivered_once(iwinv, [m for b in batches for m in b])


def test_default_bound(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    iwinv.set_faults(latency_ms=30)
    provider = iwinv_provider()
    assert provider.max_in_flight == DEFAULT_MAX_IN_FLIGHT
    assert all(o.accepted for o in provider.send_batch(personalised(3 * DEFAULT_MAX_IN_FLIGHT)))
    assert iwinv.peak_in_flight == DEFAULT_MAX_IN_FLIGHT


def test_the_requests_of_a_window_are_counted_for_the_call_that_made_them(
    iwinv: ScriptedIwinv, iwinv_provider: Any
) -> None:
    iwinv.set_faults(latency_ms=10)
    provider = iwinv_provider()
    counted: dict[str, int] = {}

    def send(prefix: str, messages: list[Message]) -> None:
        with counting_requests() as tally:
            assert all(o.accepted for o in provider.send_batch(messages))
        counted[prefix] = tally.count

    # Two calls at once through one adapter (its window's threads serve both): 12 personalised texts
    # are 12 requests, 30 receivers of one text one request; each call counts only its own
    same_text = [
        normalize({"to": f"0107{i:07d}", "text": "같은 안내", "type": "SMS", "sender": SENDER}) for i in range(30)
    ]
    threads = [
        threading.Thread(target=send, args=("0105", personalised(12))),
        threading.Thread(target=send, args=("0107", same_text)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counted == {"0105": 12, "0107": 1}
    assert iwinv.ledger.requests == 13
    # Outside a counting block nothing is counted and nothing fails
    assert all(o.accepted for o in provider.send_batch(personalised(2, prefix="0108")))


def test_mms_go_one_per_request_within_the_bound(iwinv: ScriptedIwinv, iwinv_provider: Any) -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    messages = [
        normalize(
            {
                "to": f"0108{i:07d}",
                "text": f"{i}번 이미지 안내",
                "type": "MMS",
                "sender": SENDER,
                "media": {"data_b64": png, "filename": "a.png"},
            }
        )
        for i in range(12)
    ]
    iwinv.set_faults(latency_ms=20)
    outcomes = iwinv_provider(max_in_flight=4).send_batch(messages)
    assert all(o.accepted for o in outcomes)
    assert iwinv.peak_in_flight == 4
    assert_each_delivered_once(iwinv, messages)


# -- Aligo: several /send_mass/ requests ------------------------------------------------------------

ALIGO_SENDERS = ("0212345678", "15881234", "01000000000")


def aligo_batch() -> list[Message]:
    # Three senders: three /send_mass/ requests of 5 personalised texts each
    return [
        normalize({"to": f"0109{s}{i:06d}", "text": f"{s}-{i} 고객님 안내", "type": "SMS", "sender": sender})
        for s, sender in enumerate(ALIGO_SENDERS)
        for i in range(5)
    ]


@pytest.mark.parametrize("rule", ["fail", "accept_then_hang", "throttle"])
def test_aligo_window_with_one_bad_request(aligo: ScriptedAligo, aligo_provider: Any, rule: str) -> None:
    messages = aligo_batch()
    aligo.script.rules[messages[7].to] = rule  # in the second request
    provider = aligo_provider(max_in_flight=3)

    outcomes = provider.send_batch(messages)

    bad = outcomes[5:10]
    others = outcomes[:5] + outcomes[10:]
    assert not any(o.accepted for o in bad)
    if rule == "accept_then_hang":
        assert all(isinstance(o.error, ProviderTimeout) for o in bad)
    else:
        assert all(o.state is DeliveryState.FAILED for o in bad)
    # All three were in flight together: the other two requests kept their answers
    assert all(o.accepted for o in others)
    assert aligo.peak_in_flight <= 3
    aligo.script.rules.clear()
    retry_what_never_left(provider, messages, outcomes)
    assert_each_delivered_once(aligo, messages)


# -- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", str((DEFAULT_LIMITS.max_connections or 0) + 1), "many", "-3"])
def test_a_bad_max_in_flight_stops_the_process_at_start(value: str) -> None:
    env = {"KMSG_PROVIDERS": "iwinv", "KMSG_IWINV_API_KEY": "k", "KMSG_IWINV_MAX_IN_FLIGHT": value}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert info.value.variable == "KMSG_IWINV_MAX_IN_FLIGHT"


def test_max_in_flight_comes_from_the_environment() -> None:
    env = {"KMSG_PROVIDERS": "aligo", "KMSG_ALIGO_API_KEY": "k", "KMSG_ALIGO_USER_ID": "u"}
    settings = Settings.from_env({**env, "KMSG_ALIGO_MAX_IN_FLIGHT": "3"})
    with httpx.Client() as client:
        assert AligoProvider(settings.provider_config("aligo"), client).max_in_flight == 3
        default = Settings.from_env(env).provider_config("aligo")
        assert AligoProvider(default, client).max_in_flight == DEFAULT_MAX_IN_FLIGHT
