"""The producer API: :class:`KMsg`.

Every call validates first (nothing is written for invalid input), writes the rows in one
transaction (the outbox), and only after the commit publishes task ids. If publishing fails, the
rows are already safe: the maintenance sweep re-enqueues messages left ``queued``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from kmsg_worker import adrules
from kmsg_worker.batches import BatchSummary, batch_summary, cancel_batch, cancel_batch_message
from kmsg_worker.dispatch import CELERY_APP, Dispatcher
from kmsg_worker.errors import ConfigurationError, InvalidStateError, MessageNotFoundError, RowError, ValidationError
from kmsg_worker.gctune import raised_threshold
from kmsg_worker.intake import intake
from kmsg_worker.logging import get_logger
from kmsg_worker.message import KAKAO_TYPES, Message, MessageType, check_text, normalize
from kmsg_worker.runtime import Runtime
from kmsg_worker.sandbox import event_mark, is_sandbox_content
from kmsg_worker.settings import Settings
from kmsg_worker.status import FINAL, MessageStatus
from kmsg_worker.storage.db import storage_errors
from kmsg_worker.storage.models import MessageRow
from kmsg_worker.storage.rows import new_message_row
from kmsg_worker.templates import AlimTalkPreflight, Registry, TemplateResolver

__all__ = ["AttemptInfo", "BatchReceipt", "BatchSummary", "KMsg", "MessageInfo", "Receipt"]

S = MessageStatus
log = get_logger("kmsg.producer")


@dataclass(frozen=True)
class Receipt:
    """What :meth:`KMsg.send` returns: the message was stored and will be sent.

    Attributes:
        message_id: The id to query with :meth:`KMsg.get`.
        status: ``queued`` or ``scheduled``.
        type: The (possibly inferred) message type.
        route: Providers in failover order.
        duplicate: True when an idempotency key matched an earlier identical request.
    """

    message_id: str
    status: str
    type: str
    route: tuple[str, ...]
    duplicate: bool = False


@dataclass(frozen=True)
class BatchReceipt:
    """What :meth:`KMsg.send_many` returns.

    Attributes:
        batch_id: The batch's id.
        message_ids: Ids of the accepted messages, in input order.
        invalid: Rows skipped as invalid (only with ``on_invalid="skip"``).
    """

    batch_id: str
    message_ids: list[str]
    invalid: list[RowError] = field(default_factory=list)
    duplicate: bool = False


@dataclass(frozen=True)
class AttemptInfo:
    """One provider call of a message."""

    attempt_no: int
    provider: str
    outcome: str
    error_code: str | None
    provider_code: str | None
    http_status: int | None
    latency_ms: float | None
    at: datetime


@dataclass(frozen=True)
class MessageInfo:
    """A message as the system of record knows it."""

    id: str
    status: str
    type: str
    to: str
    provider: str | None
    provider_message_id: str | None
    route: list[str]
    attempts: list[AttemptInfo]
    error_code: str | None
    error_message: str | None
    provider_status_code: str | None
    created_at: datetime
    scheduled_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    final_at: datetime | None
    parent_id: str | None
    children: list[str]
    batch_id: str | None
    warnings: list[dict[str, Any]]
    #: The provider's delivery-status text (with ``provider_status_code``).
    provider_status_message: str | None = None
    #: When the carrier or Kakao reported a failed delivery.
    failed_at: datetime | None = None
    #: For an AlimTalk with a fallback request: ``created`` or ``skipped:<reason>`` once decided.
    fallback_state: str | None = None
    #: Sent with a test API key: it only ever reached the simulator.
    test: bool = False

    @property
    def final(self) -> bool:
        """Whether the message reached a final state."""
        return MessageStatus(self.status) in FINAL


def _request_hash(message: Message) -> str:
    # The full form, so hashes stored before content was compacted still match.
    content = message.content(full=True)
    content.pop("id", None)
    content.pop("idempotency_key", None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


class KMsg:
    """Send, schedule, query and cancel messages.

    Args:
        settings: Defaults to :meth:`Settings.from_env`.
        runtime: An existing per-process runtime (shares its engine and dispatcher).
        dispatcher: Where to publish tasks; defaults to the Celery app named by ``KMSG_DISPATCHER``
            (``<CELERY_APP>:dispatcher``), resolved lazily so this module never imports Celery tasks.

    Example::

        from kmsg_worker import KMsg

        kmsg = KMsg()
        receipt = kmsg.send(to="010-1234-5678", text="인증번호 [123456]", priority="high")
        kmsg.get(receipt.message_id).status
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        runtime: Runtime | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        if runtime is None:
            settings = settings or Settings.from_env()
            runtime = Runtime(settings, dispatcher=dispatcher or _default_dispatcher())
        elif dispatcher is not None:
            runtime.dispatcher = dispatcher
        self.runtime = runtime
        self.settings = runtime.settings
        #: The tenant template registry (create, edit, publish, archive, preview).
        self.templates = Registry(runtime.engine, runtime.settings.limits)

    def close(self) -> None:
        """Release the database pool and HTTP client."""
        self.runtime.close()

    def __enter__(self) -> KMsg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- single ------------------------------------------------------------------------------------

    def validate(self, message: Mapping[str, Any] | None = None, /, **fields: Any) -> Message:
        """Validate and normalise without storing anything.

        Raises:
            ValidationError: Naming the field and the rule.
        """
        if message is not None and not isinstance(message, Mapping):
            raise ValidationError("message", "type", f"must be a mapping, got {type(message).__name__}")
        raw = {**(message or {}), **fields}
        if raw.get("template") is not None:
            raw = TemplateResolver(self.templates).apply(raw)
        return normalize(
            raw,
            limits=self.settings.limits,
            now=self.runtime.now(),
            default_sender=self.settings.default_sender,
            advertiser=adrules.profile_lookup(self.runtime.store),
        )

    def send(self, message: Mapping[str, Any] | None = None, /, **fields: Any) -> Receipt:
        """Validate, store and enqueue one message.

        Accepts a mapping, keyword arguments, or both (keywords win). See
        :func:`kmsg_worker.message.normalize` for the fields.

        Returns:
            A :class:`Receipt`; the send itself happens in a worker.

        Raises:
            ValidationError: Invalid input (nothing stored, nothing queued).
            IdempotencyConflictError: The key was used for a different request.
            StorageUnavailableError: The database is down; nothing was accepted.
            AcceptanceUnknownError: The connection broke while the row was being stored and the database
                could not be asked afterwards: the message may have been accepted (look it up by its
                ``message_id`` before sending again). A lost reply that the database *can* be asked
                about is settled here: the send succeeds or raises ``StorageUnavailableError``.
        """
        msg = self.validate(message, **fields)
        route = self.runtime.router.route(msg)
        if msg.type is MessageType.ALIMTALK:
            msg = _preflighted(self.runtime, msg, route)
        if msg.sender and msg.type not in KAKAO_TYPES:
            self.runtime.senders.check_route(route, msg.sender)
        if msg.advertising:
            adrules.check_not_suppressed(self.settings, self.runtime.store, msg.tenant, msg.to)
        now = self.runtime.now()
        row = new_message_row(msg, route, now)
        idem = None
        if msg.idempotency_key:
            idem = (msg.tenant, msg.idempotency_key, _request_hash(msg), self.settings.idempotency_ttl)
        try:
            with storage_errors():
                existing = self.runtime.store.insert_messages([row], idempotency=idem, now=now)
        except IntegrityError:
            # The only unique column of a message row is its id: the caller reused one.
            raise ValidationError("id", "duplicate", "a message with this id already exists; use a new id") from None
        if existing is not None:
            found = self.runtime.store.get(existing[0])
            return Receipt(
                existing[0],
                found.status if found else "unknown",
                msg.type.value,
                tuple(route),
                duplicate=True,
            )
        if row["status"] == S.QUEUED:
            self._publish([msg.id], msg.priority.value)
        # Logged after the publish: the worker can start while this line is rendered.
        log.info(
            "message.accepted",
            message_id=msg.id,
            type=msg.type.value,
            provider=route[0],
            tenant=msg.tenant,
            **event_mark(msg),
        )
        return Receipt(msg.id, str(row["status"]), msg.type.value, tuple(route))

    def schedule(self, message: Mapping[str, Any] | None = None, /, *, at: datetime | str, **fields: Any) -> Receipt:
        """Store a message to be sent at ``at`` (naive times are in ``KMSG_TIMEZONE``, Asia/Seoul).

        Any horizon works: the row waits in the database and a beat sweep dispatches it when due;
        there is never a long Celery ETA. Cancel with :meth:`cancel` until it is dispatched.
        """
        return self.send(message, **{**fields, "scheduled_at": at})

    def _publish(self, ids: list[str], priority: str) -> None:
        try:
            self.runtime.dispatcher.send(ids, priority=priority)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the sweep re-enqueues
            # The rows are committed: a broker outage delays the send, it never loses it.
            log.warning("message.enqueue_failed", count=len(ids), error=type(exc).__name__)

    # -- bulk --------------------------------------------------------------------------------------

    def send_many(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        on_invalid: str = "reject",
        idempotency_key: str | None = None,
        chunk_size: int | None = None,
        tenant: str = "default",
    ) -> BatchReceipt:
        """Validate and store a batch (a handful to millions of rows), then enqueue its chunks.

        Returns without waiting for the sends: follow progress with :meth:`batch_summary`.

        Rows stream to the database in slices of 10,000, so memory does not grow with the batch.
        With ``on_invalid="reject"`` or an ``idempotency_key`` the batch is stored in one
        transaction: all of it or nothing, and its chunks are queued once it commits. With
        ``on_invalid="skip"`` and no key each slice commits on its own and its chunks are queued at
        once, so the first chunks are sent while the rest is still being stored.

        While it runs, the garbage collector's first threshold is raised (``KMSG_GC_THRESHOLD``) and
        the GIL switch interval lowered to 0.5 ms in this process; both are restored when it returns.

        Args:
            messages: Mappings (a list or a generator), each merged over ``defaults``; rows that only
                carry ``to``, ``variables``, ``id`` and ``custom_fields`` take a fast path that
                reuses the validated ``defaults``.
            defaults: Shared fields (the text with ``#{name}`` variables, the sender, the type).
            on_invalid: ``"reject"``: raise :class:`BatchValidationError` listing the invalid rows
                (row number, field, rule) and store nothing; ``"skip"``: store the valid rows and
                report the invalid ones in the receipt.
            idempotency_key: Makes the whole batch safe to submit twice.
            chunk_size: Rows per provider request (capped by the provider's batch limit); default
                ``KMSG_BULK_CHUNK_SIZE`` (5,000).
            tenant: Tenant the batch belongs to.

        Raises:
            BatchValidationError: ``on_invalid="reject"`` and some rows are invalid.
            BatchPartiallyStoredError: A streamed batch (``"skip"``, no key) lost the database
                part-way: the first ``stored`` rows were accepted (batch ``batch_id``) and will be
                sent; send only the rest again.
            StorageUnavailableError: The database is down; nothing was accepted.
            AcceptanceUnknownError: The connection broke while the batch (or a streamed slice) was
                being committed and the database could not be asked afterwards: look the batch up by
                its ``batch_id`` before sending again.
        """

        # Rare collections while the rows are validated and written (restored afterwards).
        with storage_errors(), raised_threshold(self.runtime.settings.gc_threshold):
            batch_id, ids, errors, duplicate = intake(
                self.runtime,
                messages,
                defaults=defaults,
                on_invalid=on_invalid,
                chunk_size=chunk_size,
                idempotency_key=idempotency_key,
                tenant=tenant,
            )
        return BatchReceipt(batch_id, ids, errors, duplicate=duplicate)

    def batch_summary(self, batch_id: str) -> BatchSummary:
        """The bulk result summary: counts by status, provider, type and error code, cost, throughput."""

        return batch_summary(self.runtime, batch_id)

    def cancel_batch(self, batch_id: str) -> BatchSummary:
        """Stop a batch: chunks not sent yet are cancelled; what was sent stays sent."""

        cancel_batch(self.runtime, batch_id)
        return batch_summary(self.runtime, batch_id)

    # -- queries and control -----------------------------------------------------------------------

    def get(self, message_id: str) -> MessageInfo:
        """Return everything known about a message, its attempts and its failover children.

        Raises:
            MessageNotFoundError: No such message.
        """
        row = self.runtime.store.get(message_id)
        if row is None:
            raise MessageNotFoundError(f"no message with id {message_id!r}")
        return self._info_of(row)

    def find_by_provider_id(self, provider_message_id: str, *, provider: str | None = None) -> list[MessageInfo]:
        """The messages a provider knows by its own id (as its console, a report or a carrier shows it).

        Args:
            provider_message_id: The provider's message id (Solapi ``messageId``, IWINV's or Aligo's ``mid``).
            provider: Look only among this provider's messages; default: every configured provider.

        Returns:
            Each match, as :meth:`get` shows it, oldest first (usually one; ids of different providers
            may coincide).
        """
        providers = [provider] if provider else list(self.runtime.settings.providers)
        return [self._info_of(row) for row in self.runtime.store.find_by_provider_id(provider_message_id, providers)]

    def _info_of(self, row: MessageRow) -> MessageInfo:
        store = self.runtime.store
        message_id = row.id
        attempts = [
            AttemptInfo(
                a.attempt_no,
                a.provider,
                a.outcome,
                a.error_code,
                a.provider_code,
                a.http_status,
                a.latency_ms,
                a.created_at,
            )
            for a in store.attempts(message_id)
        ]
        return _info(row, attempts, [c.id for c in store.children(message_id)])

    def cancel(self, message_id: str) -> MessageInfo:
        """Cancel a message that has not been dispatched to a provider yet.

        Raises:
            MessageNotFoundError: No such message.
            InvalidStateError: It was already sent (or is being sent, or is final).
        """
        now = self.runtime.now()
        stored = self.runtime.store.get(message_id)
        if stored is not None and stored.batch_id is not None and stored.chunk is not None:
            # A batch row stays "queued" while its chunk's request is in flight: ask the chunk's lease.
            changed = cancel_batch_message(self.runtime, message_id, stored.batch_id, stored.chunk)
        else:
            changed = self.runtime.store.transition(message_id, S.CANCELLED, now=now, error_code="CANCELLED")
        if not changed:
            row = self.runtime.store.get(message_id)
            if row is None:
                raise MessageNotFoundError(f"no message with id {message_id!r}")
            if row.batch_id is not None and row.status in (S.QUEUED, S.RETRYING):
                raise InvalidStateError(
                    f"message {message_id} is being sent: its batch chunk's request is in flight; "
                    "it can no longer be cancelled"
                )
            if row.status in (S.SENDING, S.SENT, S.DELIVERED) or row.attempts > 0:
                raise InvalidStateError(
                    f"message {message_id} was already sent to the provider (status {row.status}); "
                    "it can no longer be cancelled"
                )
            raise InvalidStateError(f"message {message_id} cannot be cancelled: it is already {row.status}")
        log.info("message.cancelled", message_id=message_id)
        return self.get(message_id)


