"""The advertising policy over the system of record: profiles, the suppression list, registered senders.

The format and the window are pure rules (:mod:`kmsg_worker.message.advertising`); this module adds
what needs the database or the settings:

* **Advertiser profiles** per tenant and sender number (:func:`profile_lookup`).
* **The opt-out suppression list**, per tenant, as keyed hashes: BLAKE2b keyed with
  ``KMSG_SUPPRESSION_KEY`` (a MAC, RFC 7693 section 2.5), 16 bytes. A look-up hashes the number
  and probes the table's primary key; the table never holds a number, and without the key (kept
  out of the database) its hashes cannot be tried against the 10^8 mobile numbers. The flip side:
  an export gives hashes, and changing the key empties the list in effect (documented).
* **Registered sender numbers** (발신번호 사전등록): from the provider's own API where it has one,
  else from ``KMSG_REGISTERED_SENDERS``, cached for ``KMSG_SENDER_CACHE_TTL_SECONDS``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from kmsg_worker.errors import ConfigurationError, ProviderError, ValidationError
from kmsg_worker.logging import get_logger
from kmsg_worker.message.advertising import AdvertiserProfile
from kmsg_worker.settings import Settings
from kmsg_worker.storage import advertising as ad_store
from kmsg_worker.storage.repo import Store

__all__ = [
    "SenderRegistry",
    "SuppressionHasher",
    "check_not_suppressed",
    "hasher_for",
    "profile_lookup",
    "suppress",
    "suppress_refuser",
    "unsuppress",
]

_KEY_FILE = "suppression.key"
log = get_logger("kmsg.advertising")


class SuppressionHasher:
    """Keyed hashes of phone numbers (normalised digits, e.g. ``01012345678``)."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        # One keyed state, copied per number: the key schedule is done once, not per row.
        self._base = hashlib.blake2b(key=key[:64], digest_size=16)

    def digest(self, number: str) -> bytes:
        """The stored form of ``number`` (16 bytes)."""
        h = self._base.copy()
        h.update(number.encode("ascii", "replace"))
        return h.digest()

    def digests(self, numbers: Iterable[str]) -> list[bytes]:
        """:meth:`digest` of each number, in order."""
        base = self._base
        out = []
        for number in numbers:
            h = base.copy()
            h.update(number.encode("ascii", "replace"))
            out.append(h.digest())
        return out

    def __repr__(self) -> str:
        return "SuppressionHasher(<key hidden>)"


_hashers: dict[tuple[str, str], SuppressionHasher] = {}
_hashers_lock = threading.Lock()


def _key(settings: Settings, is_postgres: bool) -> bytes:
    if settings.suppression_key:
        return settings.suppression_key.encode()
    if is_postgres:
        # Several hosts share one PostgreSQL: a key file per host would hash the same number
        # differently on each, and an opted-out number would get through on the others.
        raise ConfigurationError(
            "KMSG_SUPPRESSION_KEY is not set: the suppression list needs one secret key shared by every "
            "host (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            variable="KMSG_SUPPRESSION_KEY",
        )
    path = Path(settings.var_dir) / _KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def hasher_for(settings: Settings, store: Store) -> SuppressionHasher:
    """The process's hasher for this deployment's key.

    Raises:
        ConfigurationError: PostgreSQL without ``KMSG_SUPPRESSION_KEY``.
    """
    ident = (str(settings.var_dir), settings.suppression_key or "")
    hasher = _hashers.get(ident)
    if hasher is None:
        with _hashers_lock:
            hasher = _hashers.get(ident)
            if hasher is None:
                hasher = _hashers[ident] = SuppressionHasher(_key(settings, store.is_postgres))
    return hasher


def profile_lookup(store: Store) -> Callable[[str, str | None], AdvertiserProfile | None]:
    """``(tenant, sender) -> profile`` for :func:`~kmsg_worker.message.normalize`, cached for one intake."""
    cache: dict[tuple[str, str | None], AdvertiserProfile | None] = {}

    def lookup(tenant: str, sender: str | None) -> AdvertiserProfile | None:
        key = (tenant, sender)
        if key not in cache:
            record = ad_store.find_advertiser(store, tenant, sender)
            cache[key] = (
                None
                if record is None
                else AdvertiserProfile(name=record.name, opt_out=record.opt_out, contact=record.contact)
            )
        return cache[key]

    return lookup


