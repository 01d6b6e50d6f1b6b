"""``kmsg report``: the figures match the seeded rows on SQLite and PostgreSQL, and the chart file is
written and shows them."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kmsg_worker.cli import main
from kmsg_worker.report import build_report, parse_when, percentile, render_html, render_text
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import Attempt, MessageRow

T0 = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
SINCE, UNTIL = T0, T0 + timedelta(hours=1)


def message(
    mid: str, status: str, *, minute: float = 1, delivered_after: float | None = None, **values: Any
) -> MessageRow:
    created = T0 + timedelta(minutes=minute)
    fields: dict[str, Any] = {
        "id": mid,
        "tenant": "default",
        "type": "SMS",
        "recipient": "01012345678",
        "status": status,
        "priority": "normal",
        "route": ["mock"],
        "provider": "mock",
        "content": {},
        "created_at": created,
        "updated_at": created,
    }
    if delivered_after is not None:
        fields["delivered_at"] = created + timedelta(seconds=delivered_after)
    fields.update(values)
    return MessageRow(**fields)


def attempt(mid: str, no: int, provider: str, outcome: str, code: str | None = None) -> Attempt:
    return Attempt(message_id=mid, attempt_no=no, provider=provider, outcome=outcome, error_code=code, created_at=T0)


def seed(rt: Runtime) -> None:
    with rt.store.sessions.begin() as s:
        s.add_all(
            [
                message("d1", "delivered", delivered_after=10),
                message("d2", "delivered", delivered_after=20),
                message("d3", "delivered", delivered_after=30),
                message("d4", "delivered", delivered_after=40),
                message("f1", "failed", error_code="INVALID_RECIPIENT"),
                message("u1", "unknown", error_code="TRACKING_TIMEOUT"),
                message("q1", "queued", provider=None),
                message("c1", "cancelled", provider=None, error_code="CANCELLED"),
                message(
                    "m1", "delivered", delivered_after=100, provider="mock_b", route=["mock", "mock_b"], route_index=1
                ),
                message("a1", "failed", type="ALIMTALK", error_code="NOT_KAKAO_USER"),
                message("a2", "delivered", type="ALIMTALK", delivered_after=5),
                message("a3", "sent", type="ALIMTALK"),
                # the outside of the window: an hour before, and exactly at the (exclusive) end
                message("old", "delivered", minute=-60, delivered_after=1),
                message("late", "failed", minute=60, error_code="INVALID_RECIPIENT"),
            ]
        )
        s.flush()
        s.add(message("a1:fallback", "delivered", minute=3, delivered_after=8, parent_id="a1"))
        s.add_all(
            [
                attempt("d1", 1, "mock", "accepted"),
                attempt("d4", 1, "mock", "retryable", "PROVIDER_ERROR"),
                attempt("d4", 2, "mock", "accepted"),
                attempt("f1", 1, "mock", "rejected", "INVALID_RECIPIENT"),
                attempt("m1", 1, "mock", "rejected", "INSUFFICIENT_BALANCE"),
                attempt("m1", 2, "mock_b", "accepted"),
                attempt("late", 1, "mock", "rejected", "INVALID_RECIPIENT"),
            ]
        )


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([8.0, 10.0, 20.0, 30.0, 40.0], 0.5) == 20.0
    assert percentile([8.0, 10.0, 20.0, 30.0, 40.0], 0.95) == pytest.approx(38.0)


def test_report_numbers_match_the_database(runtime: Runtime) -> None:
    seed(runtime)
    report = build_report(runtime.engine, SINCE, UNTIL)
    groups = {(g.provider, g.type): g for g in report.groups}
    assert set(groups) == {("mock", "SMS"), ("(none)", "SMS"), ("mock_b", "SMS"), ("mock", "ALIMTALK")}

    sms = groups[("mock", "SMS")]  # d1-d4, the fallback child, f1, u1
    assert (sms.total, sms.delivered, sms.failed, sms.unknown, sms.in_flight) == (7, 5, 1, 1, 0)
    assert sms.delivery_rate == pytest.approx(5 / 7)
    assert (sms.p50_seconds, sms.p95_seconds) == (pytest.approx(20.0), pytest.approx(38.0))
    assert (sms.billable, sms.unit_price, sms.cost) == (5, 9.9, pytest.approx(49.5))

    unassigned = groups[("(none)", "SMS")]
    assert (unassigned.in_flight, unassigned.cancelled, unassigned.delivery_rate) == (1, 1, None)

    ata = groups[("mock", "ALIMTALK")]
    assert (ata.total, ata.delivered, ata.failed, ata.in_flight, ata.delivery_rate) == (3, 1, 1, 1, 0.5)
    assert (ata.billable, ata.cost) == (2, pytest.approx(16.0))

    overall = report.overall
    assert (overall.total, overall.delivered, overall.failed, overall.unknown) == (13, 7, 2, 1)
    assert overall.delivery_rate == pytest.approx(0.7)
    assert overall.p50_seconds == pytest.approx(20.0)  # 5, 8, 10, 20, 30, 40, 100
    assert overall.p95_seconds == pytest.approx(82.0)
    assert overall.cost == pytest.approx(6 * 9.9 + 2 * 8.0)

    assert report.failover_messages == 1 and report.failover_hops == {("mock", "mock_b"): 1}
    assert report.fallbacks == {"delivered": 1}
    assert report.errors == {"INVALID_RECIPIENT": 1, "NOT_KAKAO_USER": 1, "TRACKING_TIMEOUT": 1}
    assert report.attempt_errors == {
        ("mock", "INSUFFICIENT_BALANCE"): 1,
        ("mock", "INVALID_RECIPIENT"): 1,
        ("mock", "PROVIDER_ERROR"): 1,
    }
    assert report.cost_by_type == {"ALIMTALK": (2, 8.0, 16.0), "SMS": (6, 9.9, pytest.approx(59.4))}

    cheaper = build_report(runtime.engine, SINCE, UNTIL, prices={"sms": 10})
    assert cheaper.cost_by_type["SMS"] == (6, 10.0, 60.0)
    empty = build_report(runtime.engine, UNTIL + timedelta(days=1), UNTIL + timedelta(days=2))
    assert (empty.overall.total, empty.groups, empty.overall.delivery_rate) == (0, [], None)


def test_test_key_messages_are_reported_apart_and_cost_nothing(runtime: Runtime) -> None:
    sandbox = {"provider_options": {"mock": {"sandbox": True, "deliver": "DELIVERED"}}}
    with runtime.store.sessions.begin() as s:
        s.add_all(
            [
                message("live", "delivered", delivered_after=10),
                message("t1", "delivered", delivered_after=3, content=sandbox),
                message("t2", "failed", content=sandbox, error_code="INVALID_RECIPIENT"),
                # a live message whose options merely mention the mock provider is live
                message(
                    "m", "delivered", delivered_after=4, content={"provider_options": {"mock": {"sandbox": False}}}
                ),
            ]
        )
    report = build_report(runtime.engine, SINCE, UNTIL)
    groups = {(g.provider, g.type): g for g in report.groups}
    test = groups[("test keys (simulator)", "SMS")]
    assert (test.total, test.delivered, test.failed, test.cost) == (2, 1, 1, 0.0)
    assert groups[("mock", "SMS")].total == 2
    assert report.cost_by_type == {"SMS": (2, 9.9, pytest.approx(19.8))}  # the live ones only
    assert "test keys (simulator)" in render_text(report)


def test_text_and_html_show_the_figures(runtime: Runtime) -> None:
    seed(runtime)
    report = build_report(runtime.engine, SINCE, UNTIL)
    table = render_text(report)
    assert "mock_b    SMS" in table and "71.4%" in table and "70.0%" in table
    assert "mock->mock_b 1" in table and "AlimTalk -> SMS/LMS fallbacks: 1 (delivered 1)" in table
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 4
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "delivery rate <b>70.0%</b>" in page and "75.4 KRW" in page
    assert ">mock / SMS</text>" in page and ">NOT_KAKAO_USER</text>" in page


def test_cli_writes_the_chart_file(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(runtime)
    for key in list(os.environ):
        if key.startswith("KMSG_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KMSG_DATABASE_URL", runtime.settings.database_url)
    monkeypatch.setenv("KMSG_VAR_DIR", str(tmp_path / "var"))
    chart = tmp_path / "out" / "report.html"
    # naive times are Asia/Seoul: 10:00 KST = 01:00 UTC
    assert main(["report", "--since", "2026-11-20T10:00", "--until", "2026-11-20T11:00", "--html", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "all       all" in out and f"chart: {chart}" in out
    page = chart.read_text(encoding="utf-8")
    assert "<svg" in page and "Messages created 2026-11-20 10:00 .. 2026-11-20 11:00 (Asia/Seoul): <b>13</b>" in page

    assert main(["report", "--since", "2026-11-20T01:00+00:00", "--until", "2h", "--json", "--no-html"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"]["total"] == 14  # from 01:00 UTC to two hours ago: "late" (02:00) is in, "old" is not
    assert main(["report", "--since", "yesterday-ish"]) == 2


def test_parse_when() -> None:
    now = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
    assert parse_when("24h", now=now, tz="Asia/Seoul") == now - timedelta(hours=24)
    assert parse_when("7d", now=now, tz="Asia/Seoul") == now - timedelta(days=7)
    assert parse_when("now", now=now, tz="Asia/Seoul") == now
    assert parse_when("2026-11-23 09:00", now=now, tz="Asia/Seoul") == now
