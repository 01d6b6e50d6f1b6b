"""Tenants, API keys and the tenant-scoped reads of the HTTP API.

A key reads ``kmsg_<kind>_<public id>_<secret>``: the kind (``live`` or ``test``) and the public id
are in the clear, so a key names its kind and (through the id) its tenant, and a leaked key can be
recognised in a scanner's report. The secret is 32 random bytes (``secrets.token_urlsafe``); only its
SHA-256 is stored. A slow password hash buys nothing for 256 bits of entropy (there is no dictionary
to try), and every API request checks a key. The hash is compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, literal_column, or_, select
from sqlalchemy.exc import IntegrityError

from kmsg_worker.errors import InvalidStateError, MessageNotFoundError, ValidationError
from kmsg_worker.message.values import DEFAULT_TENANT
from kmsg_worker.storage.db import make_sessionmaker
from kmsg_worker.storage.models import ApiKey, Batch, MessageRow, Tenant

__all__ = [
    "KEY_KINDS",
    "IssuedKey",
    "KeyRecord",
    "ParsedKey",
    "TenantStore",
    "hash_secret",
    "parse_key",
]

#: ``live`` keys send for real; ``test`` keys only ever reach the simulator.
KEY_KINDS = ("live", "test")
_KEY = re.compile(r"kmsg_(live|test)_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})", re.ASCII)
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class ParsedKey:
    """The parts of a well-formed key (the secret is never logged or shown)."""

    kind: str
    key_id: str
    secret: str


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: ``token`` is shown once and never stored."""

    key_id: str
    tenant: str
    kind: str
    label: str | None
    token: str

    def __repr__(self) -> str:
        # The token is a credential: never in a repr, a log line or a traceback.
        return f"IssuedKey(key_id={self.key_id!r}, tenant={self.tenant!r}, kind={self.kind!r}, label={self.label!r})"


@dataclass(frozen=True)
class KeyRecord:
    """A stored key and its tenant's state, as authentication sees them."""

    key_id: str
    tenant: str
    kind: str
    label: str | None
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None
    tenant_disabled_at: datetime | None

    def __repr__(self) -> str:
        return f"KeyRecord(key_id={self.key_id!r}, tenant={self.tenant!r}, kind={self.kind!r})"

    @property
    def usable(self) -> bool:
        """Neither the key revoked nor its tenant disabled."""
        return self.revoked_at is None and self.tenant_disabled_at is None

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this key's, compared in constant time."""
        return hmac.compare_digest(self.secret_hash, hash_secret(secret))


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_key(token: str) -> ParsedKey | None:
    """Split a bearer token into kind, public id and secret; ``None`` when it is not a kmsg key."""
    match = _KEY.fullmatch(token)
    if match is None:
        return None
    return ParsedKey(match.group(1), match.group(2), match.group(3))


def check_tenant_name(name: str) -> str:
    """A tenant name: 1-64 lowercase letters, digits, ``_``, ``.``, ``-``, starting with a letter or digit.

    Raises:
        ValidationError: Naming the rule.
    """
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
        raise ValidationError("tenant", "format", "1-64 characters: a-z, 0-9, '_', '.', '-' (first a letter or digit)")
    return name


