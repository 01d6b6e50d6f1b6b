"""Shared machinery of the fake provider servers: a real HTTP server on loopback.

A vendor fake (``kmsg_worker.testing.fake_solapi`` ...) subclasses :class:`FakeProviderServer` and
implements :meth:`FakeProviderServer.handle` for its endpoints; this module gives it:

* a threaded stdlib HTTP server with Nagle disabled (otherwise every response waits ~40 ms on
  delayed ACKs), one thread per keep-alive connection;
* a :class:`Ledger` of accepted messages that **counts acceptances per message** (by our id where
  the wire carries it, by content otherwise) and per recipient, so tests prove that nothing was
  sent twice, and progresses each message's delivery status over time by rules that can target a
  recipient, a recipient suffix and a message type;
* :class:`Faults` injected on demand: latency, a share of 5xx, 429 with ``Retry-After``,
  connection resets, responses slower than the client timeout, and "accepted but the response
  was lost";
* a control API under ``/_fake/`` (``GET /_fake/stats``, ``POST /_fake/faults``,
  ``POST /_fake/rules``, ``POST /_fake/reset``) for processes that do not share memory with it;
  every knob is listed in :data:`kmsg_worker.testing.FAULTS_HELP`.

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = [
    "Clock",
    "DeliveryRule",
    "FakeProviderServer",
    "FakeRequest",
    "FakeResponse",
    "Faults",
    "Ledger",
    "LedgerEntry",
    "RuleTarget",
]

Clock = Callable[[], float]


@dataclass
class Faults:
    """Faults to inject; every share is a probability in [0, 1] drawn per request.

    Attributes:
        latency_ms: Added to every request (real providers answer in ~20 ms).
        error_rate: Share of requests answered with ``error_status`` before anything is accepted.
        error_status: Status used for injected errors (503 by default).
        rate_limit_rate: Share of requests answered 429 with ``Retry-After: retry_after``.
        retry_after: Seconds announced in ``Retry-After``.
        reset_rate: Share of requests whose connection is closed without any response (not accepted).
        slow_rate: Share of requests answered only after ``slow_ms`` (beyond the client timeout).
        slow_ms: Delay of slow responses.
        lost_response_rate: Share of requests that are **accepted and recorded**, then the connection
            is closed without a response: the client cannot know the outcome.
    """

    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    rate_limit_rate: float = 0.0
    retry_after: float = 1.0
    reset_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    lost_response_rate: float = 0.0


@dataclass
class DeliveryRule:
    """How a recipient's message progresses after it is accepted.

    Attributes:
        final: ``"DELIVERED"`` or ``"FAILED"``.
        code: The vendor's status code for the final state (``"4000"``, ``"3104"``).
        message: The vendor's status text.
        sent_after: Seconds until the message is handed to the carrier.
        final_after: Seconds until the final state.
    """

    final: str = "DELIVERED"
    code: str | None = None
    message: str | None = None
    sent_after: float = 0.0
    final_after: float = 0.0


@dataclass(frozen=True)
class RuleTarget:
    """Which accepted messages a targeted rule applies to; an unset field matches anything.

    Attributes:
        to: The recipient number exactly as the vendor received it.
        suffix: The recipient number ends with this (e.g. ``"9"``: a tenth of the numbers).
        type: A message type, by our name (``"ALIMTALK"``, ``"SMS"``) or the vendor's (``"ATA"``).
    """

    to: str | None = None
    suffix: str | None = None
    type: str | None = None

    def matches(self, entry: LedgerEntry, type_names: Mapping[str, frozenset[str]]) -> bool:
        """Whether ``entry`` is one of the messages this target names."""
        if self.to is not None and entry.to != self.to:
            return False
        if self.suffix is not None and not entry.to.endswith(self.suffix):
            return False
        if self.type is not None:
            wanted = self.type.upper()
            return entry.type == wanted or entry.type in type_names.get(wanted, frozenset())
        return True


@dataclass(slots=True)
class LedgerEntry:
    """One accepted message as the fake stores it."""

    provider_message_id: str
    to: str
    type: str
    accepted_at: float
    reference: str | None = None
    group_id: str | None = None
    text: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    rule: DeliveryRule = field(default_factory=DeliveryRule)

    def state(self, now: float) -> tuple[str, str | None, str | None]:
        """Return ``(state, code, message)`` at time ``now``: PENDING -> SENT -> final."""
        age = now - self.accepted_at
        if age >= self.rule.final_after:
            return self.rule.final, self.rule.code, self.rule.message
        if age >= self.rule.sent_after:
            return "SENT", None, None
        return "PENDING", None, None


class Ledger:
    """Accepted messages, acceptances counted per message and per recipient, and the status rules.

    A message's rule is, in this order: the most recently added targeted rule that matches it
    (:meth:`add_rule`), the rule for its recipient (:meth:`set_rule`, every type), the rule
    function (:meth:`set_rule_function`), the default rule.

    Args:
        clock: Time source (tests pass a controllable clock).
        type_names: Our message type names -> the vendor's wire types (``{"ALIMTALK":
            frozenset({"ATA"})}``), so a rule can name either.
    """

    def __init__(self, clock: Clock = time.time, type_names: Mapping[str, frozenset[str]] | None = None) -> None:
        self.clock = clock
        self.type_names: Mapping[str, frozenset[str]] = type_names or {}
        self._lock = threading.Lock()
        self.entries: dict[str, LedgerEntry] = {}
        #: Accepted messages per recipient number.
        self.per_recipient: Counter[str] = Counter()
        #: Accepted messages per client reference (our message id, when the wire carries it).
        self.per_reference: Counter[str] = Counter()
        #: Accepted messages per message: the reference when the wire carries one, otherwise a
        #: digest of recipient, type, text and the vendor fields (see :func:`message_key`).
        self.per_message: Counter[str] = Counter()
        self.requests = 0
        #: Vendor requests per ``"METHOD /path"`` (faulted ones included): tests bound the cost of
        #: a lookup or a poll with it.
        self.per_endpoint: Counter[str] = Counter()
        self.rejected = 0
        self.default_rule = DeliveryRule()
        self.rules_by_recipient: dict[str, DeliveryRule] = {}
        self.targeted_rules: list[tuple[RuleTarget, DeliveryRule]] = []
        self._rule_fn: Callable[[LedgerEntry], DeliveryRule | None] | None = None
        self._seq = 0

    def next_id(self, prefix: str = "") -> str:
        """A unique, increasing provider message id."""
        with self._lock:
            self._seq += 1
            return f"{prefix}{self._seq:012d}"

    def set_rule(self, to: str, rule: DeliveryRule) -> None:
        """Make messages of every type to ``to`` end as ``rule`` says."""
        self.rules_by_recipient[to] = rule

    def add_rule(
        self, rule: DeliveryRule, *, to: str | None = None, suffix: str | None = None, type: str | None = None
    ) -> None:
        """Make the messages that match ``to``/``suffix``/``type`` end as ``rule`` says.

        A later rule wins over an earlier one for the messages both match: a "not a Kakao user"
        rule for ``type="ALIMTALK"`` leaves the SMS fallback to the same number to other rules.
        """
        self.targeted_rules.append((RuleTarget(to, suffix, type), rule))

    def rule_for(self, entry: LedgerEntry) -> DeliveryRule:
        """The rule a message gets when it is accepted (see the class docstring for the order)."""
        return self._rule_for(entry)

    def set_rule_function(self, fn: Callable[[LedgerEntry], DeliveryRule | None] | None) -> None:
        """Decide rules by code (e.g. every ALIMTALK to numbers ending in 9 fails with 3104)."""
        self._rule_fn = fn

    def _rule_for(self, entry: LedgerEntry) -> DeliveryRule:
        for target, targeted in reversed(self.targeted_rules):
            if target.matches(entry, self.type_names):
                return targeted
        if entry.to in self.rules_by_recipient:
            return self.rules_by_recipient[entry.to]
        if self._rule_fn is not None:
            rule = self._rule_fn(entry)
            if rule is not None:
                return rule
        return self.default_rule

    def accept(self, entries: list[LedgerEntry]) -> None:
        """Record accepted messages (one lock for a whole bulk request)."""
        # The entries of one request share its vendor fields: encode them once per request.
        encoded: dict[int, str] = {}
        with self._lock:
            for entry in entries:
                entry.rule = self._rule_for(entry)
                self.entries[entry.provider_message_id] = entry
                self.per_recipient[entry.to] += 1
                if entry.reference:
                    self.per_reference[entry.reference] += 1
                    self.per_message[entry.reference] += 1
                else:
                    self.per_message[message_key(entry, encoded)] += 1

    def get(self, provider_message_id: str) -> LedgerEntry | None:
        """Return an accepted message by the id the fake gave it."""
        return self.entries.get(provider_message_id)

    def by_reference(self, reference: str) -> list[LedgerEntry]:
        """Accepted messages carrying our reference (slow scan; tests and reconciliation only)."""
        return [e for e in list(self.entries.values()) if e.reference == reference]

    def duplicates(self) -> dict[str, int]:
        """References accepted more than once."""
        return {ref: n for ref, n in self.per_reference.items() if n > 1}

    def duplicate_messages(self) -> dict[str, int]:
        """Messages (by reference, or by content where the wire has no reference) accepted more than once."""
        return {key: n for key, n in self.per_message.items() if n > 1}

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly summary (served at ``GET /_fake/stats``)."""
        with self._lock:
            return {
                "accepted": len(self.entries),
                "requests": self.requests,
                "per_endpoint": dict(self.per_endpoint),
                "rejected": self.rejected,
                "recipients": len(self.per_recipient),
                "max_per_recipient": max(self.per_recipient.values(), default=0),
                "duplicates": {r: n for r, n in self.per_reference.items() if n > 1},
                "per_reference": dict(self.per_reference),
                "messages": len(self.per_message),
                "duplicate_messages": {k: n for k, n in self.per_message.items() if n > 1},
                "per_message": dict(self.per_message),
            }

    def reset(self) -> None:
        """Forget everything (rules included)."""
        with self._lock:
            self.entries.clear()
            self.per_recipient.clear()
            self.per_reference.clear()
            self.per_message.clear()
            self.requests = self.rejected = 0
            self.per_endpoint.clear()
            self.rules_by_recipient.clear()
            self.targeted_rules.clear()
            self.default_rule = DeliveryRule()
            self._rule_fn = None


