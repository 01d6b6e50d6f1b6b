"""The ``kmsg`` command line.

Exit codes: 0 ok; 2 invalid input or configuration; 3 other errors (provider, storage, timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kmsg_worker.dispatch import QUEUES
from kmsg_worker.errors import ConfigurationError, KmsgError, MessageNotFoundError, ValidationError
from kmsg_worker.logging import configure_logging, mask_phone

__all__ = ["main"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _producer() -> Any:
    from kmsg_worker.producer import KMsg

    return KMsg()


# -- demo -----------------------------------------------------------------------------------------

DEMO_MESSAGES: list[tuple[str, dict[str, Any]]] = [
    (
        "OTP SMS",
        {"to": "010-1234-5678", "text": "[kmsg] 인증번호 [482913] 를 입력해 주세요", "priority": "high"},
    ),
    (
        "long text -> LMS",
        {
            "to": "010-2345-6789",
            "text": (
                "#{name}님, 주문하신 상품이 오늘 출고되었습니다. 배송 조회는 앱의 주문 내역에서 확인하실 수 있습니다."
            ),
            "variables": {"name": "김민준"},
        },
    ),
    (
        "ALIMTALK",
        {
            "type": "ALIMTALK",
            "to": "010-3456-7890",
            "template_id": "ORDER_SHIPPED",
            "variables": {"name": "이서연", "order": "A-1024"},
            "kakao": {"profile_id": "demo-profile"},
        },
    ),
    (
        "ALIMTALK, not a Kakao user -> SMS",
        {
            "type": "ALIMTALK",
            "to": "010-4567-8901",
            "template_id": "ORDER_SHIPPED",
            "variables": {"name": "박지훈"},
            "failover": {"enabled": True, "content": "[kmsg] 주문 A-1025 이 출고되었습니다"},
            "provider_options": {"mock": {"deliver": "FAILED:3104"}},
        },
    ),
    (
        "fails permanently",
        {
            "to": "010-5678-9012",
            "text": "this number is invalid at the provider",
            "provider_options": {"mock": {"script": [{"outcome": "failure", "code": "INVALID_RECIPIENT"}]}},
        },
    ),
    (
        "fails twice, then succeeds",
        {
            "to": "010-6789-0123",
            "text": "retried with backoff",
            "provider_options": {"mock": {"fail_times": 2}},
        },
    ),
]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_demo(ns: argparse.Namespace) -> int:
    """Start a worker and beat, push the demo batch through, print every final status, stop."""
    env = dict(os.environ)
    # Demo pacing: quick sweeps and status checks so the whole story fits in seconds.
    env.setdefault("KMSG_SWEEP_INTERVAL_SECONDS", "1")
    env.setdefault("KMSG_TRACKING_FIRST_CHECK_SECONDS", "1")
    env.setdefault("KMSG_TRACKING_BACKOFF", "1,2,3")
    env.setdefault("KMSG_RETRY_BASE_SECONDS", "0.5")
    env.setdefault("KMSG_LOG_LEVEL", "WARNING")
    os.environ.update({k: v for k, v in env.items() if k.startswith("KMSG_")})
    from kmsg_worker.settings import Settings

    settings = Settings.from_env()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # The worker and beat run from the project root: hand them this directory's var folder (the
    # embedded broker and database live there), or they would use the project's own.
    env["KMSG_VAR_DIR"] = str(settings.var_dir.resolve())
    where = "embedded (SQLite + kombu filesystem transport)" if settings.embedded else "servers"
    print(f"kmsg demo: broker={_safe_url(settings.broker_url)} database={_safe_url(settings.database_url)} [{where}]")
    celery = [sys.executable, "-m", "celery", "-A", "config.celery"]
    worker = _start(
        [
            *celery,
            "worker",
            "-Q",
            ",".join(QUEUES.values()),
            "-c",
            "2",
            "-n",
            f"demo-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        env,
        settings.var_dir / "demo-worker.log",
    )
    beat = _start(
        [
            *celery,
            "beat",
            "--schedule",
            str(settings.var_dir / f"beat-schedule-{os.getpid()}"),
            "--loglevel=WARNING",
        ],
        env,
        settings.var_dir / "demo-beat.log",
    )
    procs = [worker, beat]
    try:
        from kmsg_worker.producer import KMsg

        with KMsg() as kmsg:
            sent: list[tuple[str, str]] = []
            for label, fields in DEMO_MESSAGES:
                receipt = kmsg.send(fields)
                sent.append((label, receipt.message_id))
                print(f"  accepted {receipt.message_id}  {receipt.type:<8} {label}")
            deadline = time.monotonic() + ns.timeout
            infos = {}
            while time.monotonic() < deadline:
                if worker.poll() is not None or beat.poll() is not None:
                    print("a worker or beat process exited; see var/demo-*.log", file=sys.stderr)
                    return 3
                infos = {mid: kmsg.get(mid) for _, mid in sent}
                children = [kmsg.get(c) for info in infos.values() for c in info.children]
                if all(i.final for i in infos.values()) and all(c.final for c in children):
                    break
                time.sleep(0.5)
            rows = []
            for label, mid in sent:
                info = kmsg.get(mid)
                rows.append(_demo_row(label, info))
                for child in info.children:
                    rows.append(_demo_row("  └ fallback child", kmsg.get(child)))
            print()
            _print_table(rows, ["case", "id", "type", "status", "provider", "attempts", "history", "error"])
            final = all(r["final"] for r in rows)
            print(f"\nall messages final: {'yes' if final else 'NO'}")
            return 0 if final else 3
    finally:
        _stop(procs)


def _demo_row(label: str, info: Any) -> dict[str, Any]:
    return {
        "case": label,
        "id": info.id,  # whole: ids made in the same millisecond share their first 12 digits
        "type": info.type,
        "status": info.status,
        "provider": info.provider or "",
        "attempts": len(info.attempts),
        "history": ",".join(a.outcome for a in info.attempts),
        "error": info.error_code or "",
        "final": info.final,
    }


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # noqa: BLE001 - only for display
        return url.split("@")[-1]


# -- messages -------------------------------------------------------------------------------------


def cmd_send(ns: argparse.Namespace) -> int:
    """Send one message."""
    fields: dict[str, Any] = {"to": ns.to}
    for name in (
        "text",
        "type",
        "subject",
        "template_id",
        "provider_id",
        "priority",
        "idempotency_key",
        "scheduled_at",
    ):
        value = getattr(ns, name)
        if value is not None:
            fields[name] = value
    if ns.sender:
        fields["sender"] = ns.sender
    if ns.var:
        fields["variables"] = dict(v.split("=", 1) for v in ns.var)
    with _producer() as kmsg:
        receipt = kmsg.send(fields)
    print(json.dumps(asdict(receipt), ensure_ascii=False))
    return 0


def cmd_get(ns: argparse.Namespace) -> int:
    """Show one message (the number masked), by our id or by the provider's (``--provider-id``)."""
    if (ns.message_id is None) == (ns.provider_id is None):
        raise ValidationError("message_id", "required", "give a message id or --provider-id, not both")
    if ns.provider and ns.provider_id is None:
        raise ValidationError("provider", "requires", "--provider narrows --provider-id")
    with _producer() as kmsg:
        if ns.message_id is not None:
            found = [kmsg.get(ns.message_id)]
        else:
            found = kmsg.find_by_provider_id(ns.provider_id, provider=ns.provider)
            if not found:
                where = ns.provider or "any configured provider"
                raise MessageNotFoundError(f"no message known to {where} as {ns.provider_id!r}")
    for info in found:
        data = asdict(info)
        data["to"] = mask_phone(info.to)
        print(json.dumps(data, ensure_ascii=False, default=str, indent=2))
    return 0


