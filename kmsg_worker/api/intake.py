"""From an HTTP body to the producer's input: tenant from the key, sandbox pins for test keys, NDJSON rows.

Nothing here validates a message: :class:`~kmsg_worker.KMsg` does, with the domain's rules. This
module only refuses what the API itself owns (``tenant``, two different idempotency keys), turns a
line that is not JSON into an invalid row, and streams an NDJSON body row by row.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from kmsg_worker.api.auth import Principal
from kmsg_worker.api.problems import Problem
from kmsg_worker.errors import ValidationError
from kmsg_worker.message.tabular import csv_message_rows
from kmsg_worker.sandbox import SIMULATOR, is_sandbox_content, sandboxed

__all__ = ["RefusedRow", "batch_rows", "csv_rows", "message_input", "ndjson_rows", "parse_json"]


class RefusedRow(Mapping[str, Any]):
    """A batch row the API refuses before the producer sees it (a line that is not JSON, a ``tenant``).

    The producer's row validation reads a row's keys inside its per-row ``try``; this mapping raises
    the :class:`ValidationError` there, so the refusal becomes an ordinary invalid row (``{row,
    field, rule}``), rejected or skipped like any other by ``on_invalid``.
    """

    def __init__(self, field: str, rule: str, message: str) -> None:
        self.error = ValidationError(field, rule, message)

    def keys(self) -> Any:
        raise self.error

    def __getitem__(self, key: str) -> Any:
        raise self.error

    def __iter__(self) -> Iterator[str]:
        raise self.error

    def __len__(self) -> int:
        return 0


def parse_json(body: bytes) -> Any:
    """Parse a JSON body.

    Raises:
        Problem: ``malformed-json`` (400).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem("malformed-json", f"the body is not valid JSON ({exc.msg})") from None


def _no_tenant(data: Mapping[str, Any], where: str) -> None:
    if "tenant" in data:
        raise ValidationError(f"{where}tenant", "forbidden", "the tenant is the API key's; remove this field")


def _no_forged_sandbox(data: Mapping[str, Any], where: str) -> None:
    # A live key's message marked as a test one would be simulated yet answered as live: refused.
    for name in ("provider_options", "providerOptions"):
        options = data.get(name)
        if isinstance(options, Mapping) and is_sandbox_content({"provider_options": options}):
            raise ValidationError(
                f"{where}{name}.{SIMULATOR}.sandbox", "forbidden", "test messages are sent with a test key"
            )


def message_input(raw: Any, principal: Principal, idempotency_header: str | None) -> dict[str, Any]:
    """The producer's input for one message posted by ``principal``.

    Raises:
        ValidationError: Not an object, a ``tenant`` field, or two different idempotency keys.
    """
    if not isinstance(raw, dict):
        raise ValidationError("body", "type", "must be a JSON object")
    _no_tenant(raw, "")
    if not principal.test:
        _no_forged_sandbox(raw, "")
    data = dict(raw)
    if idempotency_header is not None:
        body_key = data.get("idempotency_key", data.get("idempotencyKey"))
        if body_key is not None and body_key != idempotency_header:
            raise ValidationError("idempotency_key", "conflict", "differs from the Idempotency-Key header")
        data.pop("idempotencyKey", None)
        data["idempotency_key"] = idempotency_header
    data["tenant"] = principal.tenant
    return sandboxed(data) if principal.test else data


def batch_defaults(defaults: Any, principal: Principal) -> dict[str, Any]:
    """A batch's defaults, with the key's tenant (and the sandbox pins of a test key).

    Raises:
        ValidationError: Not an object, or a ``tenant`` field.
    """
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        raise ValidationError("defaults", "type", "must be a JSON object")
    _no_tenant(defaults, "defaults.")
    if not principal.test:
        _no_forged_sandbox(defaults, "defaults.")
    out = {**defaults, "tenant": principal.tenant}
    return sandboxed(out) if principal.test else out


def batch_rows(rows: Iterable[Any], defaults: Mapping[str, Any], principal: Principal) -> Iterator[Any]:
    """The rows as the producer gets them: a row naming a tenant is refused, a test key's rows are pinned."""
    for row in rows:
        if isinstance(row, dict):
            if "tenant" in row:
                yield RefusedRow("tenant", "forbidden", "the tenant is the API key's; remove this field")
                continue
            try:
                if principal.test:
                    row = sandboxed(row, defaults)
                elif "provider_options" in row or "providerOptions" in row:
                    _no_forged_sandbox(row, "")
            except ValidationError as exc:
                yield RefusedRow(exc.field, exc.rule, exc.detail)
                continue
        yield row  # anything else: the producer reports it (row, type)


def ndjson_rows(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[Any]:
    """One parsed row per non-empty line of an NDJSON stream; a line that is not JSON is a refused row.

    Raises:
        Problem: ``payload-too-large`` when a line exceeds ``max_line_bytes``.
    """
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > max_line_bytes:
            raise Problem("payload-too-large", f"an NDJSON line is longer than {max_line_bytes} bytes")
        for line in lines:
            if line.strip():
                yield _row(line, max_line_bytes)
    if pending.strip():
        yield _row(pending, max_line_bytes)


def _row(line: bytes, max_line_bytes: int) -> Any:
    if len(line) > max_line_bytes:
        raise Problem("payload-too-large", f"an NDJSON line is longer than {max_line_bytes} bytes")
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return RefusedRow("row", "json", "the line is not valid JSON")


def csv_rows(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[dict[str, Any]]:
    """Message rows of a streamed UTF-8 CSV body (header line first; a leading BOM is ignored).

    Raises:
        Problem: ``payload-too-large`` when a line exceeds ``max_line_bytes``; ``malformed-csv``
            when the body is not UTF-8 or not CSV.
    """
    try:
        yield from csv_message_rows(_text_lines(chunks, max_line_bytes))
    except UnicodeDecodeError:
        raise Problem("malformed-csv", "the body is not UTF-8 text") from None
    except csv.Error as exc:
        raise Problem("malformed-csv", f"the body is not CSV ({exc})") from None


def _text_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    for chunk in chunks:
        lines = (pending + decoder.decode(chunk)).split("\n")
        pending = lines.pop()
        # characters, not bytes: a UTF-8 character is at least one byte, so this bound is looser
        # by at most 4x, and it is only a guard against a body with no line breaks at all
        if len(pending) > max_line_bytes:
            raise Problem("payload-too-large", f"a CSV line is longer than {max_line_bytes} bytes")
        for line in lines:
            yield line + "\n"
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending
