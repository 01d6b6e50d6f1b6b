"""Which kombu transport should the embedded (no server) default use?

Runs the real pipeline (KMsg -> broker -> 2 worker processes -> mock provider -> SQLite) on each
candidate and prints messages/s from the first send to the last ``sent`` row.

    python -m bench.embedded_transports [--count 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = {
    "sqla+sqlite": lambda var: f"sqla+sqlite:///{var / 'broker.sqlite'}",
    "filesystem": lambda var: "filesystem://",
}


def run(name: str, count: int) -> dict[str, float]:
    var = Path(tempfile.mkdtemp(prefix=f"kmsg-bench-{name.replace('+', '-')}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update(
        {
            "KMSG_VAR_DIR": str(var),
            "KMSG_BROKER_URL": CANDIDATES[name](var),
            "KMSG_DATABASE_URL": f"sqlite:///{var / 'kmsg.sqlite'}",
            "KMSG_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config.celery",
            "worker",
            "-Q",
            "kmsg.send",
            "-c",
            "2",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code = f"""
import time, json
from kmsg_worker import KMsg
from sqlalchemy import select, func
from kmsg_worker.storage.models import MessageRow
k = KMsg()
time.sleep(3)  # let the worker come up
t0 = time.perf_counter()
ids = [k.send(to='0101000%04d' % i, text='bench').message_id for i in range({count})]
t1 = time.perf_counter()
deadline = time.time() + 300
while time.time() < deadline:
    with k.runtime.store.sessions() as s:
        n = s.scalar(select(func.count()).where(MessageRow.status == 'sent'))
    if n >= {count}: break
    time.sleep(0.05)
t2 = time.perf_counter()
print(json.dumps({{"enqueue_s": t1 - t0, "total_s": t2 - t0, "sent": n}}))
"""
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
        )
        data = json.loads(out.stdout.strip().splitlines()[-1])
        data["msgs_per_s"] = count / data["total_s"]
        return data
    finally:
        worker.terminate()
        worker.wait(30)
        shutil.rmtree(var, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    results = {name: run(name, args.count) for name in CANDIDATES}
    base = results["sqla+sqlite"]["msgs_per_s"]
    for name, r in results.items():
        print(
            f"{name:12s} {r['msgs_per_s']:8.1f} msg/s end to end ({r['sent']} sent, enqueue {r['enqueue_s']:.2f}s) "
            f"ratio vs sqla+sqlite {r['msgs_per_s'] / base:.2f}"
        )


if __name__ == "__main__":
    main()
