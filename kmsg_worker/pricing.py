"""Unit prices: the one table behind every cost estimate (batch summaries and reports).

The defaults are **estimates** of typical Korean list prices in KRW per message; contracts differ, so
operators set theirs with ``KMSG_UNIT_PRICES`` (a JSON object such as ``{"SMS": 8.4}``), which
replaces the default of each type it names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["DEFAULT_UNIT_PRICES", "unit_prices"]

#: KRW per message, by message type (an estimate, not an invoice).
DEFAULT_UNIT_PRICES: Mapping[str, float] = MappingProxyType(
    {
        "SMS": 9.9,
        "LMS": 30.0,
        "MMS": 60.0,
        "ALIMTALK": 8.0,
        "FRIENDTALK": 15.0,
        "NSA": 8.0,
        "VOICE": 50.0,
        "FAX": 50.0,
        "RCS_SMS": 9.0,
        "RCS_LMS": 27.0,
        "RCS_MMS": 55.0,
        "RCS_TPL": 9.0,
        "RCS_ITPL": 40.0,
        "RCS_LTPL": 27.0,
    }
)


def unit_prices(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The price table: the defaults, with ``overrides`` (type names in any letter case) on top."""
    return {**DEFAULT_UNIT_PRICES, **{k.upper(): float(v) for k, v in (overrides or {}).items()}}
