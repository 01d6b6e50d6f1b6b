"""Property-based fuzzing of the producer API: nothing lost, nothing duplicated.

Every generated input must end in exactly one of two ways:

* accepted: one row in the system of record and exactly one published task id (none for a
  scheduled message), and the stored content can be rebuilt by a worker (``Message.from_content``);
* rejected: a :class:`kmsg_worker.ValidationError` whose ``field`` names a real field path and whose
  ``rule`` is set, with no row written and no task published.

Any other exception is a bug. Most examples run on the embedded SQLite for speed; a smaller run
goes through PostgreSQL, whose JSONB and text columns are stricter (no NUL, no lone surrogates).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import string
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy import text as sql

from kmsg_worker import ValidationError
from kmsg_worker.errors import BatchValidationError, IdempotencyConflictError, KmsgError, _storable
from kmsg_worker.message import Message, MessageType, count_bytes
from kmsg_worker.message.validate import _ALIASES, _KNOWN
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.models import MessageRow
from tests.conftest import RecordingDispatcher, truncate

# -- harness -----------------------------------------------------------------------------------------

#: Roots a ValidationError.field may start with: the model's fields, their aliases, and the
#: containers the producer itself names.
ROOTS = set(_KNOWN) | set(_ALIASES) | {"message", "row", "rows", "defaults"}
_ID_KEYS = ("id", "message_id", "messageId")
_SEQ = itertools.count()
_DOMESTIC = re.compile(r"0[0-9]{8,10}", re.ASCII)
_INTERNATIONAL = re.compile(r"\+[1-9][0-9]{6,14}", re.ASCII)


def fuzz(max_examples: int) -> settings:
    """The active profile (CI derandomizes) with this file's budget and without the slow-data checks."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


class Harness:
    """A producer on one runtime, with the bookkeeping to check each example."""

    def __init__(self, rt: Runtime, dispatcher: RecordingDispatcher) -> None:
        self.rt = rt
        self.dispatcher = dispatcher
        self.kmsg = KMsg(runtime=rt)
        self.accepted = 0
        self.rejected = 0

    def rows(self) -> int:
        """Rows ever written (nothing is deleted here); on SQLite max(rowid), which unlike count(*) is O(log n)."""
        if self.rt.store.is_postgres:
            with self.rt.store.sessions() as s:
                return int(s.scalar(select(func.count()).select_from(MessageRow)) or 0)
        with self.rt.store.engine.connect() as conn:
            return int(conn.execute(sql("SELECT max(rowid) FROM kmsg_messages")).scalar() or 0)

    def send(self, raw: Mapping[Any, Any]) -> Message | KmsgError:
        """Send ``raw`` and check the outcome; return the stored message or the error."""
        rows, sends, chunks = self.rows(), len(self.dispatcher.sends), len(self.dispatcher.chunks)
        # Keys repeat across examples: the same request is answered with its first message, another
        # request under a used key is refused. Both are documented outcomes, never a new row.
        keyed = any(raw.get(k) is not None for k in ("idempotency_key", "idempotencyKey"))
        try:
            receipt = self.kmsg.send(raw)
        except (ValidationError, IdempotencyConflictError) as exc:
            if isinstance(exc, ValidationError):
                check_error(exc, raw)
            else:
                assert keyed, exc
            assert self.rows() == rows, f"a rejected input left a row ({exc})"
            assert len(self.dispatcher.sends) == sends, f"a rejected input published a task ({exc})"
            self.rejected += 1
            return exc
        if receipt.duplicate:
            assert keyed
            assert self.rows() == rows and len(self.dispatcher.sends) == sends, "a repeat must add nothing"
            return check_stored(self.rt, receipt.message_id)
        assert self.rows() == rows + 1, "an accepted message must be exactly one row"
        published = [m for m, _, _ in self.dispatcher.sends[sends:]]
        if receipt.status == "queued":
            assert published == [receipt.message_id], "an accepted message must be exactly one task"
        else:
            assert receipt.status == "scheduled" and published == []
        assert len(self.dispatcher.chunks) == chunks
        self.accepted += 1
        return check_stored(self.rt, receipt.message_id)


def check_error(exc: ValidationError, raw: Mapping[Any, Any] | None = None) -> None:
    assert type(exc.rule) is str and exc.rule, exc
    assert type(exc.field) is str, exc
    given_keys = {_storable(k) if isinstance(k, str) else repr(k) for k in (raw or {})}
    if exc.rule == "unknown_field" and exc.field in given_keys:
        return  # a top-level unknown key is named as given (even "")
    assert exc.field, exc
    root = re.split(r"[.\[]", exc.field, maxsplit=1)[0]
    assert root in ROOTS, f"{exc.field!r} is not a field path ({exc})"


