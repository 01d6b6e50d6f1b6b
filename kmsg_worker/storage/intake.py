"""Bulk intake's writes: slices of new rows (``COPY`` or ``executemany``), the batch row, its totals and key.

:class:`SliceWriter` writes slices on one background thread while the caller validates the next.
A connection lost at a commit is settled before answering (:func:`commit_in_doubt`): a commit may
have taken effect although its reply never arrived, and "nothing was stored" must be true when said.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from kmsg_worker.errors import AcceptanceUnknownError, BatchPartiallyStoredError, IdempotencyConflictError
from kmsg_worker.gctune import lowered_switch_interval
from kmsg_worker.logging import get_logger
from kmsg_worker.storage.copy import copy_payload, copy_rows
from kmsg_worker.storage.db import backend_pid, settle_lost_commit
from kmsg_worker.storage.models import Batch, ChunkLease, IdempotencyKey, MessageRow

if TYPE_CHECKING:
    from kmsg_worker.storage.repo import Store

__all__ = ["SliceWriter", "batch_key", "commit_in_doubt", "repeated_batch", "store_totals", "stored_batch_key"]

log = get_logger("kmsg.intake")


@dataclass
class _SliceData:
    """One slice of rows in the form its backend takes: ``COPY`` text on PostgreSQL, row dicts on SQLite."""

    count: int
    #: ``(column list, data)`` of :func:`_copy_payload`.
    copy: tuple[str, str] | None = None
    rows: list[dict[str, Any]] | None = None


def _slice_data(store: Store, rows: list[dict[str, Any]], shared: Mapping[str, Any]) -> _SliceData:
    """Render ``rows`` (each with the ``shared`` columns) for the writer thread."""
    if not rows:
        return _SliceData(0)
    if store.is_postgres:
        return _SliceData(len(rows), copy=copy_payload(rows, shared))
    return _SliceData(len(rows), rows=[{**shared, **row} for row in rows])


def _write(
    store: Store,
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
    took effect anyway, the slice counts as written (see :func:`commit_in_doubt`).
    """
    if session is not None:
        _write_in(session, data, extra, leases)
    else:
        store.in_own_transaction(lambda s: _write_in(s, data, extra, leases), stood)


def commit_in_doubt(store: Store, pid: int, written: Callable[[Connection], bool], doubt: str, batch_id: str) -> bool:
    """A batch's commit lost its connection: True if it took effect, False if not.

    Raises:
        AcceptanceUnknownError: The database could not be asked (``doubt`` says what may be stored).
    """
    stood = settle_lost_commit(store.engine, pid, written)
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


class SliceWriter:
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

    def __init__(
        self,
        store: Store,
        batch_id: str,
        shared: Mapping[str, Any],
        *,
        atomic: bool,
        publish: Callable[[Sequence[int]], None],
    ) -> None:
        self.store = store
        #: Publishes the tasks of chunks whose rows are committed.
        self.publish = publish
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
                self.session = self.store.sessions()
            _write(self.store, data, extra, leases, self.session, stood=lambda pid: self._slice_stood(pid, data.count))
        except BaseException:
            self.failed = True
            raise
        self.stored += data.count
        if not self.atomic:
            self.publish(ready)

    def submit(self, rows: list[dict[str, Any]], extra: list[Any], leases: list[ChunkLease], ready: list[int]) -> None:
        """Render one slice and queue it; waits (and raises its error) when two are already waiting."""
        data = _slice_data(self.store, rows, self.shared)
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
        return commit_in_doubt(
            self.store, pid, lambda conn: conn.execute(batch_rows).scalar_one() > self.stored, doubt, self.batch_id
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

            if pid is None or not commit_in_doubt(self.store, pid, stored, "all of it may be", self.batch_id):
                raise
        self.publish(ready)

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


def store_totals(store: Store, batch_id: str, totals: dict[str, Any]) -> None:
    """A streamed batch's last write: its totals, which mark the intake complete."""
    write = update(Batch).where(Batch.id == batch_id).values(**totals)
    batch_total = select(Batch.total).where(Batch.id == batch_id)

    def stood(pid: int) -> bool:
        doubt = f"all {totals['total']} rows are stored; only the batch's totals may not be"
        return commit_in_doubt(
            store, pid, lambda conn: conn.execute(batch_total).scalar_one() == totals["total"], doubt, batch_id
        )

    try:
        store.in_own_transaction(lambda s: s.execute(write), stood)
    except OperationalError as exc:
        # Every row is stored and its chunk published: not "nothing was accepted".
        raise BatchPartiallyStoredError(batch_id, totals["total"], type(exc.orig).__name__) from exc


def batch_key(tenant: str, key: str, request_hash: str, batch_id: str, now: datetime, ttl: timedelta) -> IdempotencyKey:
    """The idempotency key row of a batch (stored with the batch, in its transaction)."""
    return IdempotencyKey(
        tenant=tenant,
        key=key,
        request_hash=request_hash,
        message_ids=[],
        batch_id=batch_id,
        created_at=now,
        expires_at=now + ttl,
    )


def stored_batch_key(store: Store, tenant: str, key: str, now: datetime) -> tuple[str, str] | None:
    """``(request hash, batch id)`` of a batch stored with ``key``, or ``None`` (an expired key is removed)."""
    with store.sessions.begin() as s:
        row = s.get(IdempotencyKey, (tenant, key))
        if row is None or row.expires_at <= now:
            if row is not None:
                s.delete(row)
            return None
        return row.request_hash, row.batch_id or ""


def repeated_batch(store: Store, key: str, stored: tuple[str, str], request_hash: str) -> tuple[str, list[str]]:
    """The batch a repeated request (same key) names, with its ids; a different request is a conflict."""
    if stored[0] != request_hash:
        raise IdempotencyConflictError(key)
    batch_id = stored[1]
    with store.sessions() as s:
        return batch_id, list(s.scalars(select(MessageRow.id).where(MessageRow.batch_id == batch_id)))
