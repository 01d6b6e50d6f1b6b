"""Checks of single values: byte counts, phone numbers, ids, tenants, storable JSON, ``#{var}`` text."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kmsg_worker.errors import ValidationError
from kmsg_worker.message.model import new_message_id

VAR_PATTERN = re.compile(r"#\{([^}]+)\}")
_PHONE_STRIP = re.compile(r"[\s\-().]")
# re.ASCII: without it \d also matches Arabic-Indic, fullwidth and other Unicode digits.
_DOMESTIC = re.compile(r"0\d{8,10}", re.ASCII)
_INTERNATIONAL = re.compile(r"\+[1-9]\d{6,14}", re.ASCII)
_SENDER = re.compile(r"\+?\d{3,16}", re.ASCII)
_BUTTON_KEYS = frozenset(
    {"name", "type", "url_pc", "url_mobile", "scheme_ios", "scheme_android", "chat_extra", "chat_event"}
)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
#: A tenant is a metric label (and a key prefix): a short, printable, bounded set of characters.
_TENANT = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: The tenant of a message that names none.
DEFAULT_TENANT = "default"
#: Nesting allowed in free-form fields (``kakao``, ``provider_options`` ...).
_MAX_DEPTH = 32


def count_bytes(text: str) -> int:
    """Count bytes the way Korean carriers bill them (the 90-byte SMS limit counts Hangul as 2).

    Every UTF-16 code unit up to U+007F counts 1, every other unit counts 2, so Hangul counts 2
    and an emoji outside the basic plane (a surrogate pair) counts 4.

    Args:
        text: The message text.

    Returns:
        The estimated byte count.
    """
    if text.isascii():
        return len(text)
    # Same result as counting character by character, done in C (a hot path for bulk sends):
    # every UTF-16 unit costs 2 except ASCII ones, which cost 1. surrogatepass: a lone surrogate
    # (possible in Python strings) is one unit, as it is in JavaScript.
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    ascii_chars = len(text.encode("ascii", "ignore"))
    return 2 * units - ascii_chars


def stringify(value: object, field_name: str = "variables") -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return str(value)
    except ValueError:  # int with more than sys.get_int_max_str_digits() digits
        raise ValidationError(field_name, "range", "number too large to use as text") from None


def _bad_text(value: str) -> bool:
    """NUL (refused by PostgreSQL text and JSONB) or an unpaired surrogate (not encodable as UTF-8)."""
    if "\x00" in value:
        return True
    if value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_storable(value: Any, path: str, depth: int = 0) -> None:
    """Check that ``value`` is JSON data the system of record can store on every backend.

    Strings without NUL or unpaired surrogates, integers within 64 bits, finite floats, bools,
    null, lists and string-keyed mappings, nested at most ``_MAX_DEPTH`` levels.

    Raises:
        ValidationError: Naming the path of the first offending value.
    """
    if _is_storable(value, depth):
        return  # the common case, checked without building paths
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if _bad_text(value):
            raise ValidationError(path, "invalid_character", "must not contain NUL or unpaired surrogate characters")
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValidationError(path, "range", "integers must fit in 64 bits")
        return
    if type(value) is float:  # orjson writes no float subclass
        if not math.isfinite(value):
            raise ValidationError(path, "range", "must be a finite number")
        return
    _check_container(value, path, depth)


def _is_storable(value: Any, depth: int = 0) -> bool:
    """Fast, conservative form of :func:`check_storable` for exact built-in types (False = look closer).

    Strings and ``None``, by far the most common values, are checked inline rather than by a call.
    """
    kind = type(value)
    if kind is str:
        return "\x00" not in value and (value.isascii() or not _bad_text(value))
    if value is None or kind is bool:
        return True
    if kind is int:
        return bool(-(2**63) <= value < 2**63)
    if kind is float:
        return math.isfinite(value)
    if depth >= _MAX_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or "\x00" in key or not (key.isascii() or not _bad_text(key)):
                return False
            if type(item) is str:
                if "\x00" in item or not (item.isascii() or not _bad_text(item)):
                    return False
            elif item is not None and not _is_storable(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_is_storable(item, depth + 1) for item in value)
    return False


def _check_container(value: Any, path: str, depth: int) -> None:
    if depth >= _MAX_DEPTH:
        raise ValidationError(path, "max_depth", f"nested deeper than {_MAX_DEPTH} levels")
    # dict and list (and their subclasses) and plain tuples: what the JSON writer (orjson) accepts.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(path, "type", "keys must be strings")
            if _bad_text(key):
                raise ValidationError(path, "invalid_character", "a key contains NUL or an unpaired surrogate")
            check_storable(item, f"{path}.{key}", depth + 1)
        return
    if isinstance(value, list) or type(value) is tuple:
        for index, item in enumerate(value):
            check_storable(item, f"{path}[{index}]", depth + 1)
        return
    raise ValidationError(
        path, "type", f"must be JSON data (text, number, bool, null, list or mapping), got {type(value).__name__}"
    )


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Replace ``#{key}`` tokens with ``variables[key]``; unknown keys are left as they are.

    Args:
        text: Text containing ``#{key}`` tokens (a key is anything but ``}``).
        variables: Already stringified variable values.

    Returns:
        The interpolated text.
    """
    if "#{" not in text:
        return text
    return VAR_PATTERN.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def normalize_phone(value: object, field_name: str = "to") -> str:
    """Normalise a phone number: strip spaces, hyphens, dots and brackets, keep a leading ``+``.

    Args:
        value: The number as given (``"010-1234-5678"``, ``"+82 10 1234 5678"``).
        field_name: Field to name in the error.

    Returns:
        Digits only (``"01012345678"``), or ``"+"`` and digits for an international number.

    Raises:
        ValidationError: The value is not a string, or not a plausible Korean or E.164 number.
    """
    if not isinstance(value, str):
        raise ValidationError(field_name, "type", f"must be a string, got {type(value).__name__}")
    cleaned = _PHONE_STRIP.sub("", value.strip())
    if not cleaned:
        raise ValidationError(field_name, "required", "a phone number is required")
    if _DOMESTIC.fullmatch(cleaned) or _INTERNATIONAL.fullmatch(cleaned):
        return cleaned
    raise ValidationError(
        field_name,
        "phone_format",
        "must be a Korean number starting with 0 (9-11 digits, e.g. 010-1234-5678) "
        "or an international number starting with + (7-15 digits)",
    )


