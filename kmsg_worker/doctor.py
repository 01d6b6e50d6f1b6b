"""``kmsg doctor``: is this deployment able to deliver messages right now, and if not, what to do next.

Each check prints ``OK``, ``WARN``, ``FAIL`` or ``SKIP`` with what it saw and, when something is
wrong, the next step to take. The command exits 1 when any check fails (0 otherwise), so it can gate
a deploy or back a container health check. Every network call is bounded by ``--timeout``.

Checks, in order:

* **database**: reachable (``SELECT 1``), and its clock read for the skew check (PostgreSQL).
* **migrations**: PostgreSQL at the newest Alembic revision; SQLite has every table.
* **broker**: Redis answers ``PING`` and keeps ``maxmemory-policy noeviction`` (eviction deletes
  kombu's bindings); the embedded broker's folder is writable.
* **consumption**: workers *consume*, not merely run: the oldest ``queued`` message per queue is
  younger than ``--max-queue-age``, scheduled sends are not overdue, status checks are not far behind
  (B13: a worker can stay alive and stop consuming after a Redis reconnect).
* **beat**: the maintenance sweep and the status poll each left a fresh heartbeat (which proves that
  beat fires *and* a worker consumes their queues).
* **workers** (``--ping``): ``celery inspect ping`` answers.
* **provider:<name>**: its settings are complete and an authenticated probe (``Provider.health()``,
  the balance API where there is one) succeeds; a zero balance is a warning.
* **clock**: local UTC time against the database server and the providers' ``Date`` headers; Solapi
  refuses signatures more than 15 minutes off.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from kmsg_worker.dispatch import CELERY_APP
from kmsg_worker.errors import ConfigurationError, ProviderError
from kmsg_worker.heartbeat import read_heartbeats
from kmsg_worker.observability.backlog import read_backlog
from kmsg_worker.providers.base import Provider
from kmsg_worker.providers.base_http import HttpProvider, make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings
from kmsg_worker.storage import queries
from kmsg_worker.storage.db import make_engine, make_sessionmaker
from kmsg_worker.storage.migrate import head_revision
from kmsg_worker.storage.models import Base
from kmsg_worker.storage.webhooks import list_endpoints

__all__ = ["CheckResult", "DoctorOptions", "DoctorReport", "Status", "add_subcommand", "run_doctor", "safe_url"]

#: Solapi (and most HMAC-signed APIs) refuse a request signed more than 15 minutes off.
SIGNATURE_WINDOW = 900.0

Ping = Callable[[float], Sequence[str]]


class Status(StrEnum):
    """The verdict of one check."""

    OK = "OK"  #: Working.
    WARN = "WARN"  #: Working, but needs attention soon.
    FAIL = "FAIL"  #: Broken: messages will not be delivered (or not on time).
    SKIP = "SKIP"  #: Not applicable here, or impossible because an earlier check failed.


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's output.

    Attributes:
        name: The check (``database``, ``provider:solapi`` ...).
        status: Its verdict.
        detail: What was observed.
        hint: The next step to take (empty when nothing is to be done).
    """

    name: str
    status: Status
    detail: str
    hint: str = ""


