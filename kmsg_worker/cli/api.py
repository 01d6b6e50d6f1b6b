"""The HTTP API from the command line: ``api`` (the server), ``tenants`` and ``keys``."""

from __future__ import annotations

from typing import Any

import click

from kmsg_worker.cli.app import cli
from kmsg_worker.cli.messages import JSON_OPTION
from kmsg_worker.cli.output import echo_json, echo_table, note

__all__: list[str] = []


@cli.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
def api_server(host: str, port: int, workers: int) -> int:
    """Serve the HTTP API (FastAPI on uvicorn); keys come from `kmsg keys create`."""
    # Imported here: uvicorn and FastAPI are only needed by the process that serves.
    from kmsg_worker.api.admin import run_server

    run_server(host, port, workers)
    return 0


@cli.group()
def tenants() -> None:
    """Tenants of the HTTP API: every key, message and batch belongs to one."""


@tenants.command("create")
@click.argument("name")
@JSON_OPTION
def tenants_create(name: str, as_json: bool) -> int:
    """Create tenant NAME ([A-Za-z0-9_.-], 1-64 characters)."""
    from kmsg_worker.api.admin import create_tenant

    _show([create_tenant(name)], ["name", "created_at", "disabled_at"], as_json, single=True)
    return 0


@tenants.command("list")
@JSON_OPTION
def tenants_list(as_json: bool) -> int:
    """Every tenant, and whether it is disabled."""
    from kmsg_worker.api.admin import list_tenants

    _show(list_tenants(), ["name", "created_at", "disabled_at"], as_json)
    return 0


@tenants.command("disable")
@click.argument("name")
@JSON_OPTION
def tenants_disable(name: str, as_json: bool) -> int:
    """Disable tenant NAME: every key of it is refused within seconds."""
    from kmsg_worker.api.admin import disable_tenant

    _show([disable_tenant(name)], ["name", "created_at", "disabled_at"], as_json, single=True)
    return 0


@cli.group()
def keys() -> None:
    """API keys: random, stored only as a hash, shown once."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key sends for.")
@click.option("--test", "test", is_flag=True, help="A test key: its messages only ever reach the simulator.")
@click.option("--name", "label", default=None, help="A label to tell keys apart.")
@JSON_OPTION
def keys_create(tenant: str, test: bool, label: str | None, as_json: bool) -> int:
    """Create a key for TENANT and print it once (it cannot be shown again)."""
    from kmsg_worker.api.admin import create_key

    issued = create_key(tenant, test=test, label=label)
    if as_json:
        echo_json(
            {
                "id": issued.key_id,
                "tenant": issued.tenant,
                "kind": issued.kind,
                "label": issued.label,
                "key": issued.token,
            }
        )
    else:
        click.echo(issued.token)
        note(f"key {issued.key_id} ({issued.kind}) for tenant {issued.tenant}: store it now, it is not shown again")
    return 0


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
@JSON_OPTION
def keys_list(tenant: str | None, as_json: bool) -> int:
    """Keys (never their secrets), revoked ones included."""
    from kmsg_worker.api.admin import list_keys

    _show(list_keys(tenant), ["id", "tenant", "kind", "label", "created_at", "revoked_at"], as_json)
    return 0


@keys.command("revoke")
@click.argument("key_id")
@JSON_OPTION
def keys_revoke(key_id: str, as_json: bool) -> int:
    """Revoke key KEY_ID (its public id, as `kmsg keys list` shows it): refused within seconds."""
    from kmsg_worker.api.admin import revoke_key

    _show([revoke_key(key_id)], ["id", "tenant", "kind", "revoked_at"], as_json, single=True)
    return 0


def _show(rows: list[dict[str, Any]], columns: list[str], as_json: bool, *, single: bool = False) -> None:
    if as_json:
        echo_json(rows[0] if single else rows)
    else:
        echo_table(rows, columns)
