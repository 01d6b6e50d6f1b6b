"""Test (sandbox) messages: validated, stored and processed like any other, sent only to the simulator.

A message sent with a test API key carries ``provider_id="mock"`` and
``provider_options={"mock": {"sandbox": true, ...}}``. The router sends a sandbox message to the
built-in ``mock`` provider whatever ``KMSG_ROUTING`` says, even when ``mock`` is not in
``KMSG_PROVIDERS`` (so enabling test keys never adds the simulator to the live failover chains), and
an AlimTalk's fallback child stays on the simulator too.

The recipient number scripts the outcome, so an integrator can exercise every path before going
live (any other number is delivered):

=============== ==================================================================================
``01000000001`` delivered
``01000000002`` sent, then the delivery report says failed (``provider_status_code`` ``SIMULATED_FAILURE``)
``01000000003`` a temporary provider error (retried), then sent and delivered
``01000000004`` refused by the provider at once (``INVALID_RECIPIENT``): failed without a send
``01000000005`` sent, and the delivery report stays pending (the message stays ``sent``)
=============== ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import Message, normalize_phone

__all__ = [
    "MAGIC_NUMBERS",
    "SIMULATOR",
    "event_mark",
    "is_sandbox",
    "is_sandbox_content",
    "sandbox_child",
    "sandboxed",
]

#: The provider every sandbox message goes to.
SIMULATOR = "mock"

#: Recipient -> the mock provider's script for it (see the module docstring).
MAGIC_NUMBERS: Mapping[str, Mapping[str, Any]] = {
    "01000000001": {"deliver": "DELIVERED"},
    "01000000002": {"deliver": "FAILED:SIMULATED_FAILURE"},
    "01000000003": {"script": [{"outcome": "failure", "code": "NETWORK_SERVICE_UNAVAILABLE", "http_status": 503}]},
    "01000000004": {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT", "provider_code": "SIM_INVALID"}]},
    "01000000005": {"deliver": "PENDING"},
}
#: Field names (and their aliases) a sandbox message's pins replace.
_PINNED = frozenset({"provider_id", "providerId", "provider_options", "providerOptions"})


def _spec(options: Any) -> Mapping[str, Any] | None:
    spec = options.get(SIMULATOR) if isinstance(options, Mapping) else None
    return spec if isinstance(spec, Mapping) else None


def is_sandbox(message: Message) -> bool:
    """Whether ``message`` is a test message (it must only ever reach the simulator)."""
    spec = _spec(message.provider_options)
    return spec is not None and spec.get("sandbox") is True


def is_sandbox_content(content: Mapping[str, Any]) -> bool:
    """:func:`is_sandbox` for a stored content mapping."""
    spec = _spec(content.get("provider_options"))
    return spec is not None and spec.get("sandbox") is True


def event_mark(message: Message | Mapping[str, Any]) -> dict[str, bool]:
    """The log fields that mark a test message's lifecycle event: ``{"test": True}``, or none.

    Spread into the event (``log.info("message.sent", ..., **event_mark(message))``) so the metrics
    count test messages apart (label ``test="true"``) from what live keys send. ``message`` is a
    :class:`Message` or its stored content mapping.
    """
    test = is_sandbox(message) if isinstance(message, Message) else is_sandbox_content(message)
    return {"test": True} if test else {}


def _magic(to: Any) -> Mapping[str, Any]:
    try:
        return MAGIC_NUMBERS.get(normalize_phone(to), {})
    except ValidationError:
        return {}  # the producer's validation reports the number


def sandboxed(raw: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``raw`` pinned to the simulator, scripted by its recipient number (``defaults`` supply a missing ``to``).

    A ``provider_id`` the caller gave is replaced; the caller's ``provider_options`` are kept (and
    validated like a live message's) beside the simulator's script.

    Raises:
        ValidationError: ``provider_options`` is not a mapping.
    """
    out = {k: v for k, v in raw.items() if k not in _PINNED}
    options: dict[str, Any] = {}
    for source in (defaults or {}, raw):
        for name in ("provider_options", "providerOptions"):
            value = source.get(name)
            if isinstance(value, Mapping):
                options.update(value)
            elif value is not None:
                raise ValidationError("provider_options", "type", f"must be a mapping, got {type(value).__name__}")
    to = raw.get("to", (defaults or {}).get("to"))
    options[SIMULATOR] = {**_magic(to), "sandbox": True}
    out["provider_options"] = options
    out["provider_id"] = SIMULATOR
    return out


def sandbox_child() -> dict[str, Any]:
    """The pins of a sandbox message's fallback child (it is delivered by the simulator)."""
    return {"provider_id": SIMULATOR, "provider_options": {SIMULATOR: {"sandbox": True}}}
