"""Bulk intake: a batch of messages validated, stored in chunks, and its chunk tasks published.

:func:`intake` (behind :meth:`KMsg.send_many`) validates every row, writes rows in slices
(PostgreSQL ``COPY``, SQLite ``executemany``; never row by row), assigns each row to a *chunk* of at
most the provider's batch limit, and publishes one ``kmsg.send_chunk`` task per chunk carrying only
``(batch_id, chunk)``: after the batch's one transaction commits (``on_invalid="reject"`` or an
idempotency key), or after each slice commits (``on_invalid="skip"`` without a key). The chunks
are then sent by the delivery engine (:mod:`kmsg_worker.delivery.chunk`).

Routing is decided per chunk (round robin and weights then spread chunks, not rows, across
providers): per-row routing would cost a Redis round trip per message.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from kmsg_worker import adrules
from kmsg_worker.errors import (
    BatchValidationError,
    ErrorCode,
    RowError,
    ValidationError,
)
from kmsg_worker.logging import get_logger
from kmsg_worker.message import (
    KAKAO_TYPES,
    TEXT_TYPES,
    VAR_PATTERN,
    Message,
    MessageType,
    check_message_id,
    check_storable,
    check_tenant,
    check_text,
    count_bytes,
    infer_type,
    normalize,
    normalize_phone,
    parse_variables,
    stringify,
)
from kmsg_worker.message import advertising as ads
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import is_sandbox_content
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.advertising import suppressed as suppressed_digests
from kmsg_worker.storage.chunks import IDLE_LEASE
from kmsg_worker.storage.intake import SliceWriter, batch_key, repeated_batch, store_totals, stored_batch_key
from kmsg_worker.storage.messages import stored_ids
from kmsg_worker.storage.models import (
    Batch,
    ChunkLease,
)
from kmsg_worker.storage.rows import new_message_columns, shared_columns
from kmsg_worker.templates import AlimTalkPreflight, Registry, TemplateResolver, check_variables

__all__ = ["intake"]

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
        pieces = VAR_PATTERN.split(text)
        self.text = text
        self.bytes = count_bytes(text)
        self.head = pieces[0]
        #: (key, the token as written, the text after it), in order.
        self.tokens = [(key, "#{" + key + "}", after) for key, after in zip(pieces[1::2], pieces[2::2], strict=True)]
        self.fixed_bytes = sum(count_bytes(part) for part in pieces[0::2])
        #: A ``광`` within four characters before a token: a value could complete a head there.
        self.ad_sensitive = any("광" in part[-4:] for part in pieces[0:-1:2])

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

    def __init__(
        self,
        rt: Runtime,
        defaults: Mapping[str, Any],
        now: datetime,
        declared: tuple[str, ...] | None = None,
        advertiser: Callable[[str, str | None], ads.AdvertiserProfile | None] | None = None,
    ) -> None:
        if advertiser is None:
            advertiser = adrules.profile_lookup(rt.store)
        self.defaults = dict(defaults)
        #: The registry template's variables when the batch sends one: every row gives exactly these.
        self.declared = declared
        self.declared_set = frozenset(declared or ())
        self.ref = str(self.defaults.get("template"))
        self.raw_text = self.defaults.get("text", self.defaults.get("content"))
        probe = {**self.defaults, "to": "01000000000"}
        # Same default as the row-by-row path: batch rows ride the bulk priority unless told otherwise.
        probe.setdefault("priority", "bulk")
        probe.pop("variables", None)
        self.ok = True
        try:
            self.message = normalize(
                probe,
                limits=rt.settings.limits,
                now=now,
                default_sender=rt.settings.default_sender,
                advertiser=advertiser,
            )
            # The same checks as normalize (a mapping, string keys, scalar values, storable text).
            self.base_vars = parse_variables(self.defaults, rt.settings.limits)
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
        msg = self.message
        #: The advertiser profile the rows are composed and checked with (advertising only).
        self.profile = advertiser(msg.tenant, msg.sender) if msg.advertising else None
        if msg.advertising and isinstance(self.raw_text, str) and self.defaults.get("compose") != "check":
            # Head and footer once for every row: the rows only fill in the variables.
            assert self.profile is not None  # normalize refused the defaults otherwise
            self.raw_text = ads.compose(self.raw_text, self.profile, sender=msg.sender)
        self.text = _TemplateText(self.raw_text) if isinstance(self.raw_text, str) else None

    def _check_rendered(self, text: str, variables: Mapping[str, str]) -> None:
        """Variables may bring in what the shared text did not have: the same checks as normalize.

        The shared text was checked once, with its ``#{key}`` tokens; a row can only make it fail
        through a head or lookalike its variables complete, and every head and lookalike has a
        ``광``. So the rendered text is checked again only when a value has one, or when the shared
        text has one just before a token (a value could complete it): most rows skip the regexes.
        """
        assert self.text is not None
        if not self.text.ad_sensitive:
            for value in variables.values():
                if "광" in value:
                    break
            else:
                return
        if self.message.advertising:
            ads.check(text, self.profile, sender=self.message.sender)
        else:
            ads.check_informational(text)

    def build(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """Content for one row; same result as :func:`normalize` on the merged mapping."""
        to = normalize_phone(item.get("to"), "to")
        variables = self.base_vars
        if item.get("variables") is not None:
            row_vars = parse_variables(item, self.limits)
            check_storable(row_vars, "variables")
            if row_vars:
                variables = {**self.base_vars, **row_vars}
        if self.declared is not None and variables.keys() != self.declared_set:
            check_variables(self.ref, self.declared, variables)
        msg = self.message
        text_value: str | None
        if self.text is not None:
            text_value, nbytes = self.text.render(variables)
        else:
            text_value = msg.text
            nbytes = 0 if text_value is None else count_bytes(text_value)
        mtype = msg.type
        if msg.type_inferred:
            mtype = infer_type(text_value, msg.subject, msg.media, self.limits, nbytes)
        if mtype in TEXT_TYPES or text_value is not None:
            check_text(mtype, text_value, msg.subject, self.limits, nbytes)
        if text_value is not None and self.text is not None and self.text.tokens:
            self._check_rendered(text_value, variables)
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
            merged = {**msg.custom_fields, **_custom_fields(custom)}
            if merged:
                content["custom_fields"] = merged
        return content


def _custom_fields(custom: object) -> dict[str, str]:
    """A row's own ``custom_fields``, checked as :func:`normalize` checks them."""
    if not isinstance(custom, Mapping):
        raise ValidationError("custom_fields", "type", "must be a mapping")
    extra: dict[str, str] = {}
    for key, value in custom.items():
        if not isinstance(key, str):
            raise ValidationError("custom_fields", "type", "keys must be strings")
        extra[key] = stringify(value, f"custom_fields.{key}")
    check_storable(extra, "custom_fields")
    return extra


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
    """Assigns rows to chunks: one open chunk per (type, first provider), cut at the provider's limit.

    The limit is what one ``send_batch`` call of the first provider takes
    (:attr:`~kmsg_worker.providers.base.Provider.send_batch_limit`), which for an adapter that
    splits a call into requests itself is larger than one request, lowered by the chunk size
    (``send_many``'s ``chunk_size`` or ``KMSG_BULK_CHUNK_SIZE``).
    """

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
            provider_limit = self.rt.provider(route[0]).send_batch_limit
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
    tenant: str = "default",
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Validate rows one by one, like :meth:`KMsg.send` would, including routing.

    Ids the caller gave are collected in ``explicit``; a repeated one is an invalid row (ids are
    primary keys: the write would fail for the whole slice).
    """
    resolver = TemplateResolver(Registry(rt.engine, rt.settings.limits))
    declared: tuple[str, ...] | None = None
    if defaults.get("template") is not None:
        # The batch's template, resolved once: every row renders the same version.
        try:
            declared = resolver.version(str(defaults.get("tenant") or tenant), defaults["template"]).variables
            defaults = resolver.apply(defaults, check=False, tenant=tenant)
        except ValidationError as exc:
            # Every row is invalid the same way: reported per row, under on_invalid.
            yield from ((i, RowError(i, exc.field, exc.rule, exc.detail)) for i, _ in enumerate(messages, start=1))
            return
    advertiser = adrules.profile_lookup(rt.store)
    template = _Template(rt, defaults, now, declared, advertiser)
    preflight = AlimTalkPreflight(rt)
    base = dict(defaults)
    base.setdefault("priority", "bulk")
    explicit = set() if explicit is None else explicit
    default_id = any(base.get(k) is not None for k in _ID_KEYS)
    # Routing errors (unknown provider_id, no provider for the type, an AlimTalk no provider can
    # address to a Kakao channel) per (type, provider_id, the Kakao fields the row gives).
    # And the sender number checked against the route's registered numbers: once per batch, not per row.
    routable: dict[tuple[str, Any, Any, Any], list[str] | ValidationError] = {}
    for index, item in enumerate(messages, start=1):
        try:
            # A dict is checked by its exact type first: isinstance() against an ABC is a Python-level
            # call, paid for every row of a batch.
            if type(item) is not dict and not isinstance(item, Mapping):
                raise ValidationError("row", "type", f"must be a mapping, got {type(item).__name__}")
            if template.ok and item.keys() <= _FAST_KEYS:
                content = template.build(item)
            else:
                content = _row_content(rt, {**base, **item}, item, resolver, declared, tenant, now, advertiser)
            kakao = content.get("kakao")
            key = (
                content["type"],
                content.get("provider_id"),
                tuple(sorted(k for k, v in kakao.items() if v)) if kakao else (),
                content.get("sender"),
            )
            if key not in routable:
                routable[key] = _route(rt, content)
            route = routable[key]
            if isinstance(route, ValidationError):
                raise route
            if content["type"] == "ALIMTALK":
                content = preflight.check(content, route)
                check_text(MessageType.ALIMTALK, content.get("text"), None, rt.settings.limits)
            if default_id or _gives_id(item):
                if content["id"] in explicit:
                    raise ValidationError("id", "duplicate", "the same id is given to another row of this batch")
                explicit.add(content["id"])
            yield index, content
        except ValidationError as exc:
            yield index, RowError(index, exc.field, exc.rule, exc.detail)


def _row_content(
    rt: Runtime,
    merged: dict[str, Any],
    item: Mapping[str, Any],
    resolver: TemplateResolver,
    declared: tuple[str, ...] | None,
    tenant: str,
    now: datetime,
    advertiser: Callable[[str, str | None], ads.AdvertiserProfile | None],
) -> dict[str, Any]:
    """A row off the fast path: its template (its own, or the batch's variables checked), then normalize."""
    if item.get("template") is not None:
        # The row's own template replaces the batch's text (and template, if any).
        if item.get("text") is None and item.get("content") is None:
            merged.pop("text", None)
            merged.pop("content", None)
        merged = resolver.apply(merged, tenant=tenant)
    elif declared is not None:
        given = merged.get("variables")
        check_variables(str(merged.get("template")), declared, given if isinstance(given, Mapping) else {})
    return normalize(
        merged, limits=rt.settings.limits, now=now, default_sender=rt.settings.default_sender, advertiser=advertiser
    ).content()


def _route(rt: Runtime, content: dict[str, Any]) -> list[str] | ValidationError:
    """The route of rows like ``content`` (its sender checked against the route's registered numbers),
    or why they cannot be routed."""
    message = Message.from_content(content)
    try:
        route = rt.router.route(message)
        if message.sender and message.type not in KAKAO_TYPES:
            rt.senders.check_route(route, message.sender)
    except ValidationError as exc:
        return exc
    return route


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
        taken = stored_ids(rt.store, wanted)
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


def _suppressing(
    rt: Runtime,
    rows: Iterable[tuple[int, dict[str, Any] | RowError]],
    suppressed: set[str],
    size: int | None = None,
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Collect in ``suppressed`` the ids of advertising rows to numbers on their tenant's suppression list.

    Rows are looked up ``size`` at a time (default: a slice), one statement probing the list's
    primary key per slice and tenant. The look-up runs on a thread while the next slice is
    validated (the database probes the index while this thread renders rows), so a slice waits
    here only if its look-up is slower than validating the next. Informational rows that nothing
    holds back pass straight through.
    """
    size = size or SLICE
    buffer: list[tuple[int, dict[str, Any] | RowError]] = []
    pending: tuple[list[tuple[int, dict[str, Any] | RowError]], Future[set[str]]] | None = None
    pool: ThreadPoolExecutor | None = None
    hasher: adrules.SuppressionHasher | None = None

    def start(held: list[tuple[int, dict[str, Any] | RowError]]) -> Future[set[str]]:
        nonlocal pool, hasher
        by_tenant: dict[str, tuple[list[str], list[bytes]]] = {}
        ads_rows = [r for _, r in held if type(r) is dict and r.get("purpose") == ads.ADVERTISING]
        if ads_rows:
            if hasher is None:
                hasher = adrules.hasher_for(rt.settings, rt.store)
            digests = hasher.digests([r["to"] for r in ads_rows])
            for r, digest in zip(ads_rows, digests, strict=True):
                ids, group = by_tenant.setdefault(r.get("tenant") or "default", ([], []))
                ids.append(r["id"])
                group.append(digest)
        if pool is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="kmsg-suppression")
        return pool.submit(_suppressed_ids, rt, by_tenant)

    def finish() -> Iterator[tuple[int, dict[str, Any] | RowError]]:
        nonlocal pending
        if pending is not None:
            held, future = pending
            pending = None
            suppressed.update(future.result())
            yield from held

    try:
        for item in rows:
            row = item[1]
            if not buffer and pending is None and (type(row) is not dict or row.get("purpose") != ads.ADVERTISING):
                yield item  # nothing to look up and nothing held before it
                continue
            buffer.append(item)
            if len(buffer) >= size:
                future = start(buffer)
                yield from finish()
                pending, buffer = (buffer, future), []
        if buffer:
            future = start(buffer)
            yield from finish()
            pending, buffer = (buffer, future), []
        yield from finish()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _suppressed_ids(rt: Runtime, by_tenant: Mapping[str, tuple[list[str], list[bytes]]]) -> set[str]:
    """The ids among ``by_tenant``'s rows whose number's hash is on their tenant's list."""
    found: set[str] = set()
    for tenant, (ids, digests) in by_tenant.items():
        listed = suppressed_digests(rt.store, tenant, digests)
        if listed:
            found.update(i for i, d in zip(ids, digests, strict=True) if d in listed)
    return found


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


#: Columns a suppressed row sets that a new row leaves at their default.
_FINAL_COLUMNS = ("final_at", "error_code", "error_message")


def _suppressed_row(content: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The stored row of an advertising row to a suppressed number: final at once, in no chunk."""
    row = new_message_columns(content, [], now, priority=content.get("priority") or "bulk")
    row.update(
        status=S.SUPPRESSED.value,
        queued_at=None,
        final_at=now,
        error_code=ErrorCode.SUPPRESSED.value,
        error_message="the recipient refused advertising (on the tenant's suppression list); not sent",
    )
    return row


class _Slicer:
    """Valid rows on their way to the writer: assigned to chunks, cut into slices, their ids kept."""

    def __init__(
        self, batch: Batch, chunker: _Chunker, writer: SliceWriter, now: datetime, suppressed: set[str] | None = None
    ) -> None:
        self.batch = batch
        #: Ids of rows stored ``suppressed`` (final, in no chunk): see :func:`_suppressing`.
        self.suppressed = set() if suppressed is None else suppressed
        self.pending_suppressed = False
        self.chunker = chunker
        self.writer = writer
        self.now = now
        self.ids: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self.first = True
        self.published_upto = 0
        self.leased_upto = 0

    def add(self, row: dict[str, Any]) -> None:
        if self.suppressed and row["id"] in self.suppressed:
            self.pending.append(_suppressed_row(row, self.now))
            self.pending_suppressed = True
        else:
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
        if self.pending_suppressed:
            # A slice is written with the first row's columns (COPY): every row gets the final ones.
            for row in rows:
                for column in _FINAL_COLUMNS:
                    row.setdefault(column, None)
            self.pending_suppressed = False
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
    tenant = check_tenant(tenant)
    _check_defaults(defaults)
    now = rt.now()
    batch_id = uuid.uuid4().hex
    defaults = dict(defaults or {})
    chunker = _Chunker(rt, chunk_size or rt.settings.bulk_chunk_size)
    reject = on_invalid == "reject"
    digest = _defaults_digest(defaults)
    errors: list[RowError] = []
    invalid_count = 0
    tests = 0  # rows of a test key (they only reach the simulator): counted apart in the metrics

    explicit: set[str] = set()
    rows_iter: Iterable[tuple[int, dict[str, Any] | RowError]] = _iter_rows(
        rt, messages, defaults, now, explicit, tenant
    )
    if idempotency_key:
        rows_iter = _hashing(rows_iter, digest)
        repeat = _repeat_of_stored(rt, rows_iter, tenant, idempotency_key, now, digest, reject=reject)
        if repeat is not None:
            return (*repeat, [], True)
    # Caller-given ids already in the database (checked after the idempotency look-up, which
    # answers a repeated batch with its original ids).
    rows_iter = _without_stored_ids(rt, rows_iter, explicit)
    suppressed: set[str] = set()
    rows_iter = _suppressing(rt, rows_iter, suppressed)

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
    writer = SliceWriter(
        rt.store,
        batch_id,
        _batch_columns(batch_id, now),
        atomic=atomic,
        publish=lambda chunks: _publish_chunks(rt, batch_id, chunks),
    )
    out = _Slicer(batch, chunker, writer, now, suppressed)
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
                    tests += is_sandbox_content(row)
            if reject and invalid_count:
                raise BatchValidationError(errors)  # leaving writing(): the transaction rolls back
            out.flush(final=True)
            # ``total`` set is what marks the intake complete.
            totals = {"total": len(ids), "invalid": invalid_count, "invalid_rows": [e.__dict__ for e in errors] or None}
            if atomic:
                key = None
                if idempotency_key:
                    key = batch_key(
                        tenant, idempotency_key, digest.hexdigest(), batch_id, now, rt.settings.idempotency_ttl
                    )
                writer.commit(totals, key, chunker.ready)
    except IntegrityError:
        # The same key, stored by a concurrent submission that committed first: answer as its repeat.
        stored_key = stored_batch_key(rt.store, tenant, idempotency_key, now) if idempotency_key else None
        if idempotency_key is None or stored_key is None:
            raise
        return (*repeated_batch(rt.store, idempotency_key, stored_key, digest.hexdigest()), [], True)
    if not atomic:
        store_totals(rt.store, batch_id, totals)
    log.info(
        "batch.accepted",
        batch_id=batch_id,
        tenant=tenant,
        total=len(ids),
        tests=tests,
        invalid=invalid_count,
        chunks=chunker.next_number,
        suppressed=len(suppressed),
    )
    return batch_id, ids, errors, False


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
    stored = stored_batch_key(rt.store, tenant, key, now)
    if stored is None:
        return None
    bad = [row for _, row in rows if isinstance(row, RowError)]
    if bad and reject:
        raise BatchValidationError(bad[:_MAX_REPORTED_ERRORS])
    return repeated_batch(rt.store, key, stored, digest.hexdigest())


def _hashing(
    rows: Iterable[tuple[int, dict[str, Any] | RowError]], digest: Any
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Fold each valid row's content (ids excluded) into the request hash as it passes."""
    for index, row in rows:
        if isinstance(row, dict):
            digest.update(json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True).encode())
        yield index, row


def _publish_chunks(rt: Runtime, batch_id: str, chunks: Sequence[int]) -> None:
    if not chunks:
        return
    try:
        rt.dispatcher.chunk(batch_id, list(chunks))
    except Exception as exc:  # noqa: BLE001 - any broker failure: the sweep re-publishes stale chunks
        log.warning("batch.enqueue_failed", batch_id=batch_id, chunks=len(chunks), error=type(exc).__name__)