def cmd_cancel(ns: argparse.Namespace) -> int:
    """Cancel a message that was not dispatched yet."""
    with _producer() as kmsg:
        info = kmsg.cancel(ns.message_id)
    print(f"{info.id} {info.status}")
    return 0


def cmd_dead(ns: argparse.Namespace) -> int:
    """List dead letters and dead messages."""
    from sqlalchemy import select

    from kmsg_worker.storage.models import MessageRow

    with _producer() as kmsg:
        store = kmsg.runtime.store
        if ns.action == "list":
            with store.sessions() as s:
                dead = list(s.scalars(select(MessageRow).where(MessageRow.status == "dead").limit(ns.limit)))
            rows = [{"id": r.id, "type": r.type, "deliveries": r.deliveries, "error": r.error_code} for r in dead]
            print("dead messages:")
            _print_table(rows, ["id", "type", "deliveries", "error"])
            letters = [
                {
                    "id": d.id,
                    "task": d.task_name,
                    "reason": d.reason[:60],
                    "at": d.created_at.isoformat(timespec="seconds"),
                }
                for d in store.dead_letters(ns.limit)
            ]
            print("\ndead letters (malformed tasks):")
            _print_table(letters, ["id", "task", "reason", "at"])
            return 0
        if not ns.message_id:
            raise ValidationError("message_id", "required", "dead retry needs a message id")
        from datetime import timedelta

        from kmsg_worker.status import MessageStatus

        now = kmsg.runtime.now()
        with store.sessions.begin() as s:
            changed = (
                s.query(MessageRow)
                .filter(MessageRow.id == ns.message_id, MessageRow.status == MessageStatus.DEAD)
                .update(
                    {
                        "status": MessageStatus.QUEUED,
                        "deliveries": 0,
                        "queued_at": now - timedelta(0),
                        "final_at": None,
                    },
                    synchronize_session=False,
                )
            )
        if not changed:
            print(f"{ns.message_id} is not dead", file=sys.stderr)
            return 2
        row = store.get(ns.message_id)
        kmsg.runtime.dispatcher.send([ns.message_id], priority=row.priority if row else "normal")
        print(f"{ns.message_id} requeued")
        return 0


