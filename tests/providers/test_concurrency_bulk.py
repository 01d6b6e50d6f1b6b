"""A bulk chunk whose provider requests run concurrently, one of them failing: what PostgreSQL records.

``send_many`` stores 40 personalised SMS for IWINV (one request per text, 4 in flight), and the
chunk is processed by the real bulk path (``process_chunk``) against a fake IWINV on loopback that
misbehaves for one recipient. The rows must say what happened: accepted ones ``sent`` with one
accepted attempt each; the failed and never-started ones ``retrying`` and not marked
outcome-unknown; a request that timed out after IWINV accepted it ends ``unknown`` (IWINV cannot be
asked by our id) and is never sent again. Processing the chunk again once the retries are due
delivers every other message, and the fake holds each recipient exactly once.

The same for Aligo, whose chunk is larger than one request: 2,000 personalised SMS are one chunk
and one ``send_batch`` call, four ``/send_mass/`` requests of 500 with two in flight, the second
to arrive failing.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from kmsg_worker.delivery import process_chunk
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.aligo import MASS_BATCH_LIMIT, AligoProvider
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.iwinv import IwinvProvider
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import Attempt, MessageRow
from kmsg_worker.testing.fakeserver import FakeRequest, FakeResponse, parse_multipart
from kmsg_worker.testing.servers import fake_env
from tests.conftest import Clock, RecordingDispatcher, truncate
from tests.providers.test_concurrency import CLIENT_TIMEOUT, ScriptedAligo, ScriptedIwinv


@pytest.fixture
def fake() -> Iterator[ScriptedIwinv]:
    with ScriptedIwinv() as server:
        yield server


@pytest.fixture
def make_runtime(pg_url: str, settings_factory: Any, fake: ScriptedIwinv) -> Iterator[Any]:
    truncate(pg_url)
    made: list[Runtime] = []
    clients: list[httpx.Client] = []

    def make() -> tuple[Runtime, RecordingDispatcher, Clock]:
        dispatcher, clock = RecordingDispatcher(), Clock()
        env = {
            **fake_env({"iwinv": fake}),
            "KMSG_PROVIDERS": "iwinv",
            "KMSG_IWINV_MAX_IN_FLIGHT": "4",
        }
        rt = Runtime(settings_factory(pg_url, **env), dispatcher=dispatcher, clock=clock)
        # The process's adapter, on a client that gives up after CLIENT_TIMEOUT (the hanging request)
        client = make_http_client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=3.0))
        clients.append(client)
        rt.set_provider("iwinv", IwinvProvider(rt.settings.provider_config("iwinv"), client))
        made.append(rt)
        return rt, dispatcher, clock

    yield make
    for rt in made:
        rt.close()
    for client in clients:
        client.close()


def rows(rt: Runtime, batch_id: str) -> list[MessageRow]:
    with rt.store.sessions() as s:
        return list(s.scalars(select(MessageRow).where(MessageRow.batch_id == batch_id).order_by(MessageRow.recipient)))


def accepted_attempts(rt: Runtime) -> Counter[str]:
    with rt.store.sessions() as s:
        return Counter(s.scalars(select(Attempt.message_id).where(Attempt.outcome == "accepted")))


def send_and_process(rt: Runtime, dispatcher: RecordingDispatcher, count: int) -> str:
    receipt = KMsg(runtime=rt).send_many(
        [{"to": f"0105{i:07d}", "variables": {"n": str(i)}} for i in range(count)],
        defaults={"text": "#{n}번 고객님 안내", "sender": "0212345678", "type": "SMS"},
    )
    for batch_id, chunk, _ in list(dispatcher.chunks):
        process_chunk(rt, batch_id, chunk)
    return receipt.batch_id


def process_again(rt: Runtime, clock: Clock, batch_id: str) -> None:
    clock.advance(3600)  # every retry is due
    chunks = {r.chunk for r in rows(rt, batch_id) if r.status == "retrying"}
    for chunk in chunks:
        process_chunk(rt, batch_id, chunk)


@pytest.mark.parametrize("rule", ["fail", "throttle"])
def test_a_failed_or_throttled_request_in_a_chunk(make_runtime: Any, fake: ScriptedIwinv, rule: str) -> None:
    rt, dispatcher, clock = make_runtime()
    fake.script.rules["01050000005"] = rule
    fake.script.hold_until_answered = 5  # wherever the bad receiver lands among the 40 requests
    fake.set_faults(latency_ms=20)

    batch_id = send_and_process(rt, dispatcher, 40)

    stored = rows(rt, batch_id)
    by_status = Counter(r.status for r in stored)
    assert set(by_status) == {"sent", "retrying"}
    assert by_status["sent"] == fake.ledger.per_recipient.total() >= 5
    assert not any(r.outcome_unknown for r in stored)
    bad = next(r for r in stored if r.recipient == "01050000005")
    assert bad.status == "retrying"
    # only a request the provider refused for itself spends an attempt: a 503 does, a 429 does not,
    # and the requests held back behind either never left
    assert bad.provider_attempts == (1 if rule == "fail" else 0)
    held_back = [r for r in stored if r.status == "retrying" and r is not bad]
    assert held_back and all(r.provider_attempts == 0 for r in held_back)
    assert all("not sent because an earlier request" in (r.error_message or "") for r in held_back)
    attempts = accepted_attempts(rt)
    assert all(attempts[r.id] == 1 for r in stored if r.status == "sent")

    fake.script.rules.clear()
    process_again(rt, clock, batch_id)

    assert Counter(r.status for r in rows(rt, batch_id)) == {"sent": 40}
    assert set(fake.ledger.per_recipient.values()) == {1} and len(fake.ledger.per_recipient) == 40
    assert set(accepted_attempts(rt).values()) == {1}


def test_a_request_accepted_then_timed_out_ends_unknown_and_is_never_resent(
    make_runtime: Any, fake: ScriptedIwinv
) -> None:
    rt, dispatcher, clock = make_runtime()
    fake.script.rules["01050000002"] = "accept_then_hang"
    fake.set_faults(latency_ms=100)  # the other slots cannot finish the chunk while it hangs

    batch_id = send_and_process(rt, dispatcher, 60)

    stored = rows(rt, batch_id)
    hung = next(r for r in stored if r.recipient == "01050000002")
    assert hung.status == "unknown" and hung.error_code == "OUTCOME_UNKNOWN"
    # Which others were still unsent when it hung depends on where it fell among the claimed rows
    # (their order is the table's, not the batch's): none, if it was the last request.
    others = Counter(r.status for r in stored if r is not hung)
    assert set(others) <= {"sent", "retrying"} and others["sent"] >= 1
    assert not any(r.outcome_unknown for r in stored if r.status == "retrying")

    fake.script.rules.clear()
    process_again(rt, clock, batch_id)

    final = Counter(r.status for r in rows(rt, batch_id))
    assert final == {"sent": 59, "unknown": 1}
    # IWINV had the timed-out one: every recipient holds exactly one message
    assert set(fake.ledger.per_recipient.values()) == {1} and len(fake.ledger.per_recipient) == 60


# -- Aligo: a chunk of several /send_mass/ requests ----------------------------------------------


class FailsSecondMassRequest(ScriptedAligo):
    """Fails (503) the ``/send_mass/`` request that arrives second, once one other was answered.

    Which rows a request carries depends on the claim's row order, so the failing request is
    chosen by arrival instead: with two in flight, the first two arrive together and the second
    fails once the first was answered. The third starts only if the first's answer reaches the
    adapter before the failure does; the fourth never starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.arrivals = 0
        self._arrivals_lock = threading.Lock()

    def handle(self, request: FakeRequest) -> FakeResponse:
        if request.path.rstrip("/") == "/send_mass":
            with self._arrivals_lock:
                self.arrivals += 1
                second = self.arrivals == 2
            if second:
                receivers = [str(v) for k, v in parse_multipart(request).items() if k.startswith("rec_")]
                self.script.rules[receivers[0]] = "fail"
        return super().handle(request)


