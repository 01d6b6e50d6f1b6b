"""Every read and write of the system of record, as conditional statements.

Each status change is ``UPDATE ... WHERE id IN (...) AND status IN (<allowed previous states>)``:
a row that moved on meanwhile is simply not updated, which is what makes repeated Celery
deliveries, duplicate beats and overlapping sweeps harmless. Claims use ``UPDATE ... RETURNING``
(PostgreSQL, and SQLite >= 3.35), with ``FOR UPDATE SKIP LOCKED`` in the sub-select on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Engine,
    Update,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmsg_worker.errors import AcceptanceUnknownError, IdempotencyConflictError
from kmsg_worker.message import Message
from kmsg_worker.status import ALLOWED, FINAL, MessageStatus
from kmsg_worker.storage.db import backend_pid, make_sessionmaker, settle_lost_commit
from kmsg_worker.storage.models import SEND_STATE_COLUMNS, SENT_CLEARS, Attempt, DeadLetter, IdempotencyKey, MessageRow
from kmsg_worker.storage.rows import SendRow
from kmsg_worker.storage.webhooks import (
    EVENT_FOR_STATUS,
    EVENT_SOURCE,
    event_insert,
    events_for_ids,
    execute_with_events,
)

__all__ = ["Store"]

_T = TypeVar("_T")

S = MessageStatus

#: Built once: constructing a statement costs more Python than executing a cached one.
_INSERT_MESSAGE = insert(MessageRow)

#: The single-send claim, built once with bind parameters: building the UPDATE on every call (the
#: ``where``/``values`` coercions) cost about 1.4 ms of the ~1.9 ms a claim took, on every OTP's
#: critical path; the round trip itself is ~0.25 ms.
_CLAIM = (
    update(MessageRow)
    # Batch rows are sent by their chunk's task only, under the chunk's lease
    # (kmsg_worker.delivery.chunk): a stray single-send task for one of them does nothing.
    .where(
        MessageRow.id == bindparam("claim_id"),
        MessageRow.batch_id.is_(None),
        or_(
            MessageRow.status == S.QUEUED,
            and_(MessageRow.status == S.RETRYING, MessageRow.next_attempt_at <= bindparam("claim_due")),
        ),
    )
    .values(
        status=S.SENDING,
        lease_until=bindparam("claim_lease"),
        deliveries=MessageRow.deliveries + 1,
        updated_at=bindparam("claim_now"),
        retry_task_published=False,
    )
    .returning(
        MessageRow.id,
        MessageRow.content,
        MessageRow.route,
        *SEND_STATE_COLUMNS,
        MessageRow.priority,
        MessageRow.scheduled_at,
    )
)


def _mark_sent_statements() -> tuple[Update, Any]:
    """The sent transition (only from ``sending``) and its attempt row, each built once.

    On PostgreSQL they run as one statement (the UPDATE's RETURNING feeds the INSERT), in autocommit:
    one round trip instead of BEGIN, UPDATE, INSERT and COMMIT through an ORM session, which cost
    ~3.5 ms of a ~9 ms single send on this machine (most of it Python, building and binding two
    statements). SQLite has no data-modifying WITH and runs the two in one transaction.
    """
    sent = (
        update(MessageRow)
        .where(MessageRow.id == bindparam("m_id"), MessageRow.status == S.SENDING)
        .values(
            status=S.SENT,
            updated_at=bindparam("m_now"),
            provider=bindparam("m_provider"),
            provider_message_id=bindparam("m_pmid"),
            sent_at=bindparam("m_now"),
            attempts=bindparam("m_attempt_no"),
            provider_attempts=bindparam("m_provider_attempts"),
            next_check_at=bindparam("m_next_check"),
            native_fallback=bindparam("m_native"),
            warnings=bindparam("m_warnings"),
            **SENT_CLEARS,
        )
    )
    done = sent.returning(*EVENT_SOURCE).cte("sent")
    # The message.sent events of the row (for subscribed endpoints) in the same statement.
    events = event_insert(done, "message.sent", bindparam("m_now", type_=MessageRow.updated_at.type))
    attempt = (
        insert(Attempt)
        .from_select(
            ["message_id", "attempt_no", "provider", "outcome", "latency_ms", "created_at"],
            select(
                done.c.id,
                bindparam("m_attempt_no", type_=Attempt.attempt_no.type),
                bindparam("m_provider", type_=Attempt.provider.type),
                bindparam("m_outcome", type_=Attempt.outcome.type),
                # Cast: an untyped NULL in a SELECT list is text, which a float column refuses.
                cast(bindparam("m_latency"), Attempt.latency_ms.type),
                bindparam("m_now", type_=Attempt.created_at.type),
            ),
        )
        .returning(Attempt.message_id)
        .add_cte(events.cte("events"))
    )
    return sent, attempt


_MARK_SENT, _MARK_SENT_WITH_ATTEMPT = _mark_sent_statements()


class Store:
    """Data access for messages, attempts, idempotency keys and dead letters.

    Args:
        engine: The process's engine.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        self.is_postgres = engine.dialect.name == "postgresql"

    # -- intake -----------------------------------------------------------------------------------

    def insert_messages(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        idempotency: tuple[str, str, str, timedelta] | None = None,
        now: datetime,
        session: Session | None = None,
    ) -> list[str] | None:
        """Insert message rows in one transaction, guarded by an idempotency key.

        Args:
            rows: Column values for :class:`MessageRow`.
            idempotency: ``(tenant, key, request_hash, ttl)`` or ``None``.
            now: Current time.
            session: Use this session's transaction instead of a new one (bulk intake).

        Returns:
            ``None`` when the rows were inserted; the original message ids when the same key and
            the same request were seen within the window (nothing inserted).

        Raises:
            IdempotencyConflictError: Same key, different request.
        """
        if idempotency is None and session is None and len(rows) == 1:
            # The common single send: one INSERT is its own transaction (no BEGIN/COMMIT round
            # trips, no ORM unit of work), on every single send's critical path.
            # One parameter set, not a list of one: a list takes SQLAlchemy's executemany path.
            pid = None
            try:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    pid = backend_pid(conn)
                    conn.execute(_INSERT_MESSAGE, rows[0])
            except OperationalError:
                # Connected, then lost: the INSERT may have committed without its reply arriving.
                if pid is None or not self._lost_insert_stood(pid, rows[0]["id"]):
                    raise
            return None

        def write(s: Session) -> list[str] | None:
            if idempotency is not None:
                existing = self._check_idempotency(s, idempotency, now, [r["id"] for r in rows])
                if existing is not None:
                    return existing
            if rows:
                s.execute(insert(MessageRow), list(rows))
            return None

        for _ in range(3):
            try:
                # The rows (and the key) commit together: the first row tells whether a lost commit stood.
                return self.in_own_transaction(
                    write, (lambda pid: self._lost_insert_stood(pid, rows[0]["id"])) if rows else None
                )
            except IntegrityError:
                if idempotency is None:
                    raise
                # A concurrent producer inserted the same key first: read it on the next round.
                continue
        raise IdempotencyConflictError(idempotency[1] if idempotency else "?")

    def in_own_transaction(self, work: Callable[[Session], _T], stood: Callable[[int], bool] | None) -> _T:
        """``work`` in a transaction of its own; a commit whose reply was lost counts if ``stood(pid)`` says so.

        ``stood`` gets the PostgreSQL server process that received the COMMIT (:func:`settle_lost_commit`
        is how it should find out); without it, or on SQLite, a lost commit raises as any error does.
        """
        pid = None
        try:
            with self.sessions.begin() as s:
                result = work(s)
                pid = backend_pid(s)  # set only once everything but the commit has succeeded
        except OperationalError:
            if pid is None or stood is None or not stood(pid):
                raise
        return result

    def _lost_insert_stood(self, pid: int, message_id: str) -> bool:
        """The connection broke before the reply to the commit (or autocommitted INSERT) of ``message_id``: stored?"""
        stood = settle_lost_commit(
            self.engine,
            pid,
            lambda conn: conn.execute(select(MessageRow.id).where(MessageRow.id == message_id)).first() is not None,
        )
        if stood is None:
            raise AcceptanceUnknownError(
                f"the database connection was lost while message {message_id} was being stored, and the "
                "database could not be asked afterwards: it may have been accepted (and would then be sent); "
                f"check with `kmsg get {message_id}` before sending it again",
                message_id=message_id,
            )
        return stood

    def _check_idempotency(
        self, s: Session, idem: tuple[str, str, str, timedelta], now: datetime, ids: list[str]
    ) -> list[str] | None:
        tenant, key, request_hash, ttl = idem
        row = s.get(IdempotencyKey, (tenant, key))
        if row is not None and row.expires_at > now:
            if row.request_hash != request_hash:
                raise IdempotencyConflictError(key)
            return list(row.message_ids)
        if row is not None:
            s.delete(row)
            s.flush()
        s.add(
            IdempotencyKey(
                tenant=tenant,
                key=key,
                request_hash=request_hash,
                message_ids=ids,
                created_at=now,
                expires_at=now + ttl,
            )
        )
        s.flush()
        return None

    def purge_idempotency(self, now: datetime) -> int:
        """Delete expired idempotency keys."""
        with self.sessions.begin() as s:
            result = s.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= now))
            return int(getattr(result, "rowcount", 0) or 0)

    # -- reads ------------------------------------------------------------------------------------

    def get(self, message_id: str) -> MessageRow | None:
        """Load one message row."""
        with self.sessions() as s:
            return s.get(MessageRow, message_id)

    def find_by_provider_id(self, provider_message_id: str, providers: Sequence[str]) -> list[MessageRow]:
        """Messages that one of ``providers`` knows as ``provider_message_id``, oldest first.

        Served by ``ix_kmsg_messages_provider_pmid`` (one probe per provider name), whatever the
        size of the table: the providers must be named, as the index leads with them.
        """
        stmt = (
            select(MessageRow)
            .where(MessageRow.provider.in_(list(providers)), MessageRow.provider_message_id == provider_message_id)
            .order_by(MessageRow.created_at, MessageRow.id)
        )
        with self.sessions() as s:
            return list(s.scalars(stmt))

    def sent_by_provider_ids(self, provider: str, provider_message_ids: Sequence[str]) -> list[MessageRow]:
        """The ``sent`` messages ``provider`` knows by these ids (one probe of the provider-id index each)."""
        if not provider_message_ids:
            return []
        stmt = select(MessageRow).where(
            MessageRow.provider == provider,
            MessageRow.provider_message_id.in_(list(provider_message_ids)),
            MessageRow.status == S.SENT,
        )
        with self.sessions() as s:
            return list(s.scalars(stmt))

    def unsent_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` still on their way to the provider (queued, sending or retrying)."""
        if not ids:
            return set()
        stmt = select(MessageRow.id).where(
            MessageRow.id.in_(list(ids)), MessageRow.status.in_([S.QUEUED, S.SENDING, S.RETRYING])
        )
        with self.sessions() as s:
            return set(s.scalars(stmt))

    def attempts(self, message_id: str) -> list[Attempt]:
        """All attempt rows of a message, oldest first."""
        with self.sessions() as s:
            return list(s.scalars(select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.attempt_no)))

    def children(self, message_id: str) -> list[MessageRow]:
        """Failover children of a message."""
        with self.sessions() as s:
            return list(s.scalars(select(MessageRow).where(MessageRow.parent_id == message_id)))

    def count_by_status(self, ids: Iterable[str] | None = None) -> dict[str, int]:
        """Messages per status (optionally among ``ids``)."""
        stmt = select(MessageRow.status, func.count()).group_by(MessageRow.status)
        if ids is not None:
            stmt = stmt.where(MessageRow.id.in_(list(ids)))
        with self.sessions() as s:
            return {status: int(n) for status, n in s.execute(stmt)}

    # -- claims and transitions -------------------------------------------------------------------

    def claim_for_send(self, message_id: str, *, now: datetime, lease: timedelta) -> SendRow | None:
        """Move one message ``queued|due retrying -> sending``; ``None`` if someone else has it."""
        params = {
            "claim_id": message_id,
            "claim_now": now,
            "claim_due": now + timedelta(seconds=1),
            "claim_lease": now + lease,
        }
        # One statement is its own transaction: in autocommit mode there is no BEGIN and no
        # separate COMMIT round trip (this is on every single send's critical path).
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            row = conn.execute(_CLAIM, params).first()
        if row is None:
            return None
        return SendRow(row[0], Message.from_content_owned(row[1]), *row[2:])

    def transition(
        self,
        ids: str | Sequence[str],
        target: MessageStatus,
        *,
        now: datetime,
        expect: Iterable[MessageStatus] | None = None,
        session: Session | None = None,
        **values: Any,
    ) -> int:
        """Conditionally move messages to ``target`` from the allowed previous states.

        Args:
            ids: One id or several.
            target: New status.
            now: Current time (``updated_at``, and ``final_at`` for final states).
            expect: Narrow the allowed previous states (default: all of :data:`ALLOWED` [target]).
            session: Run inside this session's transaction.
            **values: Other columns to set.

        Returns:
            How many rows changed.
        """
        id_list = [ids] if isinstance(ids, str) else list(ids)
        if not id_list:
            return 0
        allowed = set(ALLOWED[target]) if expect is None else set(expect) & set(ALLOWED[target])
        allowed -= FINAL  # terminal states never regress, whatever a caller asks
        if not allowed:
            return 0
        vals: dict[str, Any] = {"status": target, "updated_at": now, **values}
        if target in FINAL:
            vals.setdefault("final_at", now)
            vals.setdefault("lease_until", None)
        # Equalities, not IN lists, where the list is short: an expanding IN makes SQLAlchemy
        # re-render the statement on every call (~1.4 ms per single-message transition).
        by_id = MessageRow.id == id_list[0] if len(id_list) == 1 else MessageRow.id.in_(id_list)
        by_status = or_(*(MessageRow.status == st for st in sorted(allowed)))
        stmt = update(MessageRow).where(by_id, by_status).values(**vals).execution_options(synchronize_session=False)
        # The change and the webhook events it causes, in one statement (the transactional outbox).
        event = EVENT_FOR_STATUS.get(target)
        if session is not None:
            return execute_with_events(session, stmt, event, now=now, is_postgres=self.is_postgres)
        with self.sessions.begin() as s:
            return execute_with_events(s, stmt, event, now=now, is_postgres=self.is_postgres)

    def mark_sent(
        self,
        message_id: str,
        *,
        now: datetime,
        provider: str,
        provider_message_id: str | None,
        attempt_no: int,
        provider_attempts: int,
        next_check_at: datetime,
        native_fallback: bool,
        warnings: list[dict[str, Any]] | None,
        attempt_outcome: str,
        latency_ms: float | None,
    ) -> bool:
        """Move a claimed message ``sending -> sent`` and record its attempt, atomically.

        Returns:
            ``False`` when the message was no longer ``sending`` (nothing written).
        """
        params = {
            "m_id": message_id,
            "m_now": now,
            "m_provider": provider,
            "m_pmid": provider_message_id,
            "m_attempt_no": attempt_no,
            "m_provider_attempts": provider_attempts,
            "m_next_check": next_check_at,
            "m_native": native_fallback,
            "m_warnings": warnings,
            "m_outcome": attempt_outcome,
            "m_latency": latency_ms,
        }
        if self.is_postgres:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                # The returned key, not the rowcount: SQLAlchemy reports -1 for this INSERT ... SELECT.
                return conn.execute(_MARK_SENT_WITH_ATTEMPT, params).first() is not None
        with self.sessions.begin() as s:
            if not s.execute(_MARK_SENT, params).rowcount:  # type: ignore[attr-defined]
                return False
            events_for_ids(s, [message_id], "message.sent", now)
            self.record_attempt(
                s,
                message_id=message_id,
                attempt_no=attempt_no,
                provider=provider,
                outcome=attempt_outcome,
                latency_ms=latency_ms,
                created_at=now,
            )
        return True

    def update_fields(
        self,
        ids: str | Sequence[str],
        *,
        expect: MessageStatus | Sequence[MessageStatus],
        now: datetime,
        session: Session | None = None,
        **values: Any,
    ) -> int:
        """Set columns on messages only while they are in ``expect`` (no status change)."""
        id_list = [ids] if isinstance(ids, str) else list(ids)
        states = [expect] if isinstance(expect, MessageStatus) else list(expect)
        if not id_list:
            return 0
        by_id = MessageRow.id == id_list[0] if len(id_list) == 1 else MessageRow.id.in_(id_list)
        stmt = (
            update(MessageRow)
            .where(by_id, or_(*(MessageRow.status == st for st in states)))
            .values(updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if session is not None:
            return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
        with self.sessions.begin() as s:
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]

    def record_attempt(self, session: Session | None = None, **values: Any) -> None:
        """Insert one attempt row; a duplicate ``(message_id, attempt_no)`` is ignored (redelivery)."""
        if session is not None:
            session.execute(insert(Attempt).values(**values))
            return
        try:
            with self.sessions.begin() as s:
                s.execute(insert(Attempt).values(**values))
        except IntegrityError:
            pass

    def dead_letter(
        self,
        *,
        task_name: str,
        task_id: str | None,
        reason: str,
        payload: str | None,
        message_id: str | None,
        now: datetime,
    ) -> None:
        """Keep a task payload that could not be processed, with its reason."""
        with self.sessions.begin() as s:
            s.add(
                DeadLetter(
                    task_name=task_name,
                    task_id=task_id,
                    message_id=message_id,
                    reason=reason[:2000],
                    payload=(payload or "")[:4000],
                    created_at=now,
                )
            )

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Most recent dead letters first."""
        with self.sessions() as s:
            return list(s.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)))

    # -- sweeps -----------------------------------------------------------------------------------

    def _claim_ids(
        self, where: ColumnElement[bool], order: Any, limit: int, values: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """``UPDATE ... SET values WHERE id IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) RETURNING id``.

        Returns:
            ``(id, priority)`` of every row this call claimed; a concurrent sweep gets the others.
        """
        stmt = self._claim_statement(where, order, limit, values)
        with self.sessions.begin() as s:
            return [(r[0], r[1]) for r in s.execute(stmt.returning(MessageRow.id, MessageRow.priority))]

    def _claim_statement(self, where: ColumnElement[bool], order: Any, limit: int, values: dict[str, Any]) -> Update:
        sub = select(MessageRow.id).where(where).order_by(order).limit(limit)
        if not self.is_postgres:
            return update(MessageRow).where(MessageRow.id.in_(sub.scalar_subquery()), where).values(**values)
        # A MATERIALIZED CTE runs the locking sub-select exactly once, and the UPDATE then only
        # joins its ids by primary key. As ``IN (sub-select)``, or with ``where`` repeated outside,
        # the planner picked nested loops re-running a scan for every claimed row (1,000 due among
        # 1,000,000 rows: 5-30x slower; bench/tracking_index.py). Repeating ``where`` is not needed:
        # the rows stay locked, as ``where`` matched them, until this statement updates them.
        due = sub.with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED")
        return update(MessageRow).where(MessageRow.id == due.c.id).values(**values)

    def claim_due_scheduled(self, *, now: datetime, limit: int) -> list[tuple[str, str]]:
        """``scheduled -> queued`` for single messages whose time has come; returns ids to enqueue."""
        where = and_(MessageRow.status == S.SCHEDULED, MessageRow.scheduled_at <= now, MessageRow.batch_id.is_(None))
        return self._claim_ids(
            where, MessageRow.scheduled_at, limit, {"status": S.QUEUED, "queued_at": now, "updated_at": now}
        )

    def claim_batch_chunks(
        self, where: ColumnElement[bool], values: dict[str, Any], limit: int
    ) -> set[tuple[str, int]]:
        """Update batch rows matching ``where``; return the distinct ``(batch_id, chunk)`` to publish."""
        stmt = (
            self._claim_statement(where, MessageRow.id, limit, values)
            .returning(MessageRow.batch_id, MessageRow.chunk)
            .execution_options(synchronize_session=False)
        )
        with self.sessions.begin() as s:
            return {(b, c) for b, c in s.execute(stmt) if b is not None and c is not None}

    def claim_due_scheduled_chunks(self, *, now: datetime, limit: int) -> set[tuple[str, int]]:
        """``scheduled -> queued`` for batch rows whose time has come; returns the chunks to publish."""
        where = and_(MessageRow.status == S.SCHEDULED, MessageRow.scheduled_at <= now, MessageRow.batch_id.is_not(None))
        return self.claim_batch_chunks(where, {"status": S.QUEUED, "queued_at": now, "updated_at": now}, limit)

    def claim_stale_chunks(self, *, now: datetime, older_than: timedelta, limit: int) -> set[tuple[str, int]]:
        """Batch rows left ``queued`` too long (their chunk task was lost): the chunks to re-publish."""
        where = and_(
            MessageRow.status == S.QUEUED, MessageRow.queued_at <= now - older_than, MessageRow.batch_id.is_not(None)
        )
        return self.claim_batch_chunks(where, {"queued_at": now, "updated_at": now}, limit)

    def claim_stale_queued(self, *, now: datetime, older_than: timedelta, limit: int) -> list[tuple[str, str]]:
        """Rows left ``queued`` too long (their task was lost): refresh ``queued_at`` and re-enqueue."""
        where = and_(
            MessageRow.status == S.QUEUED,
            MessageRow.queued_at <= now - older_than,
            MessageRow.batch_id.is_(None),
        )
        return self._claim_ids(where, MessageRow.queued_at, limit, {"queued_at": now, "updated_at": now})

    @staticmethod
    def _due_retry(now: datetime, grace: timedelta) -> ColumnElement[bool]:
        return and_(
            MessageRow.status == S.RETRYING,
            MessageRow.next_attempt_at <= now,
            or_(MessageRow.retry_task_published.is_(False), MessageRow.next_attempt_at <= now - grace),
        )

    def claim_due_retries(self, *, now: datetime, grace: timedelta, limit: int) -> list[tuple[str, str]]:
        """``retrying -> queued`` for single messages no countdown task will wake (or whose task was lost)."""
        where = and_(self._due_retry(now, grace), MessageRow.batch_id.is_(None))
        return self._claim_ids(
            where,
            MessageRow.next_attempt_at,
            limit,
            {"status": S.QUEUED, "queued_at": now, "updated_at": now},
        )

    def claim_due_retry_chunks(self, *, now: datetime, grace: timedelta, limit: int) -> set[tuple[str, int]]:
        """The same for batch rows; returns their chunks to publish (only a chunk's task sends its rows)."""
        where = and_(self._due_retry(now, grace), MessageRow.batch_id.is_not(None))
        return self.claim_batch_chunks(where, {"status": S.QUEUED, "queued_at": now, "updated_at": now}, limit)

    def claim_expired_leases(self, *, now: datetime, extend: timedelta, limit: int) -> list[tuple[str, str]]:
        """Rows stuck in ``sending`` past their lease (a worker died): extend the lease while we reconcile."""
        where = and_(MessageRow.status == S.SENDING, MessageRow.lease_until <= now)
        return self._claim_ids(where, MessageRow.lease_until, limit, {"lease_until": now + extend, "updated_at": now})

    def claim_due_checks(self, *, now: datetime, hold: timedelta, limit: int) -> list[MessageRow]:
        """Rows ``sent`` whose next status check is due: push ``next_check_at`` forward and return them."""
        where = and_(MessageRow.status == S.SENT, MessageRow.next_check_at <= now)
        stmt = (
            self._claim_statement(where, MessageRow.next_check_at, limit, {"next_check_at": now + hold})
            # The whole rows come back with the claim: one round trip, no second look-up by id.
            .returning(MessageRow)
            .execution_options(synchronize_session=False)
        )
        with self.sessions.begin() as s:
            return list(s.scalars(stmt))

    def release_checks(self, ids: Sequence[str], *, held_until: datetime, due: datetime) -> int:
        """Give back claimed status checks a sweep did not reach: they are due again at ``due``.

        Only rows still held by that claim (``next_check_at = held_until``) are touched.
        """
        if not ids:
            return 0
        stmt = (
            update(MessageRow)
            .where(MessageRow.id.in_(list(ids)), MessageRow.status == S.SENT, MessageRow.next_check_at == held_until)
            .values(next_check_at=due)
        )
        with self.sessions.begin() as s:
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]