@dataclass
class DoctorReport:
    """Every check's result."""

    checks: list[CheckResult] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str, hint: str = "") -> CheckResult:
        """Record one result and return it."""
        result = CheckResult(name, status, detail, hint)
        self.checks.append(result)
        return result

    def status_of(self, name: str) -> Status | None:
        """The status of check ``name`` (``None`` if it did not run)."""
        return next((c.status for c in self.checks if c.name == name), None)

    @property
    def failed(self) -> list[CheckResult]:
        """The failed checks."""
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def exit_code(self) -> int:
        """1 when any check failed, else 0."""
        return 1 if self.failed else 0

    def render(self) -> str:
        """The terminal form: one line per check, the next step indented under a problem."""
        width = max((len(c.name) for c in self.checks), default=8)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status.value:<5} {c.name:<{width}}  {c.detail}")
            if c.hint and c.status in (Status.FAIL, Status.WARN):
                lines.append(f"{'':<5} {'':<{width}}  -> {c.hint}")
        warnings = sum(1 for c in self.checks if c.status is Status.WARN)
        lines.append("")
        lines.append(
            f"{len(self.failed)} failed, {warnings} warning(s), {len(self.checks)} checks"
            if self.failed or warnings
            else f"all {len(self.checks)} checks passed"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kmsg doctor --json``)."""
        return {"ok": not self.failed, "checks": [{**asdict(c), "status": c.status.value} for c in self.checks]}


@dataclass(frozen=True)
class DoctorOptions:
    """Thresholds and switches.

    Attributes:
        max_queue_age: Oldest ``queued`` message allowed, seconds (older: workers are not consuming).
        heartbeat_max_age: Oldest heartbeat allowed, seconds; default ``max(30, 3 x sweep interval + 10)``.
        tracking_max_lag: How far behind status checks may run before a warning, seconds.
        probe_providers: Call each provider's authenticated health probe.
        ping: Also run ``celery inspect ping`` through this callable (``None``: skip).
        timeout: Bound of every network call, seconds.
        clock_warn: Skew that is worth a warning, seconds.
    """

    max_queue_age: float = 120.0
    heartbeat_max_age: float | None = None
    tracking_max_lag: float = 600.0
    probe_providers: bool = True
    ping: Ping | None = None
    timeout: float = 3.0
    clock_warn: float = 30.0


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("@")[-1]
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- the checks -----------------------------------------------------------------------------------


def _check_database(settings: Settings, report: DoctorReport, clocks: dict[str, float]) -> Engine | None:
    url = settings.database_url
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not Path(path).exists():
            report.add(
                "database",
                Status.FAIL,
                f"{shown}: the file does not exist",
                "start a worker once (it creates the schema), or fix KMSG_DATABASE_URL / KMSG_VAR_DIR",
            )
            return None
    engine = make_engine(url, pool_size=1)
    started = time.perf_counter()
    try:
        probe = queries.probe_database(engine)
        if probe.server_now is not None:
            clocks["database"] = (probe.local_now - probe.server_now).total_seconds()
        what = probe.product
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:200]
        report.add(
            "database",
            Status.FAIL,
            f"{shown}: {reason}",
            "start PostgreSQL or fix KMSG_DATABASE_URL (`pg_isready -h HOST` must answer)",
        )
        return None
    report.add("database", Status.OK, f"{what} at {shown} ({(time.perf_counter() - started) * 1000:.0f} ms)")
    return engine


def _check_migrations(engine: Engine, report: DoctorReport) -> None:
    try:
        tables = queries.table_names(engine)
        if engine.dialect.name == "sqlite":
            missing = sorted(set(Base.metadata.tables) - tables)
            if missing:
                report.add(
                    "migrations",
                    Status.WARN,
                    f"embedded schema lacks {', '.join(missing)}",
                    "start a worker once: the embedded default creates missing tables at start",
                )
            else:
                report.add("migrations", Status.OK, f"embedded schema present ({len(Base.metadata.tables)} tables)")
            return
        current = queries.schema_revision(engine)
    except SQLAlchemyError as exc:
        report.add("migrations", Status.FAIL, f"cannot read the schema: {type(exc).__name__}", "check database rights")
        return
    head = head_revision()
    if current == head:
        report.add("migrations", Status.OK, f"at the newest revision {head}")
    elif current is None:
        report.add("migrations", Status.FAIL, f"never migrated (newest is {head})", "run `kmsg migrate` (make migrate)")
    else:
        report.add("migrations", Status.FAIL, f"at {current}, newest is {head}", "run `kmsg migrate` (make migrate)")


def _check_broker(settings: Settings, report: DoctorReport, timeout: float) -> bool:
    url = settings.broker_url
    shown = safe_url(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        # Imported here, a real cost: redis takes ~380 ms to import (python -X importtime), and
        # every `kmsg` command loads this module; only a Redis broker needs it.
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            started = time.perf_counter()
            client.ping()
            elapsed = (time.perf_counter() - started) * 1000
            policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", "?"))
        except redis.RedisError as exc:
            report.add(
                "broker",
                Status.FAIL,
                f"{shown}: {exc}",
                "start Redis or fix KMSG_BROKER_URL (`redis-cli -u URL ping` must answer PONG)",
            )
            return False
        finally:
            client.close()
        if policy not in ("noeviction", "?"):
            report.add(
                "broker",
                Status.WARN,
                f"{shown} answers ({elapsed:.0f} ms) but maxmemory-policy is {policy}",
                "set `maxmemory-policy noeviction`: eviction deletes Celery's queue bindings",
            )
        else:
            report.add("broker", Status.OK, f"Redis at {shown} answers ({elapsed:.0f} ms), maxmemory-policy {policy}")
        return True
    if url.startswith("filesystem"):
        folder = settings.var_dir / "broker" / "queue"
        if folder.is_dir() and _writable(folder):
            report.add("broker", Status.OK, f"embedded filesystem broker at {folder}")
            return True
        report.add(
            "broker", Status.FAIL, f"{folder} is missing or not writable", "start a worker once, or fix KMSG_VAR_DIR"
        )
        return False
    try:
        # Imported here, a real cost: kombu's connection module takes ~75-120 ms to import
        # (python -X importtime), and only a broker that is neither Redis nor the embedded one needs it.
        from kombu import Connection  # type: ignore[attr-defined,unused-ignore]

        with Connection(url, connect_timeout=timeout) as conn:  # type: ignore[no-untyped-call,unused-ignore]
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any transport's connection error
        report.add("broker", Status.FAIL, f"{shown}: {exc}", "start the broker or fix KMSG_BROKER_URL")
        return False
    report.add("broker", Status.OK, f"{shown} answers")
    return True


def _writable(folder: Path) -> bool:
    probe = folder / f".doctor-{time.monotonic_ns()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def _check_consumption(
    settings: Settings, engine: Engine, report: DoctorReport, options: DoctorOptions, broker_ok: bool
) -> None:
    snap = read_backlog(settings, engine) if broker_ok else read_backlog(settings.with_overrides(broker_url=""), engine)
    if "database" in snap.errors:
        report.add("consumption", Status.SKIP, f"database unreadable: {snap.errors['database']}")
        return
    lengths = ", ".join(f"{q} {n}" for q, n in snap.queue_length.items() if n) or "all broker queues empty"
    stuck = {q: a for q, a in snap.oldest_queued_age.items() if a > options.max_queue_age}
    problems: list[str] = []
    hints: list[str] = []
    if stuck:
        problems.append(
            "oldest queued message "
            + ", ".join(f"{q} {a:.0f} s" for q, a in sorted(stuck.items()))
            + f" (limit {options.max_queue_age:.0f} s)"
        )
        hints.append(
            "workers are not consuming: `celery -A config.celery inspect ping` / `inspect active_queues`, "
            "restart the workers (a worker can stay alive and stop consuming after a Redis reconnect)"
        )
    late = 2 * settings.sweep_interval + 60
    if snap.scheduled_overdue and snap.scheduled_oldest_overdue_age > late:
        problems.append(
            f"{snap.scheduled_overdue} scheduled message(s) overdue by up to {snap.scheduled_oldest_overdue_age:.0f} s"
        )
        hints.append("scheduled sends are dispatched by the beat sweep: is `celery beat` running?")
    if problems:
        report.add("consumption", Status.FAIL, "; ".join(problems) + f"; {lengths}", "; ".join(hints))
        return
    queued = sum(snap.queued.values())
    detail = f"{queued} queued, oldest {max(snap.oldest_queued_age.values(), default=0):.0f} s; {lengths}"
    if snap.tracking_due and snap.tracking_oldest_due_age > options.tracking_max_lag:
        report.add(
            "consumption",
            Status.WARN,
            f"{detail}; {snap.tracking_due} status check(s) behind by up to {snap.tracking_oldest_due_age:.0f} s",
            "status polling is behind: add workers for kmsg.poll, or check the provider status API",
        )
        return
    report.add("consumption", Status.OK, detail)


def _check_beat(settings: Settings, engine: Engine, report: DoctorReport, options: DoctorOptions) -> None:
    limit = options.heartbeat_max_age or max(30.0, 3 * settings.sweep_interval + 10)
    try:
        beats = read_heartbeats(engine)
    except SQLAlchemyError:
        report.add("beat", Status.FAIL, "no heartbeat table", "run `kmsg migrate` (make migrate)")
        return
    now = datetime.now(UTC)
    missing = [job for job in ("sweep", "poll") if job not in beats]
    ages = {job: (now - info.beat_at).total_seconds() for job, info in beats.items()}
    stale = {job: age for job, age in ages.items() if age > limit}
    shown = ", ".join(f"{job} {age:.0f} s ago" for job, age in sorted(ages.items()))
    if missing or stale:
        what = []
        if missing:
            what.append(f"never ran: {', '.join(missing)}")
        if stale:
            what.append(f"stale (limit {limit:.0f} s): {shown}")
        report.add(
            "beat",
            Status.FAIL,
            "; ".join(what),
            "start exactly one `celery -A config.celery beat` (make beat) and a worker consuming "
            "kmsg.maintenance and kmsg.poll",
        )
        return
    report.add("beat", Status.OK, f"heartbeats {shown} (limit {limit:.0f} s)")


def _check_ping(report: DoctorReport, options: DoctorOptions) -> None:
    if options.ping is None:
        return
    try:
        nodes = list(options.ping(options.timeout))
    except Exception as exc:  # noqa: BLE001 - whatever the broker raises
        report.add("workers", Status.FAIL, f"inspect ping failed: {exc}", "check the broker")
        return
    if not nodes:
        report.add("workers", Status.FAIL, "no worker answered `inspect ping`", "start workers (make worker)")
        return
    report.add("workers", Status.OK, f"{len(nodes)} answered: {', '.join(sorted(nodes))}")


def _date_skew(client: httpx.Client, url: str) -> float | None:
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    header = response.headers.get("Date")
    if not header:
        return None
    try:
        remote = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if remote.tzinfo is None:
        remote = remote.replace(tzinfo=UTC)
    return (datetime.now(UTC) - remote).total_seconds()


def _check_providers(
    settings: Settings, report: DoctorReport, options: DoctorOptions, client: httpx.Client, clocks: dict[str, float]
) -> None:
    for name in settings.providers:
        check = f"provider:{name}"
        try:
            cls = provider_class(name)
            config = settings.provider_config(name)
            for key in sorted(cls.required_credentials):
                config.secret(key)
        except ConfigurationError as exc:
            variable = getattr(exc, "variable", None) or f"KMSG_{name.upper()}_*"
            report.add(check, Status.FAIL, str(exc), f"set {variable} (secrets come from the environment only)")
            continue
        provider: Provider = cls(config, client) if issubclass(cls, HttpProvider) else cls(config)
        base_url = getattr(provider, "base_url", "") or ""
        where = f" at {base_url}" if base_url else ""
        if base_url:
            skew = _date_skew(client, base_url)
            if skew is not None:
                clocks[name] = skew
        if not options.probe_providers:
            report.add(check, Status.OK, f"configured{where} (probe skipped)")
            continue
        try:
            health = provider.health()
        except ProviderError as exc:  # health() should not raise, but an adapter may
            report.add(check, Status.FAIL, f"{where.strip()} {exc}".strip(), _provider_hint(name, str(exc)))
            continue
        if not health.ok:
            report.add(check, Status.FAIL, f"{health.detail}{where}", _provider_hint(name, health.detail))
            continue
        latency = f" in {health.latency_ms:.0f} ms" if health.latency_ms is not None else ""
        if provider.capabilities.balance:
            try:
                balance = provider.balance()
            except ProviderError:
                balance = None
            if balance is not None and balance.amount <= 0:
                report.add(
                    check,
                    Status.WARN,
                    f"authenticated{where}{latency}; balance {balance.amount:g} {balance.currency}",
                    f"top up the {name} account: sends will be refused",
                )
                continue
        report.add(check, Status.OK, f"{health.detail}{where}{latency}")


def _senders_in_use(settings: Settings, engine: Engine | None) -> set[str]:
    """The default sender and every advertiser profile's sender number (digits)."""
    used = set()
    if settings.default_sender:
        used.add("".join(c for c in settings.default_sender if c.isdigit()))
    if engine is not None:
        from kmsg_worker.storage.advertising import ANY_SENDER, advertisers
        from kmsg_worker.storage.repo import Store

        try:
            used.update(p.sender for p in advertisers(Store(engine)) if p.sender != ANY_SENDER)
        except SQLAlchemyError:
            pass  # the schema predates advertiser profiles: the migrations check says so
    return used


