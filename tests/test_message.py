"""Validation and normalisation of every message type (providers.md §2)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import (
    Message,
    MessageType,
    Priority,
    ValidationLimits,
    count_bytes,
    interpolate,
    new_message_id,
    normalize,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def make(**fields: Any) -> Message:
    fields.setdefault("to", "01012345678")
    return normalize(fields, now=NOW)


def rejected(field: str, rule: str, **fields: Any) -> None:
    with pytest.raises(ValidationError) as info:
        make(**fields)
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)
    assert field in str(info.value)


# -- bytes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("가" * 45, 90),
        ("가" * 46, 92),
        ("a" * 91, 91),
        ("인증번호 [123456] 입니다", 24),
        ("😀", 4),
        ("é", 2),
        ("\n", 1),
    ],
)
def test_count_bytes_follows_the_carrier_rule(text: str, expected: int) -> None:
    assert count_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("가" * 45, MessageType.SMS),
        ("가" * 46, MessageType.LMS),
        ("a" * 90, MessageType.SMS),
        ("a" * 91, MessageType.LMS),
    ],
)
def test_type_omitted_upgrades_to_lms_above_90_bytes(text: str, expected: MessageType) -> None:
    message = make(text=text)
    assert message.type is expected
    assert message.type_inferred


def test_emoji_counts_four_bytes_toward_the_threshold() -> None:
    assert make(text="a" * 86 + "😀").type is MessageType.SMS  # 90 bytes
    assert make(text="a" * 87 + "😀").type is MessageType.LMS  # 91 bytes


def test_upgrade_is_decided_after_interpolation() -> None:
    # 10 bytes of template, 100 bytes once the variable is filled in: deciding before interpolation would pick SMS.
    message = make(text="#{body}", variables={"body": "x" * 100})
    assert message.text == "x" * 100
    assert message.type is MessageType.LMS
    # and the opposite: a long token that interpolates to a short text stays SMS
    assert make(text="#{" + "k" * 95 + "}", variables={"k" * 95: "hi"}).type is MessageType.SMS


def test_threshold_is_configurable() -> None:
    limits = ValidationLimits(auto_lms_bytes=20)
    assert normalize({"to": "01012345678", "text": "a" * 21}, limits=limits, now=NOW).type is MessageType.LMS


def test_nothing_is_dropped_when_type_is_omitted() -> None:
    at = NOW + timedelta(days=3)
    message = make(
        text="hello",
        scheduled_at=at,
        provider_options={"msgType": "GSMS"},
        custom_fields={"order": 7},
        country="82",
        sender="02-1234-5678",
    )
    assert message.scheduled_at == at
    assert message.provider_options == {"msgType": "GSMS"}
    assert message.custom_fields == {"order": "7"}
    assert message.country == "82"
    assert message.sender == "0212345678"


def test_media_without_type_makes_mms() -> None:
    message = make(text="photo", image_url="https://example.invalid/a.jpg")
    assert message.type is MessageType.MMS
    assert message.media is not None and message.media.ref == "https://example.invalid/a.jpg"


def test_explicit_sms_is_never_upgraded() -> None:
    rejected("text", "max_bytes", type="SMS", text="가" * 46)


@pytest.mark.parametrize("mtype", ["LMS", "MMS"])
def test_lms_and_mms_limit_is_2000_bytes(mtype: str) -> None:
    extra = {"image_url": "https://example.invalid/a.jpg"} if mtype == "MMS" else {}
    assert make(type=mtype, text="가" * 1000, **extra).type.value == mtype
    rejected("text", "max_bytes", type=mtype, text="가" * 1001, **extra)


def test_subject_limit_is_40_bytes() -> None:
    assert make(type="LMS", text="body", subject="가" * 20).subject == "가" * 20
    rejected("subject", "max_bytes", type="LMS", text="body", subject="가" * 21)


def test_subject_on_sms_is_rejected_and_on_omitted_type_means_lms() -> None:
    rejected("subject", "not_allowed", type="SMS", text="hi", subject="title")
    assert make(text="hi", subject="title").type is MessageType.LMS


# -- phone numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("010-1234-5678", "01012345678"),
        (" 010 1234 5678 ", "01012345678"),
        ("(02) 123-4567", "021234567"),
        ("010.1234.5678", "01012345678"),
        ("+82 10-1234-5678", "+821012345678"),
        ("+1 (415) 555-0100", "+14155550100"),
    ],
)
def test_phone_numbers_are_normalised(raw: str, normalized: str) -> None:
    assert make(to=raw, text="hi").to == normalized


@pytest.mark.parametrize("raw", ["", "   ", "12345", "010-1234-567a", "1012345678", "+0123456789", "0" * 14, "++8210"])
def test_invalid_phone_numbers_name_the_field(raw: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(to=raw, text="hi")
    assert info.value.field == "to"
    assert info.value.rule in {"phone_format", "required"}


def test_phone_must_be_a_string() -> None:
    rejected("to", "type", to=1012345678, text="hi")


def test_sender_is_normalised_and_checked() -> None:
    assert make(text="hi", sender="1588-1234").sender == "15881234"
    rejected("sender", "phone_format", text="hi", sender="12")


# -- per type ------------------------------------------------------------------------------------


def test_alimtalk_needs_a_template_code() -> None:
    rejected("template_id", "required", type="ALIMTALK", variables={"name": "kim"})
    message = make(type="ALIMTALK", template_id="TPL_1", variables={"name": "kim", "n": 3})
    assert message.variables == {"name": "kim", "n": "3"}


def test_alimtalk_failover_is_kept() -> None:
    message = make(
        type="ALIMTALK",
        template_id="T",
        failover={"enabled": True, "fallback_channel": "LMS", "fallback_content": "x"},
    )
    assert message.failover is not None
    assert (message.failover.channel, message.failover.content) == ("lms", "x")
    rejected("failover.channel", "enum", type="ALIMTALK", template_id="T", failover={"channel": "fax"})
    rejected("failover", "not_allowed", type="SMS", text="hi", failover=True)


@pytest.mark.parametrize("mtype", ["SMS", "LMS", "MMS", "FRIENDTALK", "VOICE", "RCS_SMS", "RCS_LMS", "RCS_MMS"])
def test_text_types_need_text(mtype: str) -> None:
    extra = {"image_url": "https://example.invalid/a.jpg"} if mtype == "MMS" else {}
    rejected("text", "required", type=mtype, **extra)
    rejected("text", "required", type=mtype, text="   ", **extra)


@pytest.mark.parametrize("mtype", ["NSA", "RCS_TPL", "RCS_ITPL", "RCS_LTPL"])
def test_template_types_need_a_template(mtype: str) -> None:
    rejected("template_id", "required", type=mtype)
    assert make(type=mtype, template_id="T").type.value == mtype


def test_mms_needs_an_image_and_sms_cannot_have_one() -> None:
    rejected("media", "required", type="MMS", text="hi")
    rejected("media", "not_allowed", type="SMS", text="hi", image_url="https://example.invalid/a.jpg")
    rejected("media.image", "one_of", type="MMS", text="hi", media={"image": {}})
    message = make(type="MMS", text="hi", media={"image": {"bytes": b"\x89PNG", "filename": "a.png"}})
    assert message.media is not None and message.media.data_b64 == "iVBORw=="


def test_fax_needs_files() -> None:
    rejected("fax.file_ids", "required", type="FAX")
    rejected("fax.file_urls", "type", type="FAX", fax={"file_urls": "https://x"})
    assert make(type="FAX", fax={"file_ids": ["F1"]}).fax == {"file_ids": ["F1"]}


def test_voice_options_are_checked() -> None:
    rejected("voice.voice_type", "enum", type="VOICE", text="hi", voice={"voice_type": "ROBOT"})
    rejected("voice.reply_range", "range", type="VOICE", text="hi", voice={"reply_range": 10})
    assert make(type="VOICE", text="hi", voice={"voice_type": "MALE", "reply_range": 9}).voice["voice_type"] == "MALE"


def test_buttons_are_checked() -> None:
    ok = make(type="FRIENDTALK", text="hi", buttons=[{"name": "open", "type": "WL", "url_mobile": "https://x"}])
    assert ok.buttons[0]["name"] == "open"
    rejected(
        "buttons[0].url_mobile",
        "required",
        type="FRIENDTALK",
        text="hi",
        buttons=[{"name": "a", "type": "WL"}],
    )
    rejected("buttons[0].type", "enum", type="FRIENDTALK", text="hi", buttons=[{"name": "a", "type": "XX"}])
    rejected("buttons", "max_items", type="FRIENDTALK", text="hi", buttons=[{"name": "a", "type": "BK"}] * 6)
    rejected("buttons", "not_allowed", type="SMS", text="hi", buttons=[{"name": "a", "type": "BK"}])


def test_unknown_type_and_unknown_field() -> None:
    rejected("type", "enum", type="TELEGRAM", text="hi")
    rejected("scheduled", "unknown_field", text="hi", scheduled="2030-01-01")


def test_scheduled_at_naive_is_seoul_and_past_is_rejected() -> None:
    message = make(text="hi", scheduled_at="2026-11-24 09:00:00")
    assert message.scheduled_at == datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
    rejected("scheduled_at", "in_past", text="hi", scheduled_at=NOW - timedelta(minutes=5))
    assert make(text="hi", scheduled_at=NOW - timedelta(seconds=30)).scheduled_at is not None  # clock skew
    rejected("scheduled_at", "datetime", text="hi", scheduled_at="next tuesday")


def test_k_msg_aliases_are_accepted() -> None:
    message = make(content="hi", **{"from": "0212345678", "templateId": None, "messageId": "abc-1"})
    assert (message.text, message.sender, message.id) == ("hi", "0212345678", "abc-1")


def test_interpolation_leaves_unknown_tokens_and_stringifies() -> None:
    assert interpolate("#{a} #{b} #{user.name}", {"a": "1", "user.name": "kim"}) == "1 #{b} kim"
    message = make(text="#{x}|#{y}|#{z}", variables={"x": None, "y": True, "z": 1.5})
    assert message.text == "|true|1.5"


def test_content_round_trips() -> None:
    message = make(
        type="ALIMTALK",
        template_id="T",
        variables={"a": "b"},
        failover={"content": "fallback"},
        scheduled_at=NOW + timedelta(hours=1),
        buttons=[{"name": "x", "type": "BK"}],
    )
    assert Message.from_content(message.content()) == message
    # Filled without the dataclass's __init__ (a bulk chunk's hot path): the same fields and types,
    # and each message gets its own mutable defaults.
    sms = make(text="hello")
    loaded = [Message.from_content(sms.content()) for _ in range(2)]
    assert loaded[0] == sms and vars(loaded[0]) == vars(sms)
    assert loaded[0].kakao == {} and loaded[0].kakao is not loaded[1].kakao
    assert type(loaded[0].type) is MessageType and type(loaded[0].priority) is Priority
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded[0].text = "changed"  # type: ignore[misc]
    # A stored key that is no field is still refused, as the dataclass refuses it,
    with pytest.raises(TypeError):
        Message.from_content({**sms.content(), "no_such_field": 1})
    # and so is one without a required field
    with pytest.raises(TypeError):
        Message.from_content({k: v for k, v in sms.content().items() if k != "to"})


def test_generated_ids_are_uuid7_in_creation_order() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [new_message_id() for _ in range(20_000)]
    after_ms = time.time_ns() // 1_000_000
    # Each is a UUIDv7 (RFC 9562 version and variant bits) written as 32 hex digits, like the ids before
    parsed = [uuid.UUID(hex=i) for i in ids]
    assert all(len(i) == 32 and i == u.hex for i, u in zip(ids, parsed, strict=True))
    assert {u.version for u in parsed} == {7} and {u.variant for u in parsed} == {uuid.RFC_4122}
    # carrying the creation time in milliseconds
    assert before_ms <= parsed[0].int >> 80 <= parsed[-1].int >> 80 <= after_ms
    # in the order they were made, to a quarter of a microsecond (what keeps a batch's rows together
    # in the primary key; the bits below that are random), and unique
    clock = [u.int >> 64 for u in parsed]
    assert clock == sorted(clock)
    assert len(set(ids)) == len(ids)
    # and a message built without an id gets one
    assert uuid.UUID(hex=make(text="hi").id).version == 7


def _random_part(message_id: str) -> int:
    return int(message_id, 16) & ((1 << 62) - 1)


def test_ids_made_at_once_by_threads_never_share_their_random_part() -> None:
    # The random bits are read in blocks and handed out one word per id: eight threads taking ids
    # at the same time, across many refills of the block, never get the same word.
    made: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(made))

    def take(out: list[str]) -> None:
        start.wait()
        out.extend(new_message_id() for _ in range(5_000))

    threads = [threading.Thread(target=take, args=(out,)) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parts = [_random_part(i) for out in made for i in out]
    assert len(parts) == 40_000 and len(set(parts)) == len(parts)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists only on POSIX systems, not on Windows")
def test_a_forked_child_does_not_repeat_its_parents_random_words() -> None:
    # A block read before the fork is in both processes' memory: a child that used it would make
    # the parent's next ids (same millisecond, same random part). The child starts with none.
    new_message_id()  # the parent now holds a block with words left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        os.write(write, ",".join(new_message_id() for _ in range(200)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [new_message_id() for _ in range(200)]
    assert len(child) == 200
    assert not {_random_part(i) for i in child} & {_random_part(i) for i in parent}
