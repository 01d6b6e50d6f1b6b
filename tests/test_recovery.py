"""Recovery of unknown outcomes terminates: an undecided look-up backs off and, in the end, the message is final.

A provider whose look-up keeps failing used to leave the message ``retrying`` for ever, asked
again every few seconds. Now each undecided look-up is counted on the message, the wait between
them doubles, and after ``KMSG_RECONCILE_MAX_CHECKS`` the message ends ``unknown`` with
``OUTCOME_UNDECIDED``: never resent (the provider may have it), never asked again. The single send
and the bulk chunk share the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from kmsg_worker.delivery import deliver, process_chunk
from kmsg_worker.delivery.recovery import undecided_delay
from kmsg_worker.errors import ErrorCode, ProviderTransientError
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.base import SendOutcome
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import FINAL
from tests.conftest import Clock, RecordingDispatcher

MAX_CHECKS = 4


@pytest.fixture
def rt(backend_url: str, settings_factory: Any) -> Iterator[tuple[Runtime, Clock]]:
    settings = settings_factory(backend_url, KMSG_RECONCILE_MAX_CHECKS=str(MAX_CHECKS), KMSG_CIRCUIT_ENABLED="false")
    runtime = Runtime(settings, dispatcher=RecordingDispatcher())
    clock = Clock()
    runtime.now = clock
    yield runtime, clock
    runtime.close()


class LookupDown:
    """Stands in for the mock's look-up: always fails, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ids: Sequence[str], hints: Any = None) -> dict[str, SendOutcome]:
        self.calls += 1
        raise ProviderTransientError("mock: look-up unavailable", provider="mock", code=ErrorCode.PROVIDER_ERROR)


def _settle(runtime: Runtime, clock: Clock, message_id: str, run: Callable[[], Any]) -> list[float]:
    """Run until the message is final; return the waits it was given on the way."""
    waits: list[float] = []
    for _ in range(3 * MAX_CHECKS):
        run()
        row = runtime.store.get(message_id)
        assert row is not None
        if row.status in FINAL:
            break
        assert row.next_attempt_at is not None
        wait = (row.next_attempt_at - clock.now).total_seconds()
        waits.append(round(wait, 3))
        clock.advance(wait)
    return waits


