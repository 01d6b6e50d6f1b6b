"""Operator overrides of the error taxonomy: which errors are retried, and how long to wait.

The adapters already translate every provider answer into an :class:`~kmsg_worker.errors.ErrorCode`,
a class (:class:`~kmsg_worker.errors.ProviderTransientError` = retry,
:class:`~kmsg_worker.errors.ProviderRejected` = do not) and a ``blame``. ``KMSG_RETRY_POLICY`` lets an
operator change the first decision without touching code::

    KMSG_RETRY_POLICY='{"retryable_codes": ["INSUFFICIENT_BALANCE", "iwinv:519"],
                        "non_retryable_codes": ["PROVIDER_ERROR"],
                        "retryable_statuses": [409], "non_retryable_statuses": [502],
                        "retry_after": {"by_code": {"RATE_LIMIT_EXCEEDED": 5, "solapi:TooManyRequests": 10},
                                        "by_status": {"503": 30}}}'

A code is either an :class:`ErrorCode` name or ``<provider>:<provider code>`` (the provider's raw
code, kept on every error, so even codes no table knows can be classified). Both match whatever the
letter case: providers are not consistent about it (``VENDOR_BUSY``, ``Vendor_Busy``), and an operator
copying a code from a log or a provider's page should not have to match it. First match wins:

1. the provider's own code (``iwinv:518``) in ``non_retryable_codes`` / ``retryable_codes``, then the
   normalised code (``PROVIDER_ERROR``): the more specific entry wins;
2. the HTTP status in ``non_retryable_statuses``, then in ``retryable_statuses``;
3. otherwise the adapter's own classification.

``retry_after`` supplies a wait when the provider announced none (a provider's ``Retry-After``
always wins): provider code, then normalised code, then HTTP status.

:func:`classify` is pure and is applied where the pipeline handles a failed call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)

__all__ = ["PERMANENT", "TRANSIENT", "ErrorPolicy", "classify", "parse_error_policy"]

#: Codes the adapters always raise as retryable (same provider, later): the provider is busy or
#: unreachable, not the request wrong.
TRANSIENT = frozenset(
    {
        ErrorCode.NETWORK_ERROR,
        ErrorCode.NETWORK_TIMEOUT,
        ErrorCode.NETWORK_SERVICE_UNAVAILABLE,
        ErrorCode.RATE_LIMIT_EXCEEDED,
        ErrorCode.OUTCOME_UNKNOWN,
    }
)
#: Codes the adapters always raise as permanent: retrying the same request cannot help.
#: ``PROVIDER_ERROR`` and ``UNKNOWN_ERROR`` are in neither set: a vendor code nobody documented
#: may mean either, and each adapter decides (usually: retry), keeping the raw code.
PERMANENT = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_RECIPIENT,
        ErrorCode.AUTHENTICATION_FAILED,
        ErrorCode.INSUFFICIENT_BALANCE,
        ErrorCode.TEMPLATE_NOT_FOUND,
        ErrorCode.TEMPLATE_MISMATCH,
        ErrorCode.SENDER_NOT_REGISTERED,
        ErrorCode.RECIPIENT_BLOCKED,
        ErrorCode.AD_OPTED_OUT,
        ErrorCode.NOT_KAKAO_USER,
        ErrorCode.DELIVERY_FAILED,
        ErrorCode.UNSUPPORTED,
    }
)

#: An unknown outcome is always reconciled before any resend; making it "permanent" would mark
#: messages failed that the provider may well have delivered.
_ALWAYS_RECONCILED = frozenset({ErrorCode.NETWORK_TIMEOUT.value, ErrorCode.OUTCOME_UNKNOWN.value})
_FIELDS = frozenset(
    {"retryable_codes", "non_retryable_codes", "retryable_statuses", "non_retryable_statuses", "retry_after"}
)


@dataclass(frozen=True)
class ErrorPolicy:
    """Overrides of the adapters' retry classification (see the module docstring).

    Attributes:
        retryable_codes: Codes always retried (``ErrorCode`` names or ``provider:code``).
        non_retryable_codes: Codes never retried on the same provider.
        retryable_statuses: HTTP statuses always retried.
        non_retryable_statuses: HTTP statuses never retried on the same provider.
        retry_after_by_code: Seconds to wait for a code when the provider said nothing.
        retry_after_by_status: Seconds to wait for an HTTP status when the provider said nothing.
    """

    retryable_codes: frozenset[str] = frozenset()
    non_retryable_codes: frozenset[str] = frozenset()
    retryable_statuses: frozenset[int] = frozenset()
    non_retryable_statuses: frozenset[int] = frozenset()
    retry_after_by_code: Mapping[str, float] = field(default_factory=dict)
    retry_after_by_status: Mapping[int, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when nothing is overridden (the pipeline then skips :func:`classify`)."""
        return not (
            self.retryable_codes
            or self.non_retryable_codes
            or self.retryable_statuses
            or self.non_retryable_statuses
            or self.retry_after_by_code
            or self.retry_after_by_status
        )


def _provider_key(provider: str, code: str) -> str:
    """The one form a ``provider:code`` key takes, in the policy and when an error is looked up."""
    return f"{provider.strip().lower()}:{code.strip().casefold()}"


def _keys(error: ProviderError) -> list[str]:
    """The policy keys an error answers to, most specific first."""
    keys = []
    if error.provider_code:
        keys.append(_provider_key(error.provider, error.provider_code))
    keys.append(error.code.value)
    return keys


def _verdict(error: ProviderError, policy: ErrorPolicy) -> bool | None:
    """``True`` retry, ``False`` do not, ``None`` keep the adapter's classification."""
    for key in _keys(error):
        if key in policy.non_retryable_codes:
            return False
        if key in policy.retryable_codes:
            return True
    status = error.status_code
    if status is not None:
        if status in policy.non_retryable_statuses:
            return False
        if status in policy.retryable_statuses:
            return True
    return None


def _retry_after(error: ProviderError, policy: ErrorPolicy) -> float | None:
    if error.retry_after is not None:
        return error.retry_after
    for key in _keys(error):
        if key in policy.retry_after_by_code:
            return policy.retry_after_by_code[key]
    if error.status_code is not None:
        return policy.retry_after_by_status.get(error.status_code)
    return None


def classify(error: ProviderError, policy: ErrorPolicy) -> ProviderError:
    """Apply ``policy`` to ``error``.

    Args:
        error: The adapter's error.
        policy: The operator's overrides.

    Returns:
        ``error`` itself when nothing changes (``error`` is never modified); otherwise a copy with the
        configured ``retry_after``, or a new error of the other class
        (:class:`ProviderTransientError` or :class:`ProviderRejected`) carrying the same code,
        provider code, status, blame and text, with the original as ``__cause__``. A timeout
        (outcome unknown) is never made permanent.
    """
    retry_after = _retry_after(error, policy)
    verdict = _verdict(error, policy)
    if isinstance(error, ProviderTimeout) or verdict is None or verdict == error.retryable:
        if retry_after == error.retry_after or not error.retryable:
            return error
        # Same class, same everything, plus the configured wait; the caller's object stays as it was.
        waited = copy.copy(error)
        waited.retry_after = retry_after
        return waited
    cls: type[ProviderError] = ProviderTransientError if verdict else ProviderRejected
    changed = cls(
        str(error),
        provider=error.provider,
        code=error.code,
        provider_code=error.provider_code,
        provider_message=error.provider_message,
        status_code=error.status_code,
        retry_after=retry_after if verdict else None,
        blame=error.blame,
    )
    changed.__cause__ = error
    return changed


# -- parsing ------------------------------------------------------------------------------------


def _fail(variable: str, text: str) -> ConfigurationError:
    return ConfigurationError(f"{variable}: {text}", variable=variable)


