"""The delivery engine's writes: outcomes of provider calls recorded on message rows and attempt rows.

Every verb here is conditional on the states the caller holds the rows in (``expect``): ``sending``
for a single send under its own lease, ``queued``/``retrying`` for a chunk's rows under the chunk's
lease. A row that moved on meanwhile is not touched. Each verb writes one transaction.

- :func:`record_sent`: accepted recipients -> ``sent``, with their attempt rows.
- :func:`record_transitions`: grouped status changes (retry, fail over, fail, wait) and the attempt
  rows that explain them.
- :func:`insert_attempts`: attempt rows alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, TextClause, bindparam, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kmsg_worker.providers.base import SendOutcome
from kmsg_worker.status import AttemptOutcome, MessageStatus
from kmsg_worker.storage.copy import copy_payload, copy_rows
from kmsg_worker.storage.db import json_dumps
from kmsg_worker.storage.models import SENT_CLEARS, Attempt, MessageRow
from kmsg_worker.storage.rows import SendRow
from kmsg_worker.storage.webhooks import EVENT_SOURCE, count_with_events, events_for_ids

if TYPE_CHECKING:
    from kmsg_worker.storage.repo import Store

__all__ = [
    "AttemptRow",
    "insert_child",
    "set_fallback_state",
    "stored_ids",
    "Transition",
    "attempt_row",
    "count_undecided",
    "insert_attempts",
    "record_sent",
    "record_transitions",
]

S = MessageStatus

#: One attempt row's columns.
AttemptRow = dict[str, Any]


def attempt_row(
    row: SendRow,
    outcome: AttemptOutcome,
    now: datetime,
    *,
    provider: str | None = None,
    attempt_no: int | None = None,
    error_code: str | None = None,
    provider_code: str | None = None,
    http_status: int | None = None,
    latency_ms: float | None = None,
    detail: str | None = None,
) -> AttemptRow:
    """The attempt row of ``row``'s next attempt (number ``attempts + 1`` unless given)."""
    return {
        "message_id": row.id,
        "attempt_no": row.attempts + 1 if attempt_no is None else attempt_no,
        "provider": provider or row.provider,
        "outcome": outcome.value,
        "error_code": error_code,
        "provider_code": provider_code,
        "http_status": http_status,
        "latency_ms": latency_ms,
        "detail": detail,
        "created_at": now,
    }


def insert_attempts(store: Store, session: Session, rows: Sequence[AttemptRow]) -> None:
    """Insert attempt rows in ``session``'s transaction (``COPY`` on PostgreSQL)."""
    if not rows:
        return
    if store.is_postgres:
        # Most columns are the same for a whole request (provider, outcome, latency, time).
        copy_rows(session, "kmsg_attempts", copy_payload(rows))
    else:
        session.execute(insert(Attempt), list(rows))


@dataclass
class Transition:
    """One conditional status change for a group of rows, with the columns it sets.

    ``values`` may hold SQL expressions over the row's own columns (``MessageRow.attempts + 1``), so
    one UPDATE serves rows whose counters differ.
    """

    ids: list[str]
    target: MessageStatus
    values: dict[str, Any] = field(default_factory=dict)


def record_transitions(
    store: Store,
    transitions: Sequence[Transition],
    attempts: Sequence[AttemptRow],
    *,
    now: datetime,
    expect: Sequence[MessageStatus],
) -> int:
    """Apply ``transitions`` and insert ``attempts`` in one transaction; returns the rows changed."""
    changed = 0
    with store.sessions.begin() as s:
        insert_attempts(store, s, attempts)
        for t in transitions:
            changed += store.transition(t.ids, t.target, now=now, expect=expect, session=s, **t.values)
    return changed


def count_undecided(
    store: Store, ids: Sequence[str], *, now: datetime, expect: Sequence[MessageStatus]
) -> dict[str, int]:
    """Count one more undecided look-up on each of ``ids``; returns each row's count so far.

    ``check_count`` counts the provider's answers that settled nothing: status checks of a ``sent``
    message, and look-ups of a message whose outcome is unknown (reset when it is sent again).
    """
    if not ids:
        return {}
    stmt = (
        update(MessageRow)
        .where(MessageRow.id.in_(list(ids)), or_(*(MessageRow.status == st for st in expect)))
        .values(check_count=MessageRow.check_count + 1, updated_at=now)
        .returning(MessageRow.id, MessageRow.check_count)
        .execution_options(synchronize_session=False)
    )
    with store.sessions.begin() as s:
        return {str(i): int(n) for i, n in s.execute(stmt)}