def message_key(entry: LedgerEntry, encoded: dict[int, str] | None = None) -> str:
    """The identity of a message whose wire carries no client reference (IWINV, Aligo).

    A digest (no phone number in clear) of the recipient, the type, the text and the vendor
    fields of the request: a resend of the same message gives the same key, two different
    messages to one number differ as long as their texts or template parameters differ. Tests
    that count duplicates at such a fake send distinct texts.

    ``encoded`` keeps the encoded fields by the identity of their dict, for entries that share one
    (valid only while those entries are alive, as within one :meth:`Ledger.accept`).
    """
    extra = encoded.get(id(entry.fields)) if encoded is not None else None
    if extra is None:
        extra = json.dumps(entry.fields, sort_keys=True, default=repr, ensure_ascii=False)
        if encoded is not None:
            encoded[id(entry.fields)] = extra
    digest = hashlib.sha256(f"{entry.to}\x1f{entry.type}\x1f{entry.text}\x1f{extra}".encode()).hexdigest()
    return f"{entry.type}:{digest[:20]}"


@dataclass
class FakeRequest:
    """A parsed request handed to :meth:`FakeProviderServer.handle`."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON (raises ``ValueError`` when it is not)."""
        try:
            return orjson.loads(self.body or b"null")
        except orjson.JSONDecodeError:
            # What orjson refuses but the stdlib takes (NaN, huge integers): decode as a server would.
            return json.loads(self.body)


