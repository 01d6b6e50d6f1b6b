"""The provider contract: one base class, capabilities, and the normalised results.

A provider adapter turns :class:`~kmsg_worker.message.Message` objects into its vendor's wire
format and the vendor's answers back into :class:`SendOutcome` and :class:`StatusReport`. HTTP
adapters derive from :class:`~kmsg_worker.providers.base_http.HttpProvider`, which owns the shared
``httpx.Client``, timeouts and the translation of transport errors.

Order of a send (the template method :meth:`Provider.send_batch`):
check capability -> ``_send_batch`` (vendor) -> per-recipient :class:`SendOutcome`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from kmsg_worker.errors import ErrorCode, ProviderError, ProviderRejected, ProviderTransientError
from kmsg_worker.message import VAR_PATTERN, Message, MessageType

__all__ = [
    "Balance",
    "Capabilities",
    "DeliveryState",
    "HealthReport",
    "LookupHint",
    "Provider",
    "ProviderConfig",
    "ProviderLookupUndecided",
    "RequestTally",
    "SendOutcome",
    "SendWarning",
    "StatusQuery",
    "StatusReport",
    "alimtalk_template",
    "count_request",
    "counting_requests",
]


class RequestTally:
    """How many vendor requests were made inside one :func:`counting_requests` block.

    An adapter's in-flight window adds from several threads at once, hence the lock.
    """

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        """Count one request."""
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        """Requests counted so far."""
        return self._count


_tally: ContextVar[RequestTally | None] = ContextVar("kmsg_request_tally", default=None)


@contextmanager
def counting_requests() -> Iterator[RequestTally]:
    """Count the vendor requests an adapter makes for one call (``send`` / ``send_batch``).

    A call may be one request or many (an adapter splits a chunk by its provider's limits, uploads
    images first, runs requests through its in-flight window); the adapters report each one with
    :func:`count_request`, so the caller learns the real number without a change to their API.
    """
    tally = RequestTally()
    token = _tally.set(tally)
    try:
        yield tally
    finally:
        _tally.reset(token)


def count_request() -> None:
    """Report one vendor request to the enclosing :func:`counting_requests` block, if there is one."""
    tally = _tally.get()
    if tally is not None:
        tally.add()


class DeliveryState(StrEnum):
    """What a provider says about one message."""

    PENDING = "PENDING"  #: Accepted, not yet handed to the carrier / Kakao.
    SENT = "SENT"  #: Handed to the carrier, awaiting the delivery report.
    DELIVERED = "DELIVERED"  #: Final: the handset got it.
    FAILED = "FAILED"  #: Final: the carrier or Kakao reported a failure (code kept).
    UNKNOWN = "UNKNOWN"  #: The provider's answer could not be interpreted.


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; routing and the pipeline read this instead of guessing.

    Attributes:
        types: Message types it can send.
        bulk_limit: Most recipients in one send request (1 = no bulk API).
        send_batch_limit: Most messages one :meth:`Provider.send_batch` call takes, for an adapter
            whose ``_send_batch`` splits a call into requests of at most ``bulk_limit`` itself and
            runs them through a bounded window (:meth:`HttpProvider.send_requests`); ``None``: a
            call is one request, so ``bulk_limit``. See :attr:`Provider.send_batch_limit`.
        status_query: It has a delivery-status API.
        bulk_status: Its status API answers for many messages in one call.
        alimtalk_fallback: Native AlimTalk -> SMS fallback: ``full``, ``partial`` or ``none``.
        balance: It has a balance API.
        templates: It has a template management API.
        file_upload: It has a file upload API (MMS images, fax).
        lookup_by_reference: It can find a message by *our* id (used to reconcile unknown outcomes).
    """

    types: frozenset[MessageType]
    bulk_limit: int = 1
    send_batch_limit: int | None = None
    status_query: bool = False
    bulk_status: bool = False
    alimtalk_fallback: Literal["full", "partial", "none"] = "none"
    balance: bool = False
    templates: bool = False
    file_upload: bool = False
    lookup_by_reference: bool = False


