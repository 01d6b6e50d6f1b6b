"""Bulk intake and chunk processing on SQLite and PostgreSQL (recording dispatcher, mock provider)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import sql
from sqlalchemy import event, func, select

from bench.tracking_index import explain
from kmsg_worker.delivery import process_chunk
from kmsg_worker.errors import BatchValidationError, ConfigurationError, InvalidStateError
from kmsg_worker.intake import _Template, _TemplateText
from kmsg_worker.message import count_bytes, interpolate, normalize
from kmsg_worker.producer import KMsg
from kmsg_worker.providers.mock import MockProvider
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.models import Batch, ChunkLease, MessageRow
from kmsg_worker.sweeps import sweep
from tests.conftest import Clock, RecordingDispatcher, truncate


def mock(rt: Runtime) -> MockProvider:
    provider = rt.provider("mock")
    assert isinstance(provider, MockProvider)
    return provider


def recipients(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"to": f"010{start + i:08d}", "variables": {"name": f"고객{i}"}} for i in range(n)]


DEFAULTS = {"text": "#{name}님, 겨울 세일 쿠폰이 도착했습니다", "sender": "0212345678"}


def run_all_chunks(rt: Runtime, dispatcher: RecordingDispatcher) -> None:
    for batch_id, chunk, _ in list(dispatcher.chunks):
        process_chunk(rt, batch_id, chunk)


class SliceWrites:
    """Stands in for intake's slice writer: records each slice's size, and can lose the database.

    ``fail_at``: the write (counted from 1) that raises as a dropped connection would; ``before``:
    called with each slice's row count before it is written. :meth:`heal` puts the real writer back.
    """

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        slice_size: int = 10,
        fail_at: int | None = None,
        before: Any = None,
    ) -> None:
        import kmsg_worker.intake as intake
        import kmsg_worker.storage.intake as writes

        self.writes, self.monkeypatch = writes, monkeypatch
        self.original = writes._write
        self.sizes: list[int] = []
        self.fail_at = fail_at
        self.before = before
        monkeypatch.setattr(intake, "SLICE", slice_size)
        monkeypatch.setattr(writes, "_write", self)

    def __call__(self, store: Any, data: Any, *args: Any, **kwargs: Any) -> None:
        if self.before is not None:
            self.before(data.count)
        self.sizes.append(data.count)
        if len(self.sizes) == self.fail_at:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("COPY", {}, Exception("server closed the connection"))
        self.original(store, data, *args, **kwargs)

    def heal(self) -> None:
        self.monkeypatch.setattr(self.writes, "_write", self.original)


def test_batch_is_stored_in_chunks_and_each_chunk_is_one_request(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    # Given 2,500 recipients and chunks of 1,000
    receipt = kmsg.send_many(recipients(2500), defaults=DEFAULTS, chunk_size=1000)
    # Then three chunk tasks carrying (batch_id, chunk) only were published, and no single sends
    assert sorted(c for _, c, _ in dispatcher.chunks) == [0, 1, 2]
    assert dispatcher.sends == []
    assert runtime.store.count_by_status() == {"queued": 2500}
    # When every chunk runs
    run_all_chunks(runtime, dispatcher)
    # Then each chunk was one provider request and every recipient was accepted once
    assert mock(runtime).requests == 3
    assert runtime.store.count_by_status() == {"sent": 2500}
    summary = kmsg.batch_summary(receipt.batch_id)
    assert summary.total == 2500 and summary.by_status == {"sent": 2500}
    assert summary.by_provider == {"mock": 2500} and summary.by_type == {"SMS": 2500}
    assert summary.cost_estimate_krw == pytest.approx(2500 * 9.9)
    assert summary.done


def test_fast_path_builds_exactly_what_normalize_builds(runtime: Runtime) -> None:
    now = datetime.now(UTC)
    defaults = {"text": "#{name}님 " + "가" * 40, "sender": "02-1234-5678", "priority": "bulk"}
    template = _Template(runtime, defaults, now)
    assert template.ok
    for item in [
        {"to": "010-1111-2222", "variables": {"name": "김"}},
        {"to": "01033334444", "variables": {"name": "남궁" * 5}},  # crosses 90 bytes: LMS
        {"to": "+82 10 5555 6666", "variables": {"name": 7}, "custom_fields": {"order": 1}},
    ]:
        fast = template.build({**item, "id": "x1"})
        full = normalize({**defaults, **item, "id": "x1"}, now=now).content()
        assert fast == full


@pytest.mark.parametrize(
    "text",
    [
        "#{name}님, #{item} 쿠폰이 도착했습니다",
        "#{a}#{b}#{a}",  # adjacent and repeated tokens, nothing between them
        "앞 #{missing} 뒤",  # a key no row gives stays as written
        "no tokens at all, 토큰 없음",
        "#{name",  # not a token
        "😀 #{name} 😀",  # surrogate pairs count 4 bytes each
    ],
)
def test_template_text_renders_and_counts_like_interpolate_and_count_bytes(text: str) -> None:
    compiled = _TemplateText(text)
    for variables in (
        {},
        {"name": "김", "item": "겨울", "a": "1", "b": "#{a}"},  # a value holding a token is not expanded
        {"name": "😀x", "a": "", "b": "가나"},
    ):
        rendered, nbytes = compiled.render(variables)
        assert rendered == interpolate(text, variables)
        assert nbytes == count_bytes(rendered)


def test_invalid_rows_reject_the_batch_or_are_skipped(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    rows = recipients(10)
    rows[3] = {"to": "12"}
    rows[7] = {"to": "01012345678", "variables": "oops"}
    with pytest.raises(BatchValidationError) as info:
        kmsg.send_many(rows, defaults=DEFAULTS)
    assert [(e.row, e.field) for e in info.value.errors] == [(4, "to"), (8, "variables")]
    assert runtime.store.count_by_status() == {} and dispatcher.chunks == []
    receipt = kmsg.send_many(rows, defaults=DEFAULTS, on_invalid="skip")
    assert len(receipt.message_ids) == 8
    assert [(e.row, e.rule) for e in receipt.invalid] == [(4, "phone_format"), (8, "type")]
    assert kmsg.batch_summary(receipt.batch_id).invalid == 2


def test_partial_failure_retries_only_the_failed_recipients(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    rows: list[dict[str, Any]] = recipients(6)
    rows[1]["provider_options"] = {"mock": {"fail_times": 1}}
    rows[4]["provider_options"] = {"mock": {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT"}]}}
    receipt = kmsg.send_many(rows, defaults=DEFAULTS)
    run_all_chunks(runtime, dispatcher)
    ids = receipt.message_ids
    assert runtime.store.count_by_status() == {"sent": 4, "retrying": 1, "failed": 1}
    # a run of the chunk before the retry is due claims nothing and asks the provider nothing
    before = mock(runtime).requests
    assert process_chunk(runtime, receipt.batch_id, 0).claimed == 0
    assert mock(runtime).requests == before
    # the sweep re-publishes the chunk when the retry is due, and the chunk's next run sends only
    # the failed recipient; the others are never sent again
    clock.advance(700)
    published = len(dispatcher.chunks)
    report = sweep(runtime)
    assert report.retries == 1
    assert dispatcher.ids == []  # batch rows never go out as single sends
    assert dispatcher.chunks[published:] == [(receipt.batch_id, 0, None)]
    provider = mock(runtime)
    requests = provider.requests
    assert process_chunk(runtime, receipt.batch_id, 0).sent == 1
    assert provider.requests == requests + 1
    assert [provider.calls_for(m) for m in ids] == [1, 2, 1, 1, 1, 1]
    assert runtime.store.count_by_status() == {"sent": 5, "failed": 1}
    assert kmsg.batch_summary(receipt.batch_id).by_error_code == {"INVALID_RECIPIENT": 1}


def test_a_chunk_run_twice_sends_nothing_twice(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    receipt = kmsg.send_many(recipients(50), defaults=DEFAULTS)
    run_all_chunks(runtime, dispatcher)
    run_all_chunks(runtime, dispatcher)
    assert mock(runtime).requests == 1
    assert all(mock(runtime).calls_for(m) == 1 for m in receipt.message_ids)


def test_whole_request_failure_re_runs_the_chunk(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.errors import ProviderTransientError

    receipt = kmsg.send_many(recipients(20), defaults=DEFAULTS)
    provider = mock(runtime)
    original = provider._send_batch
    state = {"fail": True}

    def flaky(messages: Any) -> Any:
        if state["fail"]:
            raise ProviderTransientError("503", provider="mock", status_code=503)
        return original(messages)

    monkeypatch.setattr(provider, "_send_batch", flaky)
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"retrying": 20}
    republished = dispatcher.chunks[-1]
    assert republished[0] == receipt.batch_id and republished[2] is not None and republished[2] > 0
    state["fail"] = False
    clock.advance(republished[2] or 0)
    process_chunk(runtime, receipt.batch_id, republished[1])
    assert runtime.store.count_by_status() == {"sent": 20}


def test_cancel_stops_pending_chunks_and_keeps_what_was_sent(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    receipt = kmsg.send_many(recipients(300), defaults=DEFAULTS, chunk_size=100)
    batch_id, first, _ = dispatcher.chunks[0]
    process_chunk(runtime, batch_id, first)
    summary = kmsg.cancel_batch(receipt.batch_id)
    assert summary.status == "cancelled" and summary.cancelled_at is not None
    assert summary.by_status == {"sent": 100, "cancelled": 200}
    run_all_chunks(runtime, dispatcher)
    assert mock(runtime).requests == 1


def test_summary_matches_the_database(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    rows = recipients(40)
    for row in rows[:5]:
        row["provider_options"] = {"mock": {"script": [{"outcome": "failure", "code": "RECIPIENT_BLOCKED"}]}}
    receipt = kmsg.send_many(rows, defaults={**DEFAULTS, "text": "#{name} " + "a" * 100})  # LMS
    run_all_chunks(runtime, dispatcher)
    summary = kmsg.batch_summary(receipt.batch_id)
    with runtime.store.sessions() as s:
        rows_db = s.query(MessageRow).filter(MessageRow.batch_id == receipt.batch_id).all()
    assert summary.total == len(rows_db) == 40
    assert summary.by_status == {"sent": 35, "failed": 5}
    assert summary.by_error_code == {"RECIPIENT_BLOCKED": 5}
    assert summary.by_type == {"LMS": 40}
    assert summary.cost_estimate_krw == pytest.approx(35 * 30.0)
    assert summary.first_sent_at is not None and summary.last_sent_at is not None


def test_scheduled_batch_waits_then_publishes_its_chunks(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    at = clock.now + timedelta(days=30)
    receipt = kmsg.send_many(recipients(30), defaults={**DEFAULTS, "scheduled_at": at})
    assert dispatcher.chunks == []  # nothing is published before its time
    assert runtime.store.count_by_status() == {"scheduled": 30}
    clock.advance(30 * 86400 + 1)
    assert sweep(runtime).scheduled == 1
    assert dispatcher.chunks == [(receipt.batch_id, 0, None)]
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"sent": 30}


def test_lost_chunk_tasks_are_re_published(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    receipt = kmsg.send_many(recipients(30), defaults=DEFAULTS, chunk_size=10)
    dispatcher.chunks.clear()  # the broker lost them
    clock.advance(runtime.settings.stale_queued_seconds + 1)
    sweep(runtime)
    assert sorted(c for b, c, _ in dispatcher.chunks if b == receipt.batch_id) == [0, 1, 2]
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"sent": 30}


def test_batch_idempotency(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    first = kmsg.send_many(recipients(10), defaults=DEFAULTS, idempotency_key="campaign-1")
    again = kmsg.send_many(recipients(10), defaults=DEFAULTS, idempotency_key="campaign-1")
    assert again.duplicate and again.batch_id == first.batch_id
    assert sorted(again.message_ids) == sorted(first.message_ids)
    assert sum(runtime.store.count_by_status().values()) == 10


def test_awkward_text_round_trips_through_copy(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    text = 'back\\slash\ttab\nnew "quote" 가😀 \\N'
    receipt = kmsg.send_many([{"to": "01012345678"}, {"to": "01012345679"}], defaults={"text": text, "type": "LMS"})
    stored = kmsg.get(receipt.message_ids[0])
    row = runtime.store.get(stored.id)
    assert row is not None and row.content["text"] == text
    assert row.scheduled_at is None and row.route == ["mock"]


def test_copy_payload_round_trips_through_postgresql(pg_url: str) -> None:
    import psycopg

    from kmsg_worker.storage.copy import copy_payload as _copy_payload

    # "b" equals in the first and last rows but not between them; "c" is the same everywhere;
    # "d" holds COPY's special characters in a plain text column, and None.
    rows = [
        {"a": f"id-{i}", "b": "x" if i != 1 else "y", "c": "same", "d": ["back\\slash\ttab\nline", None, "\\N"][i]}
        for i in range(3)
    ]
    cols, data = _copy_payload(rows)
    assert cols.split(", ")[-1] == "c"  # only the constant column is rendered once and appended
    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE copy_probe (a text, b text, c text, d text)")
        # and a slice of one row, where every column is the same in every row
        for part in (rows, rows[2:]):
            cols, data = _copy_payload(part)
            with conn.cursor() as cur, cur.copy(f"COPY copy_probe ({cols}) FROM STDIN") as copy:
                copy.write(data)
        back = conn.execute("SELECT a, b, c, d FROM copy_probe ORDER BY a").fetchall()
        assert [dict(zip("abcd", r, strict=True)) for r in back] == [*rows, rows[2]]
        # Columns given once as shared (a tab in one), beside the rows' own: a row's value wins
        conn.execute("TRUNCATE copy_probe")
        own = [{"a": f"id-{i}", "c": "row's"} for i in range(2)]
        cols, data = _copy_payload(own, {"b": "shared\tb", "c": "shared c", "d": None})
        with conn.cursor() as cur, cur.copy(f"COPY copy_probe ({cols}) FROM STDIN") as copy:
            copy.write(data)
        back = conn.execute("SELECT a, b, c, d FROM copy_probe ORDER BY a").fetchall()
    assert back == [("id-0", "shared\tb", "row's", None), ("id-1", "shared\tb", "row's", None)]


def test_a_chunks_results_keep_each_recipients_warnings_and_native_fallback(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    from kmsg_worker.providers.base import SendOutcome, SendWarning
    from kmsg_worker.storage.chunks import claim_chunk
    from kmsg_worker.storage.messages import record_sent

    receipt = kmsg.send_many(recipients(3), defaults=DEFAULTS)
    claim = claim_chunk(runtime.store, receipt.batch_id, 0, now=clock.now, lease=timedelta(seconds=60))
    assert claim is not None and len(claim.rows) == 3
    ids = [r.id for r in claim.rows]
    warning = SendWarning("FAILOVER_PARTIAL_PROVIDER", 'kept "as is"', {"n": 1})
    outcomes = {
        ids[0]: SendOutcome(ids[0], True, "pm-0", warnings=[warning]),
        ids[1]: SendOutcome(ids[1], True, "pm-1", native_fallback=True),
        ids[2]: SendOutcome(ids[2], True, None),
    }
    record_sent(
        runtime.store,
        claim.rows,
        outcomes,
        now=clock.now,
        next_check_at=clock.now,
        latency_ms=12.5,
        expect=("queued", "retrying"),  # type: ignore[arg-type]
        chunk=(receipt.batch_id, 0),
    )
    stored = {i: runtime.store.get(i) for i in ids}
    got = {i: (r.status, r.provider_message_id, r.native_fallback, r.warnings) for i, r in stored.items() if r}
    assert got == {
        ids[0]: (
            "sent",
            "pm-0",
            False,
            [{"code": "FAILOVER_PARTIAL_PROVIDER", "message": 'kept "as is"', "details": {"n": 1}}],
        ),
        ids[1]: ("sent", "pm-1", True, None),
        ids[2]: ("sent", None, False, None),
    }
    assert [a.latency_ms for i in ids for a in runtime.store.attempts(i)] == [12.5, 12.5, 12.5]


def test_rate_limited_chunk_is_given_back_without_using_a_retry(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker import ratelimit

    receipt = kmsg.send_many(recipients(30), defaults=DEFAULTS)
    monkeypatch.setattr(ratelimit, "acquire", lambda *a, **k: 2.5)
    result = process_chunk(runtime, receipt.batch_id, 0)
    assert result.throttled == 30 and result.requests == 0
    # The same rule as a single send's: the rows wait as retrying for the limiter's wait, spread a little.
    assert runtime.store.count_by_status() == {"retrying": 30}
    batch_id, chunk, countdown = dispatcher.chunks[-1]
    assert (batch_id, chunk) == (receipt.batch_id, 0) and countdown is not None and 2.5 <= countdown <= 2.5 * 1.25
    row = runtime.store.get(receipt.message_ids[0])
    assert row is not None and row.attempts == 0 and runtime.store.attempts(row.id) == []
    monkeypatch.setattr(ratelimit, "acquire", lambda *a, **k: 0.0)
    clock.advance(countdown)
    assert process_chunk(runtime, receipt.batch_id, 0).sent == 30


def test_open_circuit_moves_the_chunk_to_the_next_provider(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker import circuit
    from tests.test_pipeline import BackupMock  # registers mock_b

    assert BackupMock.name == "mock_b"
    runtime.router.providers.append("mock_b")
    runtime.router._types["mock_b"] = BackupMock.capabilities.types
    receipt = kmsg.send_many(recipients(20), defaults=DEFAULTS)
    assert runtime.store.get(receipt.message_ids[0]).route == ["mock", "mock_b"]  # type: ignore[union-attr]
    monkeypatch.setattr(circuit, "allow", lambda rt, name: name != "mock")
    # As for a single send: the rows move past the open circuit (one audit attempt row each, no
    # call) and go to the next provider in the same run.
    first = process_chunk(runtime, receipt.batch_id, 0)
    assert first.sent == 20 and first.requests == 1
    assert [a.outcome for a in runtime.store.attempts(receipt.message_ids[0])] == ["circuit_open", "accepted"]
    assert process_chunk(runtime, receipt.batch_id, 0).claimed == 0
    assert kmsg.batch_summary(receipt.batch_id).by_provider == {"mock_b": 20}


# -- chunk leases: one claim row per chunk ----------------------------------------------------------


def lease_seconds(rt: Runtime) -> float:
    return rt.settings.lease_seconds


class WorkerDied(BaseException):
    """Stands for a worker process killed mid-task (nothing after the raise runs)."""


def test_a_chunk_whose_worker_died_mid_request_is_reconciled_not_resent(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmsg_worker.delivery.record as record

    receipt = kmsg.send_many(recipients(40), defaults=DEFAULTS)

    def die(*args: Any, **kwargs: Any) -> None:
        raise WorkerDied  # the provider accepted the request; the worker dies before recording it

    with monkeypatch.context() as patch:
        patch.setattr(record, "record_sent", die)
        with pytest.raises(WorkerDied):
            process_chunk(runtime, receipt.batch_id, 0)
    assert mock(runtime).requests == 1
    # the rows never left "queued": the chunk's lease says they are in flight
    assert runtime.store.count_by_status() == {"queued": 40}
    # a re-delivered task does nothing, while the lease is held and after it ran out
    assert process_chunk(runtime, receipt.batch_id, 0).claimed == 0
    clock.advance(lease_seconds(runtime) + 1)
    assert process_chunk(runtime, receipt.batch_id, 0).claimed == 0
    # the sweep takes the chunk over, asks the provider, records what it has, and frees the chunk
    published = len(dispatcher.chunks)
    report = sweep(runtime)
    assert report.chunks_recovered == 1
    assert (receipt.batch_id, 0, None) in dispatcher.chunks[published:]
    assert runtime.store.count_by_status() == {"sent": 40}
    assert process_chunk(runtime, receipt.batch_id, 0).claimed == 0
    assert mock(runtime).requests == 1
    assert all(mock(runtime).calls_for(m) == 1 for m in receipt.message_ids)
    attempts = runtime.store.attempts(receipt.message_ids[0])
    assert [a.outcome for a in attempts] == ["reconciled_sent"]


def test_a_recovered_chunk_sends_only_what_the_provider_never_got(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    receipt = kmsg.send_many(recipients(10), defaults=DEFAULTS)

    provider = mock(runtime)
    original = provider._send_batch

    def half_then_die(messages: Any) -> Any:
        original(messages[:4])  # the provider got 4 of them, then the worker died
        raise WorkerDied

    with monkeypatch.context() as patch:
        patch.setattr(provider, "_send_batch", half_then_die)
        with pytest.raises(WorkerDied):
            process_chunk(runtime, receipt.batch_id, 0)
    clock.advance(lease_seconds(runtime) + 1)
    assert sweep(runtime).chunks_recovered == 1
    assert runtime.store.count_by_status() == {"sent": 4, "queued": 6}
    result = process_chunk(runtime, receipt.batch_id, 0)
    assert result.sent == 6 and result.requests == 1
    assert all(mock(runtime).calls_for(m) == 1 for m in receipt.message_ids)
    assert runtime.store.count_by_status() == {"sent": 10}


def test_cancel_while_a_chunk_is_in_flight_keeps_that_chunk_sent(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    receipt = kmsg.send_many(recipients(300), defaults=DEFAULTS, chunk_size=100)
    provider = mock(runtime)
    original = provider._send_batch
    cancelled: list[int] = []

    def cancel_then_send(messages: Any) -> Any:
        if not cancelled:
            # The operator cancels while this chunk's request is on the wire.
            cancelled.append(kmsg.cancel_batch(receipt.batch_id).by_status.get("cancelled", 0))
            # and a single message of the in-flight chunk can no longer be cancelled either
            with pytest.raises(InvalidStateError, match="in flight"):
                kmsg.cancel(messages[0].id)
        return original(messages)

    monkeypatch.setattr(provider, "_send_batch", cancel_then_send)
    run_all_chunks(runtime, dispatcher)
    assert cancelled == [200]
    summary = kmsg.batch_summary(receipt.batch_id)
    assert summary.status == "cancelled"
    assert summary.by_status == {"sent": 100, "cancelled": 200}
    assert provider.requests == 1


def test_cancel_one_message_of_a_waiting_chunk(kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher) -> None:
    receipt = kmsg.send_many(recipients(5), defaults=DEFAULTS)
    assert kmsg.cancel(receipt.message_ids[2]).status == "cancelled"
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"sent": 4, "cancelled": 1}
    assert mock(runtime).calls_for(receipt.message_ids[2]) == 0


def test_a_single_send_task_for_a_batch_row_does_nothing(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    from kmsg_worker.delivery import deliver

    receipt = kmsg.send_many(recipients(3), defaults=DEFAULTS)
    # only the chunk's task, under the chunk's lease, sends batch rows
    assert deliver(runtime, receipt.message_ids[0]).action == "not_claimed"
    assert mock(runtime).requests == 0
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"sent": 3}


def test_a_chunk_claimed_too_often_without_finishing_is_dead(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher
) -> None:
    from kmsg_worker.storage.chunks import claim_chunk

    receipt = kmsg.send_many(recipients(4), defaults=DEFAULTS)
    lease = timedelta(seconds=lease_seconds(runtime))
    for _ in range(runtime.settings.max_deliveries):
        assert claim_chunk(runtime.store, receipt.batch_id, 0, now=clock(), lease=lease) is not None  # each dies
        clock.advance(lease_seconds(runtime) + 1)
        assert sweep(runtime).chunks_recovered == 1  # the provider has none of them: freed again
    result = process_chunk(runtime, receipt.batch_id, 0)
    assert result.dead == 4 and result.requests == 0
    assert runtime.store.count_by_status() == {"dead": 4}
    assert mock(runtime).requests == 0


def test_a_database_lost_half_way_through_a_batch_is_reported_truthfully(
    kmsg: KMsg, runtime: Runtime, clock: Clock, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.errors import BatchPartiallyStoredError, StorageUnavailableError

    writes = SliceWrites(monkeypatch, fail_at=2)  # the database goes away after the first slice
    with pytest.raises(BatchPartiallyStoredError) as info:
        kmsg.send_many(recipients(45), defaults=DEFAULTS, on_invalid="skip")
    # still a StorageUnavailableError for callers that catch that, but it says what was stored
    assert isinstance(info.value, StorageUnavailableError)
    assert info.value.stored == 10 and "first 10 valid rows" in str(info.value)
    # nothing after the failed slice was written: what is stored is exactly the first slice
    assert writes.sizes == [10, 10]
    assert runtime.store.count_by_status() == {"queued": 10}
    # their chunk was still open when the database went away: the stale-chunk sweep publishes it
    writes.heal()
    clock.advance(runtime.settings.stale_queued_seconds + 1)
    sweep(runtime)
    assert (info.value.batch_id, 0, None) in dispatcher.chunks
    run_all_chunks(runtime, dispatcher)
    assert runtime.store.count_by_status() == {"sent": 10}


def test_a_database_lost_before_any_slice_stores_nothing(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    import kmsg_worker.storage.intake as writes
    from kmsg_worker.errors import BatchPartiallyStoredError, StorageUnavailableError

    def down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("COPY", {}, Exception("connection refused"))

    monkeypatch.setattr(writes, "_write", down)
    with pytest.raises(StorageUnavailableError) as info:
        kmsg.send_many(recipients(5), defaults=DEFAULTS)
    assert not isinstance(info.value, BatchPartiallyStoredError)
    assert runtime.store.count_by_status() == {} and dispatcher.chunks == []


def test_chunk_size_defaults_to_the_setting_and_a_caller_overrides_it(
    backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    assert Settings.from_env({}).bulk_chunk_size == 5_000
    rt = Runtime(settings_factory(backend_url, KMSG_BULK_CHUNK_SIZE="4"), dispatcher=dispatcher)
    try:
        kmsg = KMsg(runtime=rt)
        first = kmsg.send_many(recipients(10), defaults=DEFAULTS)
        second = kmsg.send_many(recipients(10, start=100), defaults=DEFAULTS, chunk_size=10)
        chunks = [(b, c) for b, c, _ in dispatcher.chunks]
        assert chunks == [(first.batch_id, 0), (first.batch_id, 1), (first.batch_id, 2), (second.batch_id, 0)]
    finally:
        rt.close()
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KMSG_BULK_CHUNK_SIZE": "0"})
    assert info.value.variable == "KMSG_BULK_CHUNK_SIZE"


#: Adapters configured without a server: intake builds them to read their limits and sends nothing.
_PROVIDER_ENV = {
    "aligo": {"KMSG_ALIGO_API_KEY": "k", "KMSG_ALIGO_USER_ID": "u"},
    "solapi": {"KMSG_SOLAPI_API_KEY": "k", "KMSG_SOLAPI_API_SECRET": "s"},
    "iwinv": {"KMSG_IWINV_API_KEY": "k", "KMSG_IWINV_SMS_API_KEY": "k", "KMSG_IWINV_SMS_AUTH_KEY": "a"},
}


@pytest.mark.parametrize(
    ("provider", "env", "count", "sizes"),
    [
        # Aligo splits a call into requests itself: chunks of KMSG_BULK_CHUNK_SIZE, not of 1,000
        ("aligo", {}, 12_000, [5_000, 5_000, 2_000]),
        # ... up to one window of requests: 1,000 x 2 in flight
        ("aligo", {"KMSG_ALIGO_MAX_IN_FLIGHT": "2"}, 4_500, [2_000, 2_000, 500]),
        # ... of the operator's smaller requests: 300 x 8
        ("aligo", {"KMSG_ALIGO_BATCH_LIMIT": "300", "KMSG_ALIGO_MAX_IN_FLIGHT": "8"}, 5_000, [2_400, 2_400, 200]),
        # one request per call: the request's limit
        ("aligo", {"KMSG_ALIGO_MAX_IN_FLIGHT": "1"}, 2_500, [1_000, 1_000, 500]),
        ("solapi", {"KMSG_SOLAPI_BATCH_LIMIT": "700"}, 1_500, [700, 700, 100]),
        ("iwinv", {}, 2_500, [1_000, 1_000, 500]),
    ],
)
def test_chunks_are_cut_at_what_one_send_batch_call_of_the_provider_takes(
    tmp_path: Any, settings_factory: Any, provider: str, env: dict[str, str], count: int, sizes: list[int]
) -> None:
    settings = settings_factory(
        f"sqlite:///{tmp_path / 'chunks.sqlite'}", KMSG_PROVIDERS=provider, **_PROVIDER_ENV[provider], **env
    )
    dispatcher = RecordingDispatcher()
    rt = Runtime(settings, dispatcher=dispatcher)
    try:
        receipt = KMsg(runtime=rt).send_many(recipients(count), defaults={**DEFAULTS, "type": "SMS"})
        with rt.store.sessions() as s:
            per_chunk = s.execute(
                select(MessageRow.chunk, func.count())
                .where(MessageRow.batch_id == receipt.batch_id)
                .group_by(MessageRow.chunk)
                .order_by(MessageRow.chunk)
            ).all()
    finally:
        rt.close()
    assert [n for _, n in per_chunk] == sizes
    assert sorted(c for _, c, _ in dispatcher.chunks) == list(range(len(sizes)))


def test_a_keyed_batch_cut_off_stores_nothing_and_its_retry_stores_it_once(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.errors import BatchPartiallyStoredError, StorageUnavailableError

    writes = SliceWrites(monkeypatch, fail_at=2)
    # Given a batch with an idempotency key (stored in one transaction) that loses the database
    # after its first slice was written, even with on_invalid="skip"
    with pytest.raises(StorageUnavailableError) as first:
        kmsg.send_many(recipients(30), defaults=DEFAULTS, idempotency_key="campaign-7", on_invalid="skip")
    # Then nothing was accepted: no rows, no batch, no key, no chunk queued
    assert not isinstance(first.value, BatchPartiallyStoredError)
    assert runtime.store.count_by_status() == {} and dispatcher.chunks == []
    # And the same request again, database back, stores the whole batch once
    writes.heal()
    receipt = kmsg.send_many(recipients(30), defaults=DEFAULTS, idempotency_key="campaign-7", on_invalid="skip")
    assert not receipt.duplicate and len(receipt.message_ids) == 30
    assert runtime.store.count_by_status() == {"queued": 30}
    # and is answered as a duplicate after that
    repeat = kmsg.send_many(recipients(30), defaults=DEFAULTS, idempotency_key="campaign-7", on_invalid="skip")
    assert repeat.duplicate and repeat.batch_id == receipt.batch_id
    assert sorted(repeat.message_ids) == sorted(receipt.message_ids)


def test_a_rejected_batch_stores_nothing_even_after_slices_were_written(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = SliceWrites(monkeypatch)
    # Given 60 rows whose 45th and 58th are invalid: four slices reach the database before the first
    rows = recipients(60)
    rows[44]["to"] = "12345"
    rows[57]["to"] = "not a number"
    with pytest.raises(BatchValidationError) as info:
        kmsg.send_many(rows, defaults=DEFAULTS)
    # Then both invalid rows are reported, after slices were written into the transaction
    assert [(e.row, e.field) for e in info.value.errors] == [(45, "to"), (58, "to")]
    assert sum(writes.sizes) == 40
    # and the transaction was rolled back: no message, no batch, no chunk, nothing queued
    assert runtime.store.count_by_status() == {}
    assert dispatcher.chunks == []
    with runtime.store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 0
        assert s.scalar(select(func.count()).select_from(ChunkLease)) == 0


def test_an_atomic_batch_losing_the_database_part_way_stores_nothing(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsg_worker.errors import BatchPartiallyStoredError, StorageUnavailableError

    writes = SliceWrites(monkeypatch, fail_at=3)
    with pytest.raises(StorageUnavailableError) as info:
        kmsg.send_many(recipients(45), defaults=DEFAULTS)  # on_invalid="reject": one transaction
    assert not isinstance(info.value, BatchPartiallyStoredError)
    assert writes.sizes == [10, 10, 10]
    assert runtime.store.count_by_status() == {} and dispatcher.chunks == []


def test_intake_streams_rows_instead_of_holding_the_batch(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = {"n": 0}
    ahead: list[int] = []
    stored = {"n": 0}

    def rows(n: int) -> Any:
        for row in recipients(n):
            produced["n"] += 1
            yield row

    def watch(slice_rows: int) -> None:
        # How far reading the input is ahead of writing it (the rest of the batch is not held).
        ahead.append(produced["n"] - stored["n"])
        stored["n"] += slice_rows

    SliceWrites(monkeypatch, slice_size=500, before=watch)
    for mode, key in (("reject", None), ("skip", None), ("skip", "campaign-9")):
        produced["n"] = stored["n"] = 0
        ahead.clear()
        receipt = kmsg.send_many(rows(8_000), defaults=DEFAULTS, on_invalid=mode, idempotency_key=key, chunk_size=1_000)
        assert len(receipt.message_ids) == 8_000 and stored["n"] == 8_000
        # The reader is never further ahead than the slice being written, two waiting, and the
        # 1,000 rows whose caller-given ids are looked up together (the whole 8,000 if held)
        assert len(ahead) >= 16 and max(ahead) <= 3 * 500 + 1_000, (mode, key, ahead)
    assert runtime.store.count_by_status() == {"queued": 24_000}
    # every chunk of the three batches was queued (the atomic ones after their commit)
    assert len(dispatcher.chunks) == 3 * 8


def test_the_same_key_stored_meanwhile_by_another_producer_is_answered_as_a_repeat(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmsg_worker.intake as intake

    first = kmsg.send_many(recipients(25), defaults=DEFAULTS, idempotency_key="campaign-race")
    # Given a second producer that looked the key up before the first one committed (it saw none)
    real = intake.stored_batch_key
    looks = {"n": 0}

    def not_yet(*args: Any) -> Any:
        looks["n"] += 1
        return None if looks["n"] == 1 else real(*args)

    monkeypatch.setattr(intake, "stored_batch_key", not_yet)
    # When it commits the same batch, its key insert collides: it rolls back and answers as a repeat
    second = kmsg.send_many(recipients(25), defaults=DEFAULTS, idempotency_key="campaign-race")
    assert second.duplicate and second.batch_id == first.batch_id and looks["n"] == 2
    assert runtime.store.count_by_status() == {"queued": 25}
    # and a different request under that key is still a conflict
    from kmsg_worker.errors import IdempotencyConflictError

    looks["n"] = 0
    with pytest.raises(IdempotencyConflictError):
        kmsg.send_many(recipients(26), defaults=DEFAULTS, idempotency_key="campaign-race")
    assert runtime.store.count_by_status() == {"queued": 25}


def test_a_database_lost_after_the_last_slice_reports_every_row_stored(
    kmsg: KMsg, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    import kmsg_worker.intake as intake
    from kmsg_worker.errors import BatchPartiallyStoredError

    sessions = runtime.store.sessions
    real_begin = sessions.begin
    writes = {"n": 0}

    def begin() -> Any:
        writes["n"] += 1
        if writes["n"] == 3:  # slice 1, slice 2, then the batch's total: the database is gone
            raise OperationalError("UPDATE", {}, Exception("server closed the connection"))
        return real_begin()

    monkeypatch.setattr(intake, "SLICE", 10)
    monkeypatch.setattr(sessions, "begin", begin)
    with pytest.raises(BatchPartiallyStoredError) as info:
        kmsg.send_many(recipients(20), defaults=DEFAULTS, on_invalid="skip")  # streamed: slices commit
    monkeypatch.setattr(sessions, "begin", real_begin)
    assert info.value.stored == 20
    assert runtime.store.count_by_status() == {"queued": 20}


def test_recording_a_chunk_reads_only_that_chunks_rows(
    pg_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    # Given a table just filled by an intake: no planner statistics yet, as during any large batch
    # before autovacuum's ANALYZE (without the chunk's own condition, PostgreSQL hashed a scan of
    # the whole table to find each chunk's 5,000 rows)
    truncate(pg_url)
    rt = Runtime(settings_factory(pg_url, KMSG_PROVIDERS="mock"), dispatcher=dispatcher)
    try:
        receipt = KMsg(runtime=rt).send_many(recipients(12_000), defaults=DEFAULTS, chunk_size=2_000)
        # When a chunk records its results, the UPDATE's plan reads the rows through the chunk's index
        plan = explain(rt.store.engine, lambda: process_chunk(rt, receipt.batch_id, 3), analyze=True)
    finally:
        rt.close()
    assert "Seq Scan on kmsg_messages" not in plan, plan
    assert "ix_kmsg_messages_batch_chunk" in plan, plan
    # and it matched exactly the chunk's rows
    assert re.search(r"Update on kmsg_messages .*\n(?:.*\n)*?.*rows=2000 loops=1", plan), plan


#: Parameter types of a prepared statement, from the Python values bound to it.
_PG_TYPES = {list: "text[]", str: "text", int: "integer", bool: "boolean", datetime: "timestamptz"}


class _Stop(Exception):
    """Stops a chunk run just before its result UPDATE reaches the server."""


def test_a_chunks_result_update_is_not_a_nested_loop_when_prepared(
    pg_url: str, settings_factory: Any, dispatcher: RecordingDispatcher
) -> None:
    # psycopg prepares a statement run five times on a connection, and PostgreSQL may then plan it
    # once for any parameters: an array parameter is guessed at 10 elements, and a chunk's 5,000 ids
    # were joined to its rows by a nested loop (25 million comparisons; 5-8 s per chunk at 1,000,000
    # rows). The chunk's UPDATE runs after settings that forbid both.
    truncate(pg_url)
    rt = Runtime(settings_factory(pg_url, KMSG_PROVIDERS="mock"), dispatcher=dispatcher)
    sent: list[tuple[str, Any]] = []

    in_force: list[tuple[str, str]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        # The sent UPDATE runs inside a WITH that also writes its webhook events (the outbox).
        is_update = "UPDATE KMSG_MESSAGES AS M SET STATUS = 'SENT'" in statement.upper()
        if "set_config" in statement or is_update:
            sent.append((statement, parameters))
            if is_update:
                # What the server will plan the UPDATE with, read on its own connection and transaction
                probe = cursor.connection.cursor()
                probe.execute("SELECT current_setting('plan_cache_mode'), current_setting('enable_nestloop')")
                in_force.append(probe.fetchone())
                raise _Stop

    try:
        receipt = KMsg(runtime=rt).send_many(recipients(12_000), defaults=DEFAULTS, chunk_size=2_000)
        event.listen(rt.store.engine, "before_cursor_execute", capture)
        with pytest.raises(_Stop):
            process_chunk(rt, receipt.batch_id, 4)
        event.remove(rt.store.engine, "before_cursor_execute", capture)
        (settings, _), (update_sql, params) = sent
        # The UPDATE as a server-side prepared statement, planned generically (the setting that
        # PostgreSQL applies on its own after a few runs), then explained after the code's settings
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", update_sql)))
        numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", update_sql)
        raw = rt.store.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("SET plan_cache_mode = force_generic_plan")
            types = [_PG_TYPES[type(params[n])] for n in names]
            cur.execute(f"PREPARE kmsg_sent ({', '.join(types)}) AS {numbered}")
            cur.execute(settings)
            # Values as literals: EXPLAIN EXECUTE takes no bind parameters of its own
            args = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(params[n]), sql.SQL(t)) for n, t in zip(names, types, strict=True)
            )
            cur.execute(sql.SQL("EXPLAIN (COSTS OFF) EXECUTE kmsg_sent({})").format(args))
            plan = "\n".join(str(r[0]) for r in cur.fetchall())
        finally:
            raw.rollback()
            raw.close()
    finally:
        rt.close()
    # The UPDATE is planned with its real arrays and without nested loops
    assert in_force == [("force_custom_plan", "off")]
    # and even a generic plan made under those settings joins by hash through the chunk's index
    assert "Update on kmsg_messages" in plan, plan
    assert "Nested Loop" not in plan and "Hash Join" in plan, plan
    assert "Seq Scan on kmsg_messages" not in plan and "ix_kmsg_messages_batch_chunk" in plan, plan


def test_row_ids_under_every_name_are_kept_and_checked_after_rows_without_ids(kmsg: KMsg, runtime: Runtime) -> None:
    # Given a message already stored under a caller's id
    kmsg.send({"to": "01012345678", "text": "first", "id": "stored-1"})
    # And a batch whose first 1,200 rows name no id (the stored-id look-up has nothing to ask for
    # them), followed by rows naming theirs under each accepted name
    rows: list[dict[str, Any]] = list(recipients(1200))
    rows += [
        {"to": "01099990001", "id": "own-1"},
        {"to": "01099990002", "message_id": "own-2"},
        {"to": "01099990003", "messageId": "stored-1"},
        {"to": "01099990004", "message_id": "own-1"},
        {"to": "01099990005", "messageId": "own-3"},
    ]
    receipt = kmsg.send_many(rows, defaults=DEFAULTS, on_invalid="skip")
    # Then the stored id and the id repeated within the batch are the only invalid rows
    assert [(e.row, e.field, e.rule) for e in receipt.invalid] == [(1203, "id", "duplicate"), (1204, "id", "duplicate")]
    # And the other given ids are the rows' ids, whatever name they came under
    assert {"own-1", "own-2", "own-3"} <= set(receipt.message_ids) and len(receipt.message_ids) == 1203
    assert runtime.store.get("own-2").recipient == "01099990002"  # type: ignore[union-attr]
    assert runtime.store.get("stored-1").batch_id is None  # type: ignore[union-attr]


def test_intake_lowers_the_switch_interval_only_while_it_runs(kmsg: KMsg, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    seen: list[float] = []
    writes = SliceWrites(monkeypatch, slice_size=100, before=lambda _count: seen.append(sys.getswitchinterval()))
    caller = sys.getswitchinterval()
    # (Python keeps the interval in whole microseconds: 0.0001 reads back as 9.9e-05.)
    try:
        # Given the caller's interval (Python's 5 ms)
        sys.setswitchinterval(0.005)
        # When a batch is taken in: its slices are written at the intake's interval
        kmsg.send_many(recipients(300), defaults=DEFAULTS)
        assert sum(writes.sizes) == 300 and seen == [pytest.approx(0.0005, rel=0.05)] * len(writes.sizes)
        # And the caller's interval is back afterwards
        assert sys.getswitchinterval() == pytest.approx(0.005, rel=0.05)
        # A caller's lower interval is never raised
        sys.setswitchinterval(0.0001)
        seen.clear()
        kmsg.send_many(recipients(100), defaults=DEFAULTS)
        assert seen
        assert seen == [pytest.approx(0.0001, rel=0.05)] * len(seen) and sys.getswitchinterval() == pytest.approx(
            0.0001, rel=0.05
        )
    finally:
        sys.setswitchinterval(caller)


def test_a_provider_side_refusal_inside_a_chunk_counts_against_the_provider_s_circuit(
    kmsg: KMsg, runtime: Runtime, dispatcher: RecordingDispatcher
) -> None:
    # Given a chunk whose call is answered per message: one 503 (the provider's failure), one
    # invalid number (the message's), the rest accepted
    down = {"mock": {"script": [{"outcome": "failure", "code": "NETWORK_SERVICE_UNAVAILABLE", "http_status": 503}]}}
    bad = {"mock": {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT"}]}}
    rows = [{"to": "01012340001", "provider_options": down}, {"to": "01012340002", "provider_options": bad}]
    rows += [{"to": f"0101234{i:04d}"} for i in range(10, 20)]
    receipt = kmsg.send_many(rows, defaults=DEFAULTS)
    assert receipt.batch_id is not None
    # When it is sent
    result = process_chunk(runtime, receipt.batch_id, 0)
    # Then the call counted as one failure of the provider, as a whole-call 503 would
    assert (result.sent, result.retrying, result.failed) == (10, 1, 1)
    snap = runtime.circuits.snapshot("mock")
    assert (snap.requests, snap.failures) == (1, 1)
