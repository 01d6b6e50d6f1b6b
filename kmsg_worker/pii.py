"""Masking of personal data: phone numbers in values that may reach a log line, an error or a report.

A leaf module (the standard library only), so anything that shows a recipient — the log processors
(:mod:`kmsg_worker.logging`), a provider adapter quoting a provider's answer, the command line —
masks it the same way without pulling in the logging set-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["mask_phone", "mask_phone_numbers", "mask_text"]

# Korean numbers (with or without separators) and E.164 numbers. The prefix is lazy, so ``01012345678``
# keeps ``010`` (not ``0101``) and ``0212345678`` keeps ``02``: only the prefix and the last four digits
# survive, as with :func:`mask_phone`.
#
# Bounded by ASCII letters and digits only (not ``\w``): a number glued to Hangul (``수신번호01012345678``) or an
# underscore is masked too, while the digit runs inside hex ids stay intact. ``(010) 1234-5678`` is covered.
_PHONE_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])(\+?\d{2,4}?)[\s\-.()]{0,2}(\d{3,4})[\s\-.]?(\d{4})(?![0-9A-Za-z])")
#: E.164 numbers too long for the pattern above (``+8201012345678``: up to 15 digits after the ``+``).
_LONG_E164_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])(\+\d{3})(\d{4,8})(\d{4})(?![0-9A-Za-z])")
#: Nesting that :func:`mask_phone_numbers` descends into (lists, tuples, mappings in event values).
_MASK_DEPTH = 8


def mask_phone(number: str | None) -> str:
    """Mask the middle of a phone number: ``01012345678`` -> ``010****5678``."""
    if not number:
        return ""
    digits = number.strip()
    if len(digits) <= 4:
        return "*" * len(digits)
    head = 4 if digits.startswith("+") else 3
    return digits[:head] + "*" * (len(digits) - head - 4) + digits[-4:]


def mask_text(text: str) -> str:
    """``text`` with every phone-number-like substring masked (``010-1234-5678`` -> ``010****5678``)."""
    text = _LONG_E164_IN_TEXT.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), text)
    return _PHONE_IN_TEXT.sub(lambda m: m.group(1) + "****" + m.group(3), text)


def _mask_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if depth >= _MASK_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: _mask_value(v, depth + 1) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_mask_value(v, depth + 1) for v in value)
    return value


def mask_phone_numbers(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask phone-number-like substrings in every string value, nested ones too.

    Runs after ``format_exc_info``, so a number in an exception's message or traceback is masked as well.
    """
    for key, value in event_dict.items():
        if isinstance(value, (str, Mapping, list, tuple)):
            event_dict[key] = _mask_value(value)
    return event_dict