def _check_senders(
    settings: Settings, engine: Engine | None, report: DoctorReport, options: DoctorOptions, client: httpx.Client
) -> None:
    """Registered sender numbers (발신번호 사전등록): the ones in use must be on each provider's list."""
    used = _senders_in_use(settings, engine)
    for name in settings.providers:
        check = f"senders:{name}"
        numbers: frozenset[str] | None = None
        source = "KMSG_REGISTERED_SENDERS"
        if options.probe_providers:
            try:
                cls = provider_class(name)
                config = settings.provider_config(name)
                provider: Provider = cls(config, client) if issubclass(cls, HttpProvider) else cls(config)
                numbers = provider.registered_senders()
                source = f"{name}'s API"
            except (ProviderError, ConfigurationError) as exc:
                report.add(
                    check, Status.WARN, f"could not list the registered numbers: {exc}", _provider_hint(name, str(exc))
                )
                continue
        if numbers is None:
            numbers = settings.registered_senders.get(name)
            source = "KMSG_REGISTERED_SENDERS"
        if numbers is None:
            report.add(check, Status.SKIP, "no list of registered sender numbers (not checked)")
            continue
        missing = sorted(used - numbers)
        if missing:
            report.add(
                check,
                Status.FAIL,
                f"sender number(s) {', '.join(missing)} not registered with {name} "
                f"({len(numbers)} registered, from {source})",
                f"register them with {name} (발신번호 사전등록), or change KMSG_DEFAULT_SENDER or the profiles",
            )
        else:
            report.add(
                check, Status.OK, f"{len(numbers)} registered (from {source}); {len(used)} in use, all registered"
            )


