"""The exception tree of kmsg-worker, split by what the caller does next.

::

    KmsgError
    ├── ConfigurationError            fix the settings; raised at start, not at first send
    ├── ValidationError (ValueError)  fix the input; raised at the producer, nothing stored
    │   └── BatchValidationError      one or more rows of a bulk request are invalid
    ├── IdempotencyConflictError      same idempotency key, different request
    ├── MessageNotFoundError (LookupError)
    ├── InvalidStateError             e.g. cancelling a message that was already dispatched
    ├── StorageUnavailableError       the system of record cannot be reached: nothing was accepted
    └── ProviderError                 a provider call failed; carries the provider's own code and text
        ├── ProviderTransientError    retry the same provider later (timeouts, 5xx, busy)
        │   ├── ProviderTimeout       the request may or may not have reached the provider
        │   ├── ProviderConnectionError
        │   ├── ProviderRateLimited   429 or "too many requests"; honour ``retry_after``
        │   └── ProviderNotAttempted  never sent: an earlier request of the same batch failed
        └── ProviderRejected          never retried on the same provider: fail over or fail

A :class:`ProviderError` also says whose fault it was (``blame``): ``"message"`` (invalid number,
template mismatch: another provider would reject it too, so no failover) or ``"provider"``
(authentication, balance, outage: another provider may well succeed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "BatchPartiallyStoredError",
    "BatchValidationError",
    "ConfigurationError",
    "ErrorCode",
    "IdempotencyConflictError",
    "InvalidStateError",
    "KmsgError",
    "MessageNotFoundError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderNotAttempted",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderTransientError",
    "RowError",
    "StorageUnavailableError",
    "ValidationError",
]

Blame = Literal["message", "provider"]


class ErrorCode(StrEnum):
    """Stable, machine-readable error codes stored with every failed attempt."""

    #: The request itself is invalid (bad field, bad number, content rule).
    INVALID_REQUEST = "INVALID_REQUEST"
    #: The recipient number is invalid or cannot receive this kind of message.
    INVALID_RECIPIENT = "INVALID_RECIPIENT"
    #: Credentials rejected, signature wrong, IP not allowed.
    AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"
    #: The account has no balance left.
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    #: The AlimTalk/RCS template does not exist or is not approved.
    TEMPLATE_NOT_FOUND = "TEMPLATE_NOT_FOUND"
    #: The text does not match the registered template.
    TEMPLATE_MISMATCH = "TEMPLATE_MISMATCH"
    #: The sender number or Kakao profile is not registered with the provider.
    SENDER_NOT_REGISTERED = "SENDER_NOT_REGISTERED"
    #: The recipient blocked the sender, opted out (080) or is on a block list.
    RECIPIENT_BLOCKED = "RECIPIENT_BLOCKED"
    #: The recipient does not use KakaoTalk (AlimTalk could not be delivered).
    NOT_KAKAO_USER = "NOT_KAKAO_USER"
    #: Too many requests; wait ``retry_after`` seconds.
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    #: Connection refused, reset or dropped.
    NETWORK_ERROR = "NETWORK_ERROR"
    #: The provider did not answer in time; the outcome is unknown.
    NETWORK_TIMEOUT = "NETWORK_TIMEOUT"
    #: The provider answered 5xx or said it is busy or down.
    NETWORK_SERVICE_UNAVAILABLE = "NETWORK_SERVICE_UNAVAILABLE"
    #: The provider reported an error we cannot classify more precisely.
    PROVIDER_ERROR = "PROVIDER_ERROR"
    #: The carrier or Kakao reported a failed delivery.
    DELIVERY_FAILED = "DELIVERY_FAILED"
    #: The provider does not support this message type or feature.
    UNSUPPORTED = "UNSUPPORTED"
    #: A worker crashed while holding the message; the outcome could not be established.
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    #: After an unknown outcome, the provider's look-up never said whether it got the message.
    OUTCOME_UNDECIDED = "OUTCOME_UNDECIDED"
    #: Tracking gave up waiting for a final delivery report.
    TRACKING_TIMEOUT = "TRACKING_TIMEOUT"
    #: The provider accepted the message without giving an id, so its status cannot be asked for.
    MISSING_PROVIDER_MESSAGE_ID = "MISSING_PROVIDER_MESSAGE_ID"
    #: The message was redelivered or crashed workers too often.
    POISON_MESSAGE = "POISON_MESSAGE"
    #: Retries or the message's maximum age ran out.
    RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"
    #: The recipient refused advertising (a 080 opt-out the provider knows of): added to the suppression list.
    AD_OPTED_OUT = "AD_OPTED_OUT"
    #: The provider refused advertising outside its sending window: deferred, not failed.
    OUTSIDE_SEND_WINDOW = "OUTSIDE_SEND_WINDOW"
    #: Advertising held for the night (21:00-08:00 Korean time) until the window opens.
    NIGHT_DEFERRED = "NIGHT_DEFERRED"
    #: Advertising to a number on the tenant's suppression list: never sent.
    SUPPRESSED = "SUPPRESSED"
    #: Anything else.
    UNKNOWN_ERROR = "UNKNOWN_ERROR"


class KmsgError(Exception):
    """Root of every error raised by kmsg-worker."""


class ConfigurationError(KmsgError):
    """A setting is missing or invalid.

    Args:
        message: What is wrong and how to fix it; names the environment variable.
        variable: The environment variable concerned, when there is one.
    """

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


def _storable(text: str) -> str:
    """``text`` with NUL and unpaired surrogates escaped (``\\x00``, ``\\ud800``); unchanged otherwise."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ValidationError(KmsgError, ValueError):
    """Invalid input, raised to the producer before anything is stored or queued.

    Args:
        field: Dotted path of the offending field (``"to"``, ``"kakao.profile_id"``).
        rule: Short machine-readable rule name (``"max_bytes"``, ``"required"``).
        message: Human-readable explanation naming the field and the rule.
    """

    def __init__(self, field: str, rule: str, message: str) -> None:
        # A path may echo a caller's key: keep it storable (bulk errors are saved as JSON).
        field, message = _storable(field), _storable(message)
        super().__init__(f"{field}: {message} [{rule}]")
        self.field = field
        self.rule = rule
        self.detail = message

    def as_dict(self) -> dict[str, str]:
        """Return the error as a JSON-friendly mapping."""
        return {"field": self.field, "rule": self.rule, "message": self.detail}


