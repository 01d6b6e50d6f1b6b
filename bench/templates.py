"""A 100,000-row bulk sent by template against the same bulk with its text inline, same invocation.

    python -m bench.templates                 # intake: 5 alternated rounds of each, 100,000 rows
    python -m bench.templates --end-to-end    # also 2 alternated runs of each through workers and the fake

Both bulks carry the same per-row variables and render the same texts; the template bulk names a
published registry template (``defaults={"template": "order_shipped"}``) instead of the text. What
differs is the producer's work: the template is resolved once per batch and each row's variables
are checked against the template's. Intake runs ``send_many`` into a scratch PostgreSQL database
(``bench.run``'s) with a dispatcher that publishes nothing, so the measurement is the producer's
alone; the rounds alternate (inline, template, template, inline, ...) so drift on a shared machine
hits both. The target: the template bulk's rate is at least 90 % of the inline one's (the median
of the rounds' template/inline ratios). ``--end-to-end`` reuses ``bench.run.bench_bulk`` (workers, the fake Solapi).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from bench.run import RESULTS, Env, bench_bulk, log, scratch_database

BODY = "[bench] #{name}님, 주문 #{order}이 발송되었습니다"
SENDER = "0212345678"
DEFAULTS = {"inline": {"text": BODY, "sender": SENDER}, "template": {"template": "order_shipped", "sender": SENDER}}


def rows(count: int) -> Any:
    return ({"to": f"010{i:08d}", "variables": {"name": f"고객{i}", "order": str(i)}} for i in range(count))


def intake_round(kmsg: Any, mode: str, count: int) -> tuple[float, float]:
    """Rows per second of one ``send_many`` intake (an empty table each time): by the wall clock,
    and by the producer process's CPU time (all its threads), which other load on a shared
    machine disturbs far less than the wall clock."""
    with kmsg.runtime.engine.begin() as conn:
        conn.execute(text("TRUNCATE kmsg_attempts, kmsg_messages, kmsg_batches, kmsg_chunks CASCADE"))
    started, cpu = time.perf_counter(), time.process_time()
    receipt = kmsg.send_many(rows(count), defaults=DEFAULTS[mode])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    if len(receipt.message_ids) != count or receipt.invalid:
        raise RuntimeError(f"{mode}: {len(receipt.message_ids)} of {count} stored")
    return count / seconds, count / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="also runs of each through real workers")
    parser.add_argument("--end-to-end-rounds", type=int, default=2, help="end-to-end runs of each, alternated")
    args = parser.parse_args()
    results: dict[str, Any] = {"messages": args.count, "rounds": args.rounds}
    with scratch_database() as url:
        env = Env(url)
        os.environ.update({k: v for k, v in env.env.items() if k.startswith("KMSG_")})
        from kmsg_worker.dispatch import NullDispatcher
        from kmsg_worker.producer import KMsg

        with KMsg(dispatcher=NullDispatcher()) as kmsg:
            now = kmsg.runtime.now()
            kmsg.templates.create("default", "order_shipped", BODY, now=now)
            kmsg.templates.publish("default", "order_shipped", now=now)
            intake_round(kmsg, "inline", 5_000)  # warm-up: imports, connections, caches
            intake_round(kmsg, "template", 5_000)
            rates: dict[str, list[float]] = {"inline": [], "template": []}
            cpu_rates: dict[str, list[float]] = {"inline": [], "template": []}
            for r in range(args.rounds):
                order = ("inline", "template") if r % 2 == 0 else ("template", "inline")
                for mode in order:
                    wall, cpu = intake_round(kmsg, mode, args.count)
                    rates[mode].append(wall)
                    cpu_rates[mode].append(cpu)
                    log(f"round {r + 1} {mode}: {wall:,.0f} rows/s (producer CPU: {cpu:,.0f} rows per CPU-second)")
        inline, template = (statistics.median(rates[m]) for m in ("inline", "template"))
        # Each round's two runs are back to back: their ratio is the least disturbed by drift.
        paired = [t / i for t, i in zip(rates["template"], rates["inline"], strict=True)]
        cpu_paired = [t / i for t, i in zip(cpu_rates["template"], cpu_rates["inline"], strict=True)]
        results["intake_rows_per_s"] = {m: [round(v, 1) for v in rates[m]] for m in rates}
        results["intake_rows_per_cpu_s"] = {m: [round(v, 1) for v in cpu_rates[m]] for m in cpu_rates}
        results["intake_paired_ratios"] = [round(r, 3) for r in paired]
        results["intake_cpu_paired_ratios"] = [round(r, 3) for r in cpu_paired]
        results["intake_ratio"] = round(statistics.median(paired), 3)
        results["intake_cpu_ratio"] = round(statistics.median(cpu_paired), 3)
        log(
            f"intake median: inline {inline:,.0f} rows/s, template {template:,.0f} rows/s; "
            f"wall ratio per round {', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}; "
            f"producer-CPU ratio per round {', '.join(f'{r:.3f}' for r in cpu_paired)}, "
            f"median {statistics.median(cpu_paired):.3f}"
        )
        if args.end_to_end:
            env.start_fakes()
            try:
                # Alternated too (inline, template, template, inline, ...): drift hits both.
                runs: dict[str, list[dict[str, Any]]] = {"inline": [], "template": []}
                for r in range(args.end_to_end_rounds):
                    for mode in ("inline", "template") if r % 2 == 0 else ("template", "inline"):
                        run = bench_bulk(env, args.count, 0.0, defaults=DEFAULTS[mode], rows=rows(args.count))
                        runs[mode].append(run)
                results["end_to_end"] = runs
                ratios = [
                    t["msgs_per_s"] / i["msgs_per_s"] for t, i in zip(runs["template"], runs["inline"], strict=True)
                ]
                results["end_to_end_paired_ratios"] = [round(r, 3) for r in ratios]
                results["end_to_end_ratio"] = round(statistics.median(ratios), 3)
                log(
                    f"end to end: ratio per round {', '.join(f'{r:.3f}' for r in ratios)}, "
                    f"median {statistics.median(ratios):.3f}"
                )
            finally:
                env.stop()
    results["target_met"] = (
        results["intake_ratio"] >= 0.9
        and results["intake_cpu_ratio"] >= 0.9
        and results.get("end_to_end_ratio", 1.0) >= 0.9
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"templates-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    log(f"written {out}; target (>= 0.9) met: {results['target_met']}")


if __name__ == "__main__":
    main()