class TenantStore:
    """Tenants and keys in the system of record, and the reads the API scopes to a tenant.

    Args:
        engine: The process's engine (the runtime's).
    """

    def __init__(self, engine: Engine) -> None:
        self.sessions = make_sessionmaker(engine)

    # -- tenants ----------------------------------------------------------------------------------

    def create_tenant(self, name: str, *, now: datetime) -> Tenant:
        """Create a tenant.

        Raises:
            ValidationError: Bad name, or the tenant exists already (rule ``duplicate``).
        """
        check_tenant_name(name)
        try:
            with self.sessions.begin() as s:
                row = Tenant(name=name, created_at=now, disabled_at=None)
                s.add(row)
        except IntegrityError:
            raise ValidationError("tenant", "duplicate", f"tenant {name!r} exists already") from None
        return row

    def tenants(self) -> list[Tenant]:
        """Every tenant, by name."""
        with self.sessions() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.name)))

    def disable_tenant(self, name: str, *, now: datetime) -> Tenant:
        """Disable a tenant: all of its keys are refused from now on (its messages stay).

        Raises:
            MessageNotFoundError: No such tenant.
        """
        with self.sessions.begin() as s:
            row = s.get(Tenant, name)
            if row is None:
                raise MessageNotFoundError(f"no tenant {name!r}")
            if row.disabled_at is None:
                row.disabled_at = now
            return row

    # -- keys -------------------------------------------------------------------------------------

    def create_key(self, tenant: str, *, kind: str = "live", label: str | None = None, now: datetime) -> IssuedKey:
        """Create a key for an enabled tenant; the returned token is the only copy of the secret.

        Raises:
            ValidationError: Unknown kind, label too long, unknown or disabled tenant.
        """
        if kind not in KEY_KINDS:
            raise ValidationError("kind", "enum", "must be live or test")
        if label is not None and len(label) > 100:
            raise ValidationError("label", "max_length", "must be at most 100 characters")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self.sessions.begin() as s:
            owner = s.get(Tenant, tenant)
            if owner is None:
                raise ValidationError("tenant", "not_found", f"no tenant {tenant!r}; create it first")
            if owner.disabled_at is not None:
                raise ValidationError("tenant", "disabled", f"tenant {tenant!r} is disabled")
            s.add(
                ApiKey(
                    id=key_id,
                    tenant=tenant,
                    kind=kind,
                    label=label,
                    secret_hash=hash_secret(secret),
                    created_at=now,
                    revoked_at=None,
                )
            )
        return IssuedKey(key_id, tenant, kind, label, f"kmsg_{kind}_{key_id}_{secret}")

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Keys (of one tenant, or all), oldest first. Only hashes: no secret can be read back."""
        stmt = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at, ApiKey.id)
        if tenant is not None:
            stmt = stmt.where(ApiKey.tenant == tenant)
        with self.sessions() as s:
            return list(s.scalars(stmt))

    def revoke_key(self, key_id: str, *, now: datetime) -> ApiKey:
        """Revoke a key (idempotent: the first revocation time stays).

        Raises:
            MessageNotFoundError: No such key.
        """
        with self.sessions.begin() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise MessageNotFoundError(f"no API key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = now
            return row

    def key_record(self, key_id: str) -> KeyRecord | None:
        """The key and its tenant's state in one read (``None`` when the id is unknown)."""
        stmt = (
            select(ApiKey, Tenant.name, Tenant.disabled_at)
            .join(Tenant, Tenant.name == ApiKey.tenant, isouter=True)
            .where(ApiKey.id == key_id)
        )
        with self.sessions() as s:
            found = s.execute(stmt).first()
        if found is None:
            return None
        key, tenant_name, disabled_at = found
        # A key whose tenant row is gone counts as disabled.
        if tenant_name is None:
            disabled_at = key.created_at
        return KeyRecord(
            key.id, key.tenant, key.kind, key.label, key.secret_hash, key.created_at, key.revoked_at, disabled_at
        )

    # -- tenant-scoped reads ----------------------------------------------------------------------

    def message_tenant(self, message_id: str) -> str | None:
        """The tenant of a message (``None`` when there is no such message)."""
        with self.sessions() as s:
            value = s.scalar(select(MessageRow.tenant).where(MessageRow.id == message_id))
        return None if value is None else str(value)

    def batch_tenant(self, batch_id: str) -> str | None:
        """The tenant of a batch (``None`` when there is no such batch)."""
        with self.sessions() as s:
            value = s.scalar(select(Batch.tenant).where(Batch.id == batch_id))
        return None if value is None else str(value)

    def batch_content(self, batch_id: str) -> dict[str, Any] | None:
        """The content of one message of a batch (``None`` for an empty batch): a batch is all test or all live.

        Served by ``ix_kmsg_messages_batch_chunk`` (one probe).
        """
        with self.sessions() as s:
            value = s.scalar(select(MessageRow.content).where(MessageRow.batch_id == batch_id).limit(1))
        return None if value is None else dict(value)

    def messages(
        self,
        tenant: str,
        *,
        statuses: Sequence[str] = (),
        batch_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[MessageRow]:
        """A tenant's messages, newest first, ``limit`` at most, strictly after the cursor ``before``.

        ``before`` is the ``(created_at, id)`` of the last row of the previous page: keyset
        pagination, so a page costs the same however deep it is and rows arriving meanwhile neither
        repeat nor shift a page. ``since`` is inclusive, ``until`` exclusive.
        """
        if limit < 1:
            raise InvalidStateError("limit must be at least 1")
        conditions = [MessageRow.tenant == tenant]
        if tenant != DEFAULT_TENANT:
            # The partial index's predicate, as a literal: a prepared (generic) plan can only use
            # the index when the statement itself implies it.
            conditions.append(MessageRow.tenant != literal_column(f"'{DEFAULT_TENANT}'"))
        if statuses:
            conditions.append(MessageRow.status.in_(list(statuses)))
        if batch_id is not None:
            conditions.append(MessageRow.batch_id == batch_id)
        if since is not None:
            conditions.append(MessageRow.created_at >= since)
        if until is not None:
            conditions.append(MessageRow.created_at < until)
        if before is not None:
            at, last_id = before
            conditions.append(
                or_(MessageRow.created_at < at, and_(MessageRow.created_at == at, MessageRow.id < last_id))
            )
        stmt = (
            select(MessageRow)
            .where(*conditions)
            .order_by(MessageRow.created_at.desc(), MessageRow.id.desc())
            .limit(limit)
        )
        with self.sessions() as s:
            return list(s.scalars(stmt))

    def touch(self) -> None:
        """One round trip to the database (the readiness probe)."""
        with self.sessions() as s:
            s.execute(select(1))
