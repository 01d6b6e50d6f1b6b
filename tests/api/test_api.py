"""The HTTP API through FastAPI's TestClient, on SQLite and PostgreSQL: messages, batches, errors, scoping."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.testclient import TestClient

from kmsg_worker.runtime import Runtime
from tests.api.conftest import Keys, stored_count
from tests.conftest import RecordingDispatcher

SMS = {"to": "010-1234-5678", "text": "인증번호 [123456]", "sender": "0212345678"}
PROBLEM = "application/problem+json"


def _problem(response: object, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["type"] == f"urn:kmsg:problem:{slug}"
    assert body["status"] == status
    return body


def test_a_posted_message_is_stored_queued_and_read_back(
    client: TestClient, keys: Keys, dispatcher: RecordingDispatcher
) -> None:
    sent = client.post("/v1/messages", json=SMS, headers=keys.a_live)
    assert sent.status_code == 202, sent.text
    receipt = sent.json()
    assert receipt["status"] == "queued" and receipt["type"] == "SMS" and receipt["test"] is False
    assert dispatcher.ids == [receipt["id"]]
    got = client.get(f"/v1/messages/{receipt['id']}", headers=keys.a_live)
    assert got.status_code == 200
    body = got.json()
    assert body["id"] == receipt["id"] and body["to"] == "01012345678" and body["status"] == "queued"
    assert body["attempts"] == [] and body["children"] == [] and body["test"] is False


def test_the_domain_rules_answer_422_with_field_and_rule_and_nothing_is_stored(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    bad_number = _problem(client.post("/v1/messages", json={**SMS, "to": "12"}, headers=keys.a_live), 422, "validation")
    assert bad_number["errors"] == [
        {"field": "to", "rule": "phone_format", "message": bad_number["errors"][0]["message"]}
    ]  # type: ignore[index]
    typo = _problem(client.post("/v1/messages", json={**SMS, "scheduled": "x"}, headers=keys.a_live), 422, "validation")
    assert typo["errors"][0]["rule"] == "unknown_field"  # type: ignore[index]
    tenant = _problem(
        client.post("/v1/messages", json={**SMS, "tenant": "shop-b"}, headers=keys.a_live), 422, "validation"
    )
    assert tenant["errors"][0] == {  # type: ignore[index]
        "field": "tenant",
        "rule": "forbidden",
        "message": "the tenant is the API key's; remove this field",
    }
    too_long = {**SMS, "type": "SMS", "text": "가" * 46}
    assert (
        _problem(client.post("/v1/messages", json=too_long, headers=keys.a_live), 422, "validation")["errors"][0][  # type: ignore[index]
            "field"
        ]
        == "text"
    )
    not_object = client.post("/v1/messages", json=[SMS], headers=keys.a_live)
    assert _problem(not_object, 422, "validation")["errors"][0]["field"] == "body"  # type: ignore[index]
    assert stored_count(runtime) == 0


def test_malformed_oversized_and_non_json_bodies_are_refused_before_anything_is_stored(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    json_headers = {**keys.a_live, "Content-Type": "application/json"}
    _problem(client.post("/v1/messages", content=b'{"to": "010', headers=json_headers), 400, "malformed-json")
    _problem(client.post("/v1/messages", content=b'{"to": NaN}', headers=json_headers), 400, "malformed-json")
    huge = {**SMS, "custom_fields": {"pad": "x" * 5000}}
    _problem(client.post("/v1/messages", json=huge, headers=keys.a_live), 413, "payload-too-large")
    form = {**keys.a_live, "Content-Type": "text/plain"}
    _problem(client.post("/v1/messages", content=b"to=010", headers=form), 415, "unsupported-media-type")
    assert stored_count(runtime) == 0


def test_an_idempotency_key_makes_a_repeat_safe_and_a_different_body_a_conflict(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    headers = {**keys.a_live, "Idempotency-Key": "order-42"}
    first = client.post("/v1/messages", json=SMS, headers=headers).json()
    again = client.post("/v1/messages", json=SMS, headers=headers).json()
    assert again["id"] == first["id"] and again["duplicate"] is True and first["duplicate"] is False
    _problem(client.post("/v1/messages", json={**SMS, "text": "other"}, headers=headers), 409, "idempotency-conflict")
    # the same key in another tenant is another key
    other = client.post("/v1/messages", json=SMS, headers={**keys.b_live, "Idempotency-Key": "order-42"}).json()
    assert other["id"] != first["id"] and other["duplicate"] is False
    assert stored_count(runtime) == 2


def test_cancel_before_dispatch_and_then_a_conflict(client: TestClient, keys: Keys) -> None:
    receipt = client.post("/v1/messages", json=SMS, headers=keys.a_live).json()
    cancelled = client.post(f"/v1/messages/{receipt['id']}/cancel", headers=keys.a_live)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    _problem(client.post(f"/v1/messages/{receipt['id']}/cancel", headers=keys.a_live), 409, "invalid-state")


def test_another_tenants_message_and_batch_are_404_like_missing_ones(client: TestClient, keys: Keys) -> None:
    mine = client.post("/v1/messages", json=SMS, headers=keys.a_live).json()["id"]
    batch = client.post("/v1/batches", json={"messages": [SMS]}, headers=keys.a_live).json()["batch_id"]
    for path in (f"/v1/messages/{mine}", f"/v1/batches/{batch}"):
        theirs = client.get(path, headers=keys.b_live)
        missing = client.get(path.rsplit("/", 1)[0] + "/nope", headers=keys.b_live)
        assert theirs.status_code == missing.status_code == 404
        assert set(theirs.json()) == set(missing.json())
    _problem(client.post(f"/v1/messages/{mine}/cancel", headers=keys.b_live), 404, "not-found")
    _problem(client.post(f"/v1/batches/{batch}/cancel", headers=keys.b_live), 404, "not-found")
    assert client.get("/v1/messages", headers=keys.b_live).json()["data"] == []
    # and the owner still sees (and could cancel) both
    assert client.get(f"/v1/messages/{mine}", headers=keys.a_live).json()["status"] == "queued"


def test_listing_pages_newest_first_with_filters(client: TestClient, keys: Keys, runtime: Runtime) -> None:
    from datetime import timedelta

    from tests.conftest import Clock

    clock = Clock()
    runtime.now = clock
    ids = []
    for _ in range(5):
        ids.append(client.post("/v1/messages", json=SMS, headers=keys.a_live).json()["id"])
        clock.advance(1)
    client.post(f"/v1/messages/{ids[0]}/cancel", headers=keys.a_live)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, object] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/messages", params=params, headers=keys.a_live).json()
        seen.extend(m["id"] for m in page["data"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids)) and pages == 3
    cancelled = client.get("/v1/messages", params={"status": "cancelled"}, headers=keys.a_live).json()
    assert [m["id"] for m in cancelled["data"]] == [ids[0]]
    since = (clock.now - timedelta(seconds=2)).isoformat()
    recent = client.get("/v1/messages", params={"since": since}, headers=keys.a_live).json()
    assert [m["id"] for m in recent["data"]] == [ids[4], ids[3]]
    _problem(client.get("/v1/messages", params={"status": "lost"}, headers=keys.a_live), 422, "validation")
    _problem(client.get("/v1/messages", params={"cursor": "zz"}, headers=keys.a_live), 422, "validation")
    _problem(client.get("/v1/messages", params={"limit": 0}, headers=keys.a_live), 422, "validation")


def test_a_json_batch_rejects_or_skips_invalid_rows(client: TestClient, keys: Keys, runtime: Runtime) -> None:
    rows = [{"to": "01011112222"}, {"to": "bad"}, {"to": "01011113333", "tenant": "shop-b"}]
    body = {"defaults": {"text": "쿠폰", "sender": "0212345678"}, "messages": rows}
    rejected = _problem(client.post("/v1/batches", json=body, headers=keys.a_live), 422, "batch-validation")
    assert [(e["row"], e["field"], e["rule"]) for e in rejected["errors"]] == [  # type: ignore[union-attr]
        (2, "to", "phone_format"),
        (3, "tenant", "forbidden"),
    ]
    assert stored_count(runtime) == 0
    skipped = client.post("/v1/batches", json={**body, "on_invalid": "skip"}, headers=keys.a_live)
    assert skipped.status_code == 202, skipped.text
    receipt = skipped.json()
    assert receipt["accepted"] == 1 and len(receipt["message_ids"]) == 1
    assert [e["row"] for e in receipt["invalid"]] == [2, 3]
    summary = client.get(f"/v1/batches/{receipt['batch_id']}", headers=keys.a_live).json()
    assert summary["total"] == 1 and summary["by_status"] == {"queued": 1} and summary["test"] is False
    _problem(client.post("/v1/batches", json={**body, "extra": 1}, headers=keys.a_live), 422, "validation")
    cancelled = client.post(f"/v1/batches/{receipt['batch_id']}/cancel", headers=keys.a_live).json()
    assert cancelled["by_status"] == {"cancelled": 1}


def _ndjson(count: int, bad_every: int = 0) -> Iterator[bytes]:
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            yield b'{"to": "0101111\n'
        else:
            yield f'{{"to": "0101{i:07d}", "variables": {{"n": {i}}}}}\n'.encode()


def test_an_ndjson_batch_streams_in_with_defaults_in_the_query(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    headers = {**keys.a_live, "Content-Type": "application/x-ndjson"}
    params = {"defaults": '{"text": "쿠폰 #{n}", "sender": "0212345678"}', "on_invalid": "skip"}
    answer = client.post("/v1/batches", params=params, content=_ndjson(3000, bad_every=1000), headers=headers)
    assert answer.status_code == 202, answer.text
    receipt = answer.json()
    assert receipt["accepted"] == 2997 and receipt["message_ids"] is None
    assert [(e["row"], e["rule"]) for e in receipt["invalid"]] == [(1000, "json"), (2000, "json"), (3000, "json")]
    assert stored_count(runtime) == 2997
    summary = client.get(f"/v1/batches/{receipt['batch_id']}", headers=keys.a_live).json()
    assert summary["total"] == 2997
    # reject (the default): one bad line and nothing of the upload is stored
    rejected = client.post(
        "/v1/batches", params={"defaults": params["defaults"]}, content=_ndjson(50, 25), headers=headers
    )
    assert _problem(rejected, 422, "batch-validation")["errors_total"] == 2
    assert stored_count(runtime) == 2997


def test_a_json_batch_over_its_limit_is_413_and_ndjson_defaults_may_come_in_a_header(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    rows = [{"to": f"0101111{i:04d}", "custom_fields": {"pad": "x" * 200}} for i in range(400)]
    big = {"defaults": {"text": "쿠폰", "sender": "0212345678"}, "messages": rows}
    _problem(client.post("/v1/batches", json=big, headers=keys.a_live), 413, "payload-too-large")
    assert stored_count(runtime) == 0
    headers = {
        **keys.a_live,
        "Content-Type": "application/x-ndjson",
        # a header is ASCII: JSON's \u escapes carry the Hangul
        "Kmsg-Defaults": json.dumps({"text": "쿠폰 #{n}", "sender": "0212345678"}),
    }
    answer = client.post("/v1/batches", content=_ndjson(10), headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 10
    both = client.post("/v1/batches", params={"defaults": "{}"}, content=_ndjson(1), headers=headers)
    assert _problem(both, 422, "validation")["errors"][0]["rule"] == "duplicate_field"  # type: ignore[index]
    bad_defaults = {**headers, "Kmsg-Defaults": "{not json"}
    _problem(client.post("/v1/batches", content=_ndjson(1), headers=bad_defaults), 400, "malformed-json")
    assert stored_count(runtime) == 10


def _stored_contents(runtime: Runtime) -> dict[str, dict[str, object]]:
    from sqlalchemy import select

    from kmsg_worker.storage.models import MessageRow

    with runtime.store.sessions() as s:
        return {row.recipient: row.content for row in s.scalars(select(MessageRow))}


def _chunked(body: bytes, size: int) -> Iterator[bytes]:
    # cut through multi-byte characters and quoted cells, as a network does
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_csv_batch_streams_in_with_columns_as_fields_and_variables(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    lines = ["\ufeffto,name,text", '010-2000-0001,김하나,"#{name}님,\n두 줄 안내"']
    lines += [f"0102000{i:04d},고객{i}," for i in range(2, 1001)]
    body = ("\r\n".join(lines) + "\r\n").encode()
    headers = {**keys.a_live, "Content-Type": "text/csv; charset=utf-8"}
    params = {"defaults": '{"text": "#{name}님 쿠폰", "sender": "0212345678"}'}
    answer = client.post("/v1/batches", params=params, content=_chunked(body, 7), headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 1000 and answer.json()["invalid"] == []
    stored = _stored_contents(runtime)
    assert len(stored) == 1000
    # a quoted cell spanning two lines is one cell; an empty text cell leaves the default's text
    assert stored["01020000001"]["text"] == "김하나님,\n두 줄 안내"
    assert stored["01020000999"]["text"] == "고객999님 쿠폰"


def test_a_csv_batch_that_is_not_utf8_or_has_a_bad_row_stores_nothing(
    client: TestClient, keys: Keys, runtime: Runtime
) -> None:
    headers = {**keys.a_live, "Content-Type": "text/csv"}
    params = {"defaults": '{"text": "안내", "sender": "0212345678"}'}
    euc_kr = "to,name\n01020000001,김하나\n".encode("euc-kr")
    _problem(client.post("/v1/batches", params=params, content=euc_kr, headers=headers), 400, "malformed-csv")
    bad_row = b"to\n01020000001\n12\n"
    rejected = _problem(
        client.post("/v1/batches", params=params, content=bad_row, headers=headers), 422, "batch-validation"
    )
    assert rejected["errors"][0]["row"] == 2 and rejected["errors"][0]["field"] == "to"  # type: ignore[index]
    endless = b"to,name\n01020000001," + b"x" * 200_000
    _problem(client.post("/v1/batches", params=params, content=endless, headers=headers), 413, "payload-too-large")
    assert stored_count(runtime) == 0