def check_stored(rt: Runtime, message_id: str) -> Message:
    """The row a worker will read: valid recipient, limits kept, content rebuildable."""
    row = rt.store.get(message_id)
    assert row is not None
    message = Message.from_content(row.content)
    assert message.id == message_id == row.id
    assert message.content() == row.content, "stored content must round-trip"
    assert row.recipient == message.to
    assert _DOMESTIC.fullmatch(message.to) or _INTERNATIONAL.fullmatch(message.to), message.to
    if message.sender is not None:
        assert message.sender.lstrip("+").isascii() and message.sender.lstrip("+").isdigit(), message.sender
    limits = rt.settings.limits
    text_bytes = count_bytes(message.text or "")
    if message.type in (MessageType.SMS, MessageType.RCS_SMS):
        assert text_bytes <= limits.sms_max_bytes
    if message.type in (MessageType.LMS, MessageType.MMS, MessageType.RCS_LMS, MessageType.RCS_MMS):
        assert text_bytes <= limits.lms_max_bytes
    if message.subject is not None:
        assert count_bytes(message.subject) <= limits.subject_max_bytes
    return message


def _runtime(url: str, var_dir: Path) -> tuple[Runtime, RecordingDispatcher]:
    dispatcher = RecordingDispatcher()
    env = {"KMSG_VAR_DIR": str(var_dir), "KMSG_DATABASE_URL": url}
    return Runtime(Settings.from_env(env), dispatcher=dispatcher), dispatcher


@pytest.fixture(scope="module")
def sqlite_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    path = tmp_path_factory.mktemp("fuzz")
    rt, dispatcher = _runtime(f"sqlite:///{path / 'fuzz.sqlite'}", path / "var")
    yield Harness(rt, dispatcher)
    rt.close()


