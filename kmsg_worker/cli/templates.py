"""``kmsg templates``: the tenant template registry, previews, and the providers' AlimTalk templates."""

from __future__ import annotations

from typing import Any

import click

from kmsg_worker.adrules import profile_lookup
from kmsg_worker.cli import app
from kmsg_worker.cli.app import cli
from kmsg_worker.cli.messages import JSON_OPTION, parse_variables
from kmsg_worker.cli.output import echo_json, echo_table
from kmsg_worker.message import normalize_phone
from kmsg_worker.templates import advertising_step

__all__: list[str] = []

_TENANT = click.option("--tenant", default="default", show_default=True, help="The tenant the template belongs to.")
_COLUMNS = ["ref", "state", "type", "variables", "updated_at", "body"]


def _show(versions: list[Any], as_json: bool, *, single: bool = False) -> None:
    rows = [v.as_dict() for v in versions]
    if as_json:
        echo_json(rows[0] if single else rows)
        return
    for row in rows:
        row["variables"] = ", ".join(row["variables"])
        row["body"] = row["body"] if len(row["body"]) <= 40 else row["body"][:39] + "…"
    echo_table(rows, _COLUMNS)


@cli.group()
def templates() -> None:
    """Message templates: versions (draft -> published -> archived), previews, AlimTalk sync."""


@templates.command("create")
@click.argument("name")
@click.option("--body", required=True, help="The text; #{name} marks a variable.")
@click.option("--type", "mtype", help="SMS, LMS, MMS or FRIENDTALK (default: SMS or LMS by the rendered bytes).")
@click.option("--subject", help="LMS/MMS subject (fixed text).")
@_TENANT
@JSON_OPTION
def create(name: str, body: str, mtype: str | None, subject: str | None, tenant: str, as_json: bool) -> int:
    """Create template NAME as version 1, a draft."""
    with app.producer() as kmsg:
        version = kmsg.templates.create(tenant, name, body, type=mtype, subject=subject, now=kmsg.runtime.now())
    _show([version], as_json, single=True)
    return 0


@templates.command("edit")
@click.argument("ref")
@click.option("--body", help="The new text.")
@click.option("--type", "mtype", help="The new type.")
@click.option("--subject", help="The new subject.")
@_TENANT
@JSON_OPTION
def edit(ref: str, body: str | None, mtype: str | None, subject: str | None, tenant: str, as_json: bool) -> int:
    """Edit REF's draft, or start the next version as a draft (a published version never changes)."""
    with app.producer() as kmsg:
        version = kmsg.templates.edit(tenant, ref, body=body, type=mtype, subject=subject, now=kmsg.runtime.now())
    _show([version], as_json, single=True)
    return 0


@templates.command("publish")
@click.argument("ref")
@_TENANT
@JSON_OPTION
def publish(ref: str, tenant: str, as_json: bool) -> int:
    """Publish REF (NAME: its draft): sends by NAME use it from now on."""
    with app.producer() as kmsg:
        version = kmsg.templates.publish(tenant, ref, now=kmsg.runtime.now())
    _show([version], as_json, single=True)
    return 0


@templates.command("archive")
@click.argument("ref")
@_TENANT
@JSON_OPTION
def archive(ref: str, tenant: str, as_json: bool) -> int:
    """Archive REF (NAME: its latest published version); messages already accepted keep it."""
    with app.producer() as kmsg:
        version = kmsg.templates.archive(tenant, ref, now=kmsg.runtime.now())
    _show([version], as_json, single=True)
    return 0


@templates.command("list")
@_TENANT
@JSON_OPTION
def list_(tenant: str, as_json: bool) -> int:
    """The latest version of every template of the tenant."""
    with app.producer() as kmsg:
        versions = kmsg.templates.all(tenant)
    _show(versions, as_json)
    return 0


@templates.command("show")
@click.argument("name")
@_TENANT
@JSON_OPTION
def show(name: str, tenant: str, as_json: bool) -> int:
    """Every version of template NAME."""
    with app.producer() as kmsg:
        versions = kmsg.templates.show(tenant, name)
    _show(versions, as_json)
    return 0


@templates.command("preview")
@click.argument("ref")
@click.option("--var", "variables", multiple=True, callback=parse_variables, help="name=value (repeatable).")
@click.option(
    "--purpose",
    type=click.Choice(["informational", "advertising"]),
    default="informational",
    show_default=True,
    help="advertising: show the text with the (광고) head and opt-out footer composed for it.",
)
@click.option("--sender", default=None, help="The sender number whose advertiser profile composes the text.")
@_TENANT
@JSON_OPTION
def preview(ref: str, variables: dict[str, str], purpose: str, sender: str | None, tenant: str, as_json: bool) -> int:
    """Render REF (any state) with sample variables: the text, its bytes, SMS or LMS."""
    with app.producer() as kmsg:
        steps = []
        if purpose == "advertising":
            number = None if sender is None else normalize_phone(sender, "sender")
            steps.append(advertising_step(profile_lookup(kmsg.runtime.store), tenant, number))
        shown = kmsg.templates.preview(tenant, ref, variables, compose=steps)
    if as_json:
        echo_json(shown.as_dict())
        return 0
    click.echo(shown.text)
    click.echo(f"-- {shown.ref}: {shown.bytes} bytes, {shown.type}", err=True)
    if shown.missing:
        click.echo(f"-- missing: {', '.join(shown.missing)}", err=True)
    if shown.unknown:
        click.echo(f"-- not in the template: {', '.join(shown.unknown)}", err=True)
    return 0


@templates.command("sync")
@click.option(
    "--provider", "providers", multiple=True, help="solapi, iwinv or aligo (repeatable; default: every configured one)."
)
@JSON_OPTION
def sync(providers: tuple[str, ...], as_json: bool) -> int:
    """Pull the providers' AlimTalk templates (approval, body, variables, buttons) for the preflight."""
    from kmsg_worker.templates import sync_all_providers, sync_provider_templates

    with app.producer() as kmsg:
        if providers:
            done = {name: sync_provider_templates(kmsg.runtime, name) for name in providers}
        else:
            done = sync_all_providers(kmsg.runtime)
    rows = [{"provider": name, **vars(counts)} for name, counts in done.items()]
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["provider", "new", "changed", "unchanged", "deleted"])
    return 0


@templates.command("alimtalk")
@click.option("--provider", help="Only this provider's templates.")
@JSON_OPTION
def alimtalk(provider: str | None, as_json: bool) -> int:
    """The providers' AlimTalk templates as the last sync stored them."""
    from kmsg_worker.storage.templates import TemplateStore

    with app.producer() as kmsg:
        found = TemplateStore(kmsg.runtime.engine).provider_templates(provider)
    rows = [
        {
            "provider": t.provider,
            "code": t.code,
            "approval": "deleted" if t.deleted_at else t.approval,
            "variables": t.variables if as_json else ", ".join(t.variables),
            "body": t.body,
            "synced_at": t.synced_at,
        }
        for t in found
    ]
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["provider", "code", "approval", "variables", "synced_at", "body"])
    return 0
