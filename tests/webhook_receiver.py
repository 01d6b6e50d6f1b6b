"""A webhook receiver for tests: a real HTTP server on loopback that verifies and records every POST."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kmsg_worker.webhooks.signing import SignatureError, verify


@dataclass
class Receiver:
    """Records requests; ``down`` makes it answer 503 (with ``retry_after``), as a receiver in trouble would."""

    secret: str = ""
    down: bool = False
    retry_after: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def event_ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for r in self.requests for e in r["body"]["events"]]

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for r in self.requests for e in r["body"]["events"]]

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        if self.down:
            with self.lock:
                self.refused += 1
            return 503, ({"Retry-After": self.retry_after} if self.retry_after else {})
        try:
            verify(self.secret, headers, body, now=time.time())
        except SignatureError:
            with self.lock:
                self.bad_signatures += 1
            return 401, {}
        with self.lock:
            self.requests.append({"headers": headers, "body": json.loads(body)})
        return 204, {}


def start_receiver(receiver: Receiver) -> Receiver:
    """Serve ``receiver`` on an ephemeral loopback port in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            status, extra = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
    return receiver
