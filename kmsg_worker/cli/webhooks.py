"""``kmsg webhooks``: a tenant's webhook endpoints (add, list, show, remove, rotate, enable, test, replay)."""

from __future__ import annotations

from typing import Any

import click

from kmsg_worker.cli.app import cli, producer
from kmsg_worker.cli.messages import JSON_OPTION, parse_time
from kmsg_worker.cli.output import echo_json, echo_table, note

__all__: list[str] = []

_COLUMNS = ["id", "tenant", "url", "events", "disabled_at", "failures", "last_success_at", "last_error"]


@cli.group()
def webhooks() -> None:
    """Webhook endpoints: signed status events (Standard Webhooks) from the event outbox."""


@webhooks.command("add")
@click.argument("url")
@click.option("--tenant", required=True, help="The tenant whose messages' events go to URL.")
@click.option("--event", "events", multiple=True, required=True, help="An event type (repeat for several).")
@click.option("--include-phone", is_flag=True, help="Full recipient numbers in events (masked otherwise).")
@JSON_OPTION
def webhooks_add(url: str, tenant: str, events: tuple[str, ...], include_phone: bool, as_json: bool) -> int:
    """Add an endpoint and print its signing secret once (it cannot be shown again)."""
    from kmsg_worker.webhooks.endpoints import add_endpoint

    made = add_endpoint(producer().runtime, tenant, url, list(events), include_phone=include_phone)
    if as_json:
        echo_json(made)
    else:
        click.echo(made["secret"])
        note(f"endpoint {made['id']} for tenant {tenant}: store the secret now, it is not shown again")
    return 0


@webhooks.command("list")
@click.option("--tenant", default=None, help="Only this tenant's endpoints.")
@JSON_OPTION
def webhooks_list(tenant: str | None, as_json: bool) -> int:
    """Endpoints (never their secrets), disabled ones included."""
    from kmsg_worker.webhooks.endpoints import list_endpoints

    _show(list_endpoints(producer().runtime, tenant), as_json)
    return 0


@webhooks.command("show")
@click.argument("endpoint_id")
@JSON_OPTION
def webhooks_show(endpoint_id: str, as_json: bool) -> int:
    """One endpoint with its event counts and its last delivery attempts."""
    from kmsg_worker.webhooks.endpoints import get_endpoint

    found = get_endpoint(producer().runtime, endpoint_id)
    if as_json:
        echo_json(found)
        return 0
    _show([found], False)
    click.echo(f"events: {found['events_count']}")
    echo_table(found["attempts"], ["at", "events", "ok", "http_status", "error", "latency_ms"])
    return 0


@webhooks.command("remove")
@click.argument("endpoint_id")
def webhooks_remove(endpoint_id: str) -> int:
    """Remove an endpoint; its undelivered events go with it."""
    from kmsg_worker.webhooks.endpoints import remove_endpoint

    remove_endpoint(producer().runtime, endpoint_id)
    note(f"endpoint {endpoint_id} removed")
    return 0


@webhooks.command("rotate")
@click.argument("endpoint_id")
@JSON_OPTION
def webhooks_rotate(endpoint_id: str, as_json: bool) -> int:
    """A new signing secret, printed once; the old one also signs for KMSG_WEBHOOK_SECRET_OVERLAP_SECONDS."""
    from kmsg_worker.webhooks.endpoints import rotate_secret

    made = rotate_secret(producer().runtime, endpoint_id)
    if as_json:
        echo_json(made)
    else:
        click.echo(made["secret"])
        note(f"the previous secret keeps signing until {made['previous_secret_valid_until']}")
    return 0


@webhooks.command("enable")
@click.argument("endpoint_id")
def webhooks_enable(endpoint_id: str) -> int:
    """Enable an endpoint the dispatcher disabled; its pending events go out again."""
    from kmsg_worker.errors import MessageNotFoundError
    from kmsg_worker.storage.webhooks import enable_endpoint

    if not enable_endpoint(producer().runtime.store.sessions, endpoint_id):
        raise MessageNotFoundError(f"no webhook endpoint with id {endpoint_id!r}")
    note(f"endpoint {endpoint_id} enabled")
    return 0


@webhooks.command("test")
@click.argument("endpoint_id")
@JSON_OPTION
def webhooks_test(endpoint_id: str, as_json: bool) -> int:
    """POST one signed webhook.test event now; exits 1 unless the endpoint answers 2xx."""
    from kmsg_worker.webhooks.endpoints import test_endpoint

    result = test_endpoint(producer().runtime, endpoint_id)
    if as_json:
        echo_json(result)
    else:
        echo_table([result], ["delivered", "http_status", "error", "latency_ms"])
    return 0 if result["delivered"] else 1


@webhooks.command("replay")
@click.option("--since", required=True, help="Events created at or after: 30m, 24h, 7d or an ISO time.")
@click.option("--endpoint", "endpoint_id", default=None, help="Only this endpoint's events.")
@click.option("--tenant", default=None, help="Only this tenant's events.")
def webhooks_replay(since: str, endpoint_id: str | None, tenant: str | None) -> int:
    """Deliver events again (same ids, so receivers that deduplicate skip what they have)."""
    from kmsg_worker.webhooks.endpoints import replay_events

    kmsg = producer()
    start = parse_time(since, "--since", now=kmsg.runtime.now(), tz=kmsg.settings.timezone)
    count = replay_events(kmsg.runtime, since=start, endpoint_id=endpoint_id, tenant=tenant)
    note(f"{count} events will be delivered again")
    return 0


def _show(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        echo_json(rows)
        return
    echo_table([{**r, "events": ",".join(r["events"])} for r in rows], _COLUMNS)
