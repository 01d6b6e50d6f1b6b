"""``kmsg tenants`` and ``kmsg keys`` through click's runner, on SQLite and PostgreSQL; ``kmsg api --help``."""

from __future__ import annotations

import json

from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.tenants import TenantStore, parse_key
from tests.test_cli import env, one_error_line, run  # noqa: F401 - env is a fixture

__all__ = ["env"]


def test_tenants_and_keys_from_creation_to_revocation(env: dict[str, str]) -> None:  # noqa: F811
    # Given a new tenant
    created = run("tenants", "create", "shop-a", "--json")
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["name"] == "shop-a"
    # When a test key is created for it
    key = run("keys", "create", "--tenant", "shop-a", "--test", "--name", "ci")
    assert key.exit_code == 0, key.output
    token = key.stdout.strip()
    # Then the key is printed once on stdout (the note goes to stderr) and names its kind
    assert token.startswith("kmsg_test_") and "\n" not in token
    assert "not shown again" in key.stderr
    listed = json.loads(run("keys", "list", "--tenant", "shop-a", "--json").stdout)
    assert [(k["tenant"], k["kind"], k["label"], k["revoked_at"]) for k in listed] == [("shop-a", "test", "ci", None)]
    assert token not in run("keys", "list").stdout  # the secret is never shown again
    # And it authenticates until it is revoked
    store = TenantStore(make_engine(Settings.from_env(env).database_url))

    def usable() -> bool:
        parsed = parse_key(token)
        assert parsed is not None
        record = store.key_record(parsed.key_id)
        return record is not None and record.matches(parsed.secret) and record.usable

    assert usable()
    revoked = run("keys", "revoke", listed[0]["id"], "--json")
    assert revoked.exit_code == 0 and json.loads(revoked.stdout)["revoked_at"]
    assert not usable()
    # A disabled tenant is shown as such
    assert run("tenants", "disable", "shop-a").exit_code == 0
    tenants = json.loads(run("tenants", "list", "--json").stdout)
    assert [(t["name"], t["disabled_at"] is not None) for t in tenants] == [("shop-a", True)]


def test_a_bad_tenant_or_an_unknown_one_is_one_line_and_exit_2(env: dict[str, str]) -> None:  # noqa: F811
    bad = run("tenants", "create", "shop a\tb")
    assert bad.exit_code == 2
    assert "tenant" in one_error_line(bad, "kmsg tenants create")
    unknown = run("keys", "create", "--tenant", "nobody")
    assert unknown.exit_code == 2
    one_error_line(unknown, "kmsg keys create")


def test_kmsg_api_has_its_options() -> None:
    shown = run("api", "--help")
    assert shown.exit_code == 0
    assert "--host" in shown.stdout and "--port" in shown.stdout and "--workers" in shown.stdout