@dataclass(frozen=True)
class RowError:
    """One invalid row of a bulk request (``row`` counts from 1)."""

    row: int
    field: str
    rule: str
    message: str


class BatchValidationError(ValidationError):
    """Some rows of a bulk request are invalid and the caller asked to reject the whole batch."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        first = errors[0]
        super().__init__(
            f"rows[{first.row}].{first.field}",
            first.rule,
            f"{len(errors)} invalid row(s); first at row {first.row}: {first.message}",
        )
        self.errors = list(errors)


class IdempotencyConflictError(KmsgError):
    """The idempotency key was already used for a different request."""

    def __init__(self, key_hint: str) -> None:
        super().__init__(
            f"idempotency key {key_hint!r} was already used with a different request; use a new key for a new request"
        )


class MessageNotFoundError(KmsgError, LookupError):
    """No message (or batch) with that id."""


class InvalidStateError(KmsgError):
    """The operation is not allowed in the message's current state."""


class StorageUnavailableError(KmsgError):
    """The database could not be reached; the request was *not* accepted.

    Two subclasses say otherwise, and say what was stored: :class:`BatchPartiallyStoredError` (part
    of a streamed batch was) and :class:`AcceptanceUnknownError` (the connection was lost while the
    request was being committed, and the database could not be asked afterwards).
    """