@dataclass
class FakeResponse:
    """What the fake answers. ``after_accept`` marks a response whose loss must be simulated."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None

    def encode(self) -> tuple[bytes, str]:
        """Body bytes and content type."""
        if self.raw is not None:
            return self.raw, self.headers.get("Content-Type", "text/plain; charset=utf-8")
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8"


class _Server(ThreadingHTTPServer):
    # The stdlib's listen backlog of 5 resets connections when 50 clients connect at once.
    request_queue_size = 128


class _DropConnection(Exception):
    """Raised inside a handler to close the socket without answering."""


class FakeProviderServer:
    """Base class of the fake provider servers.

    Args:
        host: Always loopback.
        port: 0 picks a free port.
        clock: Time source for status progression.
    """

    #: Vendor name, e.g. ``"solapi"``.
    name = "fake"
    #: Our message type names -> the vendor's wire types, for rules that name a type.
    type_names: Mapping[str, frozenset[str]] = {}
    #: Set only by ``kmsg fake-providers --host`` inside a container network; tests never change it.
    allow_external = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, clock: Clock = time.time) -> None:
        if host not in ("127.0.0.1", "localhost", "::1") and not FakeProviderServer.allow_external:
            raise ValueError("fake provider servers bind to loopback only (see allow_external)")
        self.ledger = Ledger(clock, self.type_names)
        self.faults = Faults()
        self._rng = random.Random(1234)
        #: Vendor requests being answered right now, and the most ever at once (``reset_peak``).
        self.in_flight = 0
        self.peak_in_flight = 0
        self._flight_lock = threading.Lock()
        self._httpd = _Server((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        host, port = self._httpd.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host_text}:{port}"

    def start(self) -> Self:
        """Serve in a background thread; returns ``self``."""
        # A short poll interval makes stop() quick (the default 0.5 s dominates test runtimes).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-{self.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_peak(self) -> None:
        """Start measuring the peak of concurrent vendor requests afresh."""
        with self._flight_lock:
            self.peak_in_flight = self.in_flight

    def set_faults(self, **values: Any) -> None:
        """Replace the injected faults (unknown names raise ``TypeError``)."""
        self.faults = Faults(**values)

    # -- vendor hook ------------------------------------------------------------------------------

    def handle(self, request: FakeRequest) -> FakeResponse:
        """Answer one vendor request. Subclasses implement their endpoints here."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    def drop_connection(self) -> None:
        """Call from :meth:`handle` after recording an acceptance to simulate a lost response."""
        raise _DropConnection()

    def should_lose_response(self) -> bool:
        """Whether this accepted request's response should be lost (``lost_response_rate``)."""
        return self.faults.lost_response_rate > 0 and self._rng.random() < self.faults.lost_response_rate

    # -- internals --------------------------------------------------------------------------------

    def _pre_faults(self) -> FakeResponse | None:
        f = self.faults
        if f.latency_ms:
            time.sleep(f.latency_ms / 1000.0)
        roll = self._rng.random
        if f.reset_rate and roll() < f.reset_rate:
            raise _DropConnection()
        if f.slow_rate and roll() < f.slow_rate:
            time.sleep(f.slow_ms / 1000.0)
        if f.rate_limit_rate and roll() < f.rate_limit_rate:
            return FakeResponse(
                429,
                {"errorCode": "TooManyRequests", "errorMessage": "rate limited"},
                headers={"Retry-After": f"{f.retry_after:g}"},
            )
        if f.error_rate and roll() < f.error_rate:
            return FakeResponse(f.error_status, {"errorCode": "ServiceUnavailable", "errorMessage": "injected"})
        return None

    def _control(self, request: FakeRequest) -> FakeResponse:
        action = request.path.removeprefix("/_fake/")
        if action == "stats":
            return FakeResponse(200, {**self.ledger.stats(), "peak_in_flight": self.peak_in_flight})
        if action == "faults" and request.method == "POST":
            payload = request.json() or {}
            unknown = sorted(set(payload) - {f.name for f in dataclass_fields(Faults)})
            if unknown:
                return FakeResponse(400, {"error": f"unknown fault {unknown[0]!r}"})
            self.set_faults(**payload)
            return FakeResponse(200, asdict(self.faults))
        if action == "rules" and request.method == "POST":
            payload = request.json()
            for to, rule in (payload.get("recipients") or {}).items():
                self.ledger.set_rule(to, DeliveryRule(**rule))
            for item in payload.get("rules") or ():
                spec = dict(item)
                target = {key: spec.pop(key, None) for key in ("to", "suffix", "type")}
                self.ledger.add_rule(DeliveryRule(**spec), **target)
            if payload.get("default"):
                self.ledger.default_rule = DeliveryRule(**payload["default"])
            return FakeResponse(200, {"ok": True})
        if action == "reset" and request.method == "POST":
            self.ledger.reset()
            self.faults = Faults()
            self.reset_peak()
            return FakeResponse(200, {"ok": True})
        return FakeResponse(404, {"error": "unknown control action"})

    def _dispatch(self, request: FakeRequest) -> FakeResponse:
        if request.path.startswith("/_fake/"):
            return self._control(request)
        with self._flight_lock:
            # Under the lock: concurrent requests would otherwise lose counts.
            self.ledger.requests += 1
            self.ledger.per_endpoint[f"{request.method} {request.path.rstrip('/') or '/'}"] += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            injected = self._pre_faults()
            if injected is not None:
                return injected
            return self.handle(request)
        finally:
            with self._flight_lock:
                self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without this every response waits for the client's delayed ACK (~40 ms).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = FakeRequest(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                try:
                    response = server._dispatch(request)
                except _DropConnection:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                payload, content_type = response.encode()
                head = [f"HTTP/1.1 {response.status} {self.responses.get(response.status, ('',))[0]}"]
                headers = {
                    "Content-Type": content_type,
                    "Content-Length": str(len(payload)),
                    # Real providers send it; `kmsg doctor` reads it to measure clock skew.
                    "Date": self.date_time_string(),
                    **response.headers,
                }
                head.extend(f"{k}: {v}" for k, v in headers.items())
                # Headers and body in one write: one segment, no Nagle stall.
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler


def parse_multipart(request: FakeRequest) -> dict[str, Any]:
    """Parse ``multipart/form-data`` or urlencoded bodies into ``{name: str | bytes}``.

    File parts come back as ``bytes``; text parts as ``str``.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        return {k: v[-1] for k, v in parse_qs(request.body.decode("utf-8"), keep_blank_values=True).items()}
    if not content_type.startswith("multipart/form-data"):
        raise ValueError(f"expected a form body, got {content_type or 'no content type'}")
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode("latin-1")
    fields: dict[str, Any] = {}
    for part in request.body.split(b"--" + boundary):
        # Remove exactly the delimiter CRLFs: a value may itself end in CR or LF bytes.
        if part.startswith(b"\r\n"):
            part = part[2:]
        if part.endswith(b"\r\n"):
            part = part[:-2]
        if not part or part.startswith(b"--"):
            continue
        head, _, value = part.partition(b"\r\n\r\n")
        # One regex per part header: an Aligo /send_mass/ form has 1,000 parts, and splitting each
        # header into lines and parameters was half of the fake's CPU for such a request.
        disposition = _DISPOSITION.search(head)
        if disposition is None:
            continue
        params = disposition.group(1)
        named = _PART_NAME.search(params)
        name = (named.group(1) if named.group(1) is not None else named.group(2)).decode() if named else ""
        fields[name] = value if _PART_FILENAME.search(params) else value.decode("utf-8")
    return fields


_DISPOSITION = re.compile(rb"^content-disposition:([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_PART_NAME = re.compile(rb';\s*name=(?:"([^"]*)"|([^;\s]*))')
_PART_FILENAME = re.compile(rb";\s*filename=")
