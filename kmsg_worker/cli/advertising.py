"""Advertising from the command line: ``advertisers`` (the (광고) profile) and ``suppressions`` (opt-outs)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kmsg_worker.cli.app import cli
from kmsg_worker.cli.messages import JSON_OPTION
from kmsg_worker.cli.output import echo_json, echo_table, note

if TYPE_CHECKING:
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.repo import Store

__all__: list[str] = []


def _tenant(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from kmsg_worker.errors import ValidationError
    from kmsg_worker.message import check_tenant

    try:
        return check_tenant(value)  # the producer's rule: every command names a tenant the same way
    except ValidationError as exc:
        raise click.BadParameter(f"{exc.detail} [{exc.rule}]") from None


TENANT_OPTION = click.option(
    "--tenant", default="default", show_default=True, callback=_tenant, help="The tenant the list belongs to."
)


@contextmanager
def _store() -> Iterator[tuple[Settings, Store]]:
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.db import create_schema, make_engine
    from kmsg_worker.storage.repo import Store

    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)  # the embedded default has no migrations; harmless on PostgreSQL
        yield settings, Store(engine)
    finally:
        engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)


# -- advertisers -----------------------------------------------------------------------------------


@cli.group()
def advertisers() -> None:
    """Who advertises: the name, contact and free 080 opt-out number of the (광고) head and footer."""


@advertisers.command("set")
@TENANT_OPTION
@click.option("--sender", default="*", show_default=True, help="The sender number ('*': every sender of the tenant).")
@click.option("--name", required=True, help="The advertiser's name as recipients know it.")
@click.option("--opt-out", "opt_out", required=True, help="The free opt-out number (080-...).")
@click.option("--contact", default=None, help="A contact number, when it is not the sending number.")
@JSON_OPTION
def advertisers_set(tenant: str, sender: str, name: str, opt_out: str, contact: str | None, as_json: bool) -> int:
    """Configure (or replace) the advertiser profile of a tenant's sender number."""
    from kmsg_worker.message import normalize_phone
    from kmsg_worker.message.advertising import AdvertiserProfile
    from kmsg_worker.storage.advertising import ANY_SENDER, set_advertiser

    sender_key = ANY_SENDER if sender == ANY_SENDER else normalize_phone(sender, "sender")
    profile = AdvertiserProfile(name=name, opt_out=opt_out, contact=contact)
    with _store() as (_, store):
        set_advertiser(
            store, tenant, sender_key, name=profile.name, opt_out=profile.opt_out, contact=profile.contact, now=_now()
        )
    shown = {"tenant": tenant, "sender": sender_key, "name": profile.name, "contact": profile.contact}
    shown["opt_out"] = profile.opt_out
    if as_json:
        echo_json(shown)
    else:
        echo_table([shown], ["tenant", "sender", "name", "contact", "opt_out"])
    return 0


@advertisers.command("list")
@click.option("--tenant", default=None, help="Only this tenant's profiles.")
@JSON_OPTION
def advertisers_list(tenant: str | None, as_json: bool) -> int:
    """Every advertiser profile."""
    from kmsg_worker.storage.advertising import advertisers as stored

    with _store() as (_, store):
        rows = [
            {"tenant": r.tenant, "sender": r.sender, "name": r.name, "contact": r.contact, "opt_out": r.opt_out}
            for r in stored(store, tenant)
        ]
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["tenant", "sender", "name", "contact", "opt_out"])
    return 0


@advertisers.command("remove")
@TENANT_OPTION
@click.option("--sender", default="*", show_default=True, help="The sender number ('*': the tenant's default).")
def advertisers_remove(tenant: str, sender: str) -> int:
    """Remove a profile (advertising from that sender is then refused until one is set)."""
    from kmsg_worker.errors import ValidationError
    from kmsg_worker.message import normalize_phone
    from kmsg_worker.storage.advertising import ANY_SENDER, delete_advertiser

    sender_key = ANY_SENDER if sender == ANY_SENDER else normalize_phone(sender, "sender")
    with _store() as (_, store):
        if not delete_advertiser(store, tenant, sender_key):
            raise ValidationError("sender", "not_found", f"no advertiser profile for {tenant} / {sender_key}")
    note(f"removed the advertiser profile of {tenant} / {sender_key}")
    return 0


# -- suppressions ----------------------------------------------------------------------------------


@cli.group()
def suppressions() -> None:
    """The opt-out list: advertising is never sent to these numbers (stored as keyed hashes only)."""


