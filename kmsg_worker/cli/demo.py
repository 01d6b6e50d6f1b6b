"""``kmsg demo``: a worker and beat on the embedded default, a demo batch through them, a table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from kmsg_worker.cli.app import EXIT_ERROR, cli
from kmsg_worker.cli.messages import JSON_OPTION
from kmsg_worker.cli.output import echo_json, echo_table, note
from kmsg_worker.dispatch import QUEUES

__all__ = ["DEMO_MESSAGES"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent

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


@cli.command()
@click.option("--timeout", type=click.FloatRange(min=1), default=90.0, show_default=True, help="Seconds to wait.")
@JSON_OPTION
def demo(timeout: float, as_json: bool) -> int:
    """Start a worker and beat, push the demo messages through, show every final status, stop.

    Runs on the embedded default (SQLite and a file broker under ./var) unless KMSG_* point
    elsewhere; the mock provider plays every outcome (a retry, a permanent failure, the AlimTalk
    to SMS fallback). Exits 3 if a message is not final within --timeout.
    """
    env = dict(os.environ)
    # Demo pacing: quick sweeps and status checks so the whole story fits in seconds.
    env.setdefault("KMSG_SWEEP_INTERVAL_SECONDS", "1")
    env.setdefault("KMSG_TRACKING_FIRST_CHECK_SECONDS", "1")
    env.setdefault("KMSG_TRACKING_BACKOFF", "1,2,3")
    env.setdefault("KMSG_RETRY_BASE_SECONDS", "0.5")
    env.setdefault("KMSG_LOG_LEVEL", "WARNING")
    os.environ.update({k: v for k, v in env.items() if k.startswith("KMSG_")})
    from kmsg_worker.settings import Settings, mask_url

    settings = Settings.from_env()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # The worker and beat run from the project root: hand them this directory's var folder (the
    # embedded broker and database live there), or they would use the project's own.
    env["KMSG_VAR_DIR"] = str(settings.var_dir.resolve())
    where = "embedded (SQLite + kombu filesystem transport)" if settings.embedded else "servers"
    note(f"kmsg demo: broker={mask_url(settings.broker_url)} database={mask_url(settings.database_url)} [{where}]")
    celery = [sys.executable, "-m", "celery", "-A", "config.celery"]
    queues = ",".join(QUEUES.values())
    worker_args = ["worker", "-Q", queues, "-c", "2", "-n", f"demo-{os.getpid()}@%h", "--without-mingle"]
    worker_args += ["--without-gossip", "--loglevel=WARNING"]
    worker = _start([*celery, *worker_args], env, settings.var_dir / "demo-worker.log")
    schedule = str(settings.var_dir / f"beat-schedule-{os.getpid()}")
    beat = _start(
        [*celery, "beat", "--schedule", schedule, "--loglevel=WARNING"], env, settings.var_dir / "demo-beat.log"
    )
    try:
        rows = _run_demo(worker, beat, timeout)
    finally:
        _stop([worker, beat])
    if rows is None:
        note(f"a worker or beat process exited; see {settings.var_dir}/demo-*.log")
        return EXIT_ERROR
    final = all(r["final"] for r in rows)
    if as_json:
        echo_json({"final": final, "messages": rows})
    else:
        click.echo()
        echo_table(rows, ["case", "id", "type", "status", "provider", "attempts", "history", "error"])
        click.echo(f"\nall messages final: {'yes' if final else 'NO'}")
    return 0 if final else EXIT_ERROR


def _run_demo(
    worker: subprocess.Popen[bytes], beat: subprocess.Popen[bytes], timeout: float
) -> list[dict[str, Any]] | None:
    """Send the demo messages and wait for them; ``None`` if a process died on the way."""
    from kmsg_worker.producer import KMsg

    with KMsg() as kmsg:
        sent: list[tuple[str, str]] = []
        for label, fields in DEMO_MESSAGES:
            receipt = kmsg.send(fields)
            sent.append((label, receipt.message_id))
            note(f"  accepted {receipt.message_id}  {receipt.type:<8} {label}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.poll() is not None or beat.poll() is not None:
                return None
            infos = [kmsg.get(mid) for _, mid in sent]
            children = [kmsg.get(c) for info in infos for c in info.children]
            if all(i.final for i in infos) and all(c.final for c in children):
                break
            time.sleep(0.5)
        rows = []
        for label, mid in sent:
            info = kmsg.get(mid)
            rows.append(_demo_row(label, info))
            for child in info.children:
                rows.append(_demo_row("  └ fallback child", kmsg.get(child)))
        return rows


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
