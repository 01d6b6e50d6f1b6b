"""The mock provider's call log is read incrementally, across processes, and survives torn lines.

Status queries, lookups and scripted sends all fold the log into per-message counts; these tests
check that what each instance sees equals what was written, whichever instance wrote it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmsg_worker.message import Message, MessageType, normalize
from kmsg_worker.providers.base import DeliveryState, ProviderConfig, StatusQuery
from kmsg_worker.providers.mock import MockProvider, read_call_log


def _sms(i: int, **options: Any) -> Message:
    return normalize({"id": f"m{i}", "to": f"0105{i:07d}", "text": "안내", "sender": "0212345678", **options})


def _provider(log: Path | None) -> MockProvider:
    return MockProvider(ProviderConfig(name="mock", options={"call_log": str(log)} if log else {}))


def test_two_processes_sharing_a_log_see_each_others_calls(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    first, second = _provider(log), _provider(log)
    first.send_batch([_sms(1), _sms(2)])
    assert second.calls_for("m1") == 1 and second.calls_for("m3") == 0
    second.send_batch([_sms(3)])
    first.send_batch([_sms(1)])
    assert [first.calls_for(f"m{i}") for i in (1, 2, 3)] == [2, 1, 1]
    assert [second.calls_for(f"m{i}") for i in (1, 2, 3)] == [2, 1, 1]
    assert len(read_call_log(log)) == 4
    found = second.lookup(["m1", "m2", "m4"], {})
    assert set(found) == {"m1", "m2"} and all(o.accepted for o in found.values())


def test_a_torn_last_line_is_read_once_it_is_complete(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    reader = _provider(log)
    log.write_text('{"message_id":"a","accepted":true,"pmid":"p1","deliver":"DELIVERED"}\n{"message_id":"b","acc')
    assert reader.calls_for("a") == 1 and reader.calls_for("b") == 0
    with log.open("a") as fh:
        fh.write('epted":true,"pmid":"p2","deliver":"DELIVERED"}\n')
    assert reader.calls_for("b") == 1 and reader.calls_for("a") == 1
    query = StatusQuery("b", "p2", MessageType.SMS, "01050000001", datetime.now(UTC))
    reports = reader.query_status([query])
    assert [(r.message_id, r.state) for r in reports] == [("b", DeliveryState.DELIVERED)]


def test_a_log_started_afresh_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    writer, reader = _provider(log), _provider(log)
    writer.send_batch([_sms(1), _sms(2), _sms(3)])
    assert reader.calls_for("m3") == 1
    log.unlink()
    writer.send_batch([_sms(4)])
    assert reader.calls_for("m4") == 1 and reader.calls_for("m3") == 0


def test_in_memory_calls_count_records_added_by_hand(tmp_path: Path) -> None:
    provider = _provider(None)
    script = {"mock": {"script": [{"outcome": "failure", "code": "PROVIDER_ERROR"}]}}
    provider.calls.append({"message_id": "m1", "accepted": False})  # the refusing step, consumed
    [outcome] = provider.send_batch([_sms(1, provider_options=script)])
    assert outcome.accepted and provider.calls_for("m1") == 2
    provider.calls.clear()  # a test starting over
    assert provider.calls_for("m1") == 0