@dataclass(frozen=True)
class ProviderConfig:
    """Settings for one provider instance, built from the environment by :mod:`kmsg_worker.settings`.

    Attributes:
        name: Registry name (``"solapi"``).
        base_url: Main API base URL; points at the real service or at a fake server.
        credentials: Secrets (API keys); never logged, never in a repr.
        options: Non-secret options (sender numbers, profile ids, extra base URLs, batch limits).
    """

    name: str
    base_url: str | None = None
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"ProviderConfig(name={self.name!r}, base_url={self.base_url!r}, "
            f"credentials=<{len(self.credentials)} hidden>, options={dict(self.options)!r})"
        )

    def option(self, key: str, default: Any = None) -> Any:
        """Return a non-secret option, or ``default``."""
        return self.options.get(key, default)

    def secret(self, key: str) -> str:
        """Return a credential or raise a configuration error naming the variable."""
        from kmsg_worker.errors import ConfigurationError

        value = self.credentials.get(key)
        if not value:
            var = f"KMSG_{self.name.upper()}_{key.upper()}"
            raise ConfigurationError(f"{var} is not set (needed by provider {self.name!r})", variable=var)
        return value


@dataclass(frozen=True)
class SendWarning:
    """Something the provider could only partly honour (e.g. ``FAILOVER_PARTIAL_PROVIDER``)."""

    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class SendOutcome:
    """The provider's answer for one recipient of a send request.

    Exactly one of ``provider_message_id`` (accepted) and ``error`` (refused) is meaningful:
    ``accepted`` tells which. An ``error`` that is a :class:`~kmsg_worker.errors.ProviderTimeout`
    means *the outcome is unknown*: the provider may have taken the message, so the pipeline
    reconciles before any resend. Any other retryable error means it was not taken.
    """

    message_id: str
    accepted: bool
    provider_message_id: str | None = None
    state: DeliveryState = DeliveryState.PENDING
    error: ProviderError | None = None
    warnings: list[SendWarning] = field(default_factory=list)
    #: True when the provider itself will fall back to SMS (native failover requested).
    native_fallback: bool = False
    raw: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class LookupHint:
    """What the caller knows about one message whose send outcome is unknown.

    A provider without a search by *our* id can only find a message by scanning its list; the
    hint narrows that scan to what the message can look like (recipient, sender, type) and when
    the provider can have created it. Every field is optional: a missing one only widens the
    search (and a search too wide to finish raises :class:`ProviderLookupUndecided`).

    Attributes:
        to: The recipient as stored on the message (the adapter normalises it as it does to send).
        sender: The sender the message was sent with; ``None`` when unknown or the provider default.
        type: The type that was sent.
        attempted_at: When the request that may have reached the provider started (an earlier
            time is correct too, the window is only wider).
        attempt_ended_at: When that request ended or was given up (timeout, lost reply, the lease
            of a dead worker); ``None`` means "until now".
    """

    to: str | None = None
    sender: str | None = None
    type: MessageType | None = None
    attempted_at: datetime | None = None
    attempt_ended_at: datetime | None = None

    @classmethod
    def for_message(
        cls, message: Message, attempted_at: datetime | None, attempt_ended_at: datetime | None = None
    ) -> LookupHint:
        """The hint for ``message`` whose request started at ``attempted_at``."""
        return cls(message.to, message.sender, message.type, attempted_at, attempt_ended_at)


