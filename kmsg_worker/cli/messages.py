"""Single messages: ``send``, ``get``, ``cancel``, ``messages list|pending`` and ``dead list|retry``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kmsg_worker.cli import app
from kmsg_worker.cli.app import EXIT_CHECK_FAILED, cli
from kmsg_worker.cli.output import echo_json, echo_json_lines, echo_table, is_terminal, plain
from kmsg_worker.errors import MessageNotFoundError, ValidationError
from kmsg_worker.logging import mask_phone
from kmsg_worker.status import MessageStatus

if TYPE_CHECKING:
    from kmsg_worker.producer import MessageInfo

__all__ = ["JSON_OPTION", "age_text", "parse_time", "parse_variables"]

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")

F = TypeVar("F", bound=Callable[..., Any])


def advertising_options(command: F) -> F:
    """``--purpose``, ``--compose`` and ``--night-consent``: the advertising fields of a send or a batch."""
    command = click.option(
        "--night-consent",
        "night_consent",
        flag_value=True,
        default=None,
        help="Advertising: the recipient consented to night sends.",
    )(command)
    command = click.option(
        "--compose", type=click.Choice(["auto", "check"]), help="Advertising: add the head/footer, or check them."
    )(command)
    return click.option(
        "--purpose",
        type=click.Choice(["informational", "advertising"]),
        help="advertising: the (광고) format, the 21:00-08:00 hold and the opt-out list apply (docs/ADVERTISING.md).",
    )(command)


def parse_variables(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``--var name=value`` (repeatable) as a mapping; anything else is a usage error."""
    variables: dict[str, str] = {}
    for raw in values:
        name, sep, value = raw.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{raw!r} is not name=value", param_hint="--var")
        variables[name.strip()] = value
    return variables