def _check_suppression_key(settings: Settings, report: DoctorReport) -> None:
    """Advertising needs the opt-out list's key: shared by every host, so not a file on PostgreSQL."""
    if settings.suppression_key:
        report.add("suppression-key", Status.OK, "KMSG_SUPPRESSION_KEY is set")
    elif settings.database_url.startswith("sqlite"):
        report.add("suppression-key", Status.OK, f"a key file under {settings.var_dir} (embedded default)")
    else:
        report.add(
            "suppression-key",
            Status.WARN,
            "KMSG_SUPPRESSION_KEY is not set: advertising messages are refused (the opt-out list needs it)",
            "set KMSG_SUPPRESSION_KEY to one secret shared by every host (docs/ADVERTISING.md)",
        )


def _provider_hint(name: str, detail: str) -> str:
    lowered = detail.lower()
    if "skew" in lowered or ("time" in lowered and "date" in lowered):
        return "the host clock is off: synchronise it with NTP (signatures expire after 15 minutes)"
    if any(word in lowered for word in ("auth", "signature", "api key", "apikey", "401", "403")):
        return f"check KMSG_{name.upper()}_API_KEY and its secret (they must belong to the same account)"
    if any(word in lowered for word in ("connect", "timeout", "network")):
        return f"check KMSG_{name.upper()}_BASE_URL and outbound network access"
    return f"check the {name} settings (KMSG_{name.upper()}_*)"