def _numbers(values: tuple[str, ...]) -> list[str]:
    from kmsg_worker.message import normalize_phone

    return [normalize_phone(v, "number") for v in values]


@suppressions.command("add")
@TENANT_OPTION
@click.argument("numbers", nargs=-1, required=True)
@JSON_OPTION
def suppressions_add(tenant: str, numbers: tuple[str, ...], as_json: bool) -> int:
    """Add NUMBERS to the tenant's list (a number already there is left as it was)."""
    from kmsg_worker import adrules

    normalized = _numbers(numbers)
    with _store() as (settings, store):
        added = adrules.suppress(settings, store, tenant, normalized, source="cli", now=_now())
    _report({"tenant": tenant, "given": len(normalized), "added": added}, as_json)
    return 0


@suppressions.command("remove")
@TENANT_OPTION
@click.argument("numbers", nargs=-1, required=True)
@JSON_OPTION
def suppressions_remove(tenant: str, numbers: tuple[str, ...], as_json: bool) -> int:
    """Remove NUMBERS from the tenant's list (the recipient consented again)."""
    from kmsg_worker import adrules

    normalized = _numbers(numbers)
    with _store() as (settings, store):
        removed = adrules.unsuppress(settings, store, tenant, normalized)
    _report({"tenant": tenant, "given": len(normalized), "removed": removed}, as_json)
    return 0


def _read_csv(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, first cell)`` of every non-empty line; a first line that is no number is a header."""
    from kmsg_worker.errors import ValidationError
    from kmsg_worker.message import normalize_phone

    with path.open(newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cell = row[0].strip() if row else ""
            if not cell:
                continue
            try:
                yield line, normalize_phone(cell, "number")
            except ValidationError as exc:
                if line == 1:
                    continue  # a header ("phone", "number", ...)
                raise ValidationError(f"line {line}", exc.rule, exc.detail) from None


@suppressions.command("import")
@TENANT_OPTION
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@JSON_OPTION
def suppressions_import(tenant: str, file: Path, as_json: bool) -> int:
    """Add every number of FILE.csv (first column; a header line is skipped) to the tenant's list.

    A line whose number is invalid stops the import before anything is stored, naming the line.
    """
    from kmsg_worker import adrules

    numbers = [n for _, n in _read_csv(file)]  # validated in full first: all or nothing
    with _store() as (settings, store):
        added = adrules.suppress(settings, store, tenant, numbers, source="import", now=_now())
    _report({"tenant": tenant, "given": len(numbers), "added": added}, as_json)
    return 0


@suppressions.command("export")
@TENANT_OPTION
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File (default: stdout)."
)
def suppressions_export(tenant: str, output: Path | None) -> int:
    """Write the tenant's list as CSV: digest, source, provider_code, created_at.

    Only keyed hashes are stored, so an export holds hashes, not numbers: it can be imported into
    another deployment only if that deployment uses the same KMSG_SUPPRESSION_KEY (then copy the
    table), and it shows where each entry came from (cli, import, api, provider:<name> with the
    provider's refusal code). Keep your own record of the numbers if you need them back.
    """
    from kmsg_worker.storage.advertising import export_suppressions

    count = 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["digest", "source", "provider_code", "created_at"])
    with _store() as (_, store), output.open("w", encoding="utf-8") if output else _stdout() as target:
        for entry in export_suppressions(store, tenant):
            writer.writerow([entry.digest.hex(), entry.source, entry.provider_code or "", entry.created_at.isoformat()])
            count += 1
            if count % 10_000 == 0:
                target.write(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
        target.write(buffer.getvalue())
    note(f"{count} entries of {tenant} (keyed hashes; the numbers themselves are not stored)")
    return 0


@suppressions.command("count")
@TENANT_OPTION
@JSON_OPTION
def suppressions_count(tenant: str, as_json: bool) -> int:
    """How many numbers the tenant's list holds."""
    from kmsg_worker.storage.advertising import count_suppressions

    with _store() as (_, store):
        _report({"tenant": tenant, "count": count_suppressions(store, tenant)}, as_json)
    return 0


@contextmanager
def _stdout() -> Iterator[_Echo]:
    yield _Echo()


class _Echo:
    """Writes to stdout through click (so it works under click's test runner too)."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


def _report(values: dict[str, object], as_json: bool) -> None:
    if as_json:
        echo_json(values)
    else:
        echo_table([values], list(values))