def age_text(seconds: float) -> str:
    """A duration as a person reads it: ``45s``, ``12m05s``, ``3h20m``, ``2d04h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def parse_time(value: str, option: str, *, now: datetime, tz: str) -> datetime:
    """``now``, a duration ago (``30m``, ``24h``, ``7d``) or an ISO time (naive = ``KMSG_TIMEZONE``)."""
    from kmsg_worker.report import parse_when

    try:
        return parse_when(value, now=now, tz=tz)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not 'now', a duration like 30m / 24h / 7d, or an ISO time", param_hint=option
        ) from None


# -- send, get, cancel ----------------------------------------------------------------------------


@cli.command()
@click.option("--to", required=True, help="Recipient number (010-1234-5678, 01012345678 or +82...).")
@click.option("--text", help="Message text; #{name} is replaced by --var name=...")
@click.option("--type", "mtype", help="SMS, LMS, MMS, ALIMTALK ... (default: inferred from the text).")
@click.option("--subject", help="LMS/MMS subject.")
@click.option("--from", "sender", help="Sender number (default: KMSG_DEFAULT_SENDER).")
@click.option("--template-id", help="AlimTalk template code.")
@click.option("--template", help="Registry template: NAME (latest published) or NAME@VERSION; with --var.")
@click.option("--provider", "provider_id", help="Send through this provider only (no failover).")
@click.option("--priority", type=click.Choice(["high", "normal", "bulk"]), help="Queue (default: normal).")
@click.option("--tenant", help="Tenant id ([A-Za-z0-9_.-]{1,64}; default: 'default').")
@click.option("--idempotency-key", help="Sending the same request twice with this key sends it once.")
@click.option("--at", "scheduled_at", help="Send at this ISO time (naive = KMSG_TIMEZONE, Asia/Seoul).")
@click.option("--var", "variables", multiple=True, callback=parse_variables, help="name=value (repeatable).")
@advertising_options
@JSON_OPTION
def send(as_json: bool, variables: dict[str, str], **options: Any) -> int:
    """Send one message: validated and stored now, sent by a worker."""
    fields: dict[str, Any] = {name: value for name, value in options.items() if value is not None}
    if "mtype" in fields:
        fields["type"] = fields.pop("mtype")
    if variables:
        fields["variables"] = variables
    with app.producer() as kmsg:
        receipt = kmsg.send(fields)
    if as_json:
        echo_json(receipt)
    else:
        again = "  (the same request was accepted before)" if receipt.duplicate else ""
        route = ",".join(receipt.route)
        click.echo(f"{receipt.message_id}  {receipt.status}  {receipt.type}  route={route}{again}")
    return 0


def _shown(info: MessageInfo) -> dict[str, Any]:
    data: dict[str, Any] = plain(info)
    data["to"] = mask_phone(info.to)
    return data


def _show_message(info: MessageInfo) -> None:
    data = _shown(info)
    attempts = data.pop("attempts")
    rows = [{"field": k, "value": v if not isinstance(v, list) else ", ".join(map(str, v))} for k, v in data.items()]
    echo_table([r for r in rows if r["value"] not in (None, "", [])], ["field", "value"], title=f"message {info.id}")
    if attempts:
        columns = [
            "attempt_no",
            "provider",
            "outcome",
            "error_code",
            "provider_code",
            "http_status",
            "latency_ms",
            "at",
        ]
        echo_table(attempts, columns, title="attempts")


@cli.command()
@click.argument("message_id", required=False)
@click.option("--provider-id", help="The provider's message id (Solapi messageId, IWINV/Aligo mid).")
@click.option("--provider", help="With --provider-id: only this provider's messages.")
@JSON_OPTION
def get(message_id: str | None, provider_id: str | None, provider: str | None, as_json: bool) -> int:
    """Show a message (the number masked), by our id or by the provider's.

    On a terminal it is drawn as a table; piped, or with --json, it is JSON (one document per
    message found).
    """
    if message_id is None and provider_id is None:
        raise click.UsageError("give a message id or --provider-id")
    if message_id is not None and provider_id is not None:
        raise click.UsageError("give a message id or --provider-id, not both")
    if provider and provider_id is None:
        raise click.UsageError("--provider narrows --provider-id; give --provider-id too")
    with app.producer() as kmsg:
        if message_id is not None:
            found = [kmsg.get(message_id)]
        else:
            assert provider_id is not None
            found = kmsg.find_by_provider_id(provider_id, provider=provider)
            if not found:
                where = provider or "any configured provider"
                raise MessageNotFoundError(f"no message known to {where} as {provider_id!r}")
    for info in found:
        if as_json or not is_terminal():
            echo_json(_shown(info))
        else:
            _show_message(info)
    return 0


@cli.command()
@click.argument("message_id")
@JSON_OPTION
def cancel(message_id: str, as_json: bool) -> int:
    """Cancel a message that was not dispatched yet (scheduled, queued or waiting to retry)."""
    with app.producer() as kmsg:
        info = kmsg.cancel(message_id)
    if as_json:
        echo_json({"id": info.id, "status": info.status})
    else:
        click.echo(f"{info.id} {info.status}")
    return 0


# -- messages list / pending -------------------------------------------------------------------------


@cli.group()
def messages() -> None:
    """Find messages by state, time and batch; count what is not final yet."""


_STATES = [s.value for s in MessageStatus]


@messages.command("list")
@click.option("--status", "statuses", multiple=True, type=click.Choice(_STATES), help="Only this state (repeatable).")
@click.option("--since", help="Created at or after: 30m, 24h, 7d or an ISO time (naive = KMSG_TIMEZONE).")
@click.option("--batch", "batch_id", help="Only this batch's messages.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message and line.")
def list_messages(statuses: tuple[str, ...], since: str | None, batch_id: str | None, limit: int, as_json: bool) -> int:
    """The most recent messages matching every filter, newest first (numbers masked, no text)."""
    from kmsg_worker.storage.operator import list_messages as query

    with app.producer() as kmsg:
        start = None
        if since is not None:
            start = parse_time(since, "--since", now=kmsg.runtime.now(), tz=kmsg.settings.timezone)
        found = query(kmsg.runtime.store.sessions, statuses=statuses, since=start, batch_id=batch_id, limit=limit)
    rows = [{**plain(m), "to": mask_phone(m.to)} for m in found]
    if as_json:
        echo_json_lines(rows)
        return 0
    echo_table(rows, ["id", "status", "type", "to", "provider", "error_code", "batch_id", "created_at"])
    return 0


@messages.command()
@click.option(
    "--older-than",
    help="Exit 1 if a message was due longer ago than this: 90s, 10m, 2h, 1d (or an ISO time).",
)
@JSON_OPTION
def pending(older_than: str | None, as_json: bool) -> int:
    """Messages not final yet, per state: how many, and how long the oldest has waited.

    A message's age runs from when it was accepted (a scheduled one: from its time). With
    --older-than, the command exits 1 when any message is older: a check for cron or a probe.
    """
    from kmsg_worker.storage.operator import pending_by_state

    with app.producer() as kmsg:
        now = kmsg.runtime.now()
        threshold = timedelta(0)
        if older_than is not None:
            cutoff = parse_time(older_than, "--older-than", now=now, tz=kmsg.settings.timezone)
            threshold = max(now - cutoff, timedelta(0))
        states = pending_by_state(kmsg.runtime.store.sessions, now=now, older_than=threshold)
    late = sum(s.older for s in states) if older_than is not None else 0
    if as_json:
        echo_json(
            {
                "at": now.astimezone(UTC),
                "older_than_seconds": threshold.total_seconds() if older_than is not None else None,
                "older": late,
                "states": states,
            }
        )
    else:
        rows = [
            {"state": s.status, "count": s.count, "oldest": age_text(s.oldest_age) if s.count else "", "older": s.older}
            for s in states
        ]
        echo_table(rows, ["state", "count", "oldest", *(["older"] if older_than is not None else [])])
        if late:
            click.echo(f"{late} message(s) waiting longer than {age_text(threshold.total_seconds())}", err=True)
    return EXIT_CHECK_FAILED if late else 0


# -- dead -------------------------------------------------------------------------------------------


@cli.group()
def dead() -> None:
    """Dead messages (redelivered or crashed on too often) and dead letters (unreadable tasks)."""


@dead.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@JSON_OPTION
def dead_list(limit: int, as_json: bool) -> int:
    """List dead messages and dead letters, newest first."""
    from kmsg_worker.storage.operator import dead_letters, list_messages

    with app.producer() as kmsg:
        sessions = kmsg.runtime.store.sessions
        found = list_messages(sessions, statuses=[MessageStatus.DEAD.value], limit=limit)
        letters = dead_letters(sessions, limit)
    messages_ = [{**plain(m), "to": mask_phone(m.to)} for m in found]
    if as_json:
        echo_json({"messages": messages_, "dead_letters": letters})
        return 0
    echo_table(messages_, ["id", "type", "deliveries", "error_code", "updated_at"], title="dead messages")
    click.echo()
    rows = [{**plain(d), "reason": d.reason[:60]} for d in letters]
    echo_table(rows, ["id", "task", "reason", "created_at"], title="dead letters (unreadable tasks)")
    return 0


@dead.command("retry")
@click.argument("message_id")
@JSON_OPTION
def dead_retry(message_id: str, as_json: bool) -> int:
    """Put a dead message back in its queue, its delivery count reset."""
    from kmsg_worker.storage.operator import requeue_dead

    with app.producer() as kmsg:
        priority = requeue_dead(kmsg.runtime.store.sessions, message_id, now=kmsg.runtime.now())
        if priority is None:
            raise ValidationError("message_id", "state", f"{message_id} is not dead")
        kmsg.runtime.dispatcher.send([message_id], priority=priority)
    if as_json:
        echo_json({"id": message_id, "status": MessageStatus.QUEUED.value})
    else:
        click.echo(f"{message_id} requeued")
    return 0