@pytest.mark.parametrize("path", ["single", "chunk"])
def test_an_undecided_lookup_backs_off_then_ends_unknown_without_a_resend(
    rt: tuple[Runtime, Clock], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    runtime, clock = rt
    kmsg = KMsg(runtime=runtime)
    # Given a message whose request timed out (the provider never got it) and a look-up that never answers
    message = {"to": "01012345678", "text": "hi", "provider_options": {"mock": {"script": [{"outcome": "timeout"}]}}}
    if path == "single":
        message_id = kmsg.send(message).message_id
        run: Callable[[], Any] = lambda: deliver(runtime, message_id)  # noqa: E731
    else:
        receipt = kmsg.send_many([message])
        message_id, batch_id = receipt.message_ids[0], receipt.batch_id
        assert batch_id is not None
        run = lambda: process_chunk(runtime, batch_id, 0)  # noqa: E731
    provider = runtime.provider("mock")
    assert isinstance(provider, MockProvider)
    lookups = LookupDown()
    monkeypatch.setattr(provider, "lookup", lookups)
    # When it is run until it settles
    waits = _settle(runtime, clock, message_id, run)
    # Then it was asked MAX_CHECKS times, with doubling waits, and ended unknown without a second send
    row = runtime.store.get(message_id)
    assert row is not None
    assert (row.status, row.error_code) == ("unknown", "OUTCOME_UNDECIDED")
    assert lookups.calls == MAX_CHECKS
    assert waits == [2.0] + [undecided_delay(n) for n in range(1, MAX_CHECKS)]
    assert waits[1:] == sorted(waits[1:]) and waits[-1] == 2 * waits[-2]
    assert provider.calls_for(message_id) == 1
    assert [a.outcome for a in runtime.store.attempts(message_id)] == ["timeout"]
    # and nothing wakes it again
    run()
    assert lookups.calls == MAX_CHECKS


def test_an_undecided_lookup_that_answers_in_the_end_sends_once(
    rt: tuple[Runtime, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, clock = rt
    kmsg = KMsg(runtime=runtime)
    message = {"to": "01012345678", "text": "hi", "provider_options": {"mock": {"script": [{"outcome": "timeout"}]}}}
    message_id = kmsg.send(message).message_id
    provider = runtime.provider("mock")
    assert isinstance(provider, MockProvider)
    real = provider.lookup
    lookups = LookupDown()
    monkeypatch.setattr(provider, "lookup", lookups)
    # Given two undecided look-ups
    deliver(runtime, message_id)
    for _ in range(2):
        row = runtime.store.get(message_id)
        assert row is not None and row.next_attempt_at is not None
        clock.advance((row.next_attempt_at - clock.now).total_seconds())
        deliver(runtime, message_id)
    assert lookups.calls == 2
    # When the look-up answers "not here"
    monkeypatch.setattr(provider, "lookup", real)
    row = runtime.store.get(message_id)
    assert row is not None and row.status == "retrying" and row.check_count == 2 and row.next_attempt_at is not None
    clock.advance((row.next_attempt_at - clock.now).total_seconds())
    deliver(runtime, message_id)
    # Then it is sent once, and its count of undecided look-ups starts over
    row = runtime.store.get(message_id)
    assert row is not None and row.status == "sent" and row.check_count == 0
    assert [a.outcome for a in runtime.store.attempts(message_id)] == ["timeout", "reconciled_missing", "accepted"]
    assert provider.calls_for(message_id) == 2  # the timed-out call (never taken) and the send


def test_a_partly_undecided_lookup_records_what_it_found_and_waits_only_for_the_rest(
    rt: tuple[Runtime, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.providers.base import ProviderLookupUndecided

    runtime, clock = rt
    kmsg = KMsg(runtime=runtime)
    # Given a chunk of three whose request timed out
    timeout = {"mock": {"script": [{"outcome": "timeout"}]}}
    receipt = kmsg.send_many([{"to": f"0101234000{i}", "text": "hi", "provider_options": timeout} for i in range(3)])
    assert receipt.batch_id is not None
    found_id, undecided_id, missing_id = receipt.message_ids
    process_chunk(runtime, receipt.batch_id, 0)
    assert runtime.store.count_by_status() == {"retrying": 3}
    provider = runtime.provider("mock")
    assert isinstance(provider, MockProvider)

    # When the look-up finds one, cannot decide one, and says nothing of the third
    def partly(ids: Sequence[str], hints: Any = None) -> dict[str, SendOutcome]:
        assert hints is not None and set(hints) == set(ids)  # every row goes with what is known of it
        assert hints[found_id].to == "01012340000"
        raise ProviderLookupUndecided(
            "mock: window too wide",
            provider="mock",
            found={found_id: SendOutcome(found_id, True, "pm-found")},
            undecided=[undecided_id],
        )

    monkeypatch.setattr(provider, "lookup", partly)
    clock.advance(2.0)
    process_chunk(runtime, receipt.batch_id, 0)
    # Then the found one is sent (not resent), the undecided one waits, counted, and the third is sent now
    rows = {i: runtime.store.get(i) for i in receipt.message_ids}
    assert rows[found_id] is not None and rows[found_id].status == "sent"  # type: ignore[union-attr]
    assert rows[found_id].provider_message_id == "pm-found"  # type: ignore[union-attr]
    assert (rows[undecided_id].status, rows[undecided_id].check_count) == ("retrying", 1)  # type: ignore[union-attr]
    assert rows[undecided_id].outcome_unknown  # type: ignore[union-attr]
    assert rows[missing_id].status == "sent"  # type: ignore[union-attr]
    assert provider.calls_for(found_id) == 1 and provider.calls_for(undecided_id) == 1
    assert provider.calls_for(missing_id) == 2