@pytest.fixture(scope="module")
def pg_harness(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    truncate(pg_url)
    rt, dispatcher = _runtime(pg_url, tmp_path_factory.mktemp("fuzz-pg"))
    yield Harness(rt, dispatcher)
    rt.close()
    truncate(pg_url)


# -- strategies --------------------------------------------------------------------------------------

#: Characters that have broken text handling somewhere: NUL, lone surrogates, emoji (surrogate
#: pairs in UTF-16), RTL marks and overrides, zero-width and BOM, Hangul, template braces.
SPECIAL = [
    "\x00",
    "\ud800",
    "\udfff",
    "\ud83d",
    "😀",
    "👩‍👩‍👧",
    "\u202e",
    "\u200f",
    "ا",
    "\u200b",
    "\ufeff",
    "가",
    "\u3000",
    "#{",
    "}",
    "#{name}",
    "\n",
    "\r\n",
    "\t",
    "０",
    "٣",
]
any_char = st.characters(exclude_categories=())  # includes lone surrogates (category Cs)
wild_text = st.one_of(
    st.text(any_char, max_size=40),
    st.lists(st.sampled_from(SPECIAL + list(string.printable)), max_size=80).map("".join),
    st.text(max_size=20),
)
#: Keys of nested junk: cheaper than wild_text, still with the awkward characters.
junk_key = st.one_of(st.text(max_size=6), st.sampled_from(SPECIAL), st.integers(), st.none())


@st.composite
def huge_text(draw: st.DrawFn) -> str:
    """Up to ~50 KB: a drawn piece repeated, so generation stays cheap."""
    piece = "".join(draw(st.lists(st.sampled_from(["a", "가", "😀", "\x00", " ", "#{name}"]), min_size=1, max_size=4)))
    return piece * draw(st.integers(1, 50_000 // (len(piece.encode("utf-8", "surrogatepass")) or 1)))


@st.composite
def sized_text(draw: st.DrawFn, targets: tuple[int, ...] = (90, 2000, 40)) -> str:
    """Text whose carrier byte count lies within a few bytes of a limit (ASCII 1, Hangul 2, emoji 4)."""
    target = draw(st.sampled_from(targets)) + draw(st.integers(-4, 4))
    emoji = draw(st.integers(0, max(0, target // 4)))
    hangul = draw(st.integers(0, max(0, (target - 4 * emoji) // 2)))
    ascii_count = max(0, target - 4 * emoji - 2 * hangul)
    parts = ["😀"] * emoji + ["가"] * hangul + ["a"] * ascii_count
    random.Random(draw(st.integers(0, 2**32))).shuffle(parts)  # one draw, not one per element
    return "".join(parts)


texts = st.one_of(wild_text, huge_text(), sized_text())

leaf_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(4301, 4400).map(lambda n: 10**n),  # str() refuses more than 4300 digits
    st.floats(),
    st.decimals(allow_nan=False, places=2, max_value=10**6, min_value=-(10**6)),
    wild_text,
    st.binary(max_size=16),
    st.builds(bytearray, st.binary(max_size=4)),
    st.datetimes(),
    st.dates(),
)
junk = st.recursive(
    leaf_junk,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(junk_key, inner, max_size=3),
    ),
    max_leaves=6,
)


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"k": [value]}
    return value


phone_digits = st.text(st.sampled_from("0123456789"), min_size=0, max_size=18)


@st.composite
def odd_phone(draw: st.DrawFn) -> str:
    """Plausible, half-plausible and absurd phone numbers."""
    kind = draw(st.integers(0, 5))
    if kind == 0:  # digits split by random separators
        digits = draw(phone_digits)
        rnd = random.Random(draw(st.integers(0, 2**32)))  # one draw for all the separators
        seps = ["", "", "-", " ", ".", "(", ")", "  ", "\t", "\u3000", "/", "_", "+"]
        out = "".join(ch + rnd.choice(seps) for ch in digits)
        return draw(st.sampled_from(["", "+", "+82", "+82 ", "82", "0"])) + out
    if kind == 1:  # Korean mobile, several spellings
        mid, last = draw(st.integers(0, 9999)), draw(st.integers(0, 9999))
        return draw(
            st.sampled_from(
                [
                    f"010-{mid:04d}-{last:04d}",
                    f"+82 10 {mid:04d} {last:04d}",
                    f"+82-10-{mid:04d}-{last:04d}",
                    f"(010) {mid:04d}.{last:04d}",
                    f"+8210{mid:04d}{last:04d}",
                    f"01{mid:04d}{last:04d}",
                    f"010{mid:04d}{last:04d}0",
                ]
            )
        )
    if kind == 2:  # non-ASCII digits that \d would match
        return draw(st.sampled_from(["0١٠١٢٣٤٥٦٧٨", "０１０１２３４５６７８", "0१०१२३४५६७८", "010１２３４５６７８"]))
    if kind == 3:  # trailing or embedded control characters
        return "01012345678" + draw(st.sampled_from(["\n", "\x00", "\r", "\u202e", "x", "#"]))
    if kind == 4:
        return draw(wild_text)
    return draw(st.text(st.sampled_from("0123456789+-() "), max_size=40))


VALID_BASES: list[dict[str, Any]] = [
    {"to": "010-1234-5678", "text": "hello"},
    {"to": "01012345678", "type": "LMS", "subject": "제목", "text": "긴 본문입니다"},
    {
        "to": "+821012345678",
        "type": "ALIMTALK",
        "template_id": "TPL001",
        "text": "#{name}님 안내",
        "variables": {"name": "홍길동"},
        "buttons": [{"name": "열기", "type": "WL", "url_mobile": "https://example.com"}],
        "failover": {"content": "대체 문자"},
    },
    {"to": "0212345678", "type": "MMS", "text": "image", "image_url": "https://example.com/a.jpg"},
    {"to": "01012345678", "type": "FAX", "fax": {"file_ids": ["file-1"]}},
    {"to": "01012345678", "type": "VOICE", "text": "음성 안내", "voice": {"voice_type": "MALE", "reply_range": 3}},
    {"to": "01012345678", "type": "FRIENDTALK", "text": "친구톡", "kakao": {"profile_id": "pf"}},
    {"to": "01012345678", "type": "NSA", "template_id": "n1", "naver": {"talk_id": "t"}},
    {"to": "01012345678", "type": "RCS_SMS", "text": "rcs"},
    {"to": "01012345678", "text": "later", "scheduled_at": "2099-01-01T09:00:00"},
    {"from": "1588-1234", "to": "010 1234 5678", "content": "alias names", "providerOptions": {"msgType": "GSMS"}},
]
#: Every field name a caller may use, plus near-misses.
FIELD_NAMES = sorted(_KNOWN | set(_ALIASES)) + ["scheduled", "TO", "", "text ", "variables.name"]


def _values_for(name: str) -> st.SearchStrategy[Any]:
    """Junk of every type, and values of roughly the right shape for the field."""
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "to": odd_phone(),
        "sender": odd_phone(),
        "from": odd_phone(),
        "text": texts,
        "content": texts,
        "subject": st.one_of(wild_text, sized_text((40,))),
        "type": st.one_of(st.sampled_from([t.value for t in MessageType] + ["sms", "lms", "Sms", "ß", ""]), wild_text),
        "priority": st.sampled_from(["high", "normal", "bulk", "HIGH", "", "urgent"]),
        "scheduled_at": st.one_of(
            st.datetimes(),
            st.datetimes(timezones=st.builds(timezone, st.timedeltas(-timedelta(hours=23), timedelta(hours=23)))),
            st.datetimes().map(lambda d: d.isoformat()),
            st.sampled_from(
                ["2099-01-01", "2099-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00+14:00"]
            ),
            st.dates(),
        ),
        "variables": st.dictionaries(junk_key, st.one_of(leaf_junk, junk), max_size=5),
        "buttons": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "name": st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL), leaf_junk),
                        "type": st.one_of(st.sampled_from(["WL", "AL", "DS", "BK", "wl"]), leaf_junk),
                    },
                    optional={"url_mobile": leaf_junk, "url_pc": leaf_junk, "chat_extra": junk},
                ),
                st.dictionaries(junk_key, leaf_junk, max_size=3),
                leaf_junk,
            ),
            max_size=6,
        ),
        "failover": st.one_of(
            st.booleans(),
            st.dictionaries(
                st.one_of(
                    st.sampled_from(["enabled", "channel", "content", "title", "fallback_content"]), st.integers()
                ),
                junk,
                max_size=4,
            ),
        ),
        "media": st.one_of(
            st.fixed_dictionaries(
                {"image": st.dictionaries(st.sampled_from(["ref", "data_b64", "bytes", "filename"]), junk)}
            ),
            st.dictionaries(st.sampled_from(["ref", "data_b64", "bytes", "image"]), junk, max_size=3),
        ),
        "voice": st.dictionaries(st.sampled_from(["voice_type", "reply_range", "x"]), junk, max_size=3),
        "fax": st.dictionaries(st.sampled_from(["file_ids", "file_urls"]), junk, max_size=2),
        "id": st.one_of(wild_text, st.text(st.sampled_from(string.ascii_letters + ":-_.\n"), min_size=60, max_size=70)),
        "idempotency_key": st.one_of(wild_text, st.text(st.sampled_from(string.printable), max_size=210)),
        "provider_id": st.sampled_from(["mock", "solapi", "nope", "MOCK", ""]),
    }
    for nested in ("kakao", "naver", "rcs", "provider_options", "providerOptions", "custom_fields", "customFields"):
        plausible[nested] = st.one_of(
            st.dictionaries(st.one_of(wild_text, st.integers()), junk, max_size=5), st.builds(deep, st.integers(1, 80))
        )
    choices = [junk]
    if name in plausible:
        choices.append(plausible[name])
    return st.one_of(*choices)