def check_message_id(value: object) -> str:
    """Return a caller's message id (or a fresh one when ``None``); the same rule for every path.

    Raises:
        ValidationError: Not 1-64 characters of letters, digits, ``_ . : -``.
    """
    if value is None:
        return new_message_id()
    if not isinstance(value, str) or not _MESSAGE_ID.fullmatch(value):
        raise ValidationError("id", "format", "must be 1-64 characters of letters, digits, _ . : -")
    return value


def check_tenant(value: object, field_name: str = "tenant") -> str:
    """Return a caller's tenant id (:data:`DEFAULT_TENANT` when ``None`` or empty).

    The tenant labels metrics: a free-form string (tabs, newlines, a user id per call) would give
    them unbounded cardinality, so it is checked here, before anything is stored.

    Raises:
        ValidationError: Not 1-64 characters of ASCII letters, digits, ``_ . -`` (rule ``format``;
            ``invalid_character`` for NUL or an unpaired surrogate, as in every text field).
    """
    if value is None or value == "":
        return DEFAULT_TENANT
    if not isinstance(value, str):
        raise ValidationError(field_name, "type", f"must be a string, got {type(value).__name__}")
    if _bad_text(value):  # the rule every text field follows, named the same way
        raise ValidationError(field_name, "invalid_character", "must not contain NUL or unpaired surrogate characters")
    if not _TENANT.fullmatch(value):
        raise ValidationError(
            field_name, "format", "must be 1-64 characters of ASCII letters, digits, _ . - ([A-Za-z0-9_.-]{1,64})"
        )
    return value


def normalize_phone_sender(value: object) -> str:
    """Normalise a sender (caller id) number; Korean senders may be short (``1588-1234``)."""
    if not isinstance(value, str):
        raise ValidationError("sender", "type", f"must be a string, got {type(value).__name__}")
    cleaned = _PHONE_STRIP.sub("", value.strip())
    if not _SENDER.fullmatch(cleaned) or len(cleaned.lstrip("+")) < 7:
        raise ValidationError("sender", "phone_format", "must be a registered sender number such as 1588-1234")
    return cleaned
