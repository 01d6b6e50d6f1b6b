"""Normalisation and validation of what a producer hands in.

:func:`normalize` turns what a producer hands us (keyword arguments, a dict from JSON or a CSV row)
into a frozen :class:`Message`, or raises :class:`~kmsg_worker.errors.ValidationError` naming the
field and the rule. It runs in the producer's process, before anything is written or queued.

Rules that are deliberate:

* auto SMS -> LMS is decided on the text *after* ``#{var}`` interpolation;
* nothing the caller gave is dropped when ``type`` is omitted (schedule, media, options survive);
* unknown fields are an error instead of being silently ignored (a typo such as ``scheduled`` for
  ``scheduled_at`` would otherwise send at once);
* phone numbers are normalised and checked for every provider.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import advertising as ads
from kmsg_worker.message.model import (
    _MEDIA_TYPES,
    _SUBJECT_TYPES,
    _TEMPLATE_TYPES,
    KAKAO_TYPES,
    TEXT_TYPES,
    Failover,
    Media,
    Message,
    MessageType,
    Priority,
    ValidationLimits,
)
from kmsg_worker.message.values import (
    _BUTTON_KEYS,
    _IDEMPOTENCY_KEY,
    _is_storable,
    check_message_id,
    check_storable,
    check_tenant,
    count_bytes,
    interpolate,
    normalize_phone,
    normalize_phone_sender,
    stringify,
)

# --------------------------------------------------------------------------------------------------
# normalisation

_ALIASES = {
    "from": "sender",
    "from_": "sender",
    "content": "text",
    "message_id": "id",
    "messageId": "id",
    "providerId": "provider_id",
    "templateId": "template_id",
    "template_code": "template_id",
    "imageUrl": "image_url",
    "scheduledAt": "scheduled_at",
    "providerOptions": "provider_options",
    "customFields": "custom_fields",
    "idempotencyKey": "idempotency_key",
    "nightConsent": "night_consent",
}
_KNOWN = frozenset(
    {
        "id",
        "type",
        "to",
        "sender",
        "text",
        "subject",
        "template_id",
        "template",
        "variables",
        "media",
        "image_url",
        "buttons",
        "kakao",
        "naver",
        "voice",
        "fax",
        "rcs",
        "failover",
        "provider_id",
        "provider_options",
        "scheduled_at",
        "country",
        "custom_fields",
        "tenant",
        "priority",
        "idempotency_key",
        "purpose",
        "compose",
        "night_consent",
    }
)


def _canonical_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValidationError("message", "type", f"must be a mapping, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValidationError(repr(key), "unknown_field", "field names must be strings")
        name = _ALIASES.get(key, key)
        if name not in _KNOWN:
            raise ValidationError(key, "unknown_field", f"unknown field; known fields: {', '.join(sorted(_KNOWN))}")
        if name in out and value is not None:
            raise ValidationError(name, "duplicate_field", f"given twice (as {key!r} and an alias)")
        if value is not None or name not in out:
            out[name] = value
    return out


def _opt_str(data: Mapping[str, Any], name: str, *, max_len: int = 10_000) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(name, "type", f"must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValidationError(name, "max_length", f"must be at most {max_len} characters")
    return value


def _opt_mapping(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``data[name]`` checked to be a mapping with string keys (empty when absent), not copied."""
    value = data.get(name)
    if value is None:
        return {}
    # Exact types first: variables are checked for every row of a bulk batch, and isinstance()
    # against an ABC (Mapping) is a Python-level call.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ValidationError(name, "type", f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if type(key) is not str and not isinstance(key, str):
            raise ValidationError(name, "type", "keys must be strings")
    return value


