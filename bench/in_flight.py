"""How many requests in flight an adapter should keep: throughput of one batch per setting.

    python -m bench.in_flight                       # IWINV personalised SMS, 20 ms, 1/2/4/8/16
    python -m bench.in_flight --provider aligo --count 2000 --latency 0 --settings 1,8

The fakes run in their own process (``kmsg fake-providers``) so their CPU is not this process's
GIL; the adapter sends ``--count`` personalised SMS (every text different) in batches of its
``send_batch_limit``, as a bulk chunk would, with ``KMSG_<P>_MAX_IN_FLIGHT`` set to each value. Prints
messages per second, the fake's peak of concurrent requests and the CPU seconds of this process
(the adapter path) per 1,000 messages. No Redis, no PostgreSQL: this isolates the adapter.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter
from typing import Any

import httpx

from bench.matrix import fake_url, provider_env
from bench.run import Env, log
from kmsg_worker.message import normalize
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fake(name: str, action: str, payload: dict[str, Any] | None = None) -> None:
    httpx.post(f"{fake_url(name)}/_fake/{action}", json=payload, timeout=10).raise_for_status()


def measure(name: str, count: int, latency_ms: float, in_flight: int) -> dict[str, Any]:
    variables = {**provider_env(name), f"KMSG_{name.upper()}_MAX_IN_FLIGHT": str(in_flight)}
    settings = Settings.from_env(variables)
    client = make_http_client()
    provider = provider_class(name)(settings.provider_config(name), client)  # type: ignore[call-arg]
    messages = [
        normalize({"to": f"010{i:08d}", "text": f"[bench] {i}번 고객님 쿠폰", "type": "SMS", "sender": "0212345678"})
        for i in range(count)
    ]
    provider.send_batch(messages[: min(count, 2 * in_flight)])  # open the connections, start the threads
    _fake(name, "reset")
    _fake(name, "faults", {"latency_ms": latency_ms})
    cpu = cpu_seconds()
    started = time.perf_counter()
    accepted = 0
    errors: Counter[str] = Counter()
    limit = provider.send_batch_limit
    for start in range(0, count, limit):
        for outcome in provider.send_batch(messages[start : start + limit]):
            accepted += outcome.accepted
            if outcome.error is not None:
                errors[str(outcome.error)[:120]] += 1
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    stats = httpx.get(f"{fake_url(name)}/_fake/stats", timeout=30).json()
    provider.close()
    client.close()
    result = {
        "provider": name,
        "max_in_flight": in_flight,
        "latency_ms": latency_ms,
        "messages": count,
        "accepted": accepted,
        "errors": dict(errors),
        "msgs_per_s": round(count / elapsed, 1),
        "requests": stats["requests"],
        "peak_in_flight": stats["peak_in_flight"],
        "client_cpu_ms_per_1000": round(cpu / count * 1e6, 1),
    }
    log(
        f"{name} max_in_flight={in_flight} @ {latency_ms:g} ms: {result['msgs_per_s']:,.0f} msg/s, "
        f"{stats['requests']} requests, peak {stats['peak_in_flight']} in flight, "
        f"{result['client_cpu_ms_per_1000']} ms CPU per 1,000; accepted {accepted}, errors {dict(errors)}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", default="iwinv", choices=["iwinv", "aligo", "solapi"])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--latency", type=float, default=20.0)
    parser.add_argument("--settings", default="1,2,4,8,16")
    args = parser.parse_args()
    env = Env("postgresql+psycopg://unused/none")
    try:
        env.start_fakes()
        for value in (int(v) for v in args.settings.split(",")):
            measure(args.provider, args.count, args.latency, value)
    finally:
        env.stop()


if __name__ == "__main__":
    main()
