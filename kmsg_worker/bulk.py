"""Bulk campaigns at provider-batch granularity.

Intake (:func:`intake`, behind :meth:`KMsg.send_many`) validates every row, writes rows in slices
(PostgreSQL ``COPY``, SQLite ``executemany``; never row by row), assigns each row to a *chunk* of at
most the provider's batch limit, and publishes one ``kmsg.send_chunk`` task per chunk carrying only
``(batch_id, chunk)``: after the batch's one transaction commits (``on_invalid="reject"`` or an
idempotency key), or after each slice commits (``on_invalid="skip"`` without a key).

A chunk task (:func:`process_chunk`) claims its rows in one UPDATE, makes **one** provider bulk call
per provider (the adapter may split it further by its own rules), and records every recipient's
result with one statement per outcome kind. When a bulk call partly fails, only the failed
recipients are retried; recipients that were accepted are never sent again. Running a chunk twice
is harmless: the second claim finds nothing.

Routing is decided per chunk (round robin and weights then spread chunks, not rows, across
providers): per-row routing would cost a Redis round trip per message.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import Connection, Table, Text, bindparam, func, insert, or_, select, text, update
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from kmsg_worker import circuit, ratelimit
from kmsg_worker.errors import (
    AcceptanceUnknownError,
    BatchPartiallyStoredError,
    BatchValidationError,
    ErrorCode,
    MessageNotFoundError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    RowError,
    ValidationError,
)
from kmsg_worker.gctune import lowered_switch_interval
from kmsg_worker.logging import get_logger
from kmsg_worker.message import (
    _VAR_PATTERN,
    TEXT_TYPES,
    Message,
    _check_text,
    _infer_type,
    _stringify,
    _variables,
    check_message_id,
    check_storable,
    count_bytes,
    normalize,
    normalize_phone,
)
from kmsg_worker.providers.base import SendOutcome
from kmsg_worker.retry import Action, decide
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import FINAL, MessageStatus
from kmsg_worker.storage.db import backend_pid, json_dumps, settle_lost_commit
from kmsg_worker.storage.models import (
    NEW_MESSAGE_STATE,
    SEND_STATE_COLUMNS,
    SENT_CLEARS,
    Attempt,
    Batch,
    ChunkLease,
    IdempotencyKey,
    MessageRow,
)

__all__ = [
    "BatchSummary",
    "ChunkResult",
    "LeaseReport",
    "batch_summary",
    "cancel_batch",
    "cancel_batch_message",
    "intake",
    "process_chunk",
    "reconcile_expired",
    "recover_chunks",
    "RecoveryReport",
]

S = MessageStatus
log = get_logger("kmsg.bulk")

#: Rows per write during intake (one COPY; one transaction too when the batch is streamed).
SLICE = 10_000
#: Keys a row may carry and still use the template fast path.
_FAST_KEYS = frozenset({"to", "variables", "id", "custom_fields"})
#: Names a caller's message id may be given under.
_ID_KEYS = ("id", "message_id", "messageId")
_MAX_REPORTED_ERRORS = 1000
#: Estimated unit prices in KRW (list prices vary by contract: an estimate, not an invoice).
UNIT_PRICE_KRW: dict[str, float] = {
    "SMS": 9.9,
    "LMS": 30.0,
    "MMS": 60.0,
    "ALIMTALK": 8.0,
    "FRIENDTALK": 15.0,
    "NSA": 8.0,
    "VOICE": 50.0,
    "FAX": 50.0,
    "RCS_SMS": 9.0,
    "RCS_LMS": 27.0,
    "RCS_MMS": 55.0,
    "RCS_TPL": 9.0,
    "RCS_ITPL": 40.0,
    "RCS_LTPL": 27.0,
}

# -- intake -----------------------------------------------------------------------------------------


class _TemplateText:
    """A batch's text cut at its ``#{key}`` tokens, with the byte count of the parts between them.

    :meth:`render` gives what :func:`interpolate` gives, and the result's :func:`count_bytes` from
    the variables' counts alone (the count is additive): a row does not scan its whole text twice
    (once to replace the tokens, once to count the bytes).
    """

    def __init__(self, text: str) -> None:
        # With its one group, split() alternates: text, key, text, key, ..., text.
        pieces = _VAR_PATTERN.split(text)
        self.text = text
        self.bytes = count_bytes(text)
        self.head = pieces[0]
        #: (key, the token as written, the text after it), in order.
        self.tokens = [(key, "#{" + key + "}", after) for key, after in zip(pieces[1::2], pieces[2::2], strict=True)]
        self.fixed_bytes = sum(count_bytes(part) for part in pieces[0::2])

    def render(self, variables: Mapping[str, str]) -> tuple[str, int]:
        """``(text, its count_bytes)`` with ``variables`` in place; an unknown key's token stays as written."""
        if not variables or not self.tokens:
            return self.text, self.bytes
        parts = [self.head]
        nbytes = self.fixed_bytes
        for key, token, after in self.tokens:
            value = variables.get(key, token)
            parts.append(value)
            parts.append(after)
            nbytes += count_bytes(value)
        return "".join(parts), nbytes


