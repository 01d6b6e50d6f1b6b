"""Batches: ``send-many`` (a CSV as one batch, with progress) and ``batch status|cancel``."""

from __future__ import annotations

import sys
import time
from collections.abc import Generator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmsg_worker.cli import app
from kmsg_worker.cli.app import EXIT_ERROR, cli
from kmsg_worker.cli.messages import JSON_OPTION, advertising_options
from kmsg_worker.cli.output import echo_json, echo_table, is_terminal, note, plain
from kmsg_worker.message.tabular import csv_message_rows

if TYPE_CHECKING:
    from kmsg_worker.batches import BatchSummary

__all__ = ["csv_rows", "summary_line"]


def csv_rows(path: Path) -> Generator[dict[str, Any], None, None]:
    """Message rows from a CSV file (see :func:`kmsg_worker.message.tabular.csv_message_rows`)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        yield from csv_message_rows(fh)


def _counts(summary: BatchSummary) -> tuple[int, int, int, int]:
    """``(sent, failed, cancelled, pending)`` of a batch."""
    st = summary.by_status
    sent = st.get("sent", 0) + st.get("delivered", 0)
    failed = st.get("failed", 0) + st.get("unknown", 0) + st.get("dead", 0)
    # Suppressed rows are final, never sent: not pending, and shown on their own (summary_line).
    cancelled = st.get("cancelled", 0)
    return sent, failed, cancelled, summary.total - sent - failed - cancelled - summary.suppressed


def summary_line(summary: BatchSummary) -> str:
    """One line: a bar and the counts (``[#####.....] 30 accepted | 12 sent | ... pending``)."""
    sent, failed, cancelled, pending = _counts(summary)
    width = 30
    done = 0 if not summary.total else int(width * (summary.total - pending) / summary.total)
    line = (
        f"[{'#' * done}{'.' * (width - done)}] {summary.total} accepted | {sent} sent | "
        f"{failed} failed | {cancelled} cancelled | {pending} pending"
    )
    if summary.suppressed:
        line += f" | {summary.suppressed} suppressed"
    if summary.deferred:
        line += f" ({summary.deferred} deferred to the advertising window)"
    return line


def _show_summary(summary: BatchSummary) -> None:
    click.echo(f"batch {summary.batch_id}: {summary.status}")
    click.echo(summary_line(summary))
    rows = [
        {"by": group, "key": key, "count": count}
        for group, counts in (
            ("status", summary.by_status),
            ("provider", summary.by_provider),
            ("type", summary.by_type),
            ("error", summary.by_error_code),
        )
        for key, count in sorted(counts.items())
    ]
    if rows:
        echo_table(rows, ["by", "key", "count"])
    extras = {
        "cost_estimate_krw": summary.cost_estimate_krw,
        "throughput_per_s": summary.throughput_per_s,
        "first_sent_at": summary.first_sent_at,
        "finished_at": summary.finished_at,
        "cancelled_at": summary.cancelled_at,
    }
    for key, value in extras.items():
        if value:
            click.echo(f"{key}: {plain(value)}")


def _follow(kmsg: Any, batch_id: str, timeout: float) -> BatchSummary:
    """Poll the batch until it is done or ``timeout`` passes, drawing progress on stderr."""
    deadline = time.monotonic() + timeout
    summary: BatchSummary = kmsg.batch_summary(batch_id)
    if is_terminal(sys.stderr):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"))
        with Progress(*columns, TimeElapsedColumn(), console=Console(file=sys.stderr)) as progress:
            task = progress.add_task("batch", total=summary.total, detail="")
            while True:
                sent, failed, cancelled, pending = _counts(summary)
                detail = f"{sent} sent, {failed} failed, {cancelled} cancelled"
                progress.update(task, total=summary.total, completed=summary.total - pending, detail=detail)
                if summary.done or time.monotonic() >= deadline:
                    return summary
                time.sleep(0.5)
                summary = kmsg.batch_summary(batch_id)
    # Not a terminal (a log, CI): a line every few seconds rather than a redrawn bar.
    while not summary.done and time.monotonic() < deadline:
        note(summary_line(summary))
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        summary = kmsg.batch_summary(batch_id)
    note(summary_line(summary))
    return summary


@cli.command("send-many")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", help="Text of every message; #{column} takes each row's value.")
@click.option("--type", "mtype", help="Message type of every row (default: inferred per row).")
@click.option("--subject", help="LMS/MMS subject.")
@click.option("--from", "sender", help="Sender number (default: KMSG_DEFAULT_SENDER).")
@click.option("--template-id", help="AlimTalk template code.")
@click.option("--at", "scheduled_at", help="Send at this ISO time (naive = KMSG_TIMEZONE).")
@click.option("--tenant", default="default", show_default=True, help="Tenant the batch belongs to.")
@advertising_options
@click.option(
    "--chunk-size", type=click.IntRange(min=1), help="Rows per provider request (default: KMSG_BULK_CHUNK_SIZE)."
)
@click.option("--idempotency-key", help="Sending the same batch twice with this key stores it once.")
@click.option("--skip-invalid", is_flag=True, help="Send the valid rows and list the invalid ones (default: refuse).")
@click.option("--no-wait", is_flag=True, help="Return once the batch is accepted; do not follow it.")
@click.option("--timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True, help="Seconds to follow.")
@JSON_OPTION
def send_many(
    file: Path,
    tenant: str,
    chunk_size: int | None,
    idempotency_key: str | None,
    skip_invalid: bool,
    no_wait: bool,
    timeout: float,
    as_json: bool,
    **fields: Any,
) -> int:
    """Send a CSV of recipients as one batch (a 'to' column; other columns become #{variables}).

    Progress goes to stderr; the summary (or with --json one JSON document) to stdout. Exits 3 if
    the batch is not done within --timeout.
    """
    from kmsg_worker.message import check_tenant

    defaults = {name: value for name, value in fields.items() if value is not None}
    if "mtype" in defaults:
        defaults["type"] = defaults.pop("mtype")
    # The batch's tenant is every row's too (rows label metrics by it), checked once here.
    defaults["tenant"] = tenant = check_tenant(tenant)
    # closing(): a refused batch stops reading mid-file; the file is closed now, not when the
    # abandoned generator happens to be collected.
    with app.producer() as kmsg, closing(csv_rows(file)) as rows:
        receipt = kmsg.send_many(
            rows,
            defaults=defaults,
            on_invalid="skip" if skip_invalid else "reject",
            idempotency_key=idempotency_key,
            chunk_size=chunk_size,
            tenant=tenant,
        )
        for error in receipt.invalid:
            note(f"row {error.row}: {error.field}: {error.message} [{error.rule}]")
        note(f"batch {receipt.batch_id}: {len(receipt.message_ids)} accepted, {len(receipt.invalid)} invalid")
        accepted = {
            "batch_id": receipt.batch_id,
            "accepted": len(receipt.message_ids),
            "invalid": receipt.invalid,
            "duplicate": receipt.duplicate,
        }
        if no_wait:
            if as_json:
                echo_json(accepted)
            else:
                click.echo(receipt.batch_id)
            return 0
        summary = _follow(kmsg, receipt.batch_id, timeout)
    if as_json:
        echo_json({**accepted, "done": summary.done, "summary": summary})
    else:
        _show_summary(summary)
    if not summary.done:
        follow = f"`kmsg batch status {receipt.batch_id}`"
        note(f"batch {receipt.batch_id} not done after {timeout:g}s: follow it with {follow}")
        return EXIT_ERROR
    return 0


@cli.group()
def batch() -> None:
    """Follow or stop a batch."""


def _emit(summary: BatchSummary, as_json: bool) -> None:
    if as_json:
        echo_json(
            {**plain(summary), "done": summary.done, "suppressed": summary.suppressed, "deferred": summary.deferred}
        )
    else:
        _show_summary(summary)


@batch.command("status")
@click.argument("batch_id")
@JSON_OPTION
def batch_status(batch_id: str, as_json: bool) -> int:
    """Counts by status, provider, type and error code; cost and throughput."""
    with app.producer() as kmsg:
        summary = kmsg.batch_summary(batch_id)
    _emit(summary, as_json)
    return 0


@batch.command("cancel")
@click.argument("batch_id")
@JSON_OPTION
def batch_cancel(batch_id: str, as_json: bool) -> int:
    """Stop a batch: what was not sent yet is cancelled; what was sent stays sent."""
    with app.producer() as kmsg:
        summary = kmsg.cancel_batch(batch_id)
    _emit(summary, as_json)
    return 0