class ProviderLookupUndecided(ProviderTransientError):
    """A lookup that cannot tell whether the provider got some messages: not "absent", not "found".

    Raised when the search could not be finished within its bounds (too many candidate messages
    in the window, e.g. after a large campaign without a recipient hint). Asking again with the
    same inputs gives the same answer until the window changes, so a caller counts these and,
    after its own limit, ends the message ``unknown`` rather than resending or asking forever.

    Attributes:
        found: Outcomes for the messages that *were* found (certain; safe to record).
        undecided: Our ids of the messages the search could not decide.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        found: Mapping[str, SendOutcome],
        undecided: Sequence[str],
    ) -> None:
        super().__init__(message, provider=provider, code=ErrorCode.OUTCOME_UNKNOWN)
        self.found = dict(found)
        self.undecided = tuple(undecided)


@dataclass(frozen=True)
class StatusQuery:
    """What a status API needs to find one message."""

    message_id: str
    provider_message_id: str
    type: MessageType
    to: str
    requested_at: datetime
    scheduled_at: datetime | None = None


@dataclass
class StatusReport:
    """A delivery status, normalised.

    Attributes:
        message_id: Our id.
        state: Normalised state.
        code: The provider's own status code (``"3104"``), kept verbatim.
        description: The provider's status text.
        not_kakao_user: The recipient cannot get AlimTalk (triggers the SMS/LMS fallback).
        opted_out: The recipient refused the sender's messages (a 080 opt-out): the number goes on
            the tenant's advertising suppression list.
        raw: The provider's payload for this message.
    """

    message_id: str
    state: DeliveryState
    code: str | None = None
    description: str | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    failed_at: datetime | None = None
    not_kakao_user: bool = False
    raw: Mapping[str, Any] | None = None
    opted_out: bool = False


@dataclass(frozen=True)
class Balance:
    """Account balance."""

    amount: float
    currency: str = "KRW"
    raw: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class HealthReport:
    """Result of :meth:`Provider.health`."""

    ok: bool
    detail: str
    latency_ms: float | None = None


class Provider:
    """Base class of every provider adapter.

    Subclasses set :attr:`name` and :attr:`capabilities` and implement ``_send_batch`` (and
    ``_query_status`` / ``_balance`` where the vendor has them). Hooks that a subclass leaves open
    raise :class:`NotImplementedError` naming the subclass.

    Args:
        config: This provider's settings.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    #: Setting keys that are secrets (``KMSG_<NAME>_<KEY>``); kept out of logs and reprs.
    credential_keys: ClassVar[frozenset[str]] = frozenset()
    #: Credentials without which the provider cannot work; checked at worker start.
    required_credentials: ClassVar[frozenset[str]] = frozenset()
    #: The option holding this provider's default Kakao channel (Solapi's pfId, Aligo's sender key),
    #: which an AlimTalk needs when the message names none; ``None``: its API needs no channel in the
    #: request (the key is bound to one). The producer checks it (:meth:`kmsg_worker.routing.Router.route`).
    kakao_channel_option: ClassVar[str | None] = None
    #: Keys of ``message.kakao`` this adapter reads a message's own Kakao channel from.
    kakao_channel_keys: ClassVar[tuple[str, ...]] = ("profile_id", "profileId")
    #: Requests one :meth:`send_batch` call may have in flight at once; an HTTP adapter reads it from
    #: ``KMSG_<NAME>_MAX_IN_FLIGHT`` (:class:`~kmsg_worker.providers.base_http.HttpProvider`).
    max_in_flight: int = 1

    def __init__(self, config: ProviderConfig) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__qualname__} must set the class attribute 'name'")
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} base_url={self.config.base_url!r}>"

    # -- public API -------------------------------------------------------------------------------

    @property
    def batch_limit(self) -> int:
        """Most recipients per request: the vendor limit, lowered by ``options['batch_limit']``."""
        configured = self.config.option("batch_limit")
        limit = self.capabilities.bulk_limit
        return min(limit, int(configured)) if configured else limit

    @property
    def send_batch_limit(self) -> int:
        """Most messages one :meth:`send_batch` call takes: what a bulk chunk is cut at.

        An adapter that sends a call as one request takes :attr:`batch_limit`. One that splits a
        call into requests of at most :attr:`batch_limit` itself (``capabilities.send_batch_limit``
        set) takes up to one window of full requests, :attr:`batch_limit` x :attr:`max_in_flight`,
        and never more than that capability. So the per-chunk work (claim, task, recording) is paid
        once for several requests while a call still takes a round or two of requests, not a queue
        of them: the chunk task must finish within its time limit (0.75 x ``KMSG_LEASE_SECONDS``)
        however large the chunk.

        ``options['batch_limit']`` is the operator's cap on one *request*: it lowers
        :attr:`batch_limit` and, through it, this window, so smaller requests also mean smaller
        chunks. With ``max_in_flight`` 1 a call is one request again.
        """
        per_request = self.batch_limit
        most = self.capabilities.send_batch_limit
        if most is None:
            return per_request
        return max(per_request, min(most, per_request * self.max_in_flight))

    def supports(self, mtype: MessageType) -> bool:
        """Whether this provider can send ``mtype``."""
        return mtype in self.capabilities.types

    def send(self, message: Message) -> SendOutcome:
        """Send one message.

        Returns:
            The outcome; a per-recipient refusal comes back as ``accepted=False`` with ``error``.

        Raises:
            ProviderError: The whole request failed (transport error, auth, 5xx).
        """
        return self.send_batch([message])[0]

    def send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        """Send up to :attr:`send_batch_limit` messages in as few requests as the vendor allows.

        Returns:
            One outcome per message, in the same order.

        Raises:
            ProviderError: The whole request failed; no recipient is known to be accepted.
        """
        if not messages:
            return []
        limit = self.send_batch_limit
        if len(messages) > limit:
            raise ValueError(f"{self.name}: {len(messages)} messages exceed the send_batch limit {limit}")
        for message in messages:
            if not self.supports(message.type):
                raise ProviderRejected(
                    f"{self.name} does not support {message.type.value}",
                    provider=self.name,
                    code=ErrorCode.UNSUPPORTED,
                    blame="provider",
                )
        outcomes = self._send_batch(messages)
        if len(outcomes) != len(messages):
            raise ProviderError(
                f"{self.name}: {len(outcomes)} results for {len(messages)} messages", provider=self.name
            )
        return outcomes

    def query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        """Ask the vendor for delivery statuses.

        Returns:
            Reports for the messages the vendor knows about; a message it does not know (yet) is
            simply absent.
        """
        if not self.capabilities.status_query:
            raise ProviderRejected(f"{self.name} has no status API", provider=self.name, code=ErrorCode.UNSUPPORTED)
        return self._query_status(queries)

    def delivery_reports(self, payload: Any) -> list[tuple[str, StatusReport]]:
        """Read the vendor's own delivery-report webhook body (already parsed JSON).

        Returns:
            ``(provider message id, report)`` pairs; a report's ``message_id`` is our id where
            the vendor echoes it back, else empty (the row is found by the vendor's id).

        Raises:
            ProviderRejected: The vendor sends no delivery reports (``UNSUPPORTED``), or the body is
                not one of its reports (``INVALID_REQUEST``).
        """
        raise ProviderRejected(f"{self.name} sends no delivery reports", provider=self.name, code=ErrorCode.UNSUPPORTED)

    def lookup(
        self, message_ids: Sequence[str], hints: Mapping[str, LookupHint] | None = None
    ) -> dict[str, SendOutcome]:
        """Find messages by *our* ids to reconcile a send whose outcome is unknown.

        Args:
            message_ids: Our ids.
            hints: Per id, what is known about the message and its attempt (see
                :class:`LookupHint`); ids without one are searched the slow way, if at all.

        Returns:
            Outcomes for the ids the provider has; an id it never received is absent.

        Raises:
            ProviderLookupUndecided: The provider answered, but the search could not be finished
                within its bounds; carries the outcomes that were found and the undecided ids.
            ProviderError: The provider could not be asked (transport error, 5xx, auth).
        """
        if not self.capabilities.lookup_by_reference:
            raise ProviderRejected(
                f"{self.name} cannot look messages up by reference",
                provider=self.name,
                code=ErrorCode.UNSUPPORTED,
            )
        return self._lookup(message_ids, hints or {})

    def balance(self) -> Balance:
        """Return the account balance."""
        if not self.capabilities.balance:
            raise ProviderRejected(f"{self.name} has no balance API", provider=self.name, code=ErrorCode.UNSUPPORTED)
        return self._balance()

    def registered_senders(self) -> frozenset[str] | None:
        """The sender numbers registered with the provider (발신번호 사전등록), digits only.

        ``None`` when the provider has no API to list them (they then come from
        ``KMSG_REGISTERED_SENDERS``, or are not checked).

        Raises:
            ProviderError: The provider has such an API and it failed.
        """
        return None

    def health(self) -> HealthReport:
        """Check the configuration (and, for HTTP providers, an authenticated probe)."""
        return HealthReport(ok=True, detail="configured")

    def close(self) -> None:
        """Release resources (the shared HTTP client is owned by the caller and left open)."""

    # -- hooks ------------------------------------------------------------------------------------

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        raise NotImplementedError(f"{type(self).__module__}.{type(self).__qualname__} must implement _send_batch")

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        raise NotImplementedError(f"{type(self).__module__}.{type(self).__qualname__} must implement _query_status")

    def _lookup(self, message_ids: Sequence[str], hints: Mapping[str, LookupHint]) -> dict[str, SendOutcome]:
        raise NotImplementedError(f"{type(self).__module__}.{type(self).__qualname__} must implement _lookup")

    def _balance(self) -> Balance:
        raise NotImplementedError(f"{type(self).__module__}.{type(self).__qualname__} must implement _balance")


