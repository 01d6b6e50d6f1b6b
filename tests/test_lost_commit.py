"""A connection lost between a commit and its reply (real PostgreSQL behind a breakable TCP proxy).

The reply to a COMMIT (or to an autocommitted INSERT) can be lost after the server applied it. A
producer that then said "nothing was accepted" would invite the caller to send everything again:
every message of the batch twice. These tests break the connection exactly there and check that
what the producer answers matches what the database holds once everything has settled.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from kmsg_worker.cli import main as cli_main
from kmsg_worker.errors import AcceptanceUnknownError, BatchPartiallyStoredError, StorageUnavailableError
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import Batch, MessageRow
from tests.conftest import RecordingDispatcher, scratch_pg_schema
from tests.faults.infra import TcpProxy

DEFAULTS = {"text": "#{name}님, 주문하신 상품이 발송되었습니다", "sender": "0212345678"}


def rows(n: int) -> list[dict[str, Any]]:
    return [{"to": f"010{7000_0000 + i}", "variables": {"name": f"고객{i}"}} for i in range(n)]


@pytest.fixture
def db_url() -> Iterator[str]:
    """A database of its own: some tests add a trigger that slows every commit down."""
    with scratch_pg_schema("kmsg_lost") as url:
        yield url


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(5432)
    yield p
    p.close()


@pytest.fixture
def producer(db_url: str, proxy: TcpProxy, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[KMsg]:
    """A producer whose database connections all pass through ``proxy``."""
    url = make_url(db_url).set(port=proxy.port).render_as_string(hide_password=False)
    rt = Runtime(settings_factory(url), dispatcher=dispatcher)
    yield KMsg(runtime=rt)
    rt.close()


def stored(db_url: str) -> tuple[int, int]:
    """``(batches, messages)`` in the database, read directly (not through the proxy)."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            batches = conn.execute(select(func.count()).select_from(Batch)).scalar_one()
            messages = conn.execute(select(func.count()).select_from(MessageRow)).scalar_one()
        return batches, messages
    finally:
        engine.dispose()


def ids_in(db_url: str, column: Any) -> list[str]:
    """Every value of ``column`` (a batch or message id column), read directly."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(column)).scalars())
    finally:
        engine.dispose()


def run_advice(error: str, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the ``kmsg ...`` command an error message tells the caller to run; return what it prints."""
    command = re.search(r"`kmsg ([^`]+)`", error)
    assert command is not None, error
    for key in list(os.environ):
        if key.startswith("KMSG_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KMSG_DATABASE_URL", db_url)
    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path / "cli"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(command.group(1).split()) == 0
    return out.getvalue()


def answered_accepted(call: Callable[[], object]) -> bool:
    """Whether ``call`` reported its request accepted; a lost commit must never be left unknown here."""
    try:
        call()
    except StorageUnavailableError as exc:
        assert not isinstance(exc, AcceptanceUnknownError)
        return False
    return True


