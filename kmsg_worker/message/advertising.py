"""Korean advertising rules, pure: the ``(광고)`` format, its lookalikes, and the sending windows.

Act on Promotion of Information and Communications Network Utilization and Information
Protection (정보통신망법) Article 50 (https://www.law.go.kr/법령/정보통신망이용촉진및정보보호등에관한법률/제50조)
and KISA's guide for advertising messages (https://spam.kisa.or.kr/) require of every advertising
text message:

* ``(광고)`` where the advertising starts, followed by the sender's name (and a contact, which may
  be left out when it is the sending number itself);
* a free way to refuse (``무료수신거부 080-...``) where it ends;
* no sending between 21:00 and 08:00 (Korean time) without the recipient's separate consent.

Carriers block sender numbers whose messages disguise the head (``[광고]``, ``(광 고)``,
``(광.고)``, ...), so those are refused rather than passed on. Kakao's own rule for FriendTalk
advertising closes its window at 20:50.

Nothing here touches a database or a clock of its own: the delivery engine, intake and template
previews all call the same functions (:func:`compose`, :func:`check`, :func:`next_allowed`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from kmsg_worker.errors import ValidationError
from kmsg_worker.message.model import MessageType

__all__ = [
    "AD_HEAD",
    "ADVERTISING",
    "COMPOSE_MODES",
    "INFORMATIONAL",
    "OPT_OUT_LABEL",
    "PURPOSES",
    "SEOUL",
    "AdvertiserProfile",
    "check",
    "check_informational",
    "compose",
    "find_lookalike",
    "in_quiet_hours",
    "next_allowed",
    "normalize_opt_out",
    "reopens",
    "require_profile",
    "window_of",
]

ADVERTISING = "advertising"
INFORMATIONAL = "informational"
PURPOSES = (INFORMATIONAL, ADVERTISING)
#: ``auto``: the head and the footer are added where missing; ``check``: refused when missing.
COMPOSE_MODES = ("auto", "check")

AD_HEAD = "(광고)"
OPT_OUT_LABEL = "무료수신거부"
SEOUL = ZoneInfo("Asia/Seoul")

#: When advertising may be sent without separate night consent (Article 50(3)): 08:00 to 21:00.
DAY_START = time(8, 0)
NIGHT_START = time(21, 0)
#: Kakao closes FriendTalk advertising earlier, at 20:50 (its result code 3022).
FRIENDTALK_NIGHT_START = time(20, 50)

# An opening and a closing bracket of any shape carriers have seen used to disguise the head.
_OPEN = r"[\(\[\{<（［｛＜【〔〈《「『\"'“‘]"
_CLOSE = r"[\)\]\}>）］｝＞】〕〉》」』\"'”’]"
#: A bracketed 광...고 (up to three non-Hangul characters between the two syllables, a few words
#: around them): every such head that is not exactly ``(광고)`` is a lookalike.
_LOOKALIKE = re.compile(_OPEN + r"\s*[^\n()\[\]]{0,6}?광[^가-힣\n]{0,3}고[^\n()\[\]]{0,6}?\s*" + _CLOSE)
#: A head without its opening bracket (``광고)``), or a spaced-out one without any (``광 고``) at the start.
_BARE_HEAD = re.compile(r"\s*(?:광\s*고\s*[\)）\]］]|광[\s.·/\\_\-*]+고)")
#: The free opt-out wording KISA accepts (``무료수신거부`` or ``무료거부``), then a number.
_OPT_OUT = re.compile(r"무료\s*(?:수신\s*)?거부[\s:：]*(0\d{1,2}[-\s.]?\d{3,4}[-\s.]?\d{4})")
_DIGITS = re.compile(r"\D")


def normalize_opt_out(number: str) -> str:
    """A free opt-out number written ``080-XXX-XXXX`` (or ``080-XXXX-XXXX``); anything else is refused.

    Raises:
        ValidationError: The number is not a toll-free 080 number.
    """
    digits = _DIGITS.sub("", number or "")
    if not digits.startswith("080") or len(digits) not in (10, 11):
        raise ValidationError("opt_out", "format", "must be a free 080 number such as 080-123-4567")
    return f"{digits[:3]}-{digits[3:-4]}-{digits[-4:]}"


@dataclass(frozen=True)
class AdvertiserProfile:
    """Who advertises: configured once per tenant and sender number.

    Attributes:
        name: The sender's name as recipients know it (company or service name).
        opt_out: The free opt-out number (``080-...``).
        contact: A contact number; may be omitted when it is the sending number itself.
    """

    name: str
    opt_out: str
    contact: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip() or len(self.name) > 40:
            raise ValidationError("name", "required", "an advertiser name of 1-40 characters is required")
        if find_lookalike(self.name) or AD_HEAD in self.name:
            raise ValidationError("name", "format", "the advertiser name may not contain an advertising head")
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "opt_out", normalize_opt_out(self.opt_out))
        if self.contact is not None:
            digits = _DIGITS.sub("", self.contact)
            if not 8 <= len(digits) <= 12:
                raise ValidationError("contact", "format", "must be a phone number")

    def head(self, sender: str | None) -> str:
        """``(광고)<name>``, and the contact when it is not the sending number."""
        if self.contact and _DIGITS.sub("", self.contact) != _DIGITS.sub("", sender or ""):
            return f"{AD_HEAD}{self.name} {self.contact}"
        return f"{AD_HEAD}{self.name}"

    def footer(self) -> str:
        """``무료수신거부 080-...``."""
        return f"{OPT_OUT_LABEL} {self.opt_out}"


def find_lookalike(text: str) -> str | None:
    """The first disguised advertising head in ``text`` (``[광고]``, ``(광 고)``, ...), or ``None``."""
    if "광" not in text:  # the common case, at C speed
        return None
    for match in _LOOKALIKE.finditer(text):
        if match.group(0) != AD_HEAD:
            return match.group(0)
    bare = _BARE_HEAD.match(text)
    if bare is not None:
        return bare.group(0).strip()
    return None


def _refuse_lookalike(text: str) -> None:
    found = find_lookalike(text)
    if found is not None:
        raise ValidationError(
            "text", "ad_lookalike", f"{found!r} disguises the advertising head; write exactly {AD_HEAD}"
        )


def require_profile(profile: AdvertiserProfile | None, tenant: str, sender: str | None) -> AdvertiserProfile:
    """``profile``, or the error that composing an advertising text without one is.

    Raises:
        ValidationError: ``purpose`` / ``advertiser_profile``, naming the tenant and sender.
    """
    if profile is None:
        raise ValidationError(
            "purpose",
            "advertiser_profile",
            f"no advertiser profile for tenant {tenant!r} and sender {sender or '(none)'}; "
            "configure one with `kmsg advertisers set` or use compose='check'",
        )
    return profile


def compose(text: str, profile: AdvertiserProfile, *, sender: str | None = None) -> str:
    """``text`` with the advertising head and the opt-out footer added where they are missing.

    The head goes first (``(광고)<name>`` on its own line), the footer last. A text that already
    starts with ``(광고)`` keeps its own head, and one that already carries the free opt-out wording
    keeps its own footer: composing twice gives the same text. Template previews call this too.
    """
    body = text
    if not body.lstrip().startswith(AD_HEAD):
        body = f"{profile.head(sender)}\n{body}"
    if _OPT_OUT.search(body) is None:
        body = f"{body}\n{profile.footer()}"
    return body


def check(text: str, profile: AdvertiserProfile | None, *, sender: str | None = None) -> None:
    """Refuse an advertising text that lacks a mandatory part, naming the part.

    With a ``profile`` the parts must be its own (its name after the head, its opt-out number);
    without one, their shape is checked.

    Raises:
        ValidationError: ``rule`` is ``ad_lookalike``, ``ad_head``, ``ad_name``, ``ad_contact`` or
            ``ad_opt_out``; the detail says what is missing.
    """
    _refuse_lookalike(text)
    stripped = text.lstrip()
    if not stripped.startswith(AD_HEAD):
        raise ValidationError("text", "ad_head", f"an advertising text must start with {AD_HEAD}")
    after = stripped[len(AD_HEAD) :].lstrip(" ")
    if profile is not None:
        if not after.startswith(profile.name):
            raise ValidationError("text", "ad_name", f"the advertiser name {profile.name!r} must follow {AD_HEAD}")
        if profile.contact and _DIGITS.sub("", profile.contact) != _DIGITS.sub("", sender or ""):
            if _DIGITS.sub("", profile.contact) not in _DIGITS.sub("", text):
                raise ValidationError("text", "ad_contact", f"the contact {profile.contact} is missing")
    elif not after or after[0].isspace():
        raise ValidationError("text", "ad_name", f"the advertiser's name must follow {AD_HEAD}")
    found = _OPT_OUT.search(text)
    if found is None:
        raise ValidationError("text", "ad_opt_out", f"the free opt-out line ({OPT_OUT_LABEL} 080-...) is missing")
    if profile is not None and _DIGITS.sub("", found.group(1)) != _DIGITS.sub("", profile.opt_out):
        raise ValidationError(
            "text", "ad_opt_out", f"the opt-out number must be the advertiser's own ({profile.opt_out})"
        )


def check_informational(text: str) -> None:
    """An informational text may not carry an advertising head, real or disguised.

    Raises:
        ValidationError: ``purpose`` (the text starts with ``(광고)``) or ``text`` (a lookalike).
    """
    if "광" not in text:
        return
    if text.lstrip().startswith(AD_HEAD):
        raise ValidationError(
            "purpose", "ad_head", f"the text starts with {AD_HEAD}: send it with purpose='advertising'"
        )
    _refuse_lookalike(text)


def window_of(mtype: MessageType | str) -> tuple[time, time]:
    """``(opens, closes)`` of the daily advertising window of ``mtype``, Korean time."""
    if mtype == MessageType.FRIENDTALK:
        return DAY_START, FRIENDTALK_NIGHT_START
    return DAY_START, NIGHT_START


def in_quiet_hours(now: datetime, mtype: MessageType | str) -> bool:
    """Whether ``now`` (aware) falls outside ``mtype``'s advertising window."""
    return next_allowed(now, mtype) is not None


