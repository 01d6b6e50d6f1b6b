"""``kmsg report``: what happened to the messages accepted in a time range, from the system of record.

For messages created in ``[since, until)`` (default: the last 24 hours), grouped by provider and
type: counts by status, delivery rate, time to delivered (p50/p95 of ``delivered_at - created_at``),
provider failovers (read from the attempts), AlimTalk -> SMS/LMS fallback children, errors by code
and an estimated cost. Printed as tables, and written as one self-contained HTML file with inline
SVG charts that a person can open in any browser (no extra dependency, nothing fetched).

Definitions:

* **delivery rate** = delivered / settled, where settled = delivered + failed + unknown + dead
  (messages still in flight and cancelled ones are left out; they have no outcome yet or never will).
* **time to delivered**: from acceptance (``created_at``) to the provider's delivery time
  (``delivered_at``); percentiles interpolate linearly between ranks (like PostgreSQL's
  ``percentile_cont``).
* **cost estimate**: unit price of the type x messages the provider accepted (``sent`` or
  ``delivered``); failed messages are assumed not charged. The unit prices are **estimates**
  (typical Korean list prices, KRW): override them with ``KMSG_UNIT_PRICES`` or ``--prices``.

Every query filters on ``created_at`` (indexed) and works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from kmsg_worker.errors import StorageUnavailableError, ValidationError
from kmsg_worker.pricing import DEFAULT_UNIT_PRICES, unit_prices
from kmsg_worker.settings import Settings
from kmsg_worker.storage import queries
from kmsg_worker.storage.db import make_engine

__all__ = [
    "DEFAULT_UNIT_PRICES",
    "DeliveryReport",
    "GroupStats",
    "add_subcommand",
    "build_report",
    "parse_when",
    "percentile",
    "render_html",
    "render_text",
]

#: A provider charges for what it accepted.
BILLABLE = ("sent", "delivered")
SETTLED = ("delivered", "failed", "unknown", "dead")
IN_FLIGHT = ("scheduled", "queued", "sending", "retrying", "sent")
NO_PROVIDER = "(none)"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of sorted ``values``, linear between ranks; ``None`` when empty."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return float(values[low])
    return float(values[low] + (values[high] - values[low]) * (position - low))


@dataclass(frozen=True)
class GroupStats:
    """Figures of one provider x type group (or of everything: provider and type ``all``).

    Attributes:
        provider: The provider that last handled the messages (``(none)``: never dispatched).
        type: The message type.
        by_status: Messages per status.
        total: Messages.
        delivered: Delivered.
        failed: Failed or dead.
        unknown: Outcome unknown.
        in_flight: Not final yet (scheduled, queued, sending, retrying, sent).
        cancelled: Cancelled.
        delivery_rate: delivered / settled, ``None`` when nothing settled.
        p50_seconds: Median time to delivered.
        p95_seconds: 95th percentile time to delivered.
        billable: Messages the provider accepted (sent or delivered).
        unit_price: KRW per message (``None``: no price known for the type).
        cost: Estimated KRW.
    """

    provider: str
    type: str
    by_status: dict[str, int]
    total: int
    delivered: int
    failed: int
    unknown: int
    in_flight: int
    cancelled: int
    delivery_rate: float | None
    p50_seconds: float | None
    p95_seconds: float | None
    billable: int
    unit_price: float | None
    cost: float


@dataclass(frozen=True)
class DeliveryReport:
    """Everything ``kmsg report`` shows.

    Attributes:
        since: Start of the window (inclusive, UTC).
        until: End of the window (exclusive, UTC).
        groups: One entry per provider x type, largest first.
        overall: All messages together.
        failover_messages: Messages whose attempts went to more than one provider.
        failover_hops: ``(from, to) -> count`` of provider changes between consecutive attempts.
        fallbacks: AlimTalk -> SMS/LMS children of messages in the window, by child status.
        errors: Final error codes of failed, unknown and dead messages.
        attempt_errors: ``(provider, error code) -> count`` over every failed attempt.
        cost_by_type: ``type -> (billable messages, unit price, KRW)``.
        prices: The unit prices used.
    """

    since: datetime
    until: datetime
    groups: list[GroupStats]
    overall: GroupStats
    failover_messages: int
    failover_hops: dict[tuple[str, str], int]
    fallbacks: dict[str, int]
    errors: dict[str, int]
    attempt_errors: dict[tuple[str, str], int]
    cost_by_type: dict[str, tuple[int, float | None, float]]
    prices: dict[str, float] = field(default_factory=dict)

    @property
    def fallbacks_created(self) -> int:
        """How many fallback children were created."""
        return sum(self.fallbacks.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kmsg report --json``)."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "overall": asdict(self.overall),
            "groups": [asdict(g) for g in self.groups],
            "failover_messages": self.failover_messages,
            "failover_hops": [{"from": a, "to": b, "count": n} for (a, b), n in self.failover_hops.items()],
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "attempt_errors": [
                {"provider": p, "error_code": c, "count": n} for (p, c), n in self.attempt_errors.items()
            ],
            "cost_by_type": {
                t: {"billable": b, "unit_price": u, "cost": c} for t, (b, u, c) in self.cost_by_type.items()
            },
            "prices": self.prices,
        }


def _group(
    provider: str, mtype: str, by_status: Mapping[str, int], durations: list[float], price: float | None
) -> GroupStats:
    count = dict(by_status)
    delivered = count.get("delivered", 0)
    settled = sum(count.get(s, 0) for s in SETTLED)
    billable = sum(count.get(s, 0) for s in BILLABLE)
    durations.sort()
    return GroupStats(
        provider=provider,
        type=mtype,
        by_status=count,
        total=sum(count.values()),
        delivered=delivered,
        failed=count.get("failed", 0) + count.get("dead", 0),
        unknown=count.get("unknown", 0),
        in_flight=sum(count.get(s, 0) for s in IN_FLIGHT),
        cancelled=count.get("cancelled", 0),
        delivery_rate=delivered / settled if settled else None,
        p50_seconds=percentile(durations, 0.5),
        p95_seconds=percentile(durations, 0.95),
        billable=billable,
        unit_price=price,
        cost=round(billable * (price or 0.0), 2),
    )


def build_report(
    engine: Engine, since: datetime, until: datetime, prices: Mapping[str, float] | None = None
) -> DeliveryReport:
    """Compute the report for messages created in ``[since, until)``.

    Args:
        engine: The system of record (SQLite or PostgreSQL).
        since: Window start (aware).
        until: Window end (aware, exclusive).
        prices: Unit prices (KRW) over :data:`DEFAULT_UNIT_PRICES`.
    """
    table = unit_prices(prices)
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    hops: Counter[tuple[str, str]] = Counter()
    failover_messages: set[str] = set()
    with engine.connect() as conn:
        for prov, mtype, status, n in queries.status_counts(conn, since, until, no_provider=NO_PROVIDER):
            counts[(prov, mtype)][status] += n
        for prov, mtype, value in queries.delivery_seconds(conn, since, until, no_provider=NO_PROVIDER):
            # A provider clock slightly behind ours must not yield a negative delivery time.
            durations[(prov, mtype)].append(max(0.0, round(value, 3)))
        previous: tuple[str, str] | None = None
        for message_id, prov in queries.failover_attempts(conn, since, until):
            if previous is not None and previous[0] == message_id and previous[1] != prov:
                hops[(previous[1], prov)] += 1
                failover_messages.add(message_id)
            previous = (message_id, prov)
        fallbacks = queries.fallback_child_statuses(conn, since, until)
        errors = queries.final_error_counts(conn, since, until)
        attempt_errors = queries.attempt_error_counts(conn, since, until)

    groups = [
        _group(
            prov,
            mtype,
            by_status,
            durations.get((prov, mtype), []),
            # test-key messages reached only the simulator: no provider charged for them
            0.0 if prov == queries.TEST_PROVIDER else table.get(mtype.upper()),
        )
        for (prov, mtype), by_status in counts.items()
    ]
    groups.sort(key=lambda g: (-g.total, g.provider, g.type))
    everything: Counter[str] = Counter()
    for by_status in counts.values():
        everything.update(by_status)
    overall = _group("all", "all", everything, [d for ds in durations.values() for d in ds], None)
    cost_by_type: dict[str, tuple[int, float | None, float]] = {}
    for g in groups:
        if g.provider == queries.TEST_PROVIDER:
            continue  # never charged: the cost by type is what the providers bill
        billable, _, cost = cost_by_type.get(g.type, (0, None, 0.0))
        cost_by_type[g.type] = (billable + g.billable, g.unit_price, round(cost + g.cost, 2))
    overall = GroupStats(**{**asdict(overall), "cost": round(sum(c for _, _, c in cost_by_type.values()), 2)})
    return DeliveryReport(
        since=since,
        until=until,
        groups=groups,
        overall=overall,
        failover_messages=len(failover_messages),
        failover_hops=dict(hops.most_common()),
        fallbacks=fallbacks,
        errors=dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        attempt_errors=dict(sorted(attempt_errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        cost_by_type=dict(sorted(cost_by_type.items())),
        prices=table,
    )


# -- rendering ------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _krw(value: float) -> str:
    return f"{value:,.1f}"


def _table(rows: list[list[str]], header: list[str], right: Iterable[int] = ()) -> list[str]:
    aligned = set(right)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in aligned else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


GROUP_HEADER = ["PROVIDER", "TYPE", "TOTAL", "DELIVERED", "FAILED", "UNKNOWN", "IN FLIGHT", "CANCELLED"]
GROUP_HEADER += ["RATE", "P50", "P95", "COST KRW"]


def _group_row(g: GroupStats) -> list[str]:
    return [
        g.provider,
        g.type,
        str(g.total),
        str(g.delivered),
        str(g.failed),
        str(g.unknown),
        str(g.in_flight),
        str(g.cancelled),
        _pct(g.delivery_rate),
        _secs(g.p50_seconds),
        _secs(g.p95_seconds),
        _krw(g.cost),
    ]


def render_text(report: DeliveryReport, tz: str = "Asia/Seoul") -> str:
    """The terminal form of the report."""
    zone = ZoneInfo(tz)
    out = [
        f"kmsg report: messages created {report.since.astimezone(zone):%Y-%m-%d %H:%M} .. "
        f"{report.until.astimezone(zone):%Y-%m-%d %H:%M} ({tz})",
        "",
    ]
    rows = [_group_row(g) for g in report.groups] + [_group_row(report.overall)]
    out += _table(rows, GROUP_HEADER, right=range(2, 12))
    statuses = ", ".join(f"{s} {n}" for s, n in sorted(report.overall.by_status.items())) or "no messages"
    out += ["", f"by status: {statuses}"]
    hops = ", ".join(f"{a}->{b} {n}" for (a, b), n in report.failover_hops.items()) or "none"
    out.append(f"provider failovers: {report.failover_messages} message(s); hops: {hops}")
    fb = ", ".join(f"{s} {n}" for s, n in sorted(report.fallbacks.items()))
    out.append(f"AlimTalk -> SMS/LMS fallbacks: {report.fallbacks_created}" + (f" ({fb})" if fb else ""))
    if report.errors:
        out += ["", "final errors:"]
        out += _table([[c, str(n)] for c, n in report.errors.items()], ["ERROR CODE", "MESSAGES"], right=[1])
    if report.attempt_errors:
        out += ["", "failed attempts:"]
        rows = [[p, c, str(n)] for (p, c), n in report.attempt_errors.items()]
        out += _table(rows, ["PROVIDER", "ERROR CODE", "ATTEMPTS"], right=[2])
    if report.cost_by_type:
        out += ["", "cost estimate (KRW; unit prices are estimates, override with KMSG_UNIT_PRICES):"]
        rows = [[t, str(b), "-" if u is None else f"{u:g}", _krw(c)] for t, (b, u, c) in report.cost_by_type.items()]
        rows.append(["total", str(sum(b for b, _, _ in report.cost_by_type.values())), "", _krw(report.overall.cost)])
        out += _table(rows, ["TYPE", "BILLABLE", "UNIT", "COST"], right=[1, 2, 3])
    return "\n".join(out)


_COLORS = {
    "delivered": "#2e7d32",
    "failed": "#c62828",
    "unknown": "#9e9e9e",
    "in flight": "#1565c0",
    "cancelled": "#f9a825",
    "p50": "#42a5f5",
    "p95": "#0d47a1",
    "value": "#6a1b9a",
}


def _svg_bars(title: str, rows: list[tuple[str, list[tuple[str, float]]]], unit: str = "", stacked: bool = True) -> str:
    """A horizontal bar chart: one row per label, stacked (or grouped) segments, values written on the bars."""
    esc = html.escape
    label_w, bar_w, row_h = 220, 560, 26
    series = list(dict.fromkeys(name for _, parts in rows for name, _ in parts))
    per_row = 1 if stacked else max(1, len(series))
    height = 40 + len(rows) * row_h * per_row + 30
    peak = (
        max((sum(v for _, v in parts) if stacked else max((v for _, v in parts), default=0.0)) for _, parts in rows)
        if rows
        else 0.0
    )
    scale = bar_w / peak if peak > 0 else 0.0
    parts_svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 120}" height="{height}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<text x="0" y="18" font-weight="bold">{esc(title)}</text>',
    ]
    y = 34
    for label, segments in rows:
        parts_svg.append(f'<text x="0" y="{y + 17}">{esc(label)}</text>')
        x = float(label_w)
        for i, (name, value) in enumerate(segments):
            color = _COLORS.get(name, _COLORS["value"])
            width = value * scale
            top = y if stacked else y + i * row_h
            if width > 0:
                parts_svg.append(
                    f'<rect x="{x:.1f}" y="{top}" width="{width:.1f}" height="{row_h - 6}" fill="{color}">'
                    f"<title>{esc(label)} {esc(name)}: {value:g}{esc(unit)}</title></rect>"
                )
            text_x = (x + width / 2) if stacked and width > 30 else (x + width + 4)
            anchor = "middle" if stacked and width > 30 else "start"
            fill = "#fff" if stacked and width > 30 else "#222"
            if value:
                parts_svg.append(
                    f'<text x="{text_x:.1f}" y="{top + 15}" text-anchor="{anchor}" fill="{fill}" '
                    f'font-size="12">{value:g}{esc(unit)}</text>'
                )
            if stacked:
                x += width
        y += row_h * per_row
    lx = float(label_w)
    for name in series:
        parts_svg.append(
            f'<rect x="{lx:.0f}" y="{y + 4}" width="12" height="12" fill="{_COLORS.get(name, "#6a1b9a")}"/>'
        )
        parts_svg.append(f'<text x="{lx + 16:.0f}" y="{y + 15}" font-size="12">{esc(name)}</text>')
        lx += 24 + 8 * len(name)
    parts_svg.append("</svg>")
    return "\n".join(parts_svg)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: DeliveryReport, tz: str = "Asia/Seoul") -> str:
    """One self-contained HTML page: the tables and inline SVG charts (opens offline in any browser)."""
    esc = html.escape
    zone = ZoneInfo(tz)
    span = f"{report.since.astimezone(zone):%Y-%m-%d %H:%M} .. {report.until.astimezone(zone):%Y-%m-%d %H:%M} ({tz})"

    def label(g: GroupStats) -> str:
        return f"{g.provider} / {g.type}"

    outcome_rows = [
        (
            label(g),
            [
                ("delivered", float(g.delivered)),
                ("failed", float(g.failed)),
                ("unknown", float(g.unknown)),
                ("in flight", float(g.in_flight)),
                ("cancelled", float(g.cancelled)),
            ],
        )
        for g in report.groups
    ]
    latency_rows = [
        (label(g), [("p50", round(g.p50_seconds or 0.0, 1)), ("p95", round(g.p95_seconds or 0.0, 1))])
        for g in report.groups
        if g.p50_seconds is not None
    ]
    charts = [_svg_bars("Outcome by provider and type (messages)", outcome_rows)]
    if latency_rows:
        charts.append(_svg_bars("Time to delivered (seconds)", latency_rows, unit="s", stacked=False))
    if report.errors:
        charts.append(
            _svg_bars("Final errors by code (messages)", [(c, [("value", float(n))]) for c, n in report.errors.items()])
        )
    if report.cost_by_type:
        charts.append(
            _svg_bars(
                "Estimated cost by type (KRW)",
                [(t, [("value", c)]) for t, (_, _, c) in report.cost_by_type.items()],
                unit=" KRW",
            )
        )
    tables = [
        "<h2>By provider and type</h2>",
        _html_table(GROUP_HEADER, [_group_row(g) for g in report.groups] + [_group_row(report.overall)]),
        "<h2>Failovers</h2>",
        f"<p>{report.failover_messages} message(s) changed provider; "
        f"{report.fallbacks_created} AlimTalk -&gt; SMS/LMS fallback(s) created.</p>",
        _html_table(["FROM", "TO", "HOPS"], [[a, b, str(n)] for (a, b), n in report.failover_hops.items()]),
        _html_table(["FALLBACK STATUS", "CHILDREN"], [[s, str(n)] for s, n in sorted(report.fallbacks.items())]),
        "<h2>Errors</h2>",
        _html_table(["ERROR CODE", "MESSAGES"], [[c, str(n)] for c, n in report.errors.items()]),
        _html_table(
            ["PROVIDER", "ERROR CODE", "ATTEMPTS"], [[p, c, str(n)] for (p, c), n in report.attempt_errors.items()]
        ),
        "<h2>Cost estimate (KRW)</h2>",
        "<p>Unit prices are estimates of typical list prices; set <code>KMSG_UNIT_PRICES</code> to yours. "
        "Billable = messages the provider accepted (sent or delivered).</p>",
        _html_table(
            ["TYPE", "BILLABLE", "UNIT PRICE", "COST"],
            [[t, str(b), "-" if u is None else f"{u:g}", _krw(c)] for t, (b, u, c) in report.cost_by_type.items()],
        ),
    ]
    style = (
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}svg{display:block;margin:12px 0}"
        "svg text{font-family:system-ui,sans-serif;font-size:13px}"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>kmsg delivery report</title>',
            f"<style>{style}</style></head><body>",
            f"<h1>kmsg delivery report</h1><p>Messages created {esc(span)}: <b>{report.overall.total}</b>, "
            f"delivery rate <b>{_pct(report.overall.delivery_rate)}</b>, p50 {_secs(report.overall.p50_seconds)}, "
            f"p95 {_secs(report.overall.p95_seconds)}, estimated cost <b>{_krw(report.overall.cost)} KRW</b>.</p>",
            *charts,
            *tables,
            "</body></html>",
        ]
    )


# -- command line ---------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: str, *, now: datetime, tz: str) -> datetime:
    """``now``, a duration ago (``24h``, ``7d``, ``30m``) or an ISO time (naive = ``tz``)."""
    text = value.strip().lower()
    if text == "now":
        return now
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(tz))
    return parsed.astimezone(UTC)


def cmd_report(ns: argparse.Namespace) -> int:
    """``kmsg report``: print the tables and write the HTML chart file."""
    settings = Settings.from_env()
    now = datetime.now(UTC)
    try:
        until = parse_when(ns.until, now=now, tz=settings.timezone)
        since = parse_when(ns.since, now=until, tz=settings.timezone)
    except ValueError as exc:
        raise ValidationError("since", "time", f"use 'now', a duration like 24h / 7d, or an ISO time ({exc})") from exc
    if since >= until:
        raise ValidationError("since", "range", "--since must be before --until")
    prices = dict(settings.unit_prices)
    if ns.prices:
        try:
            prices.update({k.upper(): float(v) for k, v in json.loads(ns.prices).items()})
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValidationError("prices", "json", 'use a JSON object like {"SMS": 9.9}') from exc
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        report = build_report(engine, since, until, prices)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        raise StorageUnavailableError(f"cannot read the messages ({reason}); `kmsg doctor` tells why") from exc
    finally:
        engine.dispose()
    if ns.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2, default=str))
    else:
        print(render_text(report, settings.timezone))
    if not ns.no_html:
        path = Path(ns.html) if ns.html else settings.var_dir / "reports" / f"kmsg-report-{until:%Y%m%d-%H%M%S}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(report, settings.timezone), encoding="utf-8")
        print(f"\nchart: {path}", flush=True)
    return 0


def add_subcommand(sub: Any) -> None:
    """Register ``kmsg report`` on the CLI's subparsers."""
    parser = sub.add_parser("report", help="delivery rate, latency, failovers, errors and cost over a time range")
    parser.add_argument("--since", default="24h", help="start: ISO time (naive = KMSG_TIMEZONE) or 24h, 7d ...")
    parser.add_argument("--until", default="now", help="end (exclusive): ISO time or 'now'")
    parser.add_argument("--html", help="chart file (default: $KMSG_VAR_DIR/reports/kmsg-report-<time>.html)")
    parser.add_argument("--no-html", action="store_true", help="print the tables only")
    parser.add_argument("--prices", help="unit prices in KRW over the defaults, e.g. '{\"SMS\": 9.9}'")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=cmd_report)
