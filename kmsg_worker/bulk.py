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
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from kmsg_worker.errors import (
    AcceptanceUnknownError,
    BatchPartiallyStoredError,
    BatchValidationError,
    MessageNotFoundError,
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
from kmsg_worker.pricing import unit_prices
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import FINAL, MessageStatus
from kmsg_worker.storage.chunks import IDLE_LEASE, in_flight_chunks
from kmsg_worker.storage.copy import copy_payload, copy_rows
from kmsg_worker.storage.db import backend_pid, settle_lost_commit
from kmsg_worker.storage.models import (
    Batch,
    ChunkLease,
    IdempotencyKey,
    MessageRow,
)
from kmsg_worker.storage.rows import new_message_columns, shared_columns

__all__ = [
    "BatchSummary",
    "batch_summary",
    "cancel_batch",
    "cancel_batch_message",
    "intake",
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
    return shared_columns(now, batch_id=batch_id)


def _db_row(content: dict[str, Any], chunk: _Chunk, now: datetime) -> dict[str, Any]:
    """The columns of one stored row that may differ from its batch's other rows.

    The shared ones (:func:`_batch_columns`) are not repeated in every row: rendered once per
    slice, not once per row.
    """
    scheduled_raw = content.get("scheduled_at")
    scheduled = datetime.fromisoformat(scheduled_raw) if scheduled_raw else None
    row = new_message_columns(
        content,
        chunk.route,
        now,
        priority=content.get("priority") or "bulk",
        scheduled_at=scheduled,
        chunk=chunk.number,
    )
    chunk.due |= row["queued_at"] is not None
    return row


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
        return _SliceData(len(rows), copy=copy_payload(rows, shared))
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


def _write_in(session: Session, data: _SliceData, extra: list[Any], leases: Sequence[ChunkLease]) -> None:
    for obj in extra:
        session.merge(obj)
    session.add_all(leases)
    session.flush()
    if data.copy is not None:
        copy_rows(session, "kmsg_messages", data.copy)
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
            ChunkLease(batch_id=self.batch.id, chunk=n, **IDLE_LEASE)
            for n in range(self.leased_upto, chunker.next_number)
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


# -- control and reporting --------------------------------------------------------------------------


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
        busy = in_flight_chunks(s, batch_id)
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
        if in_flight_chunks(s, batch_id, [chunk]):
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
    prices = unit_prices(rt.settings.unit_prices)
    summary = BatchSummary(
        batch_id=batch_id,
        status=batch.status,
        total=batch.total,
        invalid=batch.invalid,
        by_status=by_status,
        by_provider=by_provider,
        by_type=by_type,
        by_error_code=by_error,
        cost_estimate_krw=round(sum(prices.get(t, 0.0) * n for t, n in billed.items()), 1),
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