def slow_commits(db_url: str, table: str, seconds: float) -> None:
    """Every transaction that wrote to ``table`` spends ``seconds`` in its COMMIT, before the commit point."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION kmsg_test_slow() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE CONSTRAINT TRIGGER kmsg_test_slow AFTER INSERT ON {table} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kmsg_test_slow()"
            )
        )
    engine.dispose()


def test_an_atomic_batch_whose_commit_reply_is_lost_is_accepted_once(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    # Given the connection breaks after the server received the batch's COMMIT, before its reply
    proxy.lose_reply_to(b"COMMIT")
    receipt = producer.send_many(rows(30), defaults=DEFAULTS)
    # Then the producer found the commit had taken effect: the batch is accepted, stored and queued
    assert proxy.lost_replies == 1
    assert len(receipt.message_ids) == 30
    assert stored(db_url) == (1, 30)
    assert [(b, c) for b, c, _ in dispatcher.chunks] == [(receipt.batch_id, 0)]
    assert producer.batch_summary(receipt.batch_id).total == 30


def test_an_atomic_batch_whose_commit_never_reached_the_server_is_not_accepted(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    # Given the connection breaks as the COMMIT is sent, before the server gets it
    proxy.lose_reply_to(b"COMMIT", forward=False)
    with pytest.raises(StorageUnavailableError) as info:
        producer.send_many(rows(30), defaults=DEFAULTS)
    # Then "nothing was accepted" is the truth: nothing stored, nothing queued
    assert not isinstance(info.value, (AcceptanceUnknownError, BatchPartiallyStoredError))
    assert proxy.lost_replies == 1
    assert stored(db_url) == (0, 0)
    assert dispatcher.chunks == []


def test_a_commit_still_running_when_its_connection_broke_is_settled_before_the_answer(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    # Given a COMMIT that takes 2 s on the server (a deferred trigger), cut off 0.3 s into it: the
    # server session is still inside it, and does not know its client is gone
    slow_commits(db_url, "kmsg_batches", 2.0)
    proxy.lose_reply_to(b"COMMIT", settle=0.3)
    accepted = answered_accepted(lambda: producer.send_many(rows(20), defaults=DEFAULTS))
    # Then, once that commit has had every chance to finish, the database agrees with the answer
    # (looking for the rows at once, without settling the server session first, says "not
    # stored" and the commit lands 1.7 s later)
    time.sleep(2.5)
    assert stored(db_url) == ((1, 20) if accepted else (0, 0))
    assert (dispatcher.chunks != []) == accepted


def test_a_lost_commit_with_the_database_then_unreachable_is_reported_as_unknown(
    producer: KMsg, proxy: TcpProxy, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the COMMIT reaches the server, then every connection drops and new ones are refused
    proxy.lose_reply_to(b"COMMIT", refuse=True)
    with pytest.raises(AcceptanceUnknownError) as info:
        producer.send_many(rows(30), defaults=DEFAULTS)
    # Then the error says it may have been stored, names the batch and how to look it up ...
    error = info.value
    assert isinstance(error, StorageUnavailableError)
    assert error.batch_id is not None and f"kmsg batch status {error.batch_id}" in str(error)
    # ... and it was: the batch the error names is the one in the database
    proxy.restore()
    assert ids_in(db_url, Batch.id) == [error.batch_id]
    # and the command it names shows it
    assert "] 30 accepted | 0 sent" in run_advice(str(error), db_url, tmp_path, monkeypatch)


def test_a_streamed_slice_whose_commit_reply_is_lost_is_counted_once_and_the_batch_goes_on(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmsg_worker.intake as intake

    monkeypatch.setattr(intake, "SLICE", 10)
    # Given a streamed batch (each slice commits on its own) whose first slice's COMMIT reply is lost
    proxy.lose_reply_to(b"COMMIT")
    receipt = producer.send_many(rows(35), defaults=DEFAULTS, on_invalid="skip", chunk_size=10)
    # Then the slice counted as stored, the intake went on over a new connection, and every row
    # is stored once, with its chunk queued once
    assert proxy.lost_replies == 1
    assert len(receipt.message_ids) == 35
    assert stored(db_url) == (1, 35)
    assert sorted(c for _, c, _ in dispatcher.chunks) == [0, 1, 2, 3]
    assert producer.batch_summary(receipt.batch_id).total == 35


def test_a_streamed_batch_whose_totals_commit_reply_is_lost_is_complete(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmsg_worker.intake as intake

    monkeypatch.setattr(intake, "SLICE", 10)
    # Given a streamed batch of four slices whose last write, the batch's totals, loses its COMMIT's reply
    proxy.lose_reply_to(b"COMMIT", skip=4)
    receipt = producer.send_many(rows(35), defaults=DEFAULTS, on_invalid="skip", chunk_size=10)
    # Then the totals were found stored: the batch is accepted whole, not reported partly stored
    assert proxy.lost_replies == 1
    assert len(receipt.message_ids) == 35
    assert stored(db_url) == (1, 35)
    assert producer.batch_summary(receipt.batch_id).total == 35


def test_a_single_send_whose_insert_reply_is_lost_is_accepted_once(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    # Given the connection breaks after the server received the (autocommitted) INSERT
    proxy.lose_reply_to(b"INSERT INTO kmsg_messages")
    receipt = producer.send(to="01070000001", text="[주문] 발송되었습니다", sender="0212345678")
    # Then the producer found it stored: accepted and queued, once
    assert proxy.lost_replies == 1
    assert stored(db_url) == (0, 1)
    assert dispatcher.ids == [receipt.message_id]


def test_a_keyed_single_send_whose_commit_reply_is_lost_is_accepted_once(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    # Given a send with an idempotency key (row and key in one transaction) whose COMMIT reply is lost
    proxy.lose_reply_to(b"COMMIT")
    message = {"to": "01070000001", "text": "[주문] 발송되었습니다", "sender": "0212345678"}
    message["idempotency_key"] = "order-77"
    receipt = producer.send(message)
    # Then it was found stored: accepted (not as a duplicate) and queued once
    assert proxy.lost_replies == 1
    assert not receipt.duplicate
    assert stored(db_url) == (0, 1)
    assert dispatcher.ids == [receipt.message_id]
    # and the same request again is answered as the repeat it is
    again = producer.send(message)
    assert again.duplicate and again.message_id == receipt.message_id
    assert dispatcher.ids == [receipt.message_id]


def test_a_single_send_whose_insert_never_reached_the_server_is_not_accepted(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    proxy.lose_reply_to(b"INSERT INTO kmsg_messages", forward=False)
    with pytest.raises(StorageUnavailableError) as info:
        producer.send(to="01070000001", text="[주문] 발송되었습니다", sender="0212345678")
    assert not isinstance(info.value, AcceptanceUnknownError)
    assert stored(db_url) == (0, 0)
    assert dispatcher.sends == []


def test_a_single_send_insert_still_committing_when_cut_off_is_settled_before_the_answer(
    producer: KMsg, proxy: TcpProxy, db_url: str, dispatcher: RecordingDispatcher
) -> None:
    slow_commits(db_url, "kmsg_messages", 2.0)
    proxy.lose_reply_to(b"INSERT INTO kmsg_messages", settle=0.3)
    accepted = answered_accepted(
        lambda: producer.send(to="01070000001", text="[주문] 발송되었습니다", sender="0212345678")
    )
    time.sleep(2.5)
    assert stored(db_url) == ((0, 1) if accepted else (0, 0))
    assert (dispatcher.sends != []) == accepted


def test_a_single_send_cut_off_with_the_database_then_unreachable_is_reported_as_unknown(
    producer: KMsg, proxy: TcpProxy, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.lose_reply_to(b"INSERT INTO kmsg_messages", refuse=True)
    with pytest.raises(AcceptanceUnknownError) as info:
        producer.send(to="01070000001", text="[주문] 발송되었습니다", sender="0212345678")
    assert info.value.message_id is not None and f"kmsg get {info.value.message_id}" in str(info.value)
    proxy.restore()
    assert ids_in(db_url, MessageRow.id) == [info.value.message_id]
    assert '"status": "queued"' in run_advice(str(info.value), db_url, tmp_path, monkeypatch)