# -- bulk -------------------------------------------------------------------------------------------

_MESSAGE_COLUMNS = {"to", "id", "text", "type", "subject", "sender", "from", "template_id", "scheduled_at"}


def _csv_rows(path: str) -> Any:
    """Yield message rows from a CSV: known columns are message fields, every other column a variable."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        for record in csv.DictReader(fh):
            row: dict[str, Any] = {}
            variables = {}
            for key, value in record.items():
                if key is None:
                    continue
                name = key.strip()
                if name in _MESSAGE_COLUMNS:
                    if value not in (None, ""):
                        row[name] = value
                elif value is not None:
                    variables[name] = value
            if variables:
                row["variables"] = variables
            yield row


def _summary_line(summary: Any) -> str:
    st = summary.by_status
    accepted = st.get("sent", 0) + st.get("delivered", 0)
    failed = st.get("failed", 0) + st.get("unknown", 0) + st.get("dead", 0)
    pending = summary.total - accepted - failed - st.get("cancelled", 0)
    width = 30
    done = 0 if not summary.total else int(width * (summary.total - pending) / summary.total)
    return (
        f"[{'#' * done}{'.' * (width - done)}] {summary.total} accepted | {accepted} sent | "
        f"{failed} failed | {st.get('cancelled', 0)} cancelled | {pending} pending"
    )


def _print_summary(summary: Any) -> None:
    data = asdict(summary)
    for key in ("created_at", "first_sent_at", "last_sent_at", "finished_at", "cancelled_at"):
        data[key] = data[key].isoformat(timespec="seconds") if data[key] else None
    print(json.dumps(data, ensure_ascii=False, indent=2))


def cmd_send_many(ns: argparse.Namespace) -> int:
    """Send a CSV of recipients as one batch, with a live progress bar and the summary at the end."""
    defaults: dict[str, Any] = {}
    for name in ("text", "type", "subject", "template_id", "scheduled_at"):
        value = getattr(ns, name)
        if value is not None:
            defaults[name] = value
    if ns.sender:
        defaults["sender"] = ns.sender
    with _producer() as kmsg:
        receipt = kmsg.send_many(
            _csv_rows(ns.file),
            defaults=defaults,
            on_invalid="skip" if ns.skip_invalid else "reject",
            idempotency_key=ns.idempotency_key,
            chunk_size=ns.chunk_size,
        )
        for error in receipt.invalid:
            print(f"row {error.row}: {error.field}: {error.message} [{error.rule}]", file=sys.stderr)
        print(f"batch {receipt.batch_id}: {len(receipt.message_ids)} accepted, {len(receipt.invalid)} invalid")
        if ns.no_wait:
            return 0
        deadline = time.monotonic() + ns.timeout
        summary = kmsg.batch_summary(receipt.batch_id)
        tty = sys.stdout.isatty()
        while not summary.done and time.monotonic() < deadline:
            print(("\r" if tty else "") + _summary_line(summary), end="" if tty else "\n", flush=True)
            time.sleep(0.5 if tty else 5)
            summary = kmsg.batch_summary(receipt.batch_id)
        print(("\r" if tty else "") + _summary_line(summary))
        _print_summary(summary)
        return 0 if summary.done else 3


def cmd_batch(ns: argparse.Namespace) -> int:
    """Show or cancel a batch."""
    with _producer() as kmsg:
        summary = kmsg.cancel_batch(ns.batch_id) if ns.action == "cancel" else kmsg.batch_summary(ns.batch_id)
    print(_summary_line(summary))
    _print_summary(summary)
    return 0


# -- operations -----------------------------------------------------------------------------------


def cmd_migrate(ns: argparse.Namespace) -> int:
    """Apply the Alembic migrations to ``KMSG_DATABASE_URL``."""
    from kmsg_worker.storage.migrate import upgrade

    upgrade()
    print("database is at the latest revision")
    return 0


def cmd_fake_providers(ns: argparse.Namespace) -> int:
    """Run the fake provider servers on loopback until interrupted."""
    from kmsg_worker.testing.servers import start_fakes

    fakes = start_fakes(host=ns.host, base_port=ns.port)
    for name, fake in fakes.items():
        print(f"{name}: {fake.url}   (export KMSG_{name.upper()}_BASE_URL={fake.url})")
    sys.stdout.flush()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for fake in fakes.values():
            fake.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kmsg``."""
    parser = argparse.ArgumentParser(prog="kmsg", description="kmsg-worker command line")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run worker + beat and push a demo batch through")
    demo.add_argument("--timeout", type=float, default=90.0)
    demo.set_defaults(func=cmd_demo)

    send = sub.add_parser("send", help="send one message")
    send.add_argument("--to", required=True)
    send.add_argument("--text")
    send.add_argument("--type")
    send.add_argument("--subject")
    send.add_argument("--from", dest="sender")
    send.add_argument("--template-id", dest="template_id")
    send.add_argument("--provider", dest="provider_id")
    send.add_argument("--priority")
    send.add_argument("--idempotency-key", dest="idempotency_key")
    send.add_argument("--at", dest="scheduled_at", help="ISO time; naive = Asia/Seoul")
    send.add_argument("--var", action="append", help="name=value (repeatable)")
    send.set_defaults(func=cmd_send)

    many = sub.add_parser("send-many", help="send a CSV of recipients as one batch")
    many.add_argument("file", help="CSV with a 'to' column; other unknown columns become #{variables}")
    many.add_argument("--text")
    many.add_argument("--type")
    many.add_argument("--subject")
    many.add_argument("--from", dest="sender")
    many.add_argument("--template-id", dest="template_id")
    many.add_argument("--at", dest="scheduled_at")
    many.add_argument("--chunk-size", type=int, default=None)
    many.add_argument("--idempotency-key", dest="idempotency_key")
    many.add_argument("--skip-invalid", action="store_true", help="send the valid rows, list the invalid ones")
    many.add_argument("--no-wait", action="store_true", help="return after accepting; do not follow progress")
    many.add_argument("--timeout", type=float, default=3600.0)
    many.set_defaults(func=cmd_send_many)

    batch = sub.add_parser("batch", help="batch summary or cancel")
    batch.add_argument("action", choices=["status", "cancel"])
    batch.add_argument("batch_id")
    batch.set_defaults(func=cmd_batch)

    get = sub.add_parser("get", help="show a message (by our id, or by the provider's with --provider-id)")
    get.add_argument("message_id", nargs="?")
    get.add_argument("--provider-id", help="the provider's message id (Solapi messageId, IWINV/Aligo mid)")
    get.add_argument("--provider", help="with --provider-id: only this provider's messages")
    get.set_defaults(func=cmd_get)

    cancel = sub.add_parser("cancel", help="cancel a message not yet dispatched")
    cancel.add_argument("message_id")
    cancel.set_defaults(func=cmd_cancel)

    dead = sub.add_parser("dead", help="dead messages and dead letters")
    dead.add_argument("action", choices=["list", "retry"])
    dead.add_argument("message_id", nargs="?")
    dead.add_argument("--limit", type=int, default=50)
    dead.set_defaults(func=cmd_dead)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)

    fakes = sub.add_parser("fake-providers", help="run fake Solapi/IWINV/Aligo servers on 127.0.0.1")
    fakes.add_argument("--port", type=int, default=0, help="first port (0 = any free port)")
    fakes.add_argument("--host", default="127.0.0.1", help="bind address (keep loopback outside a container)")
    fakes.set_defaults(func=cmd_fake_providers)

    from kmsg_worker.circuit import cmd_circuits

    circuits = sub.add_parser("circuits", help="circuit breaker state of every provider (shared through Redis)")
    circuits.add_argument("--json", action="store_true", help="one JSON object per provider")
    circuits.set_defaults(func=cmd_circuits)

    # Operator tools register their own subcommands: doctor (exit 1 on a failed check), report, metrics-server.
    from kmsg_worker import doctor, metrics, report

    for tool in (doctor, report, metrics):
        tool.add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmsg``."""
    ns = build_parser().parse_args(argv)
    configure_logging(os.environ.get("KMSG_LOG_LEVEL", "WARNING"), json_output=True)
    try:
        result: int = ns.func(ns)
        return result
    except (ValidationError, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KmsgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