class _Template:
    """The shared part of a batch, validated once; rows only add a number and variables."""

    def __init__(self, rt: Runtime, defaults: Mapping[str, Any], now: datetime) -> None:
        self.defaults = dict(defaults)
        self.raw_text = self.defaults.get("text", self.defaults.get("content"))
        probe = {**self.defaults, "to": "01000000000"}
        # Same default as the row-by-row path: batch rows ride the bulk priority unless told otherwise.
        probe.setdefault("priority", "bulk")
        probe.pop("variables", None)
        self.ok = True
        try:
            self.message = normalize(
                probe, limits=rt.settings.limits, now=now, default_sender=rt.settings.default_sender
            )
            # The same checks as normalize (a mapping, string keys, scalar values, storable text).
            self.base_vars = _variables(self.defaults, rt.settings.limits)
            check_storable(self.base_vars, "variables")
        except ValidationError:
            # Some field is only valid per row (e.g. text given per row): no fast path.
            self.ok = False
            return
        if any(self.defaults.get(k) is not None for k in _ID_KEYS):
            # One id for every row: each row goes through normalize and repeats are reported.
            self.ok = False
            return
        self.content = self.message.content()
        self.limits = rt.settings.limits
        self.text = _TemplateText(self.raw_text) if isinstance(self.raw_text, str) else None

    def build(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """Content for one row; same result as :func:`normalize` on the merged mapping."""
        to = normalize_phone(item.get("to"), "to")
        variables = self.base_vars
        if item.get("variables") is not None:
            row_vars = _variables(item, self.limits)
            check_storable(row_vars, "variables")
            if row_vars:
                variables = {**self.base_vars, **row_vars}
        msg = self.message
        text_value: str | None
        if self.text is not None:
            text_value, nbytes = self.text.render(variables)
        else:
            text_value = msg.text
            nbytes = 0 if text_value is None else count_bytes(text_value)
        mtype = msg.type
        if msg.type_inferred:
            mtype = _infer_type(text_value, msg.subject, msg.media, self.limits, nbytes)
        if mtype in TEXT_TYPES or text_value is not None:
            _check_text(mtype, text_value, msg.subject, self.limits, nbytes)
        row_id = check_message_id(item.get("id"))
        content = dict(self.content)
        content.update(id=row_id, to=to, type=mtype.value)
        # Compact like Message.content(): empty values are left out.
        if text_value is not None:
            content["text"] = text_value
        else:
            content.pop("text", None)
        if variables:
            content["variables"] = variables
        else:
            content.pop("variables", None)
        custom = item.get("custom_fields")
        if custom is not None:
            if not isinstance(custom, Mapping):
                raise ValidationError("custom_fields", "type", "must be a mapping")
            extra: dict[str, str] = {}
            for key, value in custom.items():
                if not isinstance(key, str):
                    raise ValidationError("custom_fields", "type", "keys must be strings")
                extra[key] = _stringify(value, f"custom_fields.{key}")
            check_storable(extra, "custom_fields")
            merged = {**msg.custom_fields, **extra}
            if merged:
                content["custom_fields"] = merged
        return content


@dataclass
class _Chunk:
    number: int
    route: list[str]
    limit: int
    size: int = 0
    #: Holds a row to send now. A chunk of only scheduled rows is not published at intake: the
    #: schedule dispatch publishes it when its time comes (``sweeps.dispatch_scheduled``).
    due: bool = False


class _Chunker:
    """Assigns rows to chunks: one open chunk per (type, first provider), cut at the provider's limit."""

    def __init__(self, rt: Runtime, chunk_size: int) -> None:
        self.rt = rt
        self.chunk_size = chunk_size
        self.next_number = 0
        self.open: dict[tuple[str, str | None], _Chunk] = {}
        self.ready: list[int] = []
        self.route_cache: dict[str, int] = {}

    def assign(self, content: Mapping[str, Any]) -> _Chunk:
        key = (str(content["type"]), content.get("provider_id"))
        current = self.open.get(key)
        if current is None or current.size >= current.limit:
            if current is not None and current.due:
                self.ready.append(current.number)
            message = Message.from_content(content)
            route = self.rt.router.route(message)
            provider_limit = self.rt.provider(route[0]).batch_limit
            current = _Chunk(self.next_number, route, max(1, min(self.chunk_size, provider_limit)))
            self.next_number += 1
            self.open[key] = current
        current.size += 1
        return current

    def close_all(self) -> None:
        self.ready.extend(c.number for c in self.open.values() if c.size and c.due)
        self.open.clear()


def _iter_rows(
    rt: Runtime,
    messages: Iterable[Mapping[str, Any]],
    defaults: Mapping[str, Any],
    now: datetime,
    explicit: set[str] | None = None,
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Validate rows one by one, like :meth:`KMsg.send` would, including routing.

    Ids the caller gave are collected in ``explicit``; a repeated one is an invalid row (ids are
    primary keys: the write would fail for the whole slice).
    """
    template = _Template(rt, defaults, now)
    base = dict(defaults)
    base.setdefault("priority", "bulk")
    explicit = set() if explicit is None else explicit
    default_id = any(base.get(k) is not None for k in _ID_KEYS)
    # Routing errors (unknown provider_id, no provider for the type) per (type, provider_id).
    routable: dict[tuple[str, Any], ValidationError | None] = {}
    for index, item in enumerate(messages, start=1):
        try:
            # A dict is checked by its exact type first: isinstance() against an ABC is a Python-level
            # call, paid for every row of a batch.
            if type(item) is not dict and not isinstance(item, Mapping):
                raise ValidationError("row", "type", f"must be a mapping, got {type(item).__name__}")
            if template.ok and item.keys() <= _FAST_KEYS:
                content = template.build(item)
            else:
                merged = {**base, **item}
                content = normalize(
                    merged, limits=rt.settings.limits, now=now, default_sender=rt.settings.default_sender
                ).content()
            key = (content["type"], content.get("provider_id"))
            if key not in routable:
                try:
                    rt.router.route(Message.from_content(content))
                    routable[key] = None
                except ValidationError as exc:
                    routable[key] = exc
            route_error = routable[key]
            if route_error is not None:
                raise route_error
            if default_id or _gives_id(item):
                if content["id"] in explicit:
                    raise ValidationError("id", "duplicate", "the same id is given to another row of this batch")
                explicit.add(content["id"])
            yield index, content
        except ValidationError as exc:
            yield index, RowError(index, exc.field, exc.rule, exc.detail)


def _gives_id(item: Mapping[str, Any]) -> bool:
    """The row names its own message id (under any of :data:`_ID_KEYS`)."""
    # A plain loop, not any() over a generator: this runs for every row of a batch.
    for key in _ID_KEYS:
        if item.get(key) is not None:
            return True
    return False


def _defaults_digest(defaults: Mapping[str, Any]) -> Any:
    """Start of the batch's request hash (idempotency), over the shared fields."""
    try:
        text = json.dumps(defaults, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        # Mixed key types or a 5,000-digit number somewhere (rows built from it are invalid): the
        # validated rows are still folded into the hash by _hashing.
        text = "<defaults that are not JSON>"
    return hashlib.sha256(text.encode())


def _check_defaults(defaults: Mapping[str, Any] | None) -> None:
    if defaults is not None and not isinstance(defaults, Mapping):
        raise ValidationError("defaults", "type", f"must be a mapping, got {type(defaults).__name__}")
    for key in defaults or {}:
        if not isinstance(key, str):
            raise ValidationError(repr(key), "unknown_field", "field names must be strings")


def _without_stored_ids(
    rt: Runtime, rows: Iterable[tuple[int, dict[str, Any] | RowError]], explicit: set[str], size: int = 1000
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Turn rows whose caller-given id is already stored into invalid rows (one query per ``size`` rows)."""
    buffer: list[tuple[int, dict[str, Any] | RowError]] = []

    def drain() -> Iterator[tuple[int, dict[str, Any] | RowError]]:
        if not explicit:
            # No row so far named its own id (``explicit`` holds every id a row gave, up to the
            # last one buffered): nothing to look up, and no per-row checks.
            yield from buffer
            buffer.clear()
            return
        wanted = [r["id"] for _, r in buffer if isinstance(r, dict) and r["id"] in explicit]
        taken: set[str] = set()
        if wanted:
            with rt.store.sessions() as s:
                taken = set(s.scalars(select(MessageRow.id).where(MessageRow.id.in_(wanted))))
        for index, row in buffer:
            if isinstance(row, dict) and row["id"] in taken:
                yield index, RowError(index, "id", "duplicate", "a message with this id already exists")
            else:
                yield index, row
        buffer.clear()

    for item in rows:
        buffer.append(item)
        if len(buffer) >= size:
            yield from drain()
    yield from drain()


def _batch_columns(batch_id: str, now: datetime) -> dict[str, Any]:
    """The columns every stored row of a batch shares (see :func:`_db_row` for the others)."""
    return {"batch_id": batch_id, **NEW_MESSAGE_STATE, "created_at": now, "updated_at": now}


def _db_row(content: dict[str, Any], chunk: _Chunk, now: datetime) -> dict[str, Any]:
    """The columns of one stored row that may differ from its batch's other rows.

    The shared ones (:func:`_batch_columns`) are not repeated in every row: built into each of
    100,000 rows, then scanned again to find they never vary, they took 0.33 instead of 0.25 s to
    build and 0.38 instead of 0.33 s to render as COPY text (process time, three runs each).
    """
    scheduled_raw = content.get("scheduled_at")
    scheduled = datetime.fromisoformat(scheduled_raw) if scheduled_raw else None
    waiting = scheduled is not None and scheduled > now
    chunk.due |= not waiting
    return {
        "id": content["id"],
        "tenant": content.get("tenant") or "default",
        "chunk": chunk.number,
        "type": content["type"],
        "recipient": content["to"],
        "status": S.SCHEDULED.value if waiting else S.QUEUED.value,
        "priority": content.get("priority") or "bulk",
        "route": chunk.route,
        "scheduled_at": scheduled,
        "content": content,
        "queued_at": None if waiting else now,
    }


def _copy_text(value: Any) -> str:
    """One value in PostgreSQL COPY text format."""
    if type(value) is str:
        # Most values of a bulk row (ids, numbers): straight to the escape check.
        text_value = value
    elif value is None:
        return "\\N"
    elif isinstance(value, bool):
        return "t" if value else "f"
    elif isinstance(value, datetime):
        return value.isoformat()
    elif isinstance(value, (dict, list)):
        text_value = json_dumps(value)
    else:
        text_value = str(value)
    # orjson never emits raw tabs or newlines; backslashes are the only characters to escape.
    if "\\" in text_value or "\t" in text_value or "\n" in text_value or "\r" in text_value:
        text_value = text_value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text_value


def _copy_payload(rows: Sequence[Mapping[str, Any]], shared: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(column list, data)`` for ``COPY ... FROM STDIN`` of ``rows`` (text format).

    ``shared``: columns that are the same for every row, given once rather than in each row.
    Columns of ``rows`` holding the same value in every row (often the status, the chunk and the type)
    are found and treated alike: rendered once and appended to each line; only the others are
    rendered per row.
    """
    first = rows[0]
    last = rows[-1]
    # A column that differs between the first and last rows varies (ids, numbers, contents): no
    # scan. The others are counted over a list of their values, in C: a Python-level all() over
    # every row and column took a tenth of a bulk intake's producer CPU (py-spy, 100,000 rows).
    same = [c for c in first if first[c] == last[c] and [r[c] for r in rows].count(first[c]) == len(rows)]
    varying = [c for c in first if c not in same]
    constant = {c: first[c] for c in same}
    if shared:
        constant.update((c, v) for c, v in shared.items() if c not in first)
    same = list(constant)
    end = "".join("\t" + _copy_text(value) for value in constant.values()) + "\n"
    if not varying:
        return ", ".join(same), end[1:] * len(rows)
    # Column by column (map over a list, in C) rather than row by row through a generator.
    columns = [list(map(_copy_text, [r[c] for r in rows])) for c in varying]
    lines = ["\t".join(values) for values in zip(*columns, strict=True)]
    return ", ".join((*varying, *same)), end.join(lines) + end


@dataclass
class _SliceData:
    """One slice of rows in the form its backend takes: ``COPY`` text on PostgreSQL, row dicts on SQLite."""

    count: int
    #: ``(column list, data)`` of :func:`_copy_payload`.
    copy: tuple[str, str] | None = None
    rows: list[dict[str, Any]] | None = None


def _slice_data(rt: Runtime, rows: list[dict[str, Any]], shared: Mapping[str, Any]) -> _SliceData:
    """Render ``rows`` (each with the ``shared`` columns) for the writer thread."""
    if not rows:
        return _SliceData(0)
    if rt.store.is_postgres:
        return _SliceData(len(rows), copy=_copy_payload(rows, shared))
    return _SliceData(len(rows), rows=[{**shared, **row} for row in rows])


def _write(
    rt: Runtime,
    data: _SliceData,
    extra: list[Any],
    leases: Sequence[ChunkLease] = (),
    session: Session | None = None,
    *,
    stood: Callable[[int], bool] | None = None,
) -> None:
    """Write one slice of rows, any extra ORM objects, and new chunks' leases.

    In ``session``'s open transaction (an atomic intake), or in a transaction of its own. For the
    latter, ``stood(pid)`` is asked when the connection breaks at the commit: if it says the commit
    took effect anyway, the slice counts as written (see :func:`_commit_in_doubt`).
    """
    if session is not None:
        _write_in(session, data, extra, leases)
    else:
        rt.store.in_own_transaction(lambda s: _write_in(s, data, extra, leases), stood)


def _commit_in_doubt(rt: Runtime, pid: int, written: Callable[[Connection], bool], doubt: str, batch_id: str) -> bool:
    """A batch's commit lost its connection: True if it took effect, False if not.

    Raises:
        AcceptanceUnknownError: The database could not be asked (``doubt`` says what may be stored).
    """
    stood = settle_lost_commit(rt.engine, pid, written)
    if stood is None:
        raise AcceptanceUnknownError(
            f"the database connection was lost while batch {batch_id} was being committed, and the database "
            f"could not be asked afterwards: {doubt} (what is stored will be sent); check with "
            f"`kmsg batch status {batch_id}` before sending again",
            batch_id=batch_id,
        )
    return stood


def _driver_cursor(session: Session) -> Any:
    """A cursor of the driver (psycopg) itself, on the session's connection and in its transaction."""
    return cast(Any, session.connection().connection.driver_connection).cursor()


def _write_in(session: Session, data: _SliceData, extra: list[Any], leases: Sequence[ChunkLease]) -> None:
    for obj in extra:
        session.merge(obj)
    session.add_all(leases)
    session.flush()
    if data.copy is not None:
        cols, text_data = data.copy
        with _driver_cursor(session) as cur, cur.copy(f"COPY kmsg_messages ({cols}) FROM STDIN") as copy:
            copy.write(text_data)
    elif data.rows:
        session.execute(insert(MessageRow), data.rows)


#: GIL switch interval while a batch is taken in (seconds; see :func:`lowered_switch_interval`).
_INTAKE_SWITCH_INTERVAL = 0.0005


class _SliceWriter:
    """Writes slices on one background thread, in order.

    While PostgreSQL ingests one slice (``COPY``: database CPU), the caller's thread validates the
    next: intake then takes about the longer of the two, not their sum. The caller's thread also
    renders each slice (:func:`_slice_data`), so the writer thread only waits on the database: when it
    rendered them too, that Python work (under the GIL, serial with validation anyway) came before
    every ``COPY``, and the writer, not validation, set the pace (a 100,000-row intake waited on it
    for a third of its time, py-spy). At most two slices wait, so memory stays bounded by the
    slice size, whatever the size of the batch.

    Two ways to commit:

    - streaming (``atomic=False``): each slice is its own transaction, and the chunks it completed
      are published once it commits, so workers start on a long batch while the rest is stored;
    - atomic: every slice goes into one transaction, held by the writer thread; :meth:`commit` ends
      it (the batch's totals and idempotency key included) and only then publishes the chunks.
      Anything else — an invalid row to reject the batch for, the database going away, a crash —
      leaves nothing stored.
    """

    def __init__(self, rt: Runtime, batch_id: str, shared: Mapping[str, Any], *, atomic: bool) -> None:
        self.rt = rt
        self.batch_id = batch_id
        #: Columns every row of the batch has (:func:`_batch_columns`).
        self.shared = shared
        self.atomic = atomic
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmsg-intake")
        self.jobs: deque[Future[None]] = deque()
        #: Rows written so far (slices are written in order, so these are the first ones); in
        #: streaming mode they are committed.
        self.stored = 0
        self.failed = False
        #: The atomic intake's transaction (used only on the writer thread until it is closed).
        self.session: Session | None = None

    def _run(self, data: _SliceData, extra: list[Any], leases: list[ChunkLease], ready: list[int]) -> None:
        if self.failed:
            return  # a slice failed: nothing after it is written, so what is stored is a prefix
        try:
            if self.atomic and self.session is None:
                self.session = self.rt.store.sessions()
            _write(self.rt, data, extra, leases, self.session, stood=lambda pid: self._slice_stood(pid, data.count))
        except BaseException:
            self.failed = True
            raise
        self.stored += data.count
        if not self.atomic:
            _publish_chunks(self.rt, self.batch_id, ready)

    def submit(self, rows: list[dict[str, Any]], extra: list[Any], leases: list[ChunkLease], ready: list[int]) -> None:
        """Render one slice and queue it; waits (and raises its error) when two are already waiting."""
        data = _slice_data(self.rt, rows, self.shared)
        while len(self.jobs) >= 2:
            self.jobs.popleft().result()
        self.jobs.append(self.pool.submit(self._run, data, extra, leases, ready))

    def drain(self) -> None:
        """Wait for every queued slice; raise the first error."""
        while self.jobs:
            self.jobs.popleft().result()

    def _slice_stood(self, pid: int, count: int) -> bool:
        """A streamed slice's commit lost its connection: did its ``count`` rows get stored?"""
        batch_rows = select(func.count()).select_from(MessageRow).where(MessageRow.batch_id == self.batch_id)
        doubt = f"the first {self.stored} rows are stored and the next {count} may be"
        # Slices commit in order, each all or nothing: the batch has the earlier slices' rows, and this one's or not.
        return _commit_in_doubt(
            self.rt, pid, lambda conn: conn.execute(batch_rows).scalar_one() > self.stored, doubt, self.batch_id
        )

    def _commit(self, totals: dict[str, Any], key: IdempotencyKey | None, ready: list[int]) -> None:
        session = self.session
        assert session is not None, "an atomic intake writes at least the batch row before it commits"
        session.execute(update(Batch).where(Batch.id == self.batch_id).values(**totals))
        if key is not None:
            session.add(key)
            session.flush()
        pid = backend_pid(session)
        try:
            session.commit()
        except OperationalError:
            # The reply to COMMIT was lost, not necessarily the commit: ask before saying "nothing was stored".
            batch_row = select(Batch.id).where(Batch.id == self.batch_id)

            def stored(conn: Connection) -> bool:
                return conn.execute(batch_row).first() is not None

            if pid is None or not _commit_in_doubt(self.rt, pid, stored, "all of it may be", self.batch_id):
                raise
        _publish_chunks(self.rt, self.batch_id, ready)

    def commit(self, totals: dict[str, Any], key: IdempotencyKey | None, ready: list[int]) -> None:
        """Atomic mode: after the last slice, store the totals and the key, commit, publish ``ready``."""
        self.drain()
        self.pool.submit(self._commit, totals, key, ready).result()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around the intake loop: an error rolls an atomic intake back; a streaming one reports what it stored."""
        try:
            with lowered_switch_interval(_INTAKE_SWITCH_INTERVAL):
                yield
                self.drain()
        except OperationalError as exc:
            self.close()
            if self.stored and not self.atomic:
                # Not "nothing was accepted": the first rows are stored and their chunks published.
                raise BatchPartiallyStoredError(self.batch_id, self.stored, type(exc.orig).__name__) from exc
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the writer thread; an atomic transaction not committed by now is rolled back."""
        try:
            while self.jobs:
                self.jobs.popleft().exception()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.session is not None:
                session, self.session = self.session, None
                try:
                    session.close()  # rolls back unless committed
                except SQLAlchemyError as exc:  # the database is gone: the server dropped the transaction
                    log.warning("batch.rollback_failed", batch_id=self.batch_id, error=type(exc).__name__)


class _Slicer:
    """Valid rows on their way to the writer: assigned to chunks, cut into slices, their ids kept."""

    def __init__(self, batch: Batch, chunker: _Chunker, writer: _SliceWriter, now: datetime) -> None:
        self.batch = batch
        self.chunker = chunker
        self.writer = writer
        self.now = now
        self.ids: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self.first = True
        self.published_upto = 0
        self.leased_upto = 0

    def add(self, row: dict[str, Any]) -> None:
        chunk = self.chunker.assign(row)
        self.pending.append(_db_row(row, chunk, self.now))
        self.ids.append(row["id"])
        if len(self.pending) >= SLICE:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Hand the pending rows to the writer (the batch row goes with the first slice)."""
        chunker = self.chunker
        extra: list[Any] = [self.batch] if self.first else []
        self.first = False
        # Every chunk gets its lease row with its first rows, so a cancel can always lock it.
        leases = [
            ChunkLease(batch_id=self.batch.id, chunk=n, **_IDLE) for n in range(self.leased_upto, chunker.next_number)
        ]
        self.leased_upto = chunker.next_number
        rows = self.pending.copy()
        self.pending.clear()
        if final:
            chunker.close_all()
        ready = chunker.ready[self.published_upto :]
        self.published_upto = len(chunker.ready)
        self.writer.submit(rows, extra, leases, ready)


def intake(
    rt: Runtime,
    messages: Iterable[Mapping[str, Any]],
    *,
    defaults: Mapping[str, Any] | None = None,
    on_invalid: str = "reject",
    chunk_size: int | None = None,
    idempotency_key: str | None = None,
    tenant: str = "default",
) -> tuple[str, list[str], list[RowError], bool]:
    """Validate, store and enqueue a batch; see :meth:`kmsg_worker.producer.KMsg.send_many`.

    Rows stream from ``messages`` to the database in slices: memory stays bounded whatever the size
    of the batch. With ``on_invalid="reject"`` or an ``idempotency_key`` the batch is stored in one
    transaction (all of it or nothing; its chunks are published after the commit); with
    ``on_invalid="skip"`` and no key each slice commits on its own and its chunks go out at once.

    Returns:
        ``(batch_id, message_ids, invalid_rows, duplicate)``.
    """
    if on_invalid not in ("reject", "skip"):
        raise ValidationError("on_invalid", "enum", "must be 'reject' or 'skip'")
    _check_defaults(defaults)
    now = rt.now()
    batch_id = uuid.uuid4().hex
    defaults = dict(defaults or {})
    chunker = _Chunker(rt, chunk_size or rt.settings.bulk_chunk_size)
    reject = on_invalid == "reject"
    digest = _defaults_digest(defaults)
    errors: list[RowError] = []
    invalid_count = 0

    explicit: set[str] = set()
    rows_iter: Iterable[tuple[int, dict[str, Any] | RowError]] = _iter_rows(rt, messages, defaults, now, explicit)
    if idempotency_key:
        rows_iter = _hashing(rows_iter, digest)
        repeat = _repeat_of_stored(rt, rows_iter, tenant, idempotency_key, now, digest, reject=reject)
        if repeat is not None:
            return (*repeat, [], True)
    # Caller-given ids already in the database (checked after the idempotency look-up, which
    # answers a repeated batch with its original ids).
    rows_iter = _without_stored_ids(rt, rows_iter, explicit)

    batch = Batch(
        id=batch_id,
        tenant=tenant,
        status="queued",
        total=0,
        invalid=0,
        chunk_size=chunker.chunk_size,
        created_at=now,
    )
    atomic = reject or idempotency_key is not None
    writer = _SliceWriter(rt, batch_id, _batch_columns(batch_id, now), atomic=atomic)
    out = _Slicer(batch, chunker, writer, now)
    ids = out.ids
    try:
        with writer.writing():
            for _, row in rows_iter:
                if isinstance(row, RowError):
                    invalid_count += 1
                    if len(errors) < _MAX_REPORTED_ERRORS:
                        errors.append(row)
                elif not (reject and invalid_count):  # once rejected, the rest is only validated
                    out.add(row)
            if reject and invalid_count:
                raise BatchValidationError(errors)  # leaving writing(): the transaction rolls back
            out.flush(final=True)
            # ``total`` set is what marks the intake complete.
            totals = {"total": len(ids), "invalid": invalid_count, "invalid_rows": [e.__dict__ for e in errors] or None}
            if atomic:
                key = None
                if idempotency_key:
                    key = _key_row(rt, tenant, idempotency_key, digest.hexdigest(), batch_id, now)
                writer.commit(totals, key, chunker.ready)
    except IntegrityError:
        # The same key, stored by a concurrent submission that committed first: answer as its repeat.
        stored_key = _stored_key(rt, tenant, idempotency_key, now) if idempotency_key else None
        if idempotency_key is None or stored_key is None:
            raise
        return (*_repeated(rt, idempotency_key, stored_key, digest.hexdigest()), [], True)
    if not atomic:
        _store_totals(rt, batch_id, totals)
    log.info("batch.accepted", batch_id=batch_id, total=len(ids), invalid=invalid_count, chunks=chunker.next_number)
    return batch_id, ids, errors, False


def _store_totals(rt: Runtime, batch_id: str, totals: dict[str, Any]) -> None:
    """A streamed batch's last write: its totals, which mark the intake complete."""
    store = update(Batch).where(Batch.id == batch_id).values(**totals)
    batch_total = select(Batch.total).where(Batch.id == batch_id)

    def stood(pid: int) -> bool:
        doubt = f"all {totals['total']} rows are stored; only the batch's totals may not be"
        return _commit_in_doubt(
            rt, pid, lambda conn: conn.execute(batch_total).scalar_one() == totals["total"], doubt, batch_id
        )

    try:
        rt.store.in_own_transaction(lambda s: s.execute(store), stood)
    except OperationalError as exc:
        # Every row is stored and its chunk published: not "nothing was accepted".
        raise BatchPartiallyStoredError(batch_id, totals["total"], type(exc.orig).__name__) from exc


def _key_row(rt: Runtime, tenant: str, key: str, request_hash: str, batch_id: str, now: datetime) -> IdempotencyKey:
    return IdempotencyKey(
        tenant=tenant,
        key=key,
        request_hash=request_hash,
        message_ids=[],
        batch_id=batch_id,
        created_at=now,
        expires_at=now + rt.settings.idempotency_ttl,
    )


def _repeat_of_stored(
    rt: Runtime,
    rows: Iterable[tuple[int, dict[str, Any] | RowError]],
    tenant: str,
    key: str,
    now: datetime,
    digest: Any,
    *,
    reject: bool,
) -> tuple[str, list[str]] | None:
    """``(batch id, ids)`` when ``key`` already stored a batch, else ``None`` (``rows`` left unread).

    A used key's rows are read only to compare the request with the first one, never stored again.
    """
    stored = _stored_key(rt, tenant, key, now)
    if stored is None:
        return None
    bad = [row for _, row in rows if isinstance(row, RowError)]
    if bad and reject:
        raise BatchValidationError(bad[:_MAX_REPORTED_ERRORS])
    return _repeated(rt, key, stored, digest.hexdigest())


def _hashing(
    rows: Iterable[tuple[int, dict[str, Any] | RowError]], digest: Any
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Fold each valid row's content (ids excluded) into the request hash as it passes."""
    for index, row in rows:
        if isinstance(row, dict):
            digest.update(json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True).encode())
        yield index, row


def _stored_key(rt: Runtime, tenant: str, key: str, now: datetime) -> tuple[str, str] | None:
    """``(request hash, batch id)`` of a batch stored with ``key``, or ``None`` (an expired key is removed)."""
    with rt.store.sessions.begin() as s:
        row = s.get(IdempotencyKey, (tenant, key))
        if row is None or row.expires_at <= now:
            if row is not None:
                s.delete(row)
            return None
        return row.request_hash, row.batch_id or ""


def _repeated(rt: Runtime, key: str, stored: tuple[str, str], request_hash: str) -> tuple[str, list[str]]:
    """The batch a repeated request (same key) names, with its ids; a different request is a conflict."""
    from kmsg_worker.errors import IdempotencyConflictError

    if stored[0] != request_hash:
        raise IdempotencyConflictError(key)
    batch_id = stored[1]
    with rt.store.sessions() as s:
        return batch_id, list(s.scalars(select(MessageRow.id).where(MessageRow.batch_id == batch_id)))


def _publish_chunks(rt: Runtime, batch_id: str, chunks: Sequence[int]) -> None:
    if not chunks:
        return
    try:
        rt.dispatcher.chunk(batch_id, list(chunks))
    except Exception as exc:  # noqa: BLE001 - any broker failure: the sweep re-publishes stale chunks
        log.warning("batch.enqueue_failed", batch_id=batch_id, chunks=len(chunks), error=type(exc).__name__)


# -- chunk processing -------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    """What one chunk run did."""

    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    unknown: int = 0
    failed_over: int = 0
    dead: int = 0
    requests: int = 0
    throttled: int = 0
    #: Countdowns (seconds; 0 = now) at which the chunk must run again, published after its lease is released.
    republish: list[float] = field(default_factory=list)

    def again(self, delay: float) -> None:
        """Run the chunk again after ``delay`` seconds (once this run has let go of the lease)."""
        if delay not in self.republish:
            self.republish.append(delay)


@dataclass
class _Row:
    id: str
    #: Built as the row is read: the parsed JSON is handed to the message, not kept beside it
    #: (a 10,000-row chunk held both, ~6 MB more at its peak, and a chunk's peak is what a worker
    #: process keeps as resident memory afterwards).
    message: Message
    route: list[str]
    route_index: int
    attempts: int
    provider_attempts: int
    deliveries: int
    created_at: datetime
    outcome_unknown: bool
    priority: str

    @property
    def provider(self) -> str:
        return self.route[self.route_index]

    @classmethod
    def load_all(cls, rows: Iterable[Sequence[Any]]) -> list[_Row]:
        """Rows read with :data:`_ROW_COLUMNS` (``content`` and ``route`` arrive as JSON text).

        A chunk's rows share one route and, from one intake, one ``created_at``: each distinct value
        is parsed (or converted to UTC) once and the rows share the result, which is never changed.
        Columns after the first ten are ignored.
        """
        routes: dict[str, list[str]] = {}
        times: dict[datetime, datetime] = {}
        loaded: list[_Row] = []
        for values in rows:
            route = routes.get(values[2])
            if route is None:
                route = routes[values[2]] = orjson.loads(values[2])
            created = times.get(values[7])
            if created is None:
                created = times[values[7]] = values[7].astimezone(UTC)
            loaded.append(
                cls(
                    values[0],
                    Message.from_content_owned(orjson.loads(values[1])),
                    route,
                    values[3],
                    values[4],
                    values[5],
                    values[6],
                    created,
                    values[8],
                    values[9],
                )
            )
        return loaded


#: Columns of :class:`_Row`, in field order (claims and lease reconciliation read the same shape).
#: The JSON columns are read as text and parsed with orjson: the driver's own JSONB decoding cost
#: about 8 us per row, a third of a whole chunk claim.
_ROW_COLUMNS = (
    MessageRow.id,
    cast_(MessageRow.content, Text),
    cast_(MessageRow.route, Text),
    *SEND_STATE_COLUMNS,
    MessageRow.priority,
)


#: A chunk lease at rest: no claim holds it.
_IDLE: dict[str, Any] = {"lease_until": None, "in_flight": False, "deliveries": 0}
#: States a row of a claimed chunk is in while its request is in flight (the chunk holds the lease).
_HELD = (S.QUEUED, S.RETRYING)


@dataclass
class _Claim:
    rows: list[_Row]
    #: Claims since the last completed run (this one included).
    deliveries: int
    cancelled: bool


def _claim_chunk(rt: Runtime, batch_id: str, chunk: int, now: datetime) -> _Claim | None:
    """Take the chunk's lease (one row) and read its sendable rows; ``None`` if a claim holds it.

    The rows themselves are not written: they stay ``queued`` (or due ``retrying``) while the lease
    is held, and only the chunk's task sends them (the sweeps re-publish the chunk, never the rows).
    A chunk still in flight from a claim whose worker died is not taken here, even once its lease ran
    out: :func:`recover_chunks` (the maintenance sweep) settles it first.
    """
    lease = now + timedelta(seconds=rt.settings.lease_seconds)
    insert_ = pg_insert if rt.store.is_postgres else sqlite_insert
    take = (
        insert_(ChunkLease)
        .values(batch_id=batch_id, chunk=chunk, lease_until=lease, in_flight=True, deliveries=1, updated_at=now)
        .on_conflict_do_update(
            index_elements=[ChunkLease.batch_id, ChunkLease.chunk],
            set_={
                "lease_until": lease,
                "in_flight": True,
                "deliveries": ChunkLease.deliveries + 1,
                "updated_at": now,
            },
            where=ChunkLease.in_flight.is_(False),
        )
        .returning(ChunkLease.deliveries)
    )
    with rt.store.sessions.begin() as s:
        taken = s.execute(take).first()
        if taken is None:
            return None
        # Read after the lease is ours: a cancel that locked the lease first has committed by now.
        cancelled = s.scalar(select(Batch.status).where(Batch.id == batch_id)) == "cancelled"
        rows = _load_chunk_rows(s, batch_id, chunk, now + timedelta(seconds=1))
    return _Claim(rows, int(taken[0]), cancelled)


#: :data:`_ROW_COLUMNS` as SQL, for the driver's own cursor (PostgreSQL).
_ROW_SQL = ", ".join(["id", "content::text", "route::text", *(c.key for c in SEND_STATE_COLUMNS), "priority"])
#: A chunk's sendable rows on PostgreSQL: ``queued``, or ``retrying`` and due by ``%(due)s`` (NULL: every
#: ``retrying`` row, for a take-over that must settle them all).
_CHUNK_ROWS_PG = (
    f"SELECT {_ROW_SQL} FROM kmsg_messages WHERE batch_id = %(batch_id)s AND chunk = %(chunk)s "
    "AND (status = 'queued' OR (status = 'retrying' "
    "AND (CAST(%(due)s AS timestamptz) IS NULL OR next_attempt_at <= %(due)s)))"
)


def _load_chunk_rows(s: Session, batch_id: str, chunk: int, due: datetime | None) -> list[_Row]:
    """The chunk's ``queued`` rows and its ``retrying`` ones due by ``due`` (``None``: all of them)."""
    if s.get_bind().dialect.name == "postgresql":
        # The driver's cursor on the session's connection (same transaction): plain tuples, without
        # SQLAlchemy's row objects and per-value result processing (created_at is made UTC once per
        # distinct value in load_all instead). Reading and loading a 5,000-row chunk: 58.5 -> 48.8 ms
        # of CPU (best of 25 alternated runs; the medians 107.7 -> 93.7 ms on a noisy machine).
        with _driver_cursor(s) as cur:
            cur.execute(_CHUNK_ROWS_PG, {"batch_id": batch_id, "chunk": chunk, "due": due})
            return _Row.load_all(cur.fetchall())
    retrying = MessageRow.status == S.RETRYING
    if due is not None:
        retrying = retrying & (MessageRow.next_attempt_at <= due)
    stmt = select(*_ROW_COLUMNS).where(
        MessageRow.batch_id == batch_id, MessageRow.chunk == chunk, (MessageRow.status == S.QUEUED) | retrying
    )
    # On the session's connection: plain rows, without the ORM's per-row loading machinery; all at
    # once (one fetchall), not a driver fetchone per row as iterating the result does.
    return _Row.load_all(s.connection().execute(stmt).all())


def _release_chunk(rt: Runtime, batch_id: str, chunk: int, now: datetime, *, completed: bool = True) -> None:
    """Free the lease. ``completed``: the run recorded every outcome (the poison count starts over)."""
    values: dict[str, Any] = dict(_IDLE) if completed else {"lease_until": None, "in_flight": False}
    with rt.store.sessions.begin() as s:
        s.execute(
            update(ChunkLease)
            .where(ChunkLease.batch_id == batch_id, ChunkLease.chunk == chunk)
            .values(updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )


@dataclass
class RecoveryReport:
    """What :func:`recover_chunks` did."""

    chunks: int = 0
    reconciled_sent: int = 0
    deferred: int = 0
    unknown: int = 0


def recover_chunks(rt: Runtime, *, now: datetime | None = None, limit: int = 100) -> RecoveryReport:
    """Take over chunks whose worker died with their request in flight (lease expired, still in flight).

    Each is held for another lease while every row it did not record is looked up at the provider
    (by our ids): the ones the provider has are recorded ``sent`` and never sent again; the rest
    stay sendable. Then the chunk is freed and published again. The maintenance sweep runs this under
    its own time limit, so a slow look-up (Solapi lists recent messages page by page) cannot turn a
    chunk into poison. A provider that cannot be asked leaves those rows ``unknown``.
    """
    now = now or rt.now()
    report = RecoveryReport()
    hold = now + timedelta(seconds=rt.settings.lease_seconds)
    with rt.store.sessions() as s:
        expired = s.execute(
            select(ChunkLease.batch_id, ChunkLease.chunk)
            .where(ChunkLease.in_flight.is_(True), ChunkLease.lease_until <= now)
            .order_by(ChunkLease.lease_until)
            .limit(limit)
        ).all()
    for batch_id, chunk in expired:
        with rt.store.sessions.begin() as s:
            # Conditional: a concurrent sweep that took it first has moved the lease on.
            taken: Any = s.execute(
                update(ChunkLease)
                .where(
                    ChunkLease.batch_id == batch_id,
                    ChunkLease.chunk == chunk,
                    ChunkLease.in_flight.is_(True),
                    ChunkLease.lease_until <= now,
                )
                .values(lease_until=hold, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            taken = bool(taken.rowcount)
            rows = _load_chunk_rows(s, batch_id, chunk, None) if taken else []
        if not taken:
            continue
        report.chunks += 1
        result = ChunkResult()
        by_provider: dict[str, list[_Row]] = defaultdict(list)
        for row in rows:
            row.outcome_unknown = True  # the dead run may have sent any of them
            by_provider[row.provider].append(row)
        for group in by_provider.values():
            _reconcile_rows(rt, (batch_id, chunk), group, now, result)
        report.reconciled_sent += result.sent
        report.deferred += result.retrying
        report.unknown += result.unknown
        # Not a completed run: the poison count stands until a run of the chunk finishes.
        _release_chunk(rt, batch_id, chunk, rt.now(), completed=False)
        log.warning(
            "batch.chunk_recovered",
            batch_id=batch_id,
            chunk=chunk,
            rows=len(rows),
            reconciled_sent=result.sent,
            deferred=result.retrying,
            unknown=result.unknown,
        )
        rt.dispatcher.chunk(batch_id, [chunk])
    return report


def _attempt_rows(
    rows: Sequence[_Row], provider: str, outcome: str, now: datetime, **extra: Any
) -> list[dict[str, Any]]:
    return [
        {
            "message_id": r.id,
            "attempt_no": r.attempts + 1,
            "provider": provider,
            "outcome": outcome,
            "error_code": extra.get("error_code"),
            "provider_code": extra.get("provider_code"),
            "http_status": extra.get("http_status"),
            "latency_ms": extra.get("latency_ms"),
            "detail": extra.get("detail"),
            "created_at": now,
        }
        for r in rows
    ]


def _record_sent(
    rt: Runtime,
    rows: Sequence[_Row],
    outcomes: Mapping[str, SendOutcome],
    now: datetime,
    latency_ms: float,
    attempt_outcome: str = "accepted",
    expect: Sequence[MessageStatus] = _HELD,
    chunk: tuple[str, int] | None = None,
) -> None:
    """One UPDATE for every accepted recipient, plus their attempt rows, in one transaction.

    ``expect``: the states the rows are in (``queued``/``retrying`` under a chunk lease, ``sending``
    for single messages whose own lease expired). ``chunk``: the ``(batch_id, chunk)`` every row
    belongs to, which bounds the UPDATE's read of the table to that chunk (see :func:`_sent_update_pg`).
    """
    if not rows:
        return
    expected = [str(st) for st in expect]
    first_check = now + timedelta(seconds=rt.settings.tracking.first_check)
    store = rt.store
    with store.sessions.begin() as s:
        if store.is_postgres:
            s.execute(_JOIN_BY_HASH)
            s.execute(*_sent_update_pg(rows, outcomes, now, first_check, expected, chunk))
        else:
            # Core table, not the ORM entity: an executemany UPDATE keyed by a bound id.
            table = cast(Table, MessageRow.__table__)
            s.execute(
                update(table)
                # OR of equalities: an expanding IN cannot be used with executemany.
                .where(table.c.id == bindparam("b_id"), or_(*(table.c.status == st for st in expected)))
                .values(
                    status=S.SENT,
                    provider=bindparam("b_provider"),
                    provider_message_id=bindparam("b_pmid"),
                    sent_at=now,
                    updated_at=now,
                    attempts=table.c.attempts + 1,
                    provider_attempts=table.c.provider_attempts + 1,
                    next_check_at=first_check,
                    native_fallback=bindparam("b_native"),
                    warnings=bindparam("b_warnings"),
                    **SENT_CLEARS,
                ),
                [
                    {
                        "b_id": r.id,
                        "b_provider": r.provider,
                        "b_pmid": outcomes[r.id].provider_message_id,
                        "b_native": outcomes[r.id].native_fallback,
                        "b_warnings": _warnings_list(outcomes[r.id]),
                    }
                    for r in rows
                ],
            )
        _insert_attempts(rt, s, _attempt_rows(rows, rows[0].provider, attempt_outcome, now, latency_ms=latency_ms))


_SENT_SET = (
    "UPDATE kmsg_messages AS m SET status = 'sent', provider_message_id = v.pmid, sent_at = :now, "
    "updated_at = :now, attempts = m.attempts + 1, provider_attempts = m.provider_attempts + 1, "
    "next_check_at = :first_check, "
    # SENT_CLEARS as SQL literals (0, NULL, false)
    + "".join(
        f"{column} = {'NULL' if value is None else str(value).lower()}, " for column, value in SENT_CLEARS.items()
    )
)
_SENT_WHERE = "WHERE m.id = v.id AND m.status = ANY(CAST(:expected AS text[]))"
_SENT_IN_CHUNK = " AND m.batch_id = :batch_id AND m.chunk = :chunk"
#: For the rest of the transaction: plan the UPDATE with its real parameters, never as a nested loop.
#: psycopg prepares a statement run five times on a connection, and PostgreSQL then switches to a
#: generic plan that guesses 10 elements for an array parameter: it joined a chunk's 5,000 ids to its
#: 5,000 rows by a nested loop, comparing 25 million pairs (5-8 s per chunk, seen in a 1,000,000-row
#: run). The ids now arrive as a JSON array, whose row count is guessed too (100): the same guard
#: holds. Both settings end with the transaction.
_JOIN_BY_HASH = text(
    "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('enable_nestloop', 'off', true)"
)


def _json_column(param: str) -> str:
    """One column of a ``ROWS FROM``: the elements of a JSON array parameter, as text."""
    return f"json_array_elements_text(CAST(:{param} AS json))"


def _sent_update_pg(
    rows: Sequence[_Row],
    outcomes: Mapping[str, SendOutcome],
    now: datetime,
    first_check: datetime,
    expected: list[str],
    chunk: tuple[str, int] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """One ``UPDATE ... FROM ROWS FROM (JSON arrays)`` for the whole group: the statement and its parameters.

    A group is one provider's, and warnings or native fallbacks are rare: then only ids and
    provider ids travel (each as one JSON array, see below).

    With ``chunk`` the rows are also matched on ``(batch_id, chunk)``. Without it, and without
    fresh statistics (a table just filled by an intake, before autovacuum's ANALYZE), PostgreSQL
    joined the ids by hashing a sequential scan of the *whole* table, once per chunk: measured on a
    5,000-row chunk of an 80,000-row table, 95 ms of a 275 ms UPDATE, growing with the table. The
    chunk's index bounds that read to the chunk's own rows, whatever the statistics say.
    """
    ids = [r.id for r in rows]
    results = [outcomes[i] for i in ids]
    # Columns travel as JSON arrays, zipped back into rows by ROWS FROM: psycopg dumps a Python list
    # as text[] element by element in Python (18.7 ms for 5,000 ids, timeit), orjson in 0.1 ms and
    # PostgreSQL splits it in C. A NULL element arrives as SQL NULL (json_array_elements_text).
    params: dict[str, Any] = {
        "expected": expected,
        "now": now,
        "first_check": first_check,
        "ids": json_dumps(ids),
        "pmids": json_dumps([o.provider_message_id for o in results]),
    }
    providers = {r.provider for r in rows}
    if len(providers) == 1 and not any(o.native_fallback or o.warnings for o in results):
        params["provider"] = providers.pop()
        sql = (
            _SENT_SET + "provider = :provider, native_fallback = false, warnings = NULL "
            "FROM ROWS FROM (" + _json_column("ids") + ", " + _json_column("pmids") + ") AS v(id, pmid) " + _SENT_WHERE
        )
    else:
        params.update(
            providers=json_dumps([r.provider for r in rows]),
            natives=json_dumps([o.native_fallback for o in results]),
            warnings=json_dumps([_warnings_json(o) for o in results]),
        )
        columns = ", ".join(_json_column(name) for name in ("ids", "pmids", "providers", "natives", "warnings"))
        sql = (
            _SENT_SET + "provider = v.provider, native_fallback = CAST(v.native AS boolean), "
            "warnings = CAST(v.warnings AS jsonb) "
            "FROM ROWS FROM (" + columns + ") AS v(id, pmid, provider, native, warnings) " + _SENT_WHERE
        )
    if chunk is not None:
        params["batch_id"], params["chunk"] = chunk
        sql += _SENT_IN_CHUNK
    return text(sql), params


def _warnings_list(outcome: SendOutcome) -> list[dict[str, Any]] | None:
    if not outcome.warnings:
        return None
    return [{"code": w.code, "message": w.message, "details": dict(w.details)} for w in outcome.warnings]


def _warnings_json(outcome: SendOutcome) -> str | None:
    warnings = _warnings_list(outcome)
    return None if warnings is None else json_dumps(warnings)


def _insert_attempts(rt: Runtime, s: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if rt.store.is_postgres:
        # Most columns are the same for a whole request (provider, outcome, latency, time).
        cols, data = _copy_payload(rows)
        with _driver_cursor(s) as cur, cur.copy(f"COPY kmsg_attempts ({cols}) FROM STDIN") as copy:
            copy.write(data)
    else:
        s.execute(insert(Attempt), rows)


def _bulk_transition(
    rt: Runtime,
    rows: Sequence[_Row],
    target: MessageStatus,
    now: datetime,
    expect: Sequence[MessageStatus] = _HELD,
    **values: Any,
) -> None:
    if rows:
        rt.store.transition([r.id for r in rows], target, now=now, expect=expect, **values)


def _apply_errors(
    rt: Runtime,
    batch_id: str,
    chunk: int,
    failures: list[tuple[_Row, ProviderError]],
    now: datetime,
    whole_request: bool,
    result: ChunkResult,
) -> None:
    """Decide per recipient: retry, fail over, reconcile or fail; group the writes by decision."""
    by_action: dict[Action, list[tuple[_Row, ProviderError, float]]] = defaultdict(list)
    for row, error in failures:
        decision = decide(
            error,
            provider_attempts=row.provider_attempts + 1,
            age_seconds=(now - row.created_at).total_seconds(),
            has_next_provider=row.route_index + 1 < len(row.route),
            policy=rt.settings.retry,
        )
        action = decision.action
        if action is Action.RECONCILE and not rt.provider(row.provider).capabilities.lookup_by_reference:
            action = Action.FAIL
            error = ProviderTimeout(str(error), provider=error.provider, code=ErrorCode.OUTCOME_UNKNOWN)
        by_action[action].append((row, error, decision.delay))
    attempts: list[dict[str, Any]] = []
    for action, items in by_action.items():
        for row, error, _ in items:
            attempts.extend(
                _attempt_rows(
                    [row],
                    row.provider,
                    {Action.RECONCILE: "timeout", Action.RETRY: "retryable"}.get(
                        action, "retryable" if error.retryable else "rejected"
                    ),
                    now,
                    error_code=error.code.value,
                    provider_code=error.provider_code,
                    http_status=error.status_code,
                    detail=str(error)[:500],
                )
            )
    with rt.store.sessions.begin() as s:
        _insert_attempts(rt, s, attempts)
    republish_delay: float | None = None
    # One UPDATE per distinct decision (a whole-request failure: one for the whole chunk), not one per
    # recipient; the per-row counters move with column expressions (the chunk's lease keeps every
    # other writer away from these rows).
    # Rows retried together wait for the longest of their jittered delays: they go out together
    # anyway, in the chunk's next request.
    groups: dict[tuple[Action, str, str, str], tuple[list[str], list[float]]] = {}
    for action, items in by_action.items():
        for row, error, delay in items:
            ids, waits = groups.setdefault((action, error.code.value, str(error)[:1000], row.provider), ([], []))
            ids.append(row.id)
            waits.append(2.0 if action is Action.RECONCILE else delay)
    with rt.store.sessions.begin() as s:
        for (action, code, message, provider), (ids, waits) in groups.items():
            wait = max(waits)
            common: dict[str, Any] = {
                "attempts": MessageRow.attempts + 1,
                "error_code": code,
                "error_message": message,
            }
            if action in (Action.RETRY, Action.RECONCILE):
                # A whole-request failure re-runs the chunk (one request again); a partial one is
                # left to the sweep, which re-publishes the chunk when they are due (then only
                # they are sent, in one request).
                rt.store.transition(
                    ids,
                    S.RETRYING,
                    now=now,
                    expect=_HELD,
                    session=s,
                    provider_attempts=MessageRow.provider_attempts + 1,
                    next_attempt_at=now + timedelta(seconds=wait),
                    retry_task_published=whole_request,
                    outcome_unknown=action is Action.RECONCILE,
                    **common,
                )
                result.retrying += len(ids)
                if whole_request:
                    republish_delay = max(republish_delay or 0.0, wait)
            elif action is Action.FAILOVER:
                rt.store.transition(
                    ids,
                    S.QUEUED,
                    now=now,
                    expect=_HELD,
                    session=s,
                    route_index=MessageRow.route_index + 1,
                    provider_attempts=0,
                    queued_at=now,
                    **common,
                )
                result.failed_over += len(ids)
                republish_delay = republish_delay if republish_delay is not None else 0.0
            else:
                status = S.UNKNOWN if code == ErrorCode.OUTCOME_UNKNOWN.value else S.FAILED
                rt.store.transition(ids, status, now=now, expect=_HELD, session=s, provider=provider, **common)
                if status is S.UNKNOWN:
                    result.unknown += len(ids)
                else:
                    result.failed += len(ids)
    if republish_delay is not None:
        result.again(min(republish_delay, rt.settings.retry.max_countdown))


def _reconcile_rows(
    rt: Runtime, chunk: tuple[str, int], rows: list[_Row], now: datetime, result: ChunkResult
) -> list[_Row]:
    """Rows whose last request timed out (or whose worker died): ask the provider first; return those it never got."""
    unknown = [r for r in rows if r.outcome_unknown]
    if not unknown:
        return rows
    provider = rt.provider(unknown[0].provider)
    if not provider.capabilities.lookup_by_reference:
        # Nobody can tell whether they went out: final "unknown" rather than a possible duplicate.
        _bulk_transition(
            rt,
            unknown,
            S.UNKNOWN,
            now,
            provider=provider.name,
            error_code=ErrorCode.OUTCOME_UNKNOWN.value,
            error_message=f"worker lost while sending; {provider.name} cannot be asked whether it got the message",
        )
        result.unknown += len(unknown)
        return [r for r in rows if not r.outcome_unknown]
    try:
        found = provider.lookup([r.id for r in unknown])
    except ProviderError:
        found = None
    if found is None:
        # Cannot tell yet: give them back for a later attempt instead of risking a duplicate (and
        # keep them marked, so the next run asks again before sending).
        _bulk_transition(rt, unknown, S.RETRYING, now, next_attempt_at=now + timedelta(seconds=5), outcome_unknown=True)
        result.retrying += len(unknown)
        return [r for r in rows if not r.outcome_unknown]
    hits = [r for r in unknown if r.id in found]
    _record_sent(rt, hits, found, now, latency_ms=0.0, attempt_outcome="reconciled_sent", chunk=chunk)
    result.sent += len(hits)
    return [r for r in rows if not r.outcome_unknown or r.id not in found]


def _throttled(
    rt: Runtime,
    batch_id: str,
    chunk: int,
    provider: str,
    rows: Sequence[_Row],
    now: datetime,
    wait: float,
    result: ChunkResult,
) -> None:
    """Rate limited: give the rows back untouched (no attempt, no retry used) and re-run the chunk later."""
    _bulk_transition(rt, rows, S.QUEUED, now, queued_at=now)
    result.throttled += len(rows)
    log.info(
        "ratelimit.throttled",
        provider=provider,
        source="bulk",
        batch_id=batch_id,
        chunk=chunk,
        count=len(rows),
        wait=round(wait, 3),
    )
    result.again(min(wait, rt.settings.retry.max_countdown))


def _circuit_open(
    rt: Runtime, batch_id: str, chunk: int, rows: Sequence[_Row], name: str, now: datetime, result: ChunkResult
) -> None:
    """The provider's circuit is open: move on to the next provider of the route, or wait for a probe."""
    onward = [r for r in rows if r.route_index + 1 < len(r.route)]
    stuck = [r for r in rows if r.route_index + 1 >= len(r.route)]
    with rt.store.sessions.begin() as s:
        for row in onward:
            rt.store.transition(
                row.id,
                S.QUEUED,
                now=now,
                expect=_HELD,
                session=s,
                route_index=row.route_index + 1,
                provider_attempts=0,
                queued_at=now,
            )
    result.failed_over += len(onward)
    wait = max(1.0, circuit.retry_in(rt, [name]))
    if stuck:
        _bulk_transition(
            rt,
            stuck,
            S.RETRYING,
            now,
            next_attempt_at=now + timedelta(seconds=wait),
            retry_task_published=True,
        )
        result.retrying += len(stuck)
    log.info(
        "batch.circuit_open", batch_id=batch_id, chunk=chunk, provider=name, onward=len(onward), waiting=len(stuck)
    )
    if onward:
        result.again(0.0)
    if stuck:
        result.again(min(wait, rt.settings.retry.max_countdown))


def process_chunk(rt: Runtime, batch_id: str, chunk: int) -> ChunkResult:
    """Claim and send one chunk of a batch (the body of ``kmsg.send_chunk``).

    Running it twice is harmless: the second run finds the lease held, or the rows already sent.
    """
    now = rt.now()
    claim = _claim_chunk(rt, batch_id, chunk, now)
    if claim is None:
        return ChunkResult()
    result = ChunkResult(claimed=len(claim.rows))
    if claim.deliveries > rt.settings.max_deliveries:
        _bulk_transition(
            rt, claim.rows, S.DEAD, now, error_code=ErrorCode.POISON_MESSAGE.value, error_message="claimed too often"
        )
        result.dead = len(claim.rows)
    elif claim.cancelled:
        _cancel_claimed(rt, (batch_id, chunk), claim.rows, now, result)
    elif claim.rows:
        _send_claimed(rt, batch_id, chunk, claim.rows, now, result)
    # Every outcome is recorded: free the lease, then ask for the runs this one decided on (a run
    # published before the release would find the lease held and do nothing).
    _release_chunk(rt, batch_id, chunk, rt.now())
    for delay in result.republish:
        rt.dispatcher.chunk(batch_id, [chunk], countdown=delay or None)
    return result


def _cancel_claimed(rt: Runtime, chunk: tuple[str, int], rows: list[_Row], now: datetime, result: ChunkResult) -> None:
    """The batch was cancelled while this chunk was in flight or waiting: settle and cancel its rows."""
    by_provider: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        by_provider[row.provider].append(row)
    for group in by_provider.values():
        # Rows whose last request has an unknown outcome are looked up first: what was sent stays sent.
        rest = _reconcile_rows(rt, chunk, group, now, result)
        _bulk_transition(rt, rest, S.CANCELLED, now, error_code="CANCELLED")


def _send_claimed(rt: Runtime, batch_id: str, chunk: int, rows: list[_Row], now: datetime, result: ChunkResult) -> None:
    """One bulk request per provider (split further only by the provider's own limit)."""
    by_provider: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        by_provider[row.provider].append(row)
    for name, group in by_provider.items():
        provider = rt.provider(name)
        if not circuit.allow(rt, name):
            _circuit_open(rt, batch_id, chunk, group, name, now, result)
            continue
        group = _reconcile_rows(rt, (batch_id, chunk), group, now, result)
        limit = provider.batch_limit
        for start in range(0, len(group), limit):
            piece = group[start : start + limit]
            messages = [r.message for r in piece]
            # One token request for the whole bulk call (cost = the parts of every message).
            wait = ratelimit.acquire(rt, name, messages, max_wait=rt.settings.rate_limit_inline_wait)
            if wait > 0:
                _throttled(rt, batch_id, chunk, name, group[start:], now, wait, result)
                break
            started = time.perf_counter()
            try:
                outcomes = provider.send_batch(messages)
                whole = False
                circuit.observe(rt, name, None)
            except ProviderError as exc:
                circuit.observe(rt, name, exc)
                outcomes = [SendOutcome(m.id, False, error=exc) for m in messages]
                whole = True
            result.requests += 1
            latency_ms = (time.perf_counter() - started) * 1000
            now = rt.now()
            by_id = {o.message_id: o for o in outcomes}
            accepted = [r for r in piece if by_id[r.id].accepted]
            _record_sent(rt, accepted, by_id, now, latency_ms, chunk=(batch_id, chunk))
            result.sent += len(accepted)
            failures = [
                (r, by_id[r.id].error or ProviderRejected("refused without a reason", provider=name))
                for r in piece
                if not by_id[r.id].accepted
            ]
            if failures:
                before = (result.retrying, result.failed)
                _apply_errors(rt, batch_id, chunk, failures, now, whole and not accepted, result)
            else:
                before = (result.retrying, result.failed)
            # One event per provider request, labelled for metrics (provider, type, tenant, latency).
            log.info(
                "batch.chunk_sent",
                batch_id=batch_id,
                chunk=chunk,
                provider=name,
                type=piece[0].message.type.value,
                tenant=piece[0].message.tenant,
                claimed=len(piece),
                sent=len(accepted),
                retrying=result.retrying - before[0],
                failed=result.failed - before[1],
                requests=1,
                latency_ms=round(latency_ms, 2),
            )


# -- expired leases ---------------------------------------------------------------------------------


@dataclass
class LeaseReport:
    """What :func:`reconcile_expired` did."""

    reconciled_sent: int = 0
    requeued: int = 0
    unknown: int = 0
    deferred: int = 0


def _load_sending(rt: Runtime, ids: Sequence[str]) -> list[tuple[_Row, str | None, int | None]]:
    with rt.store.sessions() as s:
        result = s.execute(
            select(*_ROW_COLUMNS, MessageRow.batch_id, MessageRow.chunk).where(
                MessageRow.id.in_(list(ids)), MessageRow.status == S.SENDING
            )
        )
        found = result.all()
        return list(zip(_Row.load_all(found), (r[10] for r in found), (r[11] for r in found), strict=True))


def reconcile_expired(rt: Runtime, ids: Sequence[str]) -> LeaseReport:
    """Settle messages whose worker died while ``sending`` (lease expired), many at a time.

    The outcome of the interrupted call is unknown, so each provider is asked once for all of its
    messages (by our ids); a message is sent again only if the provider never got it. A provider
    that cannot be asked leaves its messages ``unknown`` rather than risking duplicates.
    """
    report = LeaseReport()
    now = rt.now()
    loaded = _load_sending(rt, ids)
    by_provider: dict[str, list[tuple[_Row, str | None, int | None]]] = defaultdict(list)
    for item in loaded:
        by_provider[item[0].provider].append(item)
    for name, items in by_provider.items():
        provider = rt.provider(name)
        rows = [row for row, _, _ in items]
        if not provider.capabilities.lookup_by_reference:
            _bulk_transition(
                rt,
                rows,
                S.UNKNOWN,
                now,
                (S.SENDING,),
                error_code=ErrorCode.OUTCOME_UNKNOWN.value,
                error_message=f"worker lost while sending; {name} cannot be asked whether it got the message",
            )
            report.unknown += len(rows)
            continue
        found: dict[str, SendOutcome] = {}
        try:
            for start in range(0, len(rows), 1000):
                found.update(provider.lookup([r.id for r in rows[start : start + 1000]]))
        except ProviderError as exc:
            # Cannot tell yet: keep them (the lease was extended); the next sweep asks again.
            log.warning("lease.reconcile_deferred", provider=name, count=len(rows), error_code=exc.code.value)
            report.deferred += len(rows)
            continue
        hits = [r for r in rows if r.id in found and found[r.id].accepted]
        _record_sent(rt, hits, found, now, latency_ms=0.0, attempt_outcome="reconciled_sent", expect=(S.SENDING,))
        report.reconciled_sent += len(hits)
        hit_ids = {r.id for r in hits}
        missing = [(r, b, c) for r, b, c in items if r.id not in hit_ids]
        _requeue_missing(rt, missing, name, now)
        report.requeued += len(missing)
    if ids:
        log.info(
            "lease.reconciled",
            expired=len(ids),
            reconciled_sent=report.reconciled_sent,
            requeued=report.requeued,
            unknown=report.unknown,
            deferred=report.deferred,
        )
    return report


def _requeue_missing(
    rt: Runtime, items: list[tuple[_Row, str | None, int | None]], provider: str, now: datetime
) -> None:
    """The provider never got these: back to ``queued`` (with an audit row) and published again."""
    if not items:
        return
    rows = [r for r, _, _ in items]
    with rt.store.sessions.begin() as s:
        for row in rows:
            rt.store.transition(
                row.id,
                S.QUEUED,
                now=now,
                expect=[S.SENDING],
                session=s,
                queued_at=now,
                lease_until=None,
                attempts=row.attempts + 1,
            )
        _insert_attempts(
            rt,
            s,
            _attempt_rows(rows, provider, "reconciled_missing", now, detail="worker lost; provider never got it"),
        )
    singles: dict[str, list[str]] = defaultdict(list)
    chunks: dict[str, set[int]] = defaultdict(set)
    for row, batch_id, chunk in items:
        if batch_id is not None and chunk is not None:
            chunks[batch_id].add(chunk)
        else:
            singles[row.priority].append(row.id)
    for priority, ids in singles.items():
        rt.dispatcher.send(ids, priority=priority)
    for batch_id, numbers in chunks.items():
        rt.dispatcher.chunk(batch_id, sorted(numbers))


# -- control and reporting --------------------------------------------------------------------------


def _in_flight_chunks(s: Any, batch_id: str, chunks: Sequence[int] | None = None) -> set[int]:
    """Lock the batch's chunk leases (all, or ``chunks``) and return those a claim holds.

    A chunk claim takes the same row lock, so a cancel and a claim never interleave: either the
    claim committed first (its chunk is in flight and left alone) or it waits for the cancel and
    then finds its rows cancelled.
    """
    stmt = select(ChunkLease.chunk, ChunkLease.in_flight).where(ChunkLease.batch_id == batch_id)
    if chunks is not None:
        stmt = stmt.where(ChunkLease.chunk.in_(list(chunks)))
    return {n for n, in_flight in s.execute(stmt.with_for_update()) if in_flight}


def cancel_batch(rt: Runtime, batch_id: str) -> int:
    """Cancel every message of a batch that was not dispatched yet; returns how many.

    Chunks whose request is in flight are left to finish (what is sent stays sent); their run then
    sees the batch cancelled and cancels whatever it did not send.
    """
    now = rt.now()
    with rt.store.sessions.begin() as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise MessageNotFoundError(f"no batch with id {batch_id!r}")
        busy = _in_flight_chunks(s, batch_id)
        where = [MessageRow.batch_id == batch_id, MessageRow.status.in_([S.SCHEDULED, S.QUEUED, S.RETRYING])]
        if busy:
            where.append(MessageRow.chunk.not_in(sorted(busy)))
        result: Any = s.execute(
            update(MessageRow)
            .where(*where)
            .values(status=S.CANCELLED, updated_at=now, final_at=now, error_code="CANCELLED")
            .execution_options(synchronize_session=False)
        )
        changed = result.rowcount
        batch.status = "cancelled"
        batch.cancelled_at = now
    log.info("batch.cancelled", batch_id=batch_id, cancelled=int(changed or 0), chunks_in_flight=len(busy))
    return int(changed or 0)


def cancel_batch_message(rt: Runtime, message_id: str, batch_id: str, chunk: int) -> int:
    """Cancel one message of a batch unless its chunk is in flight; returns 1 if it was cancelled."""
    now = rt.now()
    with rt.store.sessions.begin() as s:
        if _in_flight_chunks(s, batch_id, [chunk]):
            return 0
        return rt.store.transition(message_id, S.CANCELLED, now=now, session=s, error_code="CANCELLED")


@dataclass
class BatchSummary:
    """The standard bulk result summary (numbers come from the database)."""

    batch_id: str
    status: str
    total: int
    invalid: int
    by_status: dict[str, int] = field(default_factory=dict)
    by_provider: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    by_error_code: dict[str, int] = field(default_factory=dict)
    cost_estimate_krw: float = 0.0
    created_at: datetime | None = None
    first_sent_at: datetime | None = None
    last_sent_at: datetime | None = None
    finished_at: datetime | None = None
    throughput_per_s: float | None = None
    cancelled_at: datetime | None = None

    @property
    def done(self) -> bool:
        """Every message reached ``sent`` or a final state."""
        pending = sum(self.by_status.get(s.value, 0) for s in (S.SCHEDULED, S.QUEUED, S.SENDING, S.RETRYING))
        return pending == 0


def batch_summary(rt: Runtime, batch_id: str) -> BatchSummary:
    """Compute the summary of ``batch_id`` from the message rows."""
    with rt.store.sessions() as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise MessageNotFoundError(f"no batch with id {batch_id!r}")
        where = MessageRow.batch_id == batch_id

        def grouped(col: Any) -> dict[str, int]:
            return {str(k): int(n) for k, n in s.execute(select(col, func.count()).where(where).group_by(col)) if k}

        by_status = grouped(MessageRow.status)
        by_type = grouped(MessageRow.type)
        by_provider = grouped(MessageRow.provider)
        by_error = grouped(MessageRow.error_code)
        first_sent, last_sent, last_final = s.execute(
            select(func.min(MessageRow.sent_at), func.max(MessageRow.sent_at), func.max(MessageRow.final_at)).where(
                where
            )
        ).one()
        billed = {
            str(t): int(n)
            for t, n in s.execute(
                select(MessageRow.type, func.count())
                .where(where, MessageRow.sent_at.is_not(None))
                .group_by(MessageRow.type)
            )
        }
    from kmsg_worker.storage.models import UTCDateTime

    conv = UTCDateTime()
    first_sent = conv.process_result_value(first_sent, rt.engine.dialect) if isinstance(first_sent, datetime) else None
    last_sent = conv.process_result_value(last_sent, rt.engine.dialect) if isinstance(last_sent, datetime) else None
    last_final = conv.process_result_value(last_final, rt.engine.dialect) if isinstance(last_final, datetime) else None
    summary = BatchSummary(
        batch_id=batch_id,
        status=batch.status,
        total=batch.total,
        invalid=batch.invalid,
        by_status=by_status,
        by_provider=by_provider,
        by_type=by_type,
        by_error_code=by_error,
        cost_estimate_krw=round(sum(UNIT_PRICE_KRW.get(t, 0.0) * n for t, n in billed.items()), 1),
        created_at=batch.created_at,
        first_sent_at=first_sent,
        last_sent_at=last_sent,
        cancelled_at=batch.cancelled_at,
    )
    final_count = sum(n for st, n in by_status.items() if MessageStatus(st) in FINAL)
    if final_count == summary.total and last_final is not None:
        summary.finished_at = last_final
    sent = sum(billed.values())
    if sent and last_sent is not None and batch.created_at is not None:
        span = (last_sent - batch.created_at).total_seconds()
        summary.throughput_per_s = round(sent / span, 1) if span > 0 else None
    return summary
