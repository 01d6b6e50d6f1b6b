"""Tenants and API keys in the system of record (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kmsg_worker.errors import MessageNotFoundError, ValidationError
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import ApiKey
from kmsg_worker.storage.tenants import TenantStore, hash_secret, parse_key

NOW = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)


@pytest.fixture
def tenants(runtime: Runtime) -> TenantStore:
    return TenantStore(runtime.engine)


def test_a_key_names_its_kind_and_id_and_only_its_hash_is_stored(tenants: TenantStore) -> None:
    tenants.create_tenant("shop-a", now=NOW)
    issued = tenants.create_key("shop-a", kind="test", label="ci", now=NOW)
    parsed = parse_key(issued.token)
    assert parsed is not None
    assert (parsed.kind, parsed.key_id) == ("test", issued.key_id)
    assert issued.token.startswith(f"kmsg_test_{issued.key_id}_")
    assert issued.token not in repr(issued)
    [stored] = tenants.keys("shop-a")
    assert isinstance(stored, ApiKey)
    assert stored.secret_hash == hash_secret(parsed.secret)
    assert parsed.secret not in (stored.secret_hash, stored.id, stored.label)
    record = tenants.key_record(issued.key_id)
    assert record is not None and record.usable
    assert record.matches(parsed.secret)
    assert not record.matches(parsed.secret[:-1] + ("A" if parsed.secret[-1] != "A" else "B"))


def test_two_keys_never_share_an_id_or_a_secret(tenants: TenantStore) -> None:
    tenants.create_tenant("shop-a", now=NOW)
    tokens = {tenants.create_key("shop-a", now=NOW).token for _ in range(20)}
    assert len(tokens) == 20
    assert len({parse_key(t).key_id for t in tokens if parse_key(t)}) == 20  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "token",
    [
        "",
        "Bearer x",
        "kmsg_live_",
        "kmsg_prod_0123456789ab_" + "a" * 43,
        "kmsg_live_0123456789AB_" + "a" * 43,
        "kmsg_live_0123456789ab_" + "a" * 42,
        "kmsg_live_0123456789ab_" + "a" * 43 + "\n",
    ],
)
def test_malformed_keys_do_not_parse(token: str) -> None:
    assert parse_key(token) is None


def test_revoking_a_key_and_disabling_a_tenant_make_keys_unusable(tenants: TenantStore) -> None:
    tenants.create_tenant("shop-a", now=NOW)
    tenants.create_tenant("shop-b", now=NOW)
    a = tenants.create_key("shop-a", now=NOW)
    b = tenants.create_key("shop-b", now=NOW)
    tenants.revoke_key(a.key_id, now=NOW + timedelta(minutes=1))
    tenants.revoke_key(a.key_id, now=NOW + timedelta(minutes=2))  # idempotent: the first time stays
    record_a = tenants.key_record(a.key_id)
    assert record_a is not None and not record_a.usable
    assert record_a.revoked_at == NOW + timedelta(minutes=1)
    tenants.disable_tenant("shop-b", now=NOW)
    record_b = tenants.key_record(b.key_id)
    assert record_b is not None and not record_b.usable and record_b.revoked_at is None
    with pytest.raises(ValidationError) as disabled:
        tenants.create_key("shop-b", now=NOW)
    assert disabled.value.rule == "disabled"
    assert [t.name for t in tenants.tenants()] == ["shop-a", "shop-b"]


def test_unknown_names_and_duplicates_are_refused(tenants: TenantStore) -> None:
    tenants.create_tenant("shop-a", now=NOW)
    with pytest.raises(ValidationError) as dup:
        tenants.create_tenant("shop-a", now=NOW)
    assert dup.value.rule == "duplicate"
    for bad in ("", "Shop", "-x", "a" * 65, "a b"):
        with pytest.raises(ValidationError):
            tenants.create_tenant(bad, now=NOW)
    with pytest.raises(ValidationError) as missing:
        tenants.create_key("nobody", now=NOW)
    assert missing.value.rule == "not_found"
    with pytest.raises(ValidationError):
        tenants.create_key("shop-a", kind="prod", now=NOW)
    with pytest.raises(MessageNotFoundError):
        tenants.revoke_key("000000000000", now=NOW)
    with pytest.raises(MessageNotFoundError):
        tenants.disable_tenant("nobody", now=NOW)
    assert tenants.key_record("000000000000") is None
