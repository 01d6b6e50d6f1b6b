"""Structured logging: JSON events with bound context and masked phone numbers.

Events are snake_case or dotted verbs (``message.sent``), never f-strings with data baked in. The
:func:`mask_phone_numbers` processor masks anything that looks like a phone number in every value,
so a number can only reach the logs masked (``010****5678``), even by mistake.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger", "mask_phone", "mask_phone_numbers"]

# Korean numbers (with or without separators) and E.164 numbers.
_PHONE_IN_TEXT = re.compile(r"(?<![\w])(\+?\d{2,4})[\s\-.]?(\d{3,4})[\s\-.]?(\d{4})(?![\w])")
_configured = False


def mask_phone(number: str | None) -> str:
    """Mask the middle of a phone number: ``01012345678`` -> ``010****5678``."""
    if not number:
        return ""
    digits = number.strip()
    if len(digits) <= 4:
        return "*" * len(digits)
    head = 4 if digits.startswith("+") else 3
    return digits[:head] + "*" * (len(digits) - head - 4) + digits[-4:]


def _mask_text(text: str) -> str:
    return _PHONE_IN_TEXT.sub(lambda m: m.group(1) + "****" + m.group(3), text)


def mask_phone_numbers(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask phone-number-like substrings in every string value."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = _mask_text(value)
    return event_dict


def configure_logging(level: str = "INFO", *, json_output: bool = True) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    global _configured
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_phone_numbers,
        structlog.processors.format_exc_info,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str | None = None) -> Any:
    """Return a structlog logger (configured with defaults on first use)."""
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)
