"""In-process providers whose answers a test scripts, for failover/circuit/rate-limit tests.

``scripted_a``, ``scripted_b`` and ``scripted_c`` send SMS/LMS/MMS. Each keeps a list of calls and
answers from its queue of scripted errors (an empty queue means "accepted").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from kmsg_worker.errors import ProviderError
from kmsg_worker.message import Message, MessageType
from kmsg_worker.providers.base import Capabilities, Provider, SendOutcome
from kmsg_worker.providers.registry import PROVIDER_ALIASES, register_provider


class ScriptedProvider(Provider):
    """Accepts everything unless a scripted error is queued."""

    name: ClassVar[str] = "scripted_a"
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset({MessageType.SMS, MessageType.LMS, MessageType.MMS})
    )
    #: Errors to raise, per provider name, consumed in order (``None`` = accept that call).
    script: ClassVar[dict[str, deque[ProviderError | None]]] = {}
    #: ``(provider, message id)`` of every call, across instances.
    calls: ClassVar[list[tuple[str, str]]] = []
    #: Errors raised on every call while set (an outage), per provider name.
    down: ClassVar[dict[str, ProviderError]] = {}

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        outcomes = []
        for message in messages:
            ScriptedProvider.calls.append((self.name, message.id))
            queue = ScriptedProvider.script.get(self.name)
            error = ScriptedProvider.down.get(self.name) or (queue.popleft() if queue else None)
            if error is not None:
                raise error
            outcomes.append(SendOutcome(message.id, True, provider_message_id=f"{self.name}-{message.id}"))
        return outcomes

    @classmethod
    def reset(cls) -> None:
        cls.script.clear()
        cls.calls.clear()
        cls.down.clear()


class ScriptedB(ScriptedProvider):
    name: ClassVar[str] = "scripted_b"


class ScriptedC(ScriptedProvider):
    name: ClassVar[str] = "scripted_c"


for _name, _cls in (("scripted_a", "ScriptedProvider"), ("scripted_b", "ScriptedB"), ("scripted_c", "ScriptedC")):
    if _name not in PROVIDER_ALIASES:
        register_provider(_name, f"tests.scripted:{_cls}")


def calls_to(name: str) -> list[str]:
    """Message ids sent to provider ``name``."""
    return [m for p, m in ScriptedProvider.calls if p == name]


def error(cls: type[ProviderError], provider: str, **kwargs: Any) -> ProviderError:
    """A provider error as an adapter would raise it."""
    return cls(f"{provider}: scripted", provider=provider, **kwargs)