#: Kakao's button kinds (``WL`` web link, ``AL`` app link, ``DS`` delivery tracking, ``BK`` bot
#: keyword, ``MD`` message delivery, ``BC`` consultation, ``BT`` bot transfer, ``AC`` channel add).
_BUTTON_KINDS = frozenset({"WL", "AL", "DS", "BK", "MD", "BC", "BT", "AC"})


def alimtalk_template(
    *,
    code: object,
    body: object,
    approval: str,
    provider_status: object,
    channel: object = "",
    name: object = None,
    buttons: object = (),
    keys: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One provider's AlimTalk template in the form ``kmsg templates sync`` stores.

    Args:
        approval: ``approved``, ``inspecting`` or ``rejected`` (each adapter maps its own words).
        buttons: The provider's buttons; ``keys`` maps their field names onto the message's
            (``{"buttonName": "name", "buttonType": "type", "linkMo": "url_mobile", ...}``).

    Returns:
        ``code``, ``channel``, ``name``, ``body``, ``variables`` (the body's ``#{name}`` tokens, in
        order), ``buttons`` (message form; kinds Kakao does not know are left out), ``approval``,
        ``provider_status``.
    """
    text = body if isinstance(body, str) else ""
    variables = list(dict.fromkeys(VAR_PATTERN.findall(text)))
    converted: list[dict[str, Any]] = []
    for raw in buttons if isinstance(buttons, (list, tuple)) else ():
        if not isinstance(raw, Mapping):
            continue
        button = {dst: raw[src] for src, dst in (keys or {}).items() if raw.get(src)}
        if button.get("type") in _BUTTON_KINDS and button.get("name"):
            converted.append(button)
    return {
        "code": str(code),
        "channel": "" if channel is None else str(channel),
        "name": None if name is None else str(name)[:200],
        "body": text,
        "variables": variables,
        "buttons": converted,
        "approval": approval,
        "provider_status": None if provider_status is None else str(provider_status)[:32],
    }
