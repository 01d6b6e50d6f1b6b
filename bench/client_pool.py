"""What sharing one httpx client between many threads costs: the per-message baseline's client.

    python -m bench.client_pool                         # IWINV's SMS request, 8/16/50 threads, 0 and 20 ms
    python -m bench.client_pool --threads 50 --latency 20 --count 2000

The adapter builds one IWINV SMS request; then ``--threads`` threads post copies of it to the fake
(its own process, loopback), either all through **one** client whose pool holds a connection per
thread ("shared") or each through **its own** client and connection ("own"). Prints messages per
second and this process's CPU per request for each. httpcore's pool looks through all its
connections for every request, so the shared client's cost grows with its size; this is why the
matrix's per-message baseline gives each thread its own client.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.in_flight import cpu_seconds
from bench.matrix import SENDER, fake_url, provider_env
from bench.run import Env, log
from kmsg_worker.message import normalize
from kmsg_worker.providers.base_http import USER_AGENT
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings

NAME = "iwinv"


def one_request() -> httpx.Request:
    """The request IWINV's adapter sends for one SMS, as it went on the wire."""
    seen: list[httpx.Request] = []
    client = httpx.Client(headers={"User-Agent": USER_AGENT}, event_hooks={"request": [seen.append]})
    provider = provider_class(NAME)(Settings.from_env(provider_env(NAME)).provider_config(NAME), client)  # type: ignore[call-arg]
    outcome = provider.send(normalize({"to": "01000000000", "text": "[bench] 쿠폰", "sender": SENDER}))
    provider.close()
    client.close()
    if not outcome.accepted:
        raise RuntimeError(f"the fake refused the sample request: {outcome.error}")
    return seen[-1]


def measure(request: httpx.Request, threads: int, shared: bool, count: int, latency_ms: float) -> None:
    httpx.post(f"{fake_url(NAME)}/_fake/faults", json={"latency_ms": latency_ms}, timeout=10).raise_for_status()
    url, body = str(request.url), request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "host")}
    one = httpx.Client(limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads))
    own = threading.local()
    clients = [one]
    lock = threading.Lock()

    def client() -> httpx.Client:
        if shared:
            return one
        found: httpx.Client | None = getattr(own, "client", None)
        if found is None:
            found = own.client = httpx.Client()
            with lock:
                clients.append(found)
        return found

    def post(_: int) -> None:
        client().post(url, content=body, headers=headers).raise_for_status()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, range(4 * threads)))  # open the connections
        cpu, started = cpu_seconds(), time.perf_counter()
        list(pool.map(post, range(count)))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    for each in clients:
        each.close()
    log(
        f"{threads:>2} threads, {'one shared client' if shared else 'a client each':17} @ {latency_ms:g} ms: "
        f"{count / elapsed:>6,.0f} msg/s, {cpu / count * 1000:.3f} ms CPU per request"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="8,16,50")
    parser.add_argument("--latency", default="0,20")
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    env = Env("postgresql+psycopg://unused/none")
    try:
        env.start_fakes()
        request = one_request()
        for latency in (float(v) for v in args.latency.split(",")):
            for threads in (int(v) for v in args.threads.split(",")):
                for shared in (True, False):
                    measure(request, threads, shared, args.count, latency)
    finally:
        env.stop()


if __name__ == "__main__":
    main()