def check_not_suppressed(settings: Settings, store: Store, tenant: str, number: str) -> None:
    """Refuse an advertising send to a number on ``tenant``'s suppression list.

    Raises:
        ValidationError: ``to`` / ``suppressed``.
    """
    digest = hasher_for(settings, store).digest(number)
    if ad_store.suppressed(store, tenant, [digest]):
        raise ValidationError(
            "to",
            "suppressed",
            "the recipient refused advertising (on the tenant's suppression list); it is not sent",
        )


def suppress(
    settings: Settings,
    store: Store,
    tenant: str,
    numbers: Iterable[str],
    *,
    source: str,
    now: datetime,
    provider_code: str | None = None,
) -> int:
    """Add normalised numbers to ``tenant``'s list; how many were new."""
    hasher = hasher_for(settings, store)
    return ad_store.add_suppressions(
        store,
        tenant,
        (hasher.digest(n) for n in numbers),
        source=source,
        now=now,
        provider_code=provider_code,
    )


def suppress_refuser(
    settings: Settings,
    store: Store,
    *,
    tenant: str,
    numbers: Sequence[str],
    provider: str,
    provider_code: str | None,
    message_ids: Sequence[str],
    now: datetime,
) -> None:
    """Add numbers whose provider said they refused the sender (a 080 opt-out), in one write, and log it.

    Called by the engine and by tracking after the message's own state was recorded: a failure here
    (no ``KMSG_SUPPRESSION_KEY`` on PostgreSQL, the database gone) is logged, never raised, so the
    run that recorded the refusal still finishes (its lease is released, its wake-ups published).
    """
    try:
        added = suppress(
            settings, store, tenant, numbers, source=f"provider:{provider}"[:40], now=now, provider_code=provider_code
        )
    except (ConfigurationError, SQLAlchemyError) as exc:
        log.error(
            "advertising.suppress_failed",
            message_id=message_ids[0],
            count=len(numbers),
            provider=provider,
            provider_code=provider_code,
            error=type(exc).__name__,
        )
        return
    log.info(
        "advertising.suppressed_by_provider",
        message_id=message_ids[0],
        count=len(numbers),
        provider=provider,
        provider_code=provider_code,
        added=added,
    )


def unsuppress(settings: Settings, store: Store, tenant: str, numbers: Sequence[str]) -> int:
    """Remove normalised numbers from ``tenant``'s list; how many were on it."""
    return ad_store.remove_suppressions(store, tenant, hasher_for(settings, store).digests(numbers))


class SenderRegistry:
    """Registered sender numbers per provider, fetched at most once per TTL.

    Args:
        settings: ``KMSG_REGISTERED_SENDERS`` and the TTL.
        fetch: ``provider name -> numbers`` from the provider's API, or ``None`` when it has none
            (a :class:`ProviderError` counts as "not known").
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        settings: Settings,
        fetch: Callable[[str], frozenset[str] | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._fetch = fetch
        self._clock = clock
        self._cache: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._lock = threading.Lock()

    def numbers(self, provider: str) -> frozenset[str] | None:
        """The provider's registered numbers, or ``None`` when nothing is known (not checked)."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(provider)
            if cached is not None and now - cached[0] < self.settings.sender_cache_ttl:
                return cached[1]
        try:
            numbers = self._fetch(provider)
        except ProviderError as exc:
            # Not knowing is not a reason to refuse a message: the provider still refuses an
            # unregistered sender itself (SENDER_NOT_REGISTERED). Asked again after the TTL.
            log.warning("senders.lookup_failed", provider=provider, error_code=exc.code.value)
            numbers = None
        if numbers is None:
            numbers = self.settings.registered_senders.get(provider)
        with self._lock:
            self._cache[provider] = (now, numbers)
        return numbers

    def check_route(self, route: Sequence[str], sender: str | None) -> None:
        """:meth:`check` for every provider a message may be sent through."""
        for provider in route:
            self.check(provider, sender)

    def check(self, provider: str, sender: str | None) -> None:
        """Refuse ``sender`` when ``provider`` has a known list of registered numbers without it.

        Raises:
            ValidationError: ``sender`` / ``not_registered``, naming the sender and the provider.
        """
        if not sender:
            return
        numbers = self.numbers(provider)
        if numbers is None:
            return
        digits = "".join(c for c in sender if c.isdigit())
        if digits not in numbers:
            raise ValidationError(
                "sender",
                "not_registered",
                f"sender number {sender} is not registered with {provider} (발신번호 사전등록); "
                "register it with the provider first",
            )
