"""Operating a deployment: ``migrate``, ``doctor``, ``report``, ``circuits``, ``metrics-server``,
``fake-providers``."""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import click

from kmsg_worker.cli.app import cli
from kmsg_worker.cli.messages import JSON_OPTION
from kmsg_worker.cli.output import echo_json, echo_json_lines, echo_table, note

__all__: list[str] = []


def _namespace(**values: Any) -> argparse.Namespace:
    """The options of a command whose body lives with its subject (doctor, report, metrics)."""
    return argparse.Namespace(**values)


@cli.command()
@JSON_OPTION
def migrate(as_json: bool) -> int:
    """Apply the database migrations to KMSG_DATABASE_URL (PostgreSQL).

    The embedded SQLite database needs none: its tables are created when kmsg first opens it.
    """
    from kmsg_worker.settings import Settings
    from kmsg_worker.storage.migrate import current_revision, upgrade

    settings = Settings.from_env()
    if settings.database_url.startswith("sqlite"):
        text = "SQLite: the tables are created when kmsg opens the database; migrations are for PostgreSQL"
        if as_json:
            echo_json({"migrated": False, "revision": None, "note": text})
        else:
            note(text)
        return 0
    upgrade(settings.database_url)
    revision = current_revision(settings.database_url)
    if as_json:
        echo_json({"migrated": True, "revision": revision})
    else:
        click.echo(f"database is at the latest revision ({revision})")
    return 0


@cli.command()
@click.option("--max-queue-age", type=float, default=120.0, show_default=True, help="Seconds a queue may lag.")
@click.option("--max-heartbeat-age", type=float, default=None, help="Seconds (default: 3 sweeps + 10).")
@click.option("--ping", is_flag=True, help="Also run `celery inspect ping`.")
@click.option("--no-probe", is_flag=True, help="Do not call the providers' APIs.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Bound of every network call, seconds.")
@JSON_OPTION
def doctor(
    max_queue_age: float, max_heartbeat_age: float | None, ping: bool, no_probe: bool, timeout: float, as_json: bool
) -> int:
    """Check broker, database, migrations, beat, workers, providers and clock; exit 1 on a failure."""
    from kmsg_worker.doctor import cmd_doctor

    return cmd_doctor(
        _namespace(
            max_queue_age=max_queue_age,
            max_heartbeat_age=max_heartbeat_age,
            ping=ping,
            no_probe=no_probe,
            timeout=timeout,
            json=as_json,
        )
    )


@cli.command()
@click.option("--since", default="24h", show_default=True, help="Start: ISO time (naive = KMSG_TIMEZONE), 24h, 7d ...")
@click.option("--until", default="now", show_default=True, help="End (exclusive): ISO time or 'now'.")
@click.option("--html", help="Chart file (default: $KMSG_VAR_DIR/reports/kmsg-report-<time>.html).")
@click.option("--no-html", is_flag=True, help="Print the tables only.")
@click.option("--prices", help="Unit prices in KRW over the defaults, e.g. '{\"SMS\": 9.9}'.")
@JSON_OPTION
def report(since: str, until: str, html: str | None, no_html: bool, prices: str | None, as_json: bool) -> int:
    """Delivery rate, latency, failovers, errors and cost over a time range (and an HTML chart)."""
    from kmsg_worker.report import cmd_report

    return cmd_report(_namespace(since=since, until=until, html=html, no_html=no_html, prices=prices, json=as_json))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per provider and line.")
def circuits(as_json: bool) -> int:
    """Each provider's circuit breaker as the workers share it (needs KMSG_REDIS_URL)."""
    from kmsg_worker.circuit import OPEN, shared_states
    from kmsg_worker.settings import Settings

    settings = Settings.from_env()
    snaps = shared_states(settings)
    if snaps is None:
        note("no KMSG_REDIS_URL: each worker process keeps its own circuits in memory; nothing shared to show")
        return 0
    if as_json:
        echo_json_lines(snap.__dict__ for snap in snaps)
        return 0
    enabled = settings.circuit.enabled
    rows = [
        {
            "provider": s.provider,
            "state": s.state if enabled else f"{s.state} (disabled)",
            "window": f"{s.failures}/{s.requests} failed",
            "consecutive": s.consecutive,
            "opened_at": datetime.fromtimestamp(s.opened_at, UTC) if s.opened_at else None,
            "retry_in": f"{s.retry_in:.1f}s" if s.state == OPEN else "",
        }
        for s in snaps
    ]
    echo_table(rows, ["provider", "state", "window", "consecutive", "opened_at", "retry_in"])
    return 0


@cli.command("metrics-server")
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
@click.option("--addr", default="127.0.0.1", show_default=True, help="Bind address (loopback unless scraped remotely).")
@click.option("--dir", "folder", help="Worker metric files (default: $KMSG_VAR_DIR/metrics).")
@click.option("--parent-pid", type=int, default=0, hidden=True)
def metrics_server(port: int, addr: str, folder: str | None, parent_pid: int) -> int:
    """Serve Prometheus metrics of this host's workers and the queue and backlog gauges."""
    from kmsg_worker.observability.server import cmd_metrics_server

    return cmd_metrics_server(_namespace(port=port, addr=addr, dir=folder, parent_pid=parent_pid))


#: The control endpoints of every fake server, when the testing package does not describe them.
_FAULT_ENDPOINTS = """\
Each fake server answers its provider's API and, under /_fake/, a control API:

\b
  GET  /_fake/stats    requests, accepted messages, deliveries per recipient
  POST /_fake/faults   inject faults, e.g. {"error_rate": 0.2, "latency_ms": 50}:
                       latency_ms, error_rate, error_status, rate_limit_rate,
                       retry_after, reset_rate, slow_rate, slow_ms,
                       lost_response_rate (accepted, then the response is lost)
  POST /_fake/rules    delivery outcome per recipient or by default
  POST /_fake/reset    clear the ledger and the faults
"""


def _faults_help() -> str:
    import kmsg_worker.testing as testing

    text = getattr(testing, "FAULTS_HELP", None)
    return text if isinstance(text, str) and text.strip() else _FAULT_ENDPOINTS


@cli.command("fake-providers", epilog=_faults_help())
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="First port (0 = any free port).")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (keep loopback outside a container)."
)
@JSON_OPTION
def fake_providers(port: int, host: str, as_json: bool) -> int:
    """Run fake Solapi, IWINV and Aligo servers until interrupted (for the demo and tests)."""
    from kmsg_worker.testing.servers import start_fakes

    # Blocked before the server threads start, so SIGTERM reaches sigwait() below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    fakes = start_fakes(host=host, base_port=port)
    try:
        if as_json:
            echo_json({name: fake.url for name, fake in fakes.items()})
        else:
            for name, fake in fakes.items():
                click.echo(f"{name}: {fake.url}   (export KMSG_{name.upper()}_BASE_URL={fake.url})")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for fake in fakes.values():
            fake.stop()
    return 0