def _code(value: Any, variable: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(variable, f"{where}: {value!r} is not a code (an ErrorCode name or provider:code)")
    text = value.strip()
    if ":" in text:
        provider, _, raw = text.partition(":")
        if not provider or not raw:
            raise _fail(variable, f"{where}: {text!r} must be provider:code")
        return _provider_key(provider, raw)
    upper = text.upper()
    if upper not in ErrorCode.__members__:
        raise _fail(variable, f"{where}: unknown code {text!r}; use one of {', '.join(ErrorCode.__members__)}")
    return upper


def _status(value: Any, variable: str, where: str) -> int:
    try:
        status = int(str(value).strip())
    except ValueError:
        raise _fail(variable, f"{where}: {value!r} is not an HTTP status") from None
    if not 100 <= status <= 599 or isinstance(value, bool):
        raise _fail(variable, f"{where}: {value!r} is not an HTTP status")
    return status


def _seconds(value: Any, variable: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _fail(variable, f"{where}: {value!r} must be a number of seconds >= 0")
    return float(value)


def _list(raw: Mapping[str, Any], name: str, variable: str) -> Iterable[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise _fail(variable, f"{name} must be a list")
    return value


def parse_error_policy(raw: Any, variable: str = "KMSG_RETRY_POLICY") -> ErrorPolicy:
    """Validate the decoded JSON of ``KMSG_RETRY_POLICY``.

    Args:
        raw: The decoded JSON value.
        variable: Named in error messages.

    Raises:
        ConfigurationError: Unknown field, unknown code, bad status, negative wait, or a code or
            status listed as both retryable and non-retryable.
    """
    if not isinstance(raw, Mapping):
        raise _fail(variable, "must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _fail(variable, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELDS))}")
    retryable = {_code(v, variable, "retryable_codes") for v in _list(raw, "retryable_codes", variable)}
    permanent = {_code(v, variable, "non_retryable_codes") for v in _list(raw, "non_retryable_codes", variable)}
    if retryable & permanent:
        raise _fail(variable, f"code(s) both retryable and non-retryable: {', '.join(sorted(retryable & permanent))}")
    if permanent & _ALWAYS_RECONCILED:
        raise _fail(
            variable,
            "NETWORK_TIMEOUT and OUTCOME_UNKNOWN cannot be non-retryable: the outcome is unknown and is "
            "reconciled with the provider before any resend",
        )
    statuses = {_status(v, variable, "retryable_statuses") for v in _list(raw, "retryable_statuses", variable)}
    bad = {_status(v, variable, "non_retryable_statuses") for v in _list(raw, "non_retryable_statuses", variable)}
    if statuses & bad:
        raise _fail(variable, f"status(es) both retryable and non-retryable: {sorted(statuses & bad)}")
    after = raw.get("retry_after", {})
    if not isinstance(after, Mapping) or set(after) - {"by_code", "by_status"}:
        raise _fail(variable, "retry_after must be an object with by_code and/or by_status")
    by_code_raw, by_status_raw = after.get("by_code", {}), after.get("by_status", {})
    if not isinstance(by_code_raw, Mapping) or not isinstance(by_status_raw, Mapping):
        raise _fail(variable, "retry_after.by_code and retry_after.by_status must be objects")
    by_code = {
        _code(k, variable, "retry_after.by_code"): _seconds(v, variable, f"retry_after.by_code.{k}")
        for k, v in by_code_raw.items()
    }
    by_status = {
        _status(k, variable, "retry_after.by_status"): _seconds(v, variable, f"retry_after.by_status.{k}")
        for k, v in by_status_raw.items()
    }
    return ErrorPolicy(
        retryable_codes=frozenset(retryable),
        non_retryable_codes=frozenset(permanent),
        retryable_statuses=frozenset(statuses),
        non_retryable_statuses=frozenset(bad),
        retry_after_by_code=by_code,
        retry_after_by_status=by_status,
    )