def insert_child(session: Session, row: Mapping[str, Any]) -> bool:
    """Insert a fallback child (built by :func:`~kmsg_worker.storage.rows.new_message_row`) in ``session``.

    Its id is derived from its parent's, so a second insert collides: ``False`` then, and the
    caller's transaction goes on (a savepoint holds the attempt): the child exists exactly once.
    """
    try:
        with session.begin_nested():
            session.execute(insert(MessageRow), dict(row))
    except IntegrityError:
        return False
    return True


def set_fallback_state(
    session: Session, message_id: str, state: str, *, child_id: str | None = None, now: datetime | None = None
) -> None:
    """Record on a parent what became of its fallback (``created`` or ``skipped:<reason>``).

    A created child (``child_id``) is a ``message.fallback_created`` event of the parent, written
    in the same transaction as the child itself.
    """
    session.execute(update(MessageRow).where(MessageRow.id == message_id).values(fallback_state=state[:64]))
    if child_id is not None and now is not None:
        events_for_ids(session, [message_id], "message.fallback_created", now, child_id=child_id)


def stored_ids(store: Store, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are stored already."""
    if not ids:
        return set()
    with store.sessions() as s:
        return set(s.scalars(select(MessageRow.id).where(MessageRow.id.in_(list(ids)))))


# -- sent -------------------------------------------------------------------------------------------


def record_sent(
    store: Store,
    rows: Sequence[SendRow],
    outcomes: Mapping[str, SendOutcome],
    *,
    now: datetime,
    next_check_at: datetime,
    latency_ms: float | None,
    attempt_outcome: AttemptOutcome = AttemptOutcome.ACCEPTED,
    expect: Sequence[MessageStatus],
    chunk: tuple[str, int] | None = None,
) -> int:
    """Move accepted rows to ``sent`` (provider id, warnings, first status check) with their attempt rows.

    Args:
        store: The system of record.
        rows: The accepted rows (each ``outcomes[row.id]`` accepted, or found by a look-up).
        outcomes: The provider's answers by message id.
        now: When the provider answered.
        next_check_at: When tracking first asks about them.
        latency_ms: The provider call's latency (``None`` for a look-up).
        attempt_outcome: ``accepted``, or ``reconciled_sent`` when a look-up found them.
        expect: The states the rows are held in.
        chunk: The ``(batch_id, chunk)`` every row belongs to, which bounds the UPDATE's read of the
            table to that chunk (see :func:`_sent_update_pg`).

    Returns:
        How many rows moved (a row no longer in ``expect`` is left alone, with no attempt row).
    """
    if not rows:
        return 0
    if len(rows) == 1 and tuple(expect) == (S.SENDING,):
        return int(
            _mark_one_sent(store, rows[0], outcomes[rows[0].id], now, next_check_at, latency_ms, attempt_outcome)
        )
    expected = [str(st) for st in expect]
    with store.sessions.begin() as s:
        if store.is_postgres:
            s.execute(_JOIN_BY_HASH)
            stmt, params = _sent_update_pg(rows, outcomes, now, next_check_at, expected, chunk)
            # The UPDATE's RETURNING feeds the message.sent events' INSERT ... SELECT: one statement.
            changed_rows = stmt.columns(*EVENT_SOURCE).cte("changed")
            changed = int(s.execute(count_with_events(changed_rows, "message.sent", now), params).scalar_one())
        else:
            changed = _sent_update_sqlite(s, rows, outcomes, now, next_check_at, expected)
            # The rows this call moved are the ones sent at exactly ``now``.
            moved = s.scalars(
                select(MessageRow.id).where(
                    MessageRow.id.in_([r.id for r in rows]), MessageRow.status == S.SENT, MessageRow.sent_at == now
                )
            )
            events_for_ids(s, list(moved), "message.sent", now)
        # Attempt numbers from the rows as claimed: the lease keeps every other writer away.
        insert_attempts(store, s, [attempt_row(r, attempt_outcome, now, latency_ms=latency_ms) for r in rows])
    return int(changed)


def _warnings_list(outcome: SendOutcome) -> list[dict[str, Any]] | None:
    if not outcome.warnings:
        return None
    return [{"code": w.code, "message": w.message, "details": dict(w.details)} for w in outcome.warnings]


def _warnings_json(outcome: SendOutcome) -> str | None:
    warnings = _warnings_list(outcome)
    return None if warnings is None else json_dumps(warnings)


def _mark_one_sent(
    store: Store,
    row: SendRow,
    outcome: SendOutcome,
    now: datetime,
    next_check_at: datetime,
    latency_ms: float | None,
    attempt_outcome: AttemptOutcome,
) -> bool:
    """The single send's ``sending -> sent`` and its attempt row: one statement on PostgreSQL (latency)."""
    return store.mark_sent(
        row.id,
        now=now,
        provider=row.provider,
        provider_message_id=outcome.provider_message_id,
        attempt_no=row.attempts + 1,
        provider_attempts=row.provider_attempts + 1,
        next_check_at=next_check_at,
        native_fallback=outcome.native_fallback,
        warnings=_warnings_list(outcome),
        attempt_outcome=attempt_outcome.value,
        latency_ms=latency_ms,
    )


def _sent_update_sqlite(
    s: Session,
    rows: Sequence[SendRow],
    outcomes: Mapping[str, SendOutcome],
    now: datetime,
    next_check_at: datetime,
    expected: list[str],
) -> int:
    # Core table, not the ORM entity: an executemany UPDATE keyed by a bound id.
    table = cast(Table, MessageRow.__table__)
    result = s.execute(
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
            next_check_at=next_check_at,
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
    return int(getattr(result, "rowcount", 0) or 0)


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
#: What the webhook events copy of each row moved (the columns of EVENT_SOURCE, in its order).
_SENT_RETURNING = " RETURNING " + ", ".join(f"m.{c.key}" for c in EVENT_SOURCE)
#: For the rest of the transaction: plan the UPDATE with its real parameters, never as a nested loop.
#: psycopg prepares a statement run five times on a connection, and PostgreSQL then switches to a
#: generic plan that guesses 10 elements for an array parameter: it joined a chunk's 5,000 ids to its
#: 5,000 rows by a nested loop, comparing 25 million pairs (seconds per chunk on a large table). The
#: ids arrive as a JSON array, whose row count is guessed too (100): the same guard holds. Both
#: settings end with the transaction.
_JOIN_BY_HASH = text(
    "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('enable_nestloop', 'off', true)"
)


def _json_column(param: str) -> str:
    """One column of a ``ROWS FROM``: the elements of a JSON array parameter, as text."""
    return f"json_array_elements_text(CAST(:{param} AS json))"


def _sent_update_pg(
    rows: Sequence[SendRow],
    outcomes: Mapping[str, SendOutcome],
    now: datetime,
    first_check: datetime,
    expected: list[str],
    chunk: tuple[str, int] | None = None,
) -> tuple[TextClause, dict[str, Any]]:
    """One ``UPDATE ... FROM ROWS FROM (JSON arrays)`` for the whole group: the statement and its parameters.

    A group is one provider's, and warnings or native fallbacks are rare: then only ids and
    provider ids travel (each as one JSON array, see below).

    With ``chunk`` the rows are also matched on ``(batch_id, chunk)``. Without it, and without
    fresh statistics (a table just filled by an intake, before autovacuum's ANALYZE), PostgreSQL
    joined the ids by hashing a sequential scan of the *whole* table, once per chunk, growing with
    the table. The chunk's index bounds that read to the chunk's own rows, whatever the statistics say.
    """
    ids = [r.id for r in rows]
    results = [outcomes[i] for i in ids]
    # Columns travel as JSON arrays, zipped back into rows by ROWS FROM: psycopg dumps a Python list
    # as text[] element by element in Python, orjson at C speed, and PostgreSQL splits it in C. A
    # NULL element arrives as SQL NULL (json_array_elements_text).
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
    sql += _SENT_RETURNING
    return text(sql), params
