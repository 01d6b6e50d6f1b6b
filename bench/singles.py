"""Send single OTP-like messages at a steady pace from their own process; print their ids as JSON.

    python -m bench.singles --count 200 --interval 0.05 [--warmup 5]

Run by ``bench/run.py`` as a separate process: a real OTP sender is not the process that runs a
bulk intake, and in one process the two would share one GIL (the singles' latency would then
measure the benchmark's own thread contention). The ``--warmup`` sends are not printed: they pay for
the first connection and statement compilation, which a long-lived producer pays once.
"""

from __future__ import annotations

import argparse
import json
import time

from kmsg_worker.producer import KMsg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop early after this long")
    args = parser.parse_args()
    kmsg = KMsg()
    for _ in range(args.warmup):
        kmsg.send(to="01099990000", text="[bench] warm-up", priority="high")
        time.sleep(args.interval)
    ids = []
    deadline = time.monotonic() + args.max_seconds
    while len(ids) < args.count and time.monotonic() < deadline:
        ids.append(kmsg.send(to="01099990000", text="[bench] OTP 123456", priority="high").message_id)
        time.sleep(args.interval)
    kmsg.close()
    print(json.dumps(ids))


if __name__ == "__main__":
    main()
