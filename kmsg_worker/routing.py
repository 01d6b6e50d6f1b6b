"""Routing: which providers a message goes to, in failover order.

Order of precedence (an unusable provider the caller named is an error, never silently skipped):
a test message (:mod:`kmsg_worker.sandbox`) goes to the simulator only -> explicit ``provider_id``
(that provider only) -> the by-type rule (``KMSG_ROUTING``) -> the default provider -> every enabled
provider that supports the type, in ``KMSG_PROVIDERS`` order. The first provider of the route gets the
message; the others are the failover chain. An unknown or incapable provider is an error at the producer.

``KMSG_ROUTING`` example::

    {"ALIMTALK": ["solapi", "iwinv"], "SMS": {"providers": ["aligo", "iwinv"], "strategy": "round_robin"},
     "LMS": {"providers": {"solapi": 3, "aligo": 1}, "strategy": "weighted"}}

Round robin and weighted both read a counter that every producer shares (``INCR`` in Redis,
:meth:`kmsg_worker.runtime.Runtime`), so they hold across processes and machines: round robin is
``counter % n``, and weighted maps the counter through a golden-ratio (Weyl) sequence onto the
cumulative weights, which splits any number of decisions within a fraction of a percent of the
weights without a random source. Without Redis the counter is per process (from a random start).

Routing runs at the producer; circuit breakers are checked by the worker right before the call
(:mod:`kmsg_worker.circuit`), where the state is fresh, and skip an open provider of the route.
A rule naming an unknown provider, a provider that cannot send the type, or an unknown strategy is
a :class:`~kmsg_worker.errors.ConfigurationError` at start (:func:`validate_routing`).
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kmsg_worker.errors import ConfigurationError, ValidationError
from kmsg_worker.message import Message, MessageType
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.sandbox import SIMULATOR, is_sandbox

__all__ = ["STRATEGIES", "Router", "validate_routing"]

Counter = Callable[[str], int]
#: Rule strategies.
STRATEGIES = ("first", "round_robin", "weighted")
#: 1/phi: consecutive multiples modulo 1 are spread as evenly as any sequence can be.
_GOLDEN = (5**0.5 - 1) / 2


class _LocalCounter:
    """Per-process counter for round robin and weights when no Redis is configured.

    Each key starts at a random point so that many short-lived processes do not all pick the
    first provider first.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._counters: dict[str, itertools.count[int]] = {}

    def __call__(self, key: str) -> int:
        with self._lock:
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = itertools.count(self._rng.randrange(1 << 16))
            return next(counter)


def _fail(text: str) -> ConfigurationError:
    return ConfigurationError(f"KMSG_ROUTING: {text}", variable="KMSG_ROUTING")


