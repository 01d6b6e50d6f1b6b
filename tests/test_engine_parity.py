"""Parity of the one delivery engine: a single send and a bulk chunk decide and record alike.

Each case scripts one provider behaviour (through the mock provider's per-message script) and runs
it twice on the same settings: as a single send (``deliver``) and as a row of a bulk chunk
(``process_chunk``, with two plain rows beside it). Between runs the clock moves to the message's
``next_attempt_at``. The two paths must leave the message with the same trail of states and retry
delays, the same attempt rows and the same final state. Select with ``pytest -k parity``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from kmsg_worker.delivery import deliver, process_chunk
from kmsg_worker.message import Message
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.providers.registry import PROVIDER_ALIASES, register_provider
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import FINAL, MessageStatus
from tests.conftest import Clock, RecordingDispatcher


class AlwaysAccepts(MockProvider):
    """A second provider of the route that accepts everything (scripts are the first provider's)."""

    name: ClassVar[str] = "mock_parity"

    def _script_step(self, message: Message, call_no: int) -> Mapping[str, Any]:
        return {"outcome": "success"}


if "mock_parity" not in PROVIDER_ALIASES:
    register_provider("mock_parity", "tests.test_engine_parity:AlwaysAccepts")


@dataclass(frozen=True)
class Case:
    """One provider behaviour and the settings it runs under."""

    name: str
    script: list[dict[str, Any]]
    env: dict[str, str] = field(default_factory=dict)
    #: The final state both paths must reach, and the attempt outcomes on the way.
    final: str = "sent"
    outcomes: tuple[str, ...] = ()


FAILOVER_ROUTE = {"KMSG_PROVIDERS": "mock,mock_parity"}
CASES = [
    Case("accepted", [], outcomes=("accepted",)),
    Case(
        "5xx then success",
        [{"outcome": "failure", "code": "NETWORK_SERVICE_UNAVAILABLE", "http_status": 503}],
        outcomes=("retryable", "accepted"),
    ),
    Case(
        "429 with Retry-After",
        [{"outcome": "failure", "code": "RATE_LIMIT_EXCEEDED", "http_status": 429, "retry_after": 7}],
        outcomes=("retryable", "accepted"),
    ),
    Case(
        # a throttle is not the message's failure: more 429s than the attempt budget, still no failover
        "429s do not spend attempts",
        [{"outcome": "failure", "code": "RATE_LIMIT_EXCEEDED", "http_status": 429, "retry_after": 2}] * 3,
        env={**FAILOVER_ROUTE, "KMSG_RETRY_MAX_ATTEMPTS": "2"},
        outcomes=("retryable", "retryable", "retryable", "accepted"),
    ),
    Case(
        "timeout, the provider holds the message",
        [{"outcome": "lost_response"}],
        outcomes=("timeout", "reconciled_sent"),
    ),
    Case(
        "timeout, the provider never got it",
        [{"outcome": "timeout"}],
        outcomes=("timeout", "reconciled_missing", "accepted"),
    ),
    Case(
        "auth refusal fails over",
        [{"outcome": "failure", "code": "AUTHENTICATION_FAILED", "http_status": 401, "provider_code": "401"}],
        env=FAILOVER_ROUTE,
        outcomes=("rejected", "accepted"),
    ),
    Case(
        "invalid number",
        [{"outcome": "failure", "code": "INVALID_RECIPIENT", "provider_code": "3008"}],
        env=FAILOVER_ROUTE,
        final="failed",
        outcomes=("rejected",),
    ),
    Case(
        "operator override makes a code retryable",
        [{"outcome": "failure", "code": "INSUFFICIENT_BALANCE", "provider_code": "B-1"}],
        env={"KMSG_RETRY_POLICY": json.dumps({"retryable_codes": ["mock:B-1"]})},
        outcomes=("retryable", "accepted"),
    ),
    Case(
        "per-type max attempts",
        [{"outcome": "failure", "code": "NETWORK_SERVICE_UNAVAILABLE", "http_status": 503}] * 5,
        env={"KMSG_RETRY_BY_TYPE": json.dumps({"SMS": {"max_attempts": 2}})},
        final="failed",
        outcomes=("retryable", "retryable"),
    ),
    Case(
        "retries exhausted fail over",
        [{"outcome": "failure", "code": "PROVIDER_ERROR", "http_status": 500}] * 5,
        env={**FAILOVER_ROUTE, "KMSG_RETRY_MAX_ATTEMPTS": "2"},
        outcomes=("retryable", "retryable", "accepted"),
    ),
]


@dataclass
class Trail:
    """What one path did to the case's message: the state and retry delay after each run, then the rows."""

    steps: list[tuple[str, float | None]] = field(default_factory=list)
    final: tuple[Any, ...] = ()
    attempts: list[tuple[Any, ...]] = field(default_factory=list)


@pytest.fixture
def make_runtime(backend_url: str, settings_factory: Any) -> Iterator[Any]:
    made: list[Runtime] = []

    def make(env: Mapping[str, str]) -> tuple[Runtime, Clock]:
        base = {"KMSG_RETRY_JITTER": "0", "KMSG_CIRCUIT_ENABLED": "false", **env}
        rt = Runtime(settings_factory(backend_url, **base), dispatcher=RecordingDispatcher())
        clock = Clock()
        rt.now = clock
        made.append(rt)
        return rt, clock

    yield make
    for rt in made:
        rt.close()


def _follow(rt: Runtime, clock: Clock, message_id: str, run: Any) -> Trail:
    """Run the path until the message is final or sent; after each run note its state and wait."""
    trail = Trail()
    for _ in range(12):
        run()
        row = rt.store.get(message_id)
        assert row is not None
        wait = None
        if row.status == MessageStatus.RETRYING and row.next_attempt_at is not None:
            wait = round((row.next_attempt_at - clock.now).total_seconds(), 3)
        trail.steps.append((row.status, wait))
        if row.status in FINAL or row.status == MessageStatus.SENT:
            break
        clock.advance(wait or 0.0)
    row = rt.store.get(message_id)
    assert row is not None
    trail.final = (row.status, row.provider, row.attempts, row.provider_attempts, row.route_index, row.error_code)
    trail.attempts = [
        (a.attempt_no, a.provider, a.outcome, a.error_code, a.provider_code, a.http_status)
        for a in rt.store.attempts(message_id)
    ]
    return trail


def _message(case: Case, to: str) -> dict[str, Any]:
    return {"to": to, "text": "parity", "provider_options": {"mock": {"script": case.script}}}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_single_send_and_bulk_chunk_record_the_same(case: Case, make_runtime: Any) -> None:
    # Given the same settings and the same provider behaviour for both paths
    rt_single, clock_single = make_runtime(case.env)
    single = KMsg(runtime=rt_single).send(_message(case, "01012345678"))
    rt_bulk, clock_bulk = make_runtime(case.env)
    receipt = KMsg(runtime=rt_bulk).send_many(
        [_message(case, "01012345678"), {"to": "01022223333", "text": "plain"}, {"to": "01044445555", "text": "plain"}]
    )
    assert receipt.batch_id is not None
    batch_id = receipt.batch_id
    # When each path runs until the message settles
    one = _follow(rt_single, clock_single, single.message_id, lambda: deliver(rt_single, single.message_id))
    many = _follow(rt_bulk, clock_bulk, receipt.message_ids[0], lambda: process_chunk(rt_bulk, batch_id, 0))
    # Then both took the same steps, with the same waits, and recorded the same attempts and end state
    assert one.steps == many.steps
    assert one.attempts == many.attempts
    assert one.final == many.final
    assert one.final[0] == case.final
    assert tuple(a[2] for a in one.attempts) == case.outcomes


def _wakes(dispatcher: RecordingDispatcher) -> Sequence[float | None]:
    return [countdown for _, _, countdown in dispatcher.sends] + [c for _, _, c in dispatcher.chunks]


def test_parity_wakes_ride_the_same_countdowns(make_runtime: Any) -> None:
    # Given a 429 with Retry-After on both paths
    case = CASES[2]
    rt_single, _ = make_runtime({})
    rt_bulk, _ = make_runtime({})
    single = KMsg(runtime=rt_single).send(_message(case, "01012345678"))
    receipt = KMsg(runtime=rt_bulk).send_many([_message(case, "01012345678")])
    assert receipt.batch_id is not None
    # When each runs once
    deliver(rt_single, single.message_id)
    process_chunk(rt_bulk, receipt.batch_id, 0)
    # Then each asks to be woken after the provider's Retry-After, the single by its task, the chunk by its own
    single_wakes = _wakes(rt_single.dispatcher)  # type: ignore[arg-type]
    bulk_wakes = _wakes(rt_bulk.dispatcher)  # type: ignore[arg-type]
    assert single_wakes[-1] == bulk_wakes[-1] == 7.0
