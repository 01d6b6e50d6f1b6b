"""Lazy alias registry: provider name -> dotted path, imported on first use.

Unused vendors' modules are never imported. An unknown name is a configuration error that says
which names exist; registering a name twice raises.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kmsg_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from kmsg_worker.providers.base import Provider

__all__ = ["PROVIDER_ALIASES", "provider_class", "register_provider"]

#: Built-in providers.
PROVIDER_ALIASES: dict[str, str] = {
    "mock": "kmsg_worker.providers.mock:MockProvider",
    "solapi": "kmsg_worker.providers.solapi:SolapiProvider",
    "iwinv": "kmsg_worker.providers.iwinv:IwinvProvider",
    "aligo": "kmsg_worker.providers.aligo:AligoProvider",
}


def register_provider(name: str, dotted_path: str) -> None:
    """Register a third-party provider class under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in PROVIDER_ALIASES:
        raise ValueError(f"a provider named {name!r} is already registered ({PROVIDER_ALIASES[name]})")
    PROVIDER_ALIASES[name] = dotted_path


def provider_class(name: str) -> type[Provider]:
    """Resolve a provider name to its class, importing the module on first use.

    Raises:
        ConfigurationError: Unknown name.
    """
    try:
        dotted = PROVIDER_ALIASES[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDER_ALIASES))
        raise ConfigurationError(
            f"unknown provider {name!r} (known: {known}); did you spell it correctly in KMSG_PROVIDERS?",
            variable="KMSG_PROVIDERS",
        ) from None
    module_name, _, attr = dotted.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Provider] = getattr(module, attr)
    return cls