class BatchPartiallyStoredError(StorageUnavailableError):
    """The database went away in the middle of a streamed batch: the first ``stored`` rows *were* accepted.

    Only a batch sent with ``on_invalid="skip"`` and no idempotency key is streamed (each slice
    commits on its own); any other batch is stored in one transaction, all of it or nothing. The
    stored rows keep their batch (``batch_id``) and are sent; the rest were not stored. Send the rows
    after the first ``stored`` again as a new batch (not the whole list: that would send the stored
    ones twice).
    """

    def __init__(self, batch_id: str, stored: int, cause: str) -> None:
        super().__init__(
            f"the database became unavailable during the batch ({cause}): the first {stored} valid rows "
            f"were stored as batch {batch_id} and will be sent; the rest were not stored"
        )
        self.batch_id = batch_id
        self.stored = stored


class AcceptanceUnknownError(StorageUnavailableError):
    """The connection was lost while the request was committing, and whether it was stored is unknown.

    A commit whose reply never arrives may have taken effect. The producer then waits for the server
    session that ran it to end (ending it if need be) and looks for what it wrote; this error means
    that look-up failed too (the database stayed unreachable). If the request was stored it will be
    sent like any other: look it up (``kmsg get ID``, ``kmsg batch status ID``) before sending it
    again, or send it again with the same idempotency key, which makes the repeat safe.

    Attributes:
        message_id: The single message in doubt, or ``None``.
        batch_id: The batch in doubt, or ``None``.
    """

    def __init__(self, detail: str, *, message_id: str | None = None, batch_id: str | None = None) -> None:
        super().__init__(detail)
        self.message_id = message_id
        self.batch_id = batch_id


class ProviderError(KmsgError):
    """A provider call failed.

    Args:
        message: Human-readable text (never contains credentials or phone numbers).
        provider: Provider name (``"solapi"``).
        code: Normalised :class:`ErrorCode`.
        provider_code: The provider's own code, kept as text (``"3104"``, ``"-101"``).
        provider_message: The provider's own error text.
        status_code: HTTP status, when there was a response.
        retry_after: Seconds to wait before the next try, when the provider said so.
        blame: ``"message"`` or ``"provider"`` (see module docstring).
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        code: ErrorCode = ErrorCode.PROVIDER_ERROR,
        provider_code: str | None = None,
        provider_message: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
        blame: Blame = "provider",
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.code = code
        self.provider_code = provider_code
        self.provider_message = provider_message
        self.status_code = status_code
        self.retry_after = retry_after
        self.blame: Blame = blame

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, provider={self.provider!r}, code={self.code.value!r}, "
            f"provider_code={self.provider_code!r}, status_code={self.status_code!r})"
        )


class ProviderTransientError(ProviderError):
    """Retry the same provider later."""

    retryable = True


class ProviderTimeout(ProviderTransientError):
    """No answer in time. The provider may have accepted the message: reconcile before resending."""


class ProviderConnectionError(ProviderTransientError):
    """The connection failed before a response was read."""


class ProviderRateLimited(ProviderTransientError):
    """The provider throttled us; wait ``retry_after`` seconds."""


class ProviderNotAttempted(ProviderTransientError):
    """Never sent: an earlier request of the same batch failed, and the requests after it were held back.

    The provider never saw the message, so it is not "maybe accepted" (never reconciled) and the
    call does not count against the message's attempts on that provider. It carries the code,
    status and ``retry_after`` of the failure that held it back, so the same policy applies to it.
    """

    @classmethod
    def held_back_by(cls, cause: ProviderError) -> ProviderNotAttempted:
        """The error of a request that was not made because ``cause`` stopped the batch."""
        # A held-back message did not time out itself: its stored code must not say it might be sent.
        code = ErrorCode.PROVIDER_ERROR if isinstance(cause, ProviderTimeout) else cause.code
        return cls(
            f"{cause.provider}: not sent because an earlier request of the batch failed ({cause.code.value})",
            provider=cause.provider,
            code=code,
            status_code=cause.status_code,
            retry_after=cause.retry_after,
            blame=cause.blame,
        )


class ProviderRejected(ProviderError):
    """A permanent refusal: do not retry on this provider."""