def _opt_dict(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(_opt_mapping(data, name))


def parse_variables(data: Mapping[str, Any], limits: ValidationLimits) -> dict[str, str]:
    # Not copied first: the stringified values are a new dict anyway.
    raw = _opt_mapping(data, "variables")
    if len(raw) > limits.max_variables:
        raise ValidationError("variables", "max_items", f"at most {limits.max_variables} variables")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if type(value) is str:
            out[key] = value
            continue
        if isinstance(value, (Mapping, list, tuple, set, frozenset, bytes, bytearray)):
            raise ValidationError(f"variables.{key}", "type", "must be a string, number, bool, date or null")
        out[key] = stringify(value, f"variables.{key}")
    return out


def _media(data: Mapping[str, Any]) -> Media | None:
    raw = data.get("media")
    image_url = _opt_str(data, "image_url", max_len=2048)
    if raw is None:
        return Media(ref=image_url) if image_url else None
    if not isinstance(raw, Mapping):
        raise ValidationError("media", "type", "must be a mapping such as {'image': {'ref': url}}")
    image = raw.get("image", raw)
    if not isinstance(image, Mapping):
        raise ValidationError("media.image", "type", "must be a mapping with 'ref' or 'data_b64'")
    ref = image.get("ref") or image_url
    data_b64 = image.get("data_b64")
    if isinstance(image.get("bytes"), (bytes, bytearray)):
        import base64

        data_b64 = base64.b64encode(bytes(image["bytes"])).decode("ascii")
    if ref is not None and not isinstance(ref, str):
        raise ValidationError("media.image.ref", "type", "must be a string (URL or file id)")
    if data_b64 is not None and not isinstance(data_b64, str):
        raise ValidationError("media.image.data_b64", "type", "must be base64 text")
    if bool(ref) == bool(data_b64):
        raise ValidationError("media.image", "one_of", "give exactly one of 'ref' (URL/file id) or 'bytes'/'data_b64'")
    filename = image.get("filename")
    content_type = image.get("content_type") or image.get("contentType")
    for name, val in (("filename", filename), ("content_type", content_type)):
        if val is not None and not isinstance(val, str):
            raise ValidationError(f"media.image.{name}", "type", "must be a string")
    return Media(ref=ref, data_b64=data_b64, filename=filename, content_type=content_type)


def _buttons(data: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    raw = data.get("buttons")
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValidationError("buttons", "type", "must be a list of buttons")
    if len(raw) > 5:
        raise ValidationError("buttons", "max_items", "at most 5 buttons (Kakao rule)")
    out = []
    for i, button in enumerate(raw):
        if not isinstance(button, Mapping):
            raise ValidationError(f"buttons[{i}]", "type", "must be a mapping with 'name' and 'type'")
        unknown = set(button) - _BUTTON_KEYS
        if unknown:
            first = sorted(map(str, unknown))[0]
            raise ValidationError(f"buttons[{i}].{first}", "unknown_field", "unknown button field")
        name, kind = button.get("name"), button.get("type")
        if not isinstance(name, str) or not name.strip():
            raise ValidationError(f"buttons[{i}].name", "required", "a button needs a non-empty name")
        if len(name) > 28:
            raise ValidationError(f"buttons[{i}].name", "max_length", "at most 28 characters (Kakao rule)")
        if not isinstance(kind, str) or kind not in {"WL", "AL", "DS", "BK", "MD", "BC", "BT", "AC"}:
            raise ValidationError(f"buttons[{i}].type", "enum", "must be one of WL, AL, DS, BK, MD, BC, BT, AC")
        if kind == "WL" and not button.get("url_mobile"):
            raise ValidationError(f"buttons[{i}].url_mobile", "required", "a WL (web link) button needs url_mobile")
        out.append(dict(button))
    return tuple(out)


def _failover(data: Mapping[str, Any]) -> Failover | None:
    raw = data.get("failover")
    if raw is None:
        return None
    if isinstance(raw, bool):
        return Failover(enabled=raw)
    if not isinstance(raw, Mapping):
        raise ValidationError("failover", "type", "must be a mapping or a bool")
    allowed = {
        "enabled",
        "channel",
        "fallback_channel",
        "content",
        "fallback_content",
        "title",
        "fallback_title",
    }
    unknown = set(raw) - allowed
    if unknown:
        raise ValidationError(f"failover.{sorted(map(str, unknown))[0]}", "unknown_field", "unknown failover field")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValidationError("failover.enabled", "type", "must be a bool")
    channel = raw.get("channel", raw.get("fallback_channel"))
    if channel is not None:
        if not isinstance(channel, str) or channel.lower() not in {"sms", "lms"}:
            raise ValidationError("failover.channel", "enum", "must be 'sms' or 'lms'")
        channel = channel.lower()
    content = raw.get("content", raw.get("fallback_content"))
    title = raw.get("title", raw.get("fallback_title"))
    for name, val in (("content", content), ("title", title)):
        if val is not None and not isinstance(val, str):
            raise ValidationError(f"failover.{name}", "type", "must be a string")
    return Failover(enabled=enabled, channel=channel, content=content, title=title)


def _scheduled_at(data: Mapping[str, Any], limits: ValidationLimits, now: datetime) -> datetime | None:
    raw = data.get("scheduled_at")
    if raw is None:
        return None
    zone: tzinfo = ZoneInfo(limits.timezone)
    if isinstance(raw, str):
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            raise ValidationError("scheduled_at", "datetime", "must be an ISO 8601 date-time") from None
    elif isinstance(raw, datetime):
        value = raw
    else:
        raise ValidationError("scheduled_at", "type", "must be a datetime or an ISO 8601 string")
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    try:
        in_past = value < now - limits.schedule_tolerance
        utc = value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59-12:00 is past the last representable UTC time
        raise ValidationError("scheduled_at", "range", "is outside the supported date range") from None
    if in_past:
        raise ValidationError(
            "scheduled_at", "in_past", f"is in the past ({value.isoformat()}); give a future time or omit it"
        )
    return utc


#: A resolved registry reference: ``name@version``.
_TEMPLATE_REF = re.compile(r"[A-Za-z0-9_.\-]{1,64}@[1-9][0-9]{0,8}", re.ASCII)


def _template_ref(data: Mapping[str, Any]) -> str | None:
    """The ``template`` a message was rendered from: ``name@version``, as the producer resolved it.

    A bare name (``"order_shipped"``) is resolved to its latest published version by
    :meth:`kmsg_worker.producer.KMsg.send` before it gets here; :func:`normalize` has no registry.
    """
    ref = _opt_str(data, "template", max_len=80)
    if ref is not None and not _TEMPLATE_REF.fullmatch(ref):
        raise ValidationError(
            "template", "unresolved", "must be a resolved 'name@version' (send through KMsg, which resolves names)"
        )
    return ref


#: Types that may never carry advertising: AlimTalk is for information the recipient expects.
_NO_ADVERTISING = frozenset({MessageType.ALIMTALK})


def parse_purpose(data: Mapping[str, Any]) -> tuple[str | None, str, bool]:
    """``(purpose, compose mode, night consent)``: purpose ``None`` is informational."""
    raw = data.get("purpose")
    if raw is None or raw == "":
        raw = ads.INFORMATIONAL
    if not isinstance(raw, str) or raw not in ads.PURPOSES:
        raise ValidationError("purpose", "enum", f"must be one of {', '.join(ads.PURPOSES)}")
    mode = data.get("compose")
    if mode is None or mode == "":
        mode = "auto"
    if not isinstance(mode, str) or mode not in ads.COMPOSE_MODES:
        raise ValidationError("compose", "enum", f"must be one of {', '.join(ads.COMPOSE_MODES)}")
    consent = data.get("night_consent")
    if consent is None or consent == "":
        consent = False
    elif isinstance(consent, str) and consent.lower() in ("true", "false", "1", "0"):
        consent = consent.lower() in ("true", "1")  # a CSV cell
    if not isinstance(consent, bool):
        raise ValidationError("night_consent", "type", "must be a bool")
    if raw == ads.INFORMATIONAL and consent:
        raise ValidationError("night_consent", "not_allowed", "night consent applies to advertising only")
    return (None if raw == ads.INFORMATIONAL else raw), mode, consent


def check_text(
    mtype: MessageType,
    text: str | None,
    subject: str | None,
    limits: ValidationLimits,
    nbytes: int | None = None,
) -> None:
    """The text and subject rules of ``mtype``. ``nbytes``: ``text``'s :func:`count_bytes`, if known."""
    if mtype in TEXT_TYPES and not (text and text.strip()):
        raise ValidationError("text", "required", f"{mtype.value} needs a non-empty text")
    # No early return without a text: the subject rules below hold for text-less types too.
    if nbytes is None:
        nbytes = 0 if text is None else count_bytes(text)
    if mtype in (MessageType.SMS, MessageType.RCS_SMS) and nbytes > limits.sms_max_bytes:
        raise ValidationError(
            "text",
            "max_bytes",
            f"{mtype.value} text is {nbytes} bytes; at most {limits.sms_max_bytes} (use LMS)",
        )
    if mtype in (MessageType.LMS, MessageType.MMS, MessageType.RCS_LMS, MessageType.RCS_MMS):
        if nbytes > limits.lms_max_bytes:
            raise ValidationError(
                "text", "max_bytes", f"{mtype.value} text is {nbytes} bytes; at most {limits.lms_max_bytes}"
            )
    if mtype in KAKAO_TYPES and text is not None and len(text) > limits.kakao_max_chars:
        raise ValidationError("text", "max_length", f"Kakao text is at most {limits.kakao_max_chars} characters")
    if subject is not None:
        if mtype not in _SUBJECT_TYPES:
            raise ValidationError("subject", "not_allowed", f"{mtype.value} has no subject; use LMS or MMS")
        sbytes = count_bytes(subject)
        if sbytes > limits.subject_max_bytes:
            raise ValidationError(
                "subject", "max_bytes", f"subject is {sbytes} bytes; at most {limits.subject_max_bytes}"
            )


def _check_type_fields(mtype: MessageType, msg: dict[str, Any]) -> None:
    if mtype in _TEMPLATE_TYPES and not msg.get("template_id"):
        raise ValidationError("template_id", "required", f"{mtype.value} needs a template code (template_id)")
    if msg.get("media") is not None and mtype not in _MEDIA_TYPES:
        raise ValidationError("media", "not_allowed", f"{mtype.value} cannot carry media; use MMS")
    if mtype is MessageType.MMS and msg.get("media") is None:
        raise ValidationError("media", "required", "MMS needs an image (media or image_url)")
    if mtype is MessageType.FAX:
        fax = msg["fax"]
        ids, urls = fax.get("file_ids"), fax.get("file_urls")
        if not ids and not urls:
            raise ValidationError("fax.file_ids", "required", "FAX needs fax.file_ids or fax.file_urls")
        for name, val in (("file_ids", ids), ("file_urls", urls)):
            if val is not None and (
                not isinstance(val, (list, tuple)) or not all(isinstance(v, str) and v for v in val)
            ):
                raise ValidationError(f"fax.{name}", "type", "must be a list of non-empty strings")
    if mtype is MessageType.VOICE:
        voice_type = msg["voice"].get("voice_type", "FEMALE")
        if not isinstance(voice_type, str) or voice_type not in {"FEMALE", "MALE"}:
            raise ValidationError("voice.voice_type", "enum", "must be FEMALE or MALE")
        reply_range = msg["voice"].get("reply_range")
        if reply_range is not None and (
            isinstance(reply_range, bool) or not isinstance(reply_range, int) or not 1 <= reply_range <= 9
        ):
            raise ValidationError("voice.reply_range", "range", "must be an integer from 1 to 9")
    if msg.get("buttons") and mtype not in (KAKAO_TYPES | {MessageType.NSA} | _RCS):
        raise ValidationError("buttons", "not_allowed", f"{mtype.value} cannot carry buttons")
    if msg.get("failover") is not None and mtype is not MessageType.ALIMTALK:
        raise ValidationError("failover", "not_allowed", "failover to SMS/LMS applies to ALIMTALK only")


_RCS = frozenset(
    {
        MessageType.RCS_SMS,
        MessageType.RCS_LMS,
        MessageType.RCS_MMS,
        MessageType.RCS_TPL,
        MessageType.RCS_ITPL,
        MessageType.RCS_LTPL,
    }
)


def infer_type(
    text: str | None,
    subject: str | None,
    media: Media | None,
    limits: ValidationLimits,
    nbytes: int | None = None,
) -> MessageType:
    """SMS, LMS or MMS from what the message carries. ``nbytes``: ``text``'s :func:`count_bytes`, if known."""
    if media is not None:
        return MessageType.MMS
    if subject:
        return MessageType.LMS
    if text is not None and (count_bytes(text) if nbytes is None else nbytes) > limits.auto_lms_bytes:
        return MessageType.LMS
    return MessageType.SMS


def _purposed_text(
    text: str | None,
    variables: Mapping[str, str],
    purpose: str | None,
    compose_mode: str,
    tenant: str,
    sender: str | None,
    advertiser: Callable[[str, str | None], ads.AdvertiserProfile | None] | None,
) -> str | None:
    """The text with its variables in, composed and checked under the advertising rules."""
    profile = None
    if purpose is not None:
        profile = advertiser(tenant, sender) if advertiser is not None else None
        # Composed before the variables go in, so a batch's shared text is composed once for all
        # its rows; checked after, on exactly what is sent.
        if text is not None and compose_mode == "auto":
            text = ads.compose(text, ads.require_profile(profile, tenant, sender), sender=sender)
    if text is not None and variables:
        text = interpolate(text, variables)
    if text is not None:
        if purpose is None:
            ads.check_informational(text)
        else:
            ads.check(text, profile, sender=sender)
    return text


def normalize(
    raw: Mapping[str, Any],
    *,
    limits: ValidationLimits | None = None,
    now: datetime | None = None,
    default_sender: str | None = None,
    advertiser: Callable[[str, str | None], ads.AdvertiserProfile | None] | None = None,
) -> Message:
    """Validate and normalise one message.

    Args:
        raw: The message as given by the producer. Python names (``sender``, ``template_id``) and the
            JSON-style aliases (``from``, ``templateId``, ``content``, ``imageUrl``) are both accepted.
        limits: Byte and length limits; defaults to :class:`ValidationLimits()`.
        now: Current time (for ``scheduled_at`` checks); defaults to the wall clock.
        default_sender: Sender number used when none is given.
        advertiser: ``(tenant, sender) -> profile``: the advertiser profile an advertising message
            is composed or checked with (see :mod:`kmsg_worker.message.advertising`).

    Returns:
        A frozen :class:`Message` with a fresh id unless one was given.

    Raises:
        ValidationError: Naming the field and the rule.
    """
    limits = limits or ValidationLimits()
    now = now or datetime.now(UTC)
    data = _canonical_keys(raw)

    to = normalize_phone(data.get("to"), "to")
    sender_raw = data.get("sender")
    if sender_raw is None or sender_raw == "":  # omitted (or an empty CSV cell): the default sender
        sender_raw = default_sender
    sender = None
    if sender_raw is not None:
        sender = normalize_phone_sender(sender_raw)

    tenant = check_tenant(data.get("tenant"))
    purpose, compose_mode, night_consent = parse_purpose(data)
    variables = parse_variables(data, limits)
    text = _opt_str(data, "text", max_len=20_000)
    subject = _opt_str(data, "subject", max_len=1000)
    if subject is not None and not subject.strip():
        subject = None
    text = _purposed_text(text, variables, purpose, compose_mode, tenant, sender, advertiser)
    media = _media(data)

    raw_type = data.get("type")
    inferred = raw_type is None
    # Counted once for the type inference and the size rules (a bulk row's hot path goes through both).
    nbytes = 0 if text is None else count_bytes(text)
    if inferred:
        mtype = infer_type(text, subject, media, limits, nbytes)
    else:
        if not isinstance(raw_type, str):
            raise ValidationError("type", "type", "must be a string")
        try:
            mtype = MessageType(raw_type.upper())
        except ValueError:
            raise ValidationError(
                "type", "enum", f"unknown type {raw_type!r}; one of {', '.join(t.value for t in MessageType)}"
            ) from None

    message_id = check_message_id(data.get("id"))

    priority_raw = data.get("priority")
    if priority_raw is None or priority_raw == "":
        priority_raw = "normal"
    if not isinstance(priority_raw, str):
        raise ValidationError("priority", "type", f"must be a string, got {type(priority_raw).__name__}")
    try:
        priority = Priority(priority_raw)
    except ValueError:
        raise ValidationError("priority", "enum", "must be high, normal or bulk") from None

    if purpose is not None and mtype in _NO_ADVERTISING:
        raise ValidationError(
            "purpose",
            "not_allowed",
            f"{mtype.value} may not carry advertising (Kakao's rule); send it as FRIENDTALK, SMS or LMS",
        )
    idem = data.get("idempotency_key")
    if idem is not None and (not isinstance(idem, str) or not _IDEMPOTENCY_KEY.fullmatch(idem)):
        raise ValidationError("idempotency_key", "format", "must be 1-200 printable ASCII characters")

    custom = _opt_dict(data, "custom_fields")
    fields: dict[str, Any] = {
        "template_id": _opt_str(data, "template_id", max_len=128),
        "template": _template_ref(data),
        "media": media,
        "buttons": _buttons(data),
        "kakao": _opt_dict(data, "kakao"),
        "naver": _opt_dict(data, "naver"),
        "voice": _opt_dict(data, "voice"),
        "fax": _opt_dict(data, "fax"),
        "rcs": _opt_dict(data, "rcs"),
        "failover": _failover(data),
    }
    check_text(mtype, text, subject, limits, nbytes)
    _check_type_fields(mtype, fields)

    country = _opt_str(data, "country", max_len=4)
    provider_id = _opt_str(data, "provider_id", max_len=32)
    message = Message(
        id=message_id,
        type=mtype,
        to=to,
        sender=sender,
        text=text,
        subject=subject,
        variables=variables,
        provider_id=provider_id,
        provider_options=_opt_dict(data, "provider_options"),
        scheduled_at=_scheduled_at(data, limits, now),
        country=country,
        custom_fields={k: stringify(v, f"custom_fields.{k}") for k, v in custom.items()},
        tenant=tenant,
        priority=priority,
        idempotency_key=idem,
        type_inferred=inferred,
        purpose=purpose,
        night_consent=night_consent,
        **fields,
    )
    # Everything stored must be storable on both backends (free-form fields take any nesting).
    content = message.content()
    if not _is_storable(content, -1):
        for name, value in content.items():
            check_storable(value, name)
    return message