#: Built once: building strategies per draw costs more than drawing from them.
FIELD_VALUES = {name: _values_for(name) for name in FIELD_NAMES}


@st.composite
def fuzzed_message(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid message with one to four fields replaced, added or removed."""
    raw: dict[Any, Any] = dict(draw(st.sampled_from(VALID_BASES)))
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(FIELD_NAMES))
        if draw(st.integers(0, 9)) == 0:
            raw.pop(name, None)
        else:
            raw[name] = draw(FIELD_VALUES[name])
    if draw(st.integers(0, 19)) == 0:
        raw[draw(st.one_of(st.integers(), st.none(), st.tuples(st.integers())))] = "non-string key"
    return raw


# -- single sends ------------------------------------------------------------------------------------


@fuzz(3500)
@given(raw=fuzzed_message())
@example(raw={"to": "01012345678", "text": "hi\ud800"})  # lone surrogate: crashed the JSON writer
@example(raw={"to": "01012345678", "text": "hi", "provider_options": {"a": b"x"}})  # bytes: not JSON
@example(raw={"to": "01012345678", "text": "hi", "kakao": {"a": {1, 2}}})  # set: not JSON
@example(raw={"to": "01012345678", "text": "hi", "provider_options": {"a": 2**70}})  # beyond 64 bits
@example(raw={"to": "01012345678", "text": "hi", "provider_options": deep(100)})  # orjson recursion limit
@example(raw={"to": "01012345678", "text": "hi", "variables": {"\ud800": "x"}})  # surrogate in a key
@example(raw={"to": "01012345678", "text": "hi", "variables": {"n": 10**5000}})  # str(int) limit
@example(raw={"to": "01012345678", "text": "hi", "custom_fields": {"n": 10**5000}})
@example(raw={"to": "0١٠١٢٣٤٥٦٧٨", "text": "hi"})  # Arabic-Indic digits passed the phone check
@example(raw={"to": "01012345678", "text": "hi", "id": "abc\n"})  # "$" matched before a newline
@example(raw={"to": "01012345678", "text": "hi", "idempotency_key": "key\n"})
@example(raw={"to": "01012345678", "type": "ALIMTALK", "template_id": "T", "failover": {1: "a", "x": "b"}})
@example(raw={"to": "01012345678", "type": "ALIMTALK", "template_id": "T", "buttons": [{1: "a", "x": "b"}]})
@example(raw={"to": "01012345678", "type": "ALIMTALK", "template_id": "T", "buttons": [{"name": "a", "type": []}]})
@example(raw={"to": "01012345678", "type": "VOICE", "text": "hi", "voice": {"voice_type": []}})
@example(raw={"to": "01012345678", "type": "VOICE", "text": "hi", "voice": {"reply_range": True}})
@example(raw={"to": "01012345678", "text": "hi", "scheduled_at": "9999-12-31T23:59:59-12:00"})  # overflow
@example(raw={"to": "01012345678", "text": "hi", "scheduled_at": datetime.min})
@example(raw={"to": "01012345678", "text": "hi", "priority": 0})  # falsy junk silently became "normal"
@example(raw={"to": "01012345678", "text": "hi", "sender": 0})  # falsy junk silently became the default
@example(raw={"to": "01012345678", "type": "NSA", "template_id": "n1", "subject": "x" * 41})  # subject unchecked
def test_send_accepts_or_rejects_every_input_cleanly(sqlite_harness: Harness, raw: dict[Any, Any]) -> None:
    outcome = sqlite_harness.send(raw)
    if isinstance(outcome, Message):
        # What a worker reads is plain storable text on every backend: UTF-8, no NUL.
        stored = json.dumps(outcome.content(), ensure_ascii=False)
        stored.encode("utf-8")  # raises on an unpaired surrogate
        assert "\\u0000" not in stored


def _expect_rejected(outcome: Message | KmsgError, field: str, rule: str | None = None) -> None:
    assert isinstance(outcome, ValidationError), f"accepted, expected {field} [{rule}]"
    assert outcome.field.startswith(field), outcome
    if rule is not None:
        assert outcome.rule == rule, outcome


class Pair(NamedTuple):
    x: int
    y: int


def test_known_bad_inputs_name_the_field_and_rule(sqlite_harness: Harness) -> None:
    send = sqlite_harness.send
    ok = {"to": "01012345678", "text": "hi"}
    _expect_rejected(send({**ok, "text": "hi\x00there"}), "text", "invalid_character")
    _expect_rejected(send({**ok, "text": "hi\ud800"}), "text", "invalid_character")
    _expect_rejected(send({**ok, "tenant": "a\x00"}), "tenant", "invalid_character")
    _expect_rejected(send({**ok, "provider_options": {"a": b"x"}}), "provider_options.a", "type")
    _expect_rejected(send({**ok, "kakao": {"a": [1, {2, 3}]}}), "kakao.a[1]", "type")
    _expect_rejected(send({**ok, "provider_options": {"a": 2**70}}), "provider_options.a", "range")
    _expect_rejected(send({**ok, "provider_options": {"a": float("nan")}}), "provider_options.a", "range")
    _expect_rejected(send({**ok, "provider_options": deep(300)}), "provider_options", "max_depth")
    _expect_rejected(send({**ok, "provider_options": {"a": {1: 2}}}), "provider_options.a", "type")
    # Mappings and tuples the JSON writer cannot take (it takes dict and list subclasses)
    _expect_rejected(send({**ok, "kakao": {"a": MappingProxyType({"b": 1})}}), "kakao.a", "type")
    _expect_rejected(send({**ok, "kakao": {"a": Pair(1, 2)}}), "kakao.a", "type")
    assert isinstance(send({**ok, "kakao": {"a": OrderedDict(b=1)}}), Message)
    _expect_rejected(send({**ok, "variables": {"n": 10**5000}}), "variables.n", "range")
    _expect_rejected(send({**ok, "to": "0١٠١٢٣٤٥٦٧٨"}), "to", "phone_format")
    _expect_rejected(send({**ok, "to": "０１０１２３４５６７８"}), "to", "phone_format")
    _expect_rejected(send({**ok, "id": "abc\n"}), "id", "format")
    _expect_rejected(send({**ok, "idempotency_key": "key\n"}), "idempotency_key", "format")
    _expect_rejected(send({**ok, "priority": 0}), "priority")
    _expect_rejected(send({**ok, "sender": 0}), "sender", "type")
    _expect_rejected(send({**ok, "scheduled_at": "9999-12-31T23:59:59-12:00"}), "scheduled_at", "range")
    alim = {**ok, "type": "ALIMTALK", "template_id": "T"}
    _expect_rejected(send({**alim, "failover": {1: "a", "x": "b"}}), "failover", "unknown_field")
    _expect_rejected(send({**alim, "buttons": [{"name": "a", "type": []}]}), "buttons[0].type", "enum")
    _expect_rejected(send({**ok, "type": "NSA", "template_id": "n", "subject": "s"}), "subject", "not_allowed")
    _expect_rejected(send({**ok, "type": "FAX", "fax": {"file_ids": ["f"]}, "subject": "s"}), "subject", "not_allowed")
    voice = {**ok, "type": "VOICE"}
    _expect_rejected(send({**voice, "voice": {"voice_type": []}}), "voice.voice_type", "enum")
    _expect_rejected(send({**voice, "voice": {"reply_range": True}}), "voice.reply_range", "range")
    # ... and the ordinary forms still pass
    for good in (ok, {**ok, "priority": "high"}, {**ok, "sender": "1588-1234"}, {**ok, "kakao": {"a": [1, "x", None]}}):
        assert isinstance(send(good), Message)


def test_a_non_mapping_message_is_a_validation_error(sqlite_harness: Harness) -> None:
    for junk_message in ([("to", "01012345678")], "to=01012345678", 42, b"x"):
        with pytest.raises(ValidationError) as info:
            sqlite_harness.kmsg.send(junk_message)  # type: ignore[arg-type]
        assert info.value.field == "message" and info.value.rule == "type"


def test_a_reused_message_id_is_a_validation_error(sqlite_harness: Harness) -> None:
    first = sqlite_harness.send({"to": "01012345678", "text": "one", "id": "fuzz-reused-id"})
    assert isinstance(first, Message)
    again = sqlite_harness.send({"to": "01012345678", "text": "two", "id": "fuzz-reused-id"})
    _expect_rejected(again, "id", "duplicate")
    assert check_stored(sqlite_harness.rt, "fuzz-reused-id").text == "one"


@fuzz(2000)
@given(
    text=st.one_of(sized_text((90, 2000)), huge_text(), wild_text),
    subject=st.one_of(st.none(), sized_text((40,)), wild_text),
    mtype=st.sampled_from([None, "SMS", "LMS", "RCS_SMS", "ALIMTALK"]),
)
def test_byte_limits_hold_exactly_at_the_boundaries(
    sqlite_harness: Harness, text: str, subject: str | None, mtype: str | None
) -> None:
    raw: dict[str, Any] = {"to": "010-2000-0000", "text": text}
    if subject is not None:
        raw["subject"] = subject
    if mtype is not None:
        raw["type"] = mtype
    if mtype == "ALIMTALK":
        raw["template_id"] = "T1"
    outcome = sqlite_harness.send(raw)
    limits = sqlite_harness.rt.settings.limits
    nbytes = count_bytes(text)
    bad_chars = "\x00" in text + (subject or "") or not _utf8(text + (subject or ""))
    if isinstance(outcome, Message):
        assert not bad_chars
        if mtype is None:
            expected = (
                MessageType.LMS if subject and subject.strip() or nbytes > limits.auto_lms_bytes else MessageType.SMS
            )
            assert outcome.type is expected
        return
    assert isinstance(outcome, ValidationError)
    # Rejected: never a valid SMS/LMS, and always for a reason the input really has.
    clean_subject = subject is None or not subject.strip() or count_bytes(subject) <= limits.subject_max_bytes
    if not bad_chars and text.strip() and len(text) <= 20_000 and clean_subject:
        if mtype in (None, "LMS") and nbytes <= limits.lms_max_bytes:
            raise AssertionError(f"a valid LMS was rejected: {outcome}")
        if mtype == "SMS" and nbytes <= limits.sms_max_bytes and not (subject and subject.strip()):
            raise AssertionError(f"a valid SMS was rejected: {outcome}")
    if outcome.field == "text" and outcome.rule == "max_bytes":
        limit = limits.sms_max_bytes if outcome.detail.startswith(("SMS", "RCS_SMS")) else limits.lms_max_bytes
        assert nbytes > limit
    elif outcome.field == "subject" and outcome.rule == "max_bytes":
        assert subject is not None and count_bytes(subject) > limits.subject_max_bytes
    else:
        assert outcome.rule in {"invalid_character", "required", "not_allowed", "max_length"}, outcome


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@fuzz(2500)
@given(to=odd_phone(), sender=st.one_of(st.none(), odd_phone()))
@example(to="0١٠١٢٣٤٥٦٧٨", sender=None)
@example(to="01012345678", sender="１５８８１２３４")
def test_phone_numbers_are_normalised_to_ascii_or_rejected(
    sqlite_harness: Harness, to: str, sender: str | None
) -> None:
    raw: dict[str, Any] = {"to": to, "text": "phone fuzz"}
    if sender is not None:
        raw["sender"] = sender
    outcome = sqlite_harness.send(raw)
    stripped = re.sub(r"[\s\-().]", "", to)
    if isinstance(outcome, Message):
        assert outcome.to == stripped
    else:
        assert isinstance(outcome, ValidationError)
        assert outcome.field in {"to", "sender"}
        assert outcome.rule in {"phone_format", "required", "type"}
        if outcome.field == "to":
            assert not (_DOMESTIC.fullmatch(stripped) or _INTERNATIONAL.fullmatch(stripped))


# -- bulk --------------------------------------------------------------------------------------------

good_row = st.fixed_dictionaries(
    {"to": st.integers(0, 99_999_999).map(lambda n: f"010{n:08d}")},
    optional={
        "variables": st.fixed_dictionaries({"name": st.text(string.ascii_letters, max_size=8)}),
        "custom_fields": st.fixed_dictionaries({"ref": st.integers(0, 99)}),
    },
)
junk_row = st.one_of(
    junk,
    fuzzed_message(),
    st.fixed_dictionaries({"to": st.one_of(odd_phone(), junk)}, optional={"variables": junk, "id": junk}),
    st.fixed_dictionaries(
        {
            "to": st.just("01012345678"),
            "variables": st.dictionaries(st.one_of(wild_text, st.integers()), junk, max_size=3),
        },
        optional={"custom_fields": junk},
    ),
    st.fixed_dictionaries({"to": st.just("01012345678"), "provider_id": st.sampled_from(["nope", "mock", "solapi"])}),
)
bulk_defaults = st.one_of(
    st.just({"text": "#{name}님 안녕하세요", "sender": "0212345678"}),
    st.just({"text": "#{name} sale", "type": "SMS", "variables": {"name": "x"}}),
    st.just({"type": "LMS", "subject": "s", "text": "#{name} " * 20}),
    st.fixed_dictionaries({"text": texts}, optional={"type": FIELD_VALUES["type"], "variables": junk}),
    st.dictionaries(st.sampled_from(FIELD_NAMES), junk, max_size=3),
)


def _row_ok(h: Harness, defaults: Mapping[str, Any], row: Any) -> bool:
    """The single-send oracle: would ``send`` accept this row merged over the defaults?"""
    if not isinstance(row, Mapping):
        return False
    try:
        message = h.kmsg.validate({"priority": "bulk", **defaults, **row})
        h.rt.router.route(message)
    except ValidationError:
        return False
    return True


def _expected(h: Harness, defaults: Mapping[str, Any], rows: list[Any]) -> list[bool]:
    """Per row: valid on its own, and its caller-given id (if any) neither repeated nor stored."""
    seen: set[str] = set()
    out = []
    for row in rows:
        ok = _row_ok(h, defaults, row)
        if ok:
            merged = {**defaults, **row}
            given = next((merged[k] for k in _ID_KEYS if merged.get(k) is not None), None)
            if given is not None:
                ok = given not in seen and h.rt.store.get(given) is None
                seen.add(given)
        out.append(ok)
    return out


def _unique_ids(rows: list[Any]) -> list[Any]:
    """Make string ids unique per example (repeats inside the batch are kept: they are a case)."""
    tag = next(_SEQ)
    return [
        {**row, "id": f"{row['id'][:20]}-{tag}"} if isinstance(row, dict) and isinstance(row.get("id"), str) else row
        for row in rows
    ]


def _batch_rows(h: Harness, batch_id: str) -> list[MessageRow]:
    with h.rt.store.sessions() as s:
        return list(s.scalars(select(MessageRow).where(MessageRow.batch_id == batch_id)))


def _check_batch(h: Harness, receipt: Any, rows: list[Any], defaults: Mapping[str, Any], expected: list[bool]) -> None:
    invalid_rows = [e.row for e in receipt.invalid]
    assert invalid_rows == [i + 1 for i, ok in enumerate(expected) if not ok], receipt.invalid
    for error in receipt.invalid:
        row = rows[error.row - 1]
        check_error(
            ValidationError(error.field, error.rule, error.message),
            {**defaults, **row} if isinstance(row, Mapping) else None,
        )
    assert len(receipt.message_ids) == len(set(receipt.message_ids)) == expected.count(True)
    stored = _batch_rows(h, receipt.batch_id)
    assert sorted(r.id for r in stored) == sorted(receipt.message_ids)
    for r in stored:
        check_stored(h.rt, r.id)
    chunks = {c for b, c, _ in h.dispatcher.chunks if b == receipt.batch_id}
    assert chunks == {r.chunk for r in stored if r.status == "queued"}, "one task per chunk that has rows to send"


@fuzz(600)
@given(rows=st.lists(st.one_of(good_row, junk_row), min_size=1, max_size=12), defaults=bulk_defaults)
@example(rows=[{"to": "01012345678"}], defaults={"text": "#{name}", "variables": [1, 2]})  # AttributeError
@example(rows=[{"to": "01012345678", "variables": 0}], defaults={"text": "hi"})  # fast path took junk
@example(rows=[{"to": "01012345678", "variables": {1: "x"}}], defaults={"text": "hi"})
@example(rows=[{"to": "01012345678", "id": "x" * 100}], defaults={"text": "hi"})  # id unchecked
@example(rows=[{"to": "01012345678", "provider_id": "nope"}, {"to": "01012345678"}], defaults={"text": "hi"})
@example(rows=[{"to": "01012345678", "id": "same"}, {"to": "01012345679", "id": "same"}], defaults={"text": "hi"})
@example(rows=[{"to": "01012345678", "variables": {"name": "\x00"}}], defaults={"text": "#{name}"})
@example(rows=[{"to": "01012345678"}, {"to": "01012345679"}], defaults={"text": "hi", "id": "shared"})
@example(rows=[{"to": "01012345678"}], defaults={1: "x", "text": "hi"})  # sort_keys on mixed keys
@example(rows=[{"\ud800": None}], defaults={"text": "hi"})  # the error named the key: invalid_rows JSON failed
@example(rows=[{"to": "01012345678"}], defaults={"text": "hi", "variables": {"": 1, 0: 2}})  # digest sort_keys
def test_send_many_skip_stores_exactly_the_valid_rows(
    sqlite_harness: Harness, rows: list[Any], defaults: dict[Any, Any]
) -> None:
    h = sqlite_harness
    rows = _unique_ids(rows)
    sends = len(h.dispatcher.sends)
    if any(not isinstance(k, str) for k in defaults):
        with pytest.raises(ValidationError) as info:
            h.kmsg.send_many(rows, defaults=defaults, on_invalid="skip")
        check_error(info.value, defaults)
        return
    expected = _expected(h, defaults, rows)
    before = h.rows()
    receipt = h.kmsg.send_many(rows, defaults=defaults, on_invalid="skip")
    assert h.rows() == before + len(receipt.message_ids)
    _check_batch(h, receipt, rows, defaults, expected)
    assert len(h.dispatcher.sends) == sends, "a batch publishes chunks, never single sends"


@fuzz(500)
@given(rows=st.lists(st.one_of(good_row, good_row, junk_row), min_size=1, max_size=10), defaults=bulk_defaults)
@example(rows=[{"to": "01012345678", "id": "dup"}, {"to": "01012345679", "id": "dup"}], defaults={"text": "hi"})
def test_send_many_reject_stores_nothing_when_a_row_is_invalid(
    sqlite_harness: Harness, rows: list[Any], defaults: dict[str, Any]
) -> None:
    h = sqlite_harness
    rows = _unique_ids(rows)
    expected = _expected(h, defaults, rows)
    before, chunks = h.rows(), len(h.dispatcher.chunks)
    try:
        receipt = h.kmsg.send_many(rows, defaults=defaults, on_invalid="reject")
    except BatchValidationError as exc:
        assert not all(expected)
        assert [e.row for e in exc.errors] == [i + 1 for i, ok in enumerate(expected) if not ok]
        check_error(exc)
        assert h.rows() == before, "a rejected batch must store nothing"
        assert len(h.dispatcher.chunks) == chunks, "a rejected batch must publish nothing"
        return
    assert all(expected)
    assert h.rows() == before + len(rows)
    _check_batch(h, receipt, rows, defaults, expected)


def test_send_many_reports_ids_that_are_already_stored(sqlite_harness: Harness) -> None:
    h = sqlite_harness
    assert isinstance(h.send({"to": "01012345678", "text": "first", "id": "fuzz-stored-id"}), Message)
    rows = [{"to": "01012345678", "id": "fuzz-stored-id"}, {"to": "01012345679", "id": "fuzz-new-id"}]
    with pytest.raises(BatchValidationError) as info:
        h.kmsg.send_many(rows, defaults={"text": "hi"}, on_invalid="reject")
    assert [(e.row, e.field, e.rule) for e in info.value.errors] == [(1, "id", "duplicate")]
    assert h.rt.store.get("fuzz-new-id") is None
    receipt = h.kmsg.send_many(rows, defaults={"text": "hi"}, on_invalid="skip")
    assert [(e.row, e.field, e.rule) for e in receipt.invalid] == [(1, "id", "duplicate")]
    assert receipt.message_ids == ["fuzz-new-id"]
    assert check_stored(h.rt, "fuzz-stored-id").text == "first"


# -- PostgreSQL --------------------------------------------------------------------------------------


@pytest.mark.integration
@fuzz(800)
@given(raw=fuzzed_message())
@example(raw={"to": "01012345678", "text": "hi\x00"})  # PostgreSQL text and JSONB refuse NUL
@example(raw={"to": "01012345678", "text": "hi", "tenant": "t\x00"})
@example(raw={"to": "01012345678", "text": "hi", "kakao": {"a": "x\x00"}})
@example(raw={"to": "01012345678", "text": "hi", "variables": {"k": "\ud83d"}})
def test_send_on_postgresql_accepts_or_rejects_cleanly(pg_harness: Harness, raw: dict[Any, Any]) -> None:
    pg_harness.send(raw)


@pytest.mark.integration
@fuzz(100)
@given(rows=st.lists(st.one_of(good_row, junk_row), min_size=1, max_size=8))
@example(rows=[{"to": "01012345678", "id": "x" * 100}])  # longer than the id column
@example(rows=[{"to": "01012345678", "variables": {"name": "\x00"}}])
def test_send_many_on_postgresql_skips_invalid_rows(pg_harness: Harness, rows: list[Any]) -> None:
    h = pg_harness
    rows = _unique_ids(rows)
    defaults = {"text": "#{name}님", "sender": "0212345678"}
    expected = _expected(h, defaults, rows)
    before = h.rows()
    receipt = h.kmsg.send_many(rows, defaults=defaults, on_invalid="skip")
    assert h.rows() == before + len(receipt.message_ids)
    _check_batch(h, receipt, rows, defaults, expected)