def _check_clock(report: DoctorReport, options: DoctorOptions, clocks: dict[str, float]) -> None:
    if not clocks:
        report.add("clock", Status.SKIP, "no reference clock (SQLite database and no provider Date header)")
        return
    shown = ", ".join(f"{source} {skew:+.1f} s" for source, skew in sorted(clocks.items()))
    worst = max(abs(v) for v in clocks.values())
    if worst > SIGNATURE_WINDOW:
        report.add(
            "clock",
            Status.FAIL,
            f"local clock is off by up to {worst:.0f} s ({shown})",
            "synchronise the host clock (NTP): Solapi refuses requests signed more than 15 minutes off",
        )
    elif worst > options.clock_warn:
        report.add("clock", Status.WARN, f"skew {shown}", "synchronise the host clock (NTP)")
    else:
        report.add("clock", Status.OK, f"skew {shown} (Date headers have 1 s resolution)")


def _check_webhooks(engine: Engine, report: DoctorReport) -> None:
    """Disabled or failing webhook endpoints: their tenants are not being told what happened."""
    try:
        endpoints = list_endpoints(make_sessionmaker(engine))
    except SQLAlchemyError as exc:
        report.add("webhooks", Status.SKIP, f"cannot read the endpoints: {type(exc).__name__}")
        return
    disabled = [e for e in endpoints if e.disabled_at is not None]
    failing = [e for e in endpoints if e.disabled_at is None and e.failures]
    if disabled:
        first = disabled[0]
        report.add(
            "webhooks",
            Status.WARN,
            f"{len(disabled)} endpoint(s) disabled after failing, e.g. {first.id} of {first.tenant}: "
            f"{(first.disabled_reason or '')[:160]}",
            "fix the receiver, then `kmsg webhooks enable <id>` (pending events go out again; "
            "`kmsg webhooks replay --since ...` re-sends older ones)",
        )
    elif failing:
        first = failing[0]
        report.add(
            "webhooks",
            Status.WARN,
            f"{len(failing)} endpoint(s) failing, e.g. {first.id} of {first.tenant}: {(first.last_error or '')[:160]}",
            "check the receiver; `kmsg webhooks show <id>` lists the last attempts",
        )
    else:
        report.add("webhooks", Status.OK, f"{len(endpoints)} endpoint(s), none failing")


