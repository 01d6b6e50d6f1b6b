"""The message model, its validation, and the checks of single values.

- :mod:`.model`: :class:`Message` and its types, priorities and ids.
- :mod:`.values`: byte counts, phone numbers, ids, tenants, storable JSON, ``#{var}`` text.
- :mod:`.validate`: :func:`normalize`, which turns what a producer hands in (keyword arguments, a dict
  from JSON or a CSV row) into a frozen :class:`Message`, or raises
  :class:`~kmsg_worker.errors.ValidationError` naming the field and the rule, before anything is
  written or queued.
"""

from __future__ import annotations

from kmsg_worker.message.model import (
    KAKAO_TYPES,
    TEXT_TYPES,
    Failover,
    Media,
    Message,
    MessageType,
    Priority,
    ValidationLimits,
    new_message_id,
    redact,
)
from kmsg_worker.message.validate import check_text, infer_type, normalize, parse_variables
from kmsg_worker.message.values import (
    DEFAULT_TENANT,
    VAR_PATTERN,
    check_message_id,
    check_storable,
    check_tenant,
    count_bytes,
    interpolate,
    normalize_phone,
    normalize_phone_sender,
    stringify,
)

__all__ = [
    "DEFAULT_TENANT",
    "KAKAO_TYPES",
    "TEXT_TYPES",
    "VAR_PATTERN",
    "Failover",
    "Media",
    "Message",
    "MessageType",
    "Priority",
    "ValidationLimits",
    "check_message_id",
    "check_storable",
    "check_tenant",
    "check_text",
    "count_bytes",
    "infer_type",
    "interpolate",
    "new_message_id",
    "normalize",
    "normalize_phone",
    "normalize_phone_sender",
    "parse_variables",
    "redact",
    "stringify",
]
