"""The shapes of message rows: the one new-row builder, and the claimed row the delivery engine sends.

A new message row is built in one place (:func:`new_message_columns` plus :func:`shared_columns`),
whoever accepts it: a single send, a bulk intake (which writes the shared columns once per slice
instead of once per row) or an AlimTalk fallback child. A claimed row (:class:`SendRow`) is read
the same way by a single-send claim, a chunk claim and a lease recovery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Text
from sqlalchemy import cast as cast_

from kmsg_worker.message import Message
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.models import NEW_MESSAGE_STATE, SEND_STATE_COLUMNS, MessageRow

__all__ = ["ROW_COLUMNS", "ROW_SQL", "SendRow", "new_message_columns", "new_message_row", "shared_columns"]

S = MessageStatus


def shared_columns(now: datetime, *, batch_id: str | None = None) -> dict[str, Any]:
    """The columns of a new row that every row accepted at ``now`` (in one batch) shares."""
    return {"batch_id": batch_id, **NEW_MESSAGE_STATE, "created_at": now, "updated_at": now}


def new_message_columns(
    content: Mapping[str, Any],
    route: list[str],
    now: datetime,
    *,
    priority: str,
    scheduled_at: datetime | None = None,
    chunk: int | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """The columns of a new row that may differ between the rows of one batch.

    Args:
        content: The message's stored content (:meth:`Message.content`).
        route: Provider names, in the order they are tried.
        now: When it was accepted.
        priority: Its queue priority (a batch's rows default to ``bulk``).
        scheduled_at: Its send time; a time after ``now`` stores it ``scheduled``, else ``queued``.
        chunk: Its chunk, for a batch row.
        parent_id: The message it is the fallback of.
    """
    waiting = scheduled_at is not None and scheduled_at > now
    return {
        "id": content["id"],
        "tenant": content.get("tenant") or "default",
        "parent_id": parent_id,
        "chunk": chunk,
        "type": content["type"],
        "recipient": content["to"],
        "status": S.SCHEDULED.value if waiting else S.QUEUED.value,
        "priority": priority,
        "route": route,
        "scheduled_at": scheduled_at,
        "content": content,
        "idempotency_key": content.get("idempotency_key"),
        "queued_at": None if waiting else now,
    }


def new_message_row(
    message: Message, route: list[str], now: datetime, *, parent_id: str | None = None
) -> dict[str, Any]:
    """Every column of one new message row (a single send, a scheduled send, a fallback child)."""
    return {
        **shared_columns(now),
        **new_message_columns(
            message.content(),
            route,
            now,
            priority=message.priority.value,
            scheduled_at=message.scheduled_at,
            parent_id=parent_id,
        ),
    }


@dataclass(slots=True)
class SendRow:
    """A message the delivery engine holds: claimed for a single send, in a claimed chunk, or being recovered.

    ``attempts`` and the other counters are what the row holds in the database; the engine keeps
    them in step with what it writes, so attempt numbers stay consecutive within one run.
    """

    id: str
    message: Message
    route: list[str]
    route_index: int
    attempts: int
    provider_attempts: int
    deliveries: int
    created_at: datetime
    outcome_unknown: bool
    priority: str
    scheduled_at: datetime | None = None
    batch_id: str | None = None
    chunk: int | None = None

    @property
    def provider(self) -> str:
        """The provider this row's next call goes to."""
        return self.route[self.route_index]

    @classmethod
    def load_all(cls, rows: Iterable[Sequence[Any]]) -> list[SendRow]:
        """Rows read with :data:`ROW_COLUMNS` (``content`` and ``route`` arrive as JSON text).

        A chunk's rows share one route and, from one intake, one ``created_at``: each distinct value
        is parsed (or converted to UTC) once and the rows share the result, which is never changed.
        Columns after the first ten, if any, are ``scheduled_at``, ``batch_id`` and ``chunk``.
        """
        routes: dict[str, list[str]] = {}
        times: dict[datetime, datetime] = {}
        loaded: list[SendRow] = []
        for values in rows:
            route = routes.get(values[2])
            if route is None:
                route = routes[values[2]] = orjson.loads(values[2])
            created = times.get(values[7])
            if created is None:
                created = times[values[7]] = values[7].astimezone(UTC)
            row = cls(
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
            if len(values) > 10:
                row.scheduled_at, row.batch_id, row.chunk = values[10], values[11], values[12]
            loaded.append(row)
        return loaded


#: Columns of :class:`SendRow`, in field order (every claim and recovery reads the same shape). The
#: JSON columns are read as text and parsed with orjson: the driver's own JSON decoding cost about
#: 8 us per row, a third of a whole chunk claim.
ROW_COLUMNS = (
    MessageRow.id,
    cast_(MessageRow.content, Text),
    cast_(MessageRow.route, Text),
    *SEND_STATE_COLUMNS,
    MessageRow.priority,
)
#: The optional trailing columns :meth:`SendRow.load_all` reads.
ROW_EXTRA_COLUMNS = (MessageRow.scheduled_at, MessageRow.batch_id, MessageRow.chunk)

#: :data:`ROW_COLUMNS` as SQL, for the driver's own cursor (PostgreSQL).
ROW_SQL = ", ".join(["id", "content::text", "route::text", *(c.key for c in SEND_STATE_COLUMNS), "priority"])
