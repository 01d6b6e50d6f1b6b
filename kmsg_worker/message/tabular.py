"""Message rows from a table (CSV): known columns are message fields, every other column a variable.

The command line's ``send-many FILE.csv`` and the HTTP API's ``text/csv`` batch body read a table the
same way, through :func:`csv_message_rows`, lazily, so a million-row table streams into a batch
without being held in memory.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["MESSAGE_COLUMNS", "csv_message_rows"]

#: CSV columns that are message fields; every other column is a ``#{variable}``.
MESSAGE_COLUMNS = frozenset({"to", "id", "text", "type", "subject", "sender", "from", "template_id", "scheduled_at"})


def csv_message_rows(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One message row per CSV record after the header line.

    Args:
        lines: The table's lines (a text file opened with ``newline=""``, or any iterator of lines);
            a quoted cell may span lines.

    An empty cell of a message column is left out (the batch's defaults then apply); an empty cell
    of a variable column is an empty value. A record with more cells than the header has its extra
    cells dropped: they have no name.
    """
    for record in csv.DictReader(lines):
        row: dict[str, Any] = {}
        variables = {}
        for key, value in record.items():
            if key is None:
                continue
            name = key.strip()
            if name in MESSAGE_COLUMNS:
                if value not in (None, ""):
                    row[name] = value
            elif value is not None:
                variables[name] = value
        if variables:
            row["variables"] = variables
        yield row