def next_allowed(now: datetime, mtype: MessageType | str) -> datetime | None:
    """The next moment advertising of ``mtype`` may be sent, or ``None`` when it may be sent at ``now``.

    The window is ``[opens, closes)`` in Asia/Seoul: 20:59:59 may send, 21:00:00 waits until
    08:00:00 the next morning; 07:59:59 waits one second. Korea has no daylight saving time, so
    the arithmetic is on wall-clock times.
    """
    opens, closes = window_of(mtype)
    local = now.astimezone(SEOUL)
    clock = local.timetz().replace(tzinfo=None)
    if opens <= clock < closes:
        return None
    day = local.date() if clock < opens else local.date() + timedelta(days=1)
    return datetime.combine(day, opens, tzinfo=SEOUL)


def reopens(now: datetime, mtype: MessageType | str) -> datetime:
    """When to try again after a provider refused a send as outside its window.

    Our window's next opening when ours is closed too; otherwise the provider's window is narrower
    than ours (Solapi's carrier code 3108 names 08:00-20:00): the next morning's opening.
    """
    opening = next_allowed(now, mtype)
    if opening is not None:
        return opening
    local = now.astimezone(SEOUL)
    return datetime.combine(local.date() + timedelta(days=1), window_of(mtype)[0], tzinfo=SEOUL)
