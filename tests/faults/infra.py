"""Fault-injection infrastructure: a pausable TCP proxy and a private Redis with AOF.

The machine's PostgreSQL and Redis are shared with other tests, so they are never stopped: a test
that needs "PostgreSQL unreachable" routes its processes through :class:`TcpProxy` and cuts it;
a test that needs to stop or wipe Redis starts its own ``redis-server`` on a spare loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrivateRedis", "TcpProxy", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _LostReply:
    marker: bytes
    forward: bool
    refuse: bool
    settle: float
    skip: int


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; :meth:`cut` drops every connection and refuses new ones.

    :meth:`lose_reply_to` breaks one connection at a chosen request (a COMMIT, an INSERT), the way a
    network failure between the request and its reply does.

    Args:
        target_port: Port of the real server on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._lost: _LostReply | None = None
        self.lost_replies = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.extend([client, upstream])
            muted = threading.Event()
            for a, b, outbound in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, outbound, muted), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool, muted: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                lost = self._take_lost(data) if outbound else None
                if lost is not None:
                    muted.set()  # first: the server's reply must not get through
                    if lost.refuse:
                        self._open.clear()  # before the client can notice and reconnect
                    if lost.forward:
                        dst.sendall(data)
                        time.sleep(lost.settle)  # the server receives it and acts on it
                    if lost.refuse:
                        self.cut()
                    break  # both ends close: the client never sees the reply
                if muted.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _take_lost(self, data: bytes) -> _LostReply | None:
        with self._lock:
            lost = self._lost
            if lost is None or lost.marker not in data:
                return None
            if lost.skip:
                lost.skip -= 1
                return None
            self._lost = None
            self.lost_replies += 1
            return lost

    def lose_reply_to(
        self, marker: bytes, *, forward: bool = True, refuse: bool = False, settle: float = 0.3, skip: int = 0
    ) -> None:
        """Once: break the connection whose client next sends bytes containing ``marker`` (after ``skip``).

        Args:
            marker: What to look for in the client's bytes (e.g. ``b"COMMIT"``).
            forward: Pass those bytes on first (the server acts on the request; only the reply is lost),
                or drop them (the server never sees the request).
            refuse: Then drop every connection and refuse new ones (:meth:`cut`) until :meth:`restore`.
            settle: Seconds between forwarding the request and breaking the connection.
            skip: Let this many matching requests through first.
        """
        with self._lock:
            self._lost = _LostReply(marker, forward, refuse, settle, skip)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (the server looks unreachable)."""
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def restore(self) -> None:
        """Accept connections again."""
        self._open.set()

    def close(self) -> None:
        """Stop the proxy."""
        self._stop.set()
        self.cut()
        self._listener.close()


class PrivateRedis:
    """A ``redis-server`` of this test's own, with AOF, that may be stopped, restarted or wiped."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        """Broker URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port and data directory."""
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(self.dir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its AOF first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def flushall(self) -> None:
        """Wipe every key: the broker forgets every queued task."""
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True)

    def close(self) -> None:
        """Stop and remove the data directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def kill_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to a process group started with ``start_new_session``."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
