"""How the command line shows things: data on stdout, progress and notes on stderr.

On a terminal, tables and progress are drawn with rich; piped or redirected, tables are plain
aligned text and progress is a line every few seconds, so the output stays readable in a log and
parsable by ``awk``. ``--json`` prints JSON instead of a table (one document, or one object per
line for the listing commands, which ``jq`` reads as a stream).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from typing import Any

import click

__all__ = ["echo_json", "echo_json_lines", "echo_table", "is_terminal", "note", "plain"]


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal a person reads."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def plain(value: Any) -> Any:
    """``value`` made JSON-friendly: dataclasses as dicts, times in ISO 8601 with their offset."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def echo_json(data: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(plain(data), ensure_ascii=False, indent=2, default=str))


def echo_json_lines(items: Iterable[Any]) -> None:
    """Print one compact JSON object per line on stdout."""
    for item in items:
        click.echo(json.dumps(plain(item), ensure_ascii=False, default=str))


def note(text: str) -> None:
    """A line for the person at the terminal (stderr): never mixed into the data."""
    click.echo(text, err=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def echo_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, title: str | None = None) -> None:
    """Print ``rows`` as a table on stdout: rich on a terminal, aligned plain text otherwise.

    Plain text has one header line (the column names in capitals) and one line per row, columns
    separated by at least two spaces, so ``awk '{print $2}'`` works on it.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for column in columns:
            table.add_column(column.upper())
        for line in cells:
            table.add_row(*line)
        Console(file=sys.stdout).print(table)
        return
    if title:
        click.echo(title)
    widths = [max(len(c), *(len(line[i]) for line in cells)) if cells else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
