"""Routing: which providers a message goes to, in failover order.

Order of precedence (``providers.md`` §2.12, without k-msg's silent skips):
explicit ``provider_id`` (that provider only) -> the by-type rule (``KMSG_ROUTING``) -> the default provider -> every
enabled provider that supports the type, in ``KMSG_PROVIDERS`` order. The first provider of the
route gets the message; the others are the failover chain. An unknown or incapable provider is an
error at the producer.

``KMSG_ROUTING`` example::

    {"ALIMTALK": ["solapi", "iwinv"], "SMS": {"providers": ["aligo", "iwinv"], "strategy": "round_robin"},
     "LMS": {"providers": {"solapi": 3, "aligo": 1}, "strategy": "weighted"}}
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import Message, MessageType
from kmsg_worker.providers.registry import provider_class

__all__ = ["Router"]

Counter = Callable[[str], int]


class _LocalCounter:
    """Per-process counter for round robin when no Redis is configured."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, itertools.count[int]] = {}

    def __call__(self, key: str) -> int:
        with self._lock:
            return next(self._counters.setdefault(key, itertools.count()))


class Router:
    """Compute a message's route from the settings.

    Args:
        providers: Enabled provider names, in preference order.
        rules: By-type rules (see module docstring).
        default_provider: Provider tried after the by-type rule.
        counter: Shared counter for round robin (``INCR`` in Redis across workers); per process
            when not given.
        rng: Random source for weighted choice.
    """

    def __init__(
        self,
        providers: Sequence[str],
        rules: Mapping[str, Any] | None = None,
        default_provider: str | None = None,
        *,
        counter: Counter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.providers = list(providers)
        self.rules = dict(rules or {})
        self.default_provider = default_provider
        self.counter = counter or _LocalCounter()
        self.rng = rng or random.Random()
        self._types = {name: provider_class(name).capabilities.types for name in self.providers}

    def supports(self, name: str, mtype: MessageType) -> bool:
        """Whether enabled provider ``name`` can send ``mtype``."""
        return mtype in self._types.get(name, frozenset())

    def _check(self, name: str, mtype: MessageType, field: str) -> None:
        if name not in self._types:
            raise ValidationError(field, "unknown_provider", f"provider {name!r} is not enabled (KMSG_PROVIDERS)")
        if not self.supports(name, mtype):
            raise ValidationError(field, "unsupported_type", f"provider {name!r} does not support {mtype.value}")

    def _rule_candidates(self, mtype: MessageType) -> list[str]:
        rule = self.rules.get(mtype.value)
        if rule is None:
            return []
        if isinstance(rule, str):
            self._check(rule, mtype, f"routing.{mtype.value}")
            return [rule]
        if isinstance(rule, list):
            names, strategy, weights = [str(n) for n in rule], "first", None
        else:
            raw = rule.get("providers", [])
            strategy = str(rule.get("strategy", "first"))
            if isinstance(raw, Mapping):
                names, weights = [str(n) for n in raw], [float(w) for w in raw.values()]
            else:
                names, weights = [str(n) for n in raw], None
        names = [n for n in names if n in self._types and self.supports(n, mtype)]
        if not names:
            return []
        if strategy == "round_robin":
            start = self.counter(f"rr:{mtype.value}") % len(names)
            return names[start:] + names[:start]
        if strategy == "weighted":
            first = self.rng.choices(names, weights=weights or [1.0] * len(names))[0]
            return [first] + [n for n in names if n != first]
        return names

    def route(self, message: Message) -> list[str]:
        """Return the providers to try, first choice first.

        Raises:
            ValidationError: Unknown/incapable explicit provider, or no provider for the type.
        """
        mtype = message.type
        if message.provider_id:
            # Explicit means explicit: the caller chose the provider, so there is no failover chain.
            self._check(message.provider_id, mtype, "provider_id")
            return [message.provider_id]
        else:
            chain = self._rule_candidates(mtype)
            if self.default_provider and self.supports(self.default_provider, mtype):
                chain.append(self.default_provider)
        chain.extend(n for n in self.providers if self.supports(n, mtype))
        route = list(dict.fromkeys(chain))
        if not route:
            raise ValidationError("type", "no_provider", f"no enabled provider supports {mtype.value}")
        return route