def run_doctor(
    settings: Settings, options: DoctorOptions | None = None, *, http_client: httpx.Client | None = None
) -> DoctorReport:
    """Run every check once and return the results (nothing is printed).

    Args:
        settings: What to check.
        options: Thresholds and switches.
        http_client: For the provider probes (default: a short-timeout client closed at the end).
    """
    options = options or DoctorOptions()
    report = DoctorReport()
    clocks: dict[str, float] = {}
    engine = _check_database(settings, report, clocks)
    try:
        if engine is not None:
            _check_migrations(engine, report)
        else:
            report.add("migrations", Status.SKIP, "database unreachable")
        broker_ok = _check_broker(settings, report, options.timeout)
        if engine is not None:
            _check_consumption(settings, engine, report, options, broker_ok)
            _check_beat(settings, engine, report, options)
            _check_webhooks(engine, report)
        else:
            report.add("consumption", Status.SKIP, "database unreachable")
            report.add("beat", Status.SKIP, "database unreachable")
        if broker_ok:
            _check_ping(report, options)
        client = http_client or make_http_client(timeout=httpx.Timeout(options.timeout))
        try:
            _check_providers(settings, report, options, client, clocks)
            _check_senders(settings, engine, report, options, client)
            _check_suppression_key(settings, report)
        finally:
            if http_client is None:
                client.close()
        _check_clock(report, options, clocks)
    finally:
        if engine is not None:
            engine.dispose()
    return report


# -- command line ---------------------------------------------------------------------------------


def _celery_ping(timeout: float) -> list[str]:
    """The workers that answer ``celery inspect ping``, asked through Celery's own command line.

    The library never imports the project's Celery app (``config``): like ``kmsg demo`` starting
    workers, it names the app to ``celery -A`` in a child process.
    """
    command = [sys.executable, "-m", "celery", "-A", CELERY_APP, "inspect", "ping", "--json"]
    result = subprocess.run(
        [*command, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        # Celery's start-up (the app, its broker connection) comes on top of the ping's own wait.
        timeout=timeout + 60,
        check=False,
    )
    if result.returncode != 0:
        if "No nodes replied" in result.stderr + result.stdout:
            return []
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(lines[-1][:300] if lines else f"celery exited with {result.returncode}")
    replies = json.loads(result.stdout.strip().splitlines()[-1])
    return sorted(replies) if isinstance(replies, dict) else [name for reply in replies for name in reply]


def cmd_doctor(ns: argparse.Namespace) -> int:
    """``kmsg doctor``: run the checks, print them, exit 1 on any failure."""
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        report = DoctorReport()
        report.add("settings", Status.FAIL, str(exc), f"fix {exc.variable or 'the KMSG_* variables'}")
    else:
        options = DoctorOptions(
            max_queue_age=ns.max_queue_age,
            heartbeat_max_age=ns.max_heartbeat_age,
            probe_providers=not ns.no_probe,
            ping=_celery_ping if ns.ping else None,
            timeout=ns.timeout,
        )
        print(f"kmsg doctor: broker {safe_url(settings.broker_url)}, database {safe_url(settings.database_url)}")
        report = run_doctor(settings, options)
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) if ns.json else report.render())
    return report.exit_code


def add_subcommand(sub: Any) -> None:
    """Register ``kmsg doctor`` on the CLI's subparsers."""
    parser = sub.add_parser("doctor", help="check broker, database, migrations, beat, workers, providers, clock")
    parser.add_argument("--max-queue-age", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--max-heartbeat-age", type=float, default=None, help="seconds (default 3 sweeps + 10)")
    parser.add_argument("--ping", action="store_true", help="also run `celery inspect ping`")
    parser.add_argument("--no-probe", action="store_true", help="do not call the providers' APIs")
    parser.add_argument("--timeout", type=float, default=3.0, help="bound of every network call, seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=cmd_doctor)