def _rule_parts(mtype: str, rule: Any) -> tuple[list[str], str, list[float] | None]:
    """Split a rule into ``(names, strategy, weights)``; raises on a malformed rule."""
    if isinstance(rule, str):
        return [rule], "first", None
    if isinstance(rule, list):
        return [str(n) for n in rule], "first", None
    if not isinstance(rule, Mapping) or set(rule) - {"providers", "strategy"}:
        raise _fail(f"{mtype}: a rule is a provider name, a list, or {{providers, strategy}}")
    strategy = str(rule.get("strategy", "first"))
    if strategy not in STRATEGIES:
        raise _fail(f"{mtype}: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    raw = rule.get("providers", [])
    if isinstance(raw, Mapping):
        try:
            weights = [float(w) for w in raw.values()]
        except (TypeError, ValueError):
            raise _fail(f"{mtype}: weights must be numbers") from None
        if any(w <= 0 for w in weights):
            raise _fail(f"{mtype}: weights must be greater than 0")
        return [str(n) for n in raw], strategy, weights
    if not isinstance(raw, list):
        raise _fail(f"{mtype}: providers must be a list or an object of weights")
    return [str(n) for n in raw], strategy, None


def validate_routing(rules: Mapping[str, Any], providers: Sequence[str]) -> None:
    """Check ``KMSG_ROUTING`` against the enabled providers at start.

    Raises:
        ConfigurationError: Unknown type, malformed rule, unknown strategy, a provider that is not
            enabled or cannot send the type, or an empty provider list.
    """
    enabled = set(providers)
    for key, rule in rules.items():
        try:
            mtype = MessageType(str(key).upper())
        except ValueError:
            raise _fail(f"unknown message type {key!r}") from None
        names, _, _ = _rule_parts(mtype.value, rule)
        if not names:
            raise _fail(f"{key}: no providers")
        for name in names:
            if name not in enabled:
                raise _fail(f"{key}: provider {name!r} is not enabled (KMSG_PROVIDERS={','.join(providers)})")
            if mtype not in provider_class(name).capabilities.types:
                raise _fail(f"{key}: provider {name!r} does not support {mtype.value}")


class Router:
    """Compute a message's route from the settings.

    Args:
        providers: Enabled provider names, in preference order.
        rules: By-type rules (see module docstring).
        default_provider: Provider tried after the by-type rule.
        counter: Shared counter for round robin (``INCR`` in Redis across workers); per process
            when not given.
        rng: Random start of the per-process counters (used only without ``counter``).
        provider_configs: Each provider's settings: an AlimTalk whose route has no provider able
            to name its Kakao channel is refused here (see :meth:`route`).
    """

    def __init__(
        self,
        providers: Sequence[str],
        rules: Mapping[str, Any] | None = None,
        default_provider: str | None = None,
        *,
        counter: Counter | None = None,
        rng: random.Random | None = None,
        provider_configs: Mapping[str, ProviderConfig] | None = None,
    ) -> None:
        self.providers = list(providers)
        self.rules = dict(rules or {})
        self.default_provider = default_provider
        self.rng = rng or random.Random()
        self.counter = counter or _LocalCounter(self.rng)
        self._types = {name: provider_class(name).capabilities.types for name in self.providers}
        # Per provider: the message keys it reads a Kakao channel from, or None when it needs none
        # from the message (no channel in its API, or one in its settings; or settings not given).
        self._channel_keys: dict[str, tuple[str, ...] | None] = {}
        for name in self.providers:
            cls = provider_class(name)
            option = cls.kakao_channel_option
            config = (provider_configs or {}).get(name) or ProviderConfig(name=name)
            needed = provider_configs is not None and option is not None and not config.option(option)
            self._channel_keys[name] = cls.kakao_channel_keys if needed else None

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
        names, strategy, weights = _rule_parts(mtype.value, rule)
        if weights is not None:
            kept = [(n, w) for n, w in zip(names, weights, strict=True) if n in self._types and self.supports(n, mtype)]
            names, weights = [n for n, _ in kept], [w for _, w in kept]
        else:
            names = [n for n in names if n in self._types and self.supports(n, mtype)]
        if not names:
            return []
        if strategy == "round_robin":
            start = self.counter(f"rr:{mtype.value}") % len(names)
            return names[start:] + names[:start]
        if strategy == "weighted":
            first = names[self._weighted_index(mtype, weights or [1.0] * len(names))]
            return [first] + [n for n in names if n != first]
        return names

    def _weighted_index(self, mtype: MessageType, weights: Sequence[float]) -> int:
        # The n-th decision lands at frac(n / phi) in [0, 1): over any run of decisions the share
        # landing in each provider's slice of the cumulative weights matches its weight closely,
        # across every process sharing the counter, with no random source to drift.
        point = (self.counter(f"wt:{mtype.value}") * _GOLDEN) % 1.0 * sum(weights)
        total = 0.0
        for index, weight in enumerate(weights):
            total += weight
            if point < total:
                return index
        return len(weights) - 1

    def route(self, message: Message) -> list[str]:
        """Return the providers to try, first choice first.

        Raises:
            ValidationError: Unknown/incapable explicit provider, or no provider for the type.
        """
        mtype = message.type
        if is_sandbox(message):
            # A test message only ever reaches the simulator, whatever the rules (kmsg_worker.sandbox).
            return [SIMULATOR]
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
        if mtype is MessageType.ALIMTALK:
            self._check_kakao_channel(message, route)
        return route

    def _check_kakao_channel(self, message: Message, route: Sequence[str]) -> None:
        """Refuse an AlimTalk that no provider of ``route`` could address to a Kakao channel.

        The channel (Solapi's pfId, Aligo's sender key) comes from the message (``kakao.profile_id``)
        or from the provider's settings; IWINV's key is bound to its channel. Without one, every
        provider of the route would refuse the message after it was accepted.
        """
        for name in route:
            keys = self._channel_keys.get(name)
            if keys is None or any(message.kakao.get(k) for k in keys):
                return
        settings = " or ".join(f"KMSG_{n}_{provider_class(n).kakao_channel_option}".upper() for n in route)
        raise ValidationError(
            "kakao.profile_id",
            "required",
            f"ALIMTALK needs a Kakao channel (sender key / pfId): set kakao.profile_id or {settings}",
        )