@pytest.fixture
def aligo_fake() -> Iterator[FailsSecondMassRequest]:
    with FailsSecondMassRequest() as server:
        yield server


@pytest.fixture
def aligo_runtime(pg_url: str, settings_factory: Any, aligo_fake: FailsSecondMassRequest) -> Iterator[Any]:
    truncate(pg_url)
    dispatcher, clock = RecordingDispatcher(), Clock()
    env = {
        **fake_env({"aligo": aligo_fake}),
        "KMSG_PROVIDERS": "aligo",
        "KMSG_ALIGO_API_KEY": aligo_fake.api_key,
        "KMSG_ALIGO_USER_ID": aligo_fake.user_id,
        "KMSG_ALIGO_MAX_IN_FLIGHT": "2",
    }
    rt = Runtime(settings_factory(pg_url, **env), dispatcher=dispatcher, clock=clock)
    client = make_http_client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=3.0))
    rt.set_provider("aligo", AligoProvider(rt.settings.provider_config("aligo"), client))
    yield rt, dispatcher, clock
    rt.close()
    client.close()


def test_an_aligo_chunk_of_several_send_mass_requests_with_one_failing(
    aligo_runtime: Any, aligo_fake: FailsSecondMassRequest
) -> None:
    rt, dispatcher, clock = aligo_runtime
    aligo_fake.script.hold_until_answered = 1
    aligo_fake.set_faults(latency_ms=50)  # a third request, if started, is still out when the second fails
    assert rt.provider("aligo").send_batch_limit == 2_000  # 1,000 a request x 2 in flight

    # Given 2,000 personalised SMS: one chunk, more than one request's 1,000
    receipt = KMsg(runtime=rt).send_many(
        [{"to": f"0105{i:07d}", "variables": {"n": str(i)}} for i in range(2_000)],
        defaults={"text": "#{n}번 고객님 안내", "sender": "0212345678", "type": "SMS"},
    )
    [(batch_id, chunk, _)] = dispatcher.chunks

    # When the chunk runs
    result = process_chunk(rt, batch_id, chunk)

    # Then it was one send_batch call of /send_mass/ requests (four planned), two in flight at most,
    # none started after the failure but the one already on its way; the chunk counts each that left
    assert result.claimed == 2_000
    assert aligo_fake.arrivals in (2, 3) and aligo_fake.peak_in_flight == 2
    assert result.requests == aligo_fake.arrivals
    stored = rows(rt, receipt.batch_id)
    assert not any(r.outcome_unknown for r in stored)
    sent = [r for r in stored if r.status == "sent"]
    failed = [r for r in stored if r.status == "retrying" and r.provider_attempts == 1]
    held_back = [r for r in stored if r.status == "retrying" and r.provider_attempts == 0]
    assert len(sent) + len(failed) + len(held_back) == 2_000
    # the answered requests are recorded, each message once at the fake and one accepted attempt each
    assert len(sent) == (aligo_fake.arrivals - 1) * MASS_BATCH_LIMIT
    assert aligo_fake.ledger.per_recipient.total() == len(sent)
    assert set(aligo_fake.ledger.per_recipient.values()) == {1}
    attempts = accepted_attempts(rt)
    assert all(attempts[r.id] == 1 for r in sent)
    # the failed request spent its messages' attempt; the ones held back behind it spent none
    assert len(failed) == MASS_BATCH_LIMIT
    assert {r.error_message for r in failed} == {"aligo: HTTP 503 Service Unavailable"}
    assert len(held_back) >= MASS_BATCH_LIMIT
    assert all("not sent because an earlier request" in (r.error_message or "") for r in held_back)

    # And when the provider is fine again and the retries are due, the rest goes out once
    aligo_fake.script.rules.clear()
    aligo_fake.arrivals = 100  # no second arrival to fail any more
    process_again(rt, clock, receipt.batch_id)

    assert Counter(r.status for r in rows(rt, receipt.batch_id)) == {"sent": 2_000}
    assert len(aligo_fake.ledger.per_recipient) == 2_000 and set(aligo_fake.ledger.per_recipient.values()) == {1}
    assert set(accepted_attempts(rt).values()) == {1}
