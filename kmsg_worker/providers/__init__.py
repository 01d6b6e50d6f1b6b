"""Provider adapters: one module per vendor behind :class:`~kmsg_worker.providers.base.Provider`."""

from kmsg_worker.providers.base import (
    Balance,
    Capabilities,
    DeliveryState,
    HealthReport,
    LookupHint,
    Provider,
    ProviderConfig,
    ProviderLookupUndecided,
    SendOutcome,
    SendWarning,
    StatusQuery,
    StatusReport,
)
from kmsg_worker.providers.registry import PROVIDER_ALIASES, provider_class, register_provider

__all__ = [
    "PROVIDER_ALIASES",
    "Balance",
    "Capabilities",
    "DeliveryState",
    "HealthReport",
    "LookupHint",
    "Provider",
    "ProviderConfig",
    "ProviderLookupUndecided",
    "SendOutcome",
    "SendWarning",
    "StatusQuery",
    "StatusReport",
    "provider_class",
    "register_provider",
]