def _preflighted(rt: Runtime, msg: Message, route: list[str]) -> Message:
    """``msg`` checked against its providers' approved AlimTalk template (and completed from it)."""
    content = msg.content()
    checked = AlimTalkPreflight(rt).check(dict(content), route)
    if checked == content:
        return msg
    check_text(msg.type, checked.get("text"), msg.subject, rt.settings.limits)
    return Message.from_content(checked)


def _info(row: MessageRow, attempts: list[AttemptInfo], children: list[str]) -> MessageInfo:
    return MessageInfo(
        id=row.id,
        status=row.status,
        type=row.type,
        to=row.recipient,
        provider=row.provider or (row.route[row.route_index] if row.route else None),
        provider_message_id=row.provider_message_id,
        route=list(row.route),
        attempts=attempts,
        error_code=row.error_code,
        error_message=row.error_message,
        provider_status_code=row.provider_status_code,
        created_at=row.created_at,
        scheduled_at=row.scheduled_at,
        sent_at=row.sent_at,
        delivered_at=row.delivered_at,
        final_at=row.final_at,
        parent_id=row.parent_id,
        children=children,
        batch_id=row.batch_id,
        warnings=list(row.warnings or []),
        provider_status_message=row.provider_status_message,
        failed_at=row.failed_at,
        fallback_state=row.fallback_state,
        test=is_sandbox_content(row.content or {}),
    )


def _default_dispatcher() -> Dispatcher:
    target = os.environ.get("KMSG_DISPATCHER", f"{CELERY_APP}:dispatcher")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"KMSG_DISPATCHER={target!r} cannot be imported ({exc}); pass dispatcher= to KMsg",
            variable="KMSG_DISPATCHER",
        ) from exc
    factory = getattr(module, attr)
    dispatcher: Dispatcher = factory() if callable(factory) and not hasattr(factory, "send") else factory
    return dispatcher
