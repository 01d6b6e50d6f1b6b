"""What the ``kmsg api``, ``kmsg tenants`` and ``kmsg keys`` commands do, as plain functions.

The command line only parses arguments and prints; these functions do the work, so they are
tested without a terminal. A key's token is returned once by :func:`create_key` and never again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import create_schema, make_engine
from kmsg_worker.storage.tenants import IssuedKey, TenantStore

__all__ = ["create_key", "create_tenant", "disable_tenant", "list_keys", "list_tenants", "revoke_key", "run_server"]


@contextmanager
def _store(settings: Settings | None) -> Iterator[TenantStore]:
    settings = settings or Settings.from_env()
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)  # the embedded default has no migrations; harmless on PostgreSQL
        yield TenantStore(engine)
    finally:
        engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)


def create_tenant(name: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """Create a tenant (``kmsg tenants create NAME``).

    Raises:
        ValidationError: Bad name or existing tenant.
    """
    with _store(settings) as store:
        row = store.create_tenant(name, now=_now())
        return {"name": row.name, "created_at": row.created_at, "disabled_at": row.disabled_at}


def list_tenants(*, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every tenant (``kmsg tenants list``)."""
    with _store(settings) as store:
        return [{"name": t.name, "created_at": t.created_at, "disabled_at": t.disabled_at} for t in store.tenants()]


def disable_tenant(name: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """Disable a tenant: every key of it is refused within seconds (``kmsg tenants disable NAME``).

    Raises:
        MessageNotFoundError: No such tenant.
    """
    with _store(settings) as store:
        row = store.disable_tenant(name, now=_now())
        return {"name": row.name, "created_at": row.created_at, "disabled_at": row.disabled_at}


def create_key(
    tenant: str, *, test: bool = False, label: str | None = None, settings: Settings | None = None
) -> IssuedKey:
    """Create a key (``kmsg keys create --tenant NAME [--test] [--name LABEL]``); print ``.token`` once.

    Raises:
        ValidationError: Unknown or disabled tenant, label too long.
    """
    with _store(settings) as store:
        return store.create_key(tenant, kind="test" if test else "live", label=label, now=_now())


def list_keys(tenant: str | None = None, *, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Keys without their secrets (``kmsg keys list [--tenant NAME]``)."""
    with _store(settings) as store:
        return [
            {
                "id": k.id,
                "tenant": k.tenant,
                "kind": k.kind,
                "label": k.label,
                "created_at": k.created_at,
                "revoked_at": k.revoked_at,
            }
            for k in store.keys(tenant)
        ]


def revoke_key(key_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """Revoke a key by its public id (``kmsg keys revoke ID``); refused everywhere within seconds.

    Raises:
        MessageNotFoundError: No such key.
    """
    with _store(settings) as store:
        row = store.revoke_key(key_id, now=_now())
        return {"id": row.id, "tenant": row.tenant, "kind": row.kind, "revoked_at": row.revoked_at}


def run_server(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the API with uvicorn (``kmsg api [--host H] [--port P] [--workers N]``).

    uvicorn's access log is off: the API logs its own line per request, with keys never shown and
    phone numbers masked (:mod:`kmsg_worker.logging`).
    """
    import uvicorn

    # The app factory configures the structured logs in each server process.
    settings = Settings.from_env()
    uvicorn.run(
        "kmsg_worker.api:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level=settings.log_level.lower(),
        server_header=False,
    )
