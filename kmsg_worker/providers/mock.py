"""The built-in mock provider: no network, scripted outcomes, every call recorded.

A message scripts its own fate through ``provider_options={"mock": {...}}`` so that the script
travels with the message to whichever worker process sends it:

* ``{"script": [step, ...]}`` — step *n* answers the *n*-th call for this message; after the
  script, calls succeed. A step is ``{"outcome": "success" | "failure" | "timeout" | "delay" |
  "lost_response", "code": "<ErrorCode>", "provider_code": "...", "message": "...",
  "http_status": 503, "retry_after": 1.5, "duration_ms": 50}``. ``delay`` sleeps, then answers with
  the next step in the same call. ``lost_response`` accepts the message, then raises a timeout as if
  the response had been lost on the way back.
* ``{"fail_times": n}`` — n ``PROVIDER_ERROR`` failures (retryable), then success.
* ``{"deliver": "DELIVERED" | "FAILED:<code>"}`` — what the status API later reports.

Calls are appended to a JSON-lines log (option ``call_log``; default in memory only) so tests and
the demo can count, across processes, how often each message reached the provider. The log holds
message ids and types only, never numbers or text.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from kmsg_worker.errors import (
    ErrorCode,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, MessageType
from kmsg_worker.providers.base import (
    Balance,
    Capabilities,
    DeliveryState,
    LookupHint,
    Provider,
    ProviderConfig,
    SendOutcome,
    SendWarning,
    StatusQuery,
    StatusReport,
    count_request,
)

__all__ = ["MockProvider", "read_call_log"]

_MESSAGE_BLAME = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_RECIPIENT,
        ErrorCode.TEMPLATE_NOT_FOUND,
        ErrorCode.TEMPLATE_MISMATCH,
        ErrorCode.RECIPIENT_BLOCKED,
        ErrorCode.NOT_KAKAO_USER,
        ErrorCode.AD_OPTED_OUT,
        ErrorCode.OUTSIDE_SEND_WINDOW,
    }
)


def build_error(provider: str, step: Mapping[str, Any]) -> ProviderError:
    """Turn a scripted failure step into the matching exception class."""
    try:
        code = ErrorCode(step.get("code", "PROVIDER_ERROR"))
    except ValueError:
        code = ErrorCode.PROVIDER_ERROR
    common: dict[str, Any] = {
        "provider": provider,
        "code": code,
        "provider_code": step.get("provider_code"),
        "provider_message": step.get("message"),
        "status_code": step.get("http_status"),
        "retry_after": step.get("retry_after"),
    }
    text = f"{provider}: scripted {code.value}"
    if code in (ErrorCode.NETWORK_TIMEOUT, ErrorCode.OUTCOME_UNKNOWN):
        # As the real adapters raise it: the provider may have the message, so reconcile first.
        return ProviderTimeout(text, **common)
    if code is ErrorCode.NETWORK_ERROR:
        return ProviderConnectionError(text, **common)
    if code is ErrorCode.RATE_LIMIT_EXCEEDED:
        return ProviderRateLimited(text, **common)
    if code in (ErrorCode.NETWORK_SERVICE_UNAVAILABLE, ErrorCode.PROVIDER_ERROR, ErrorCode.UNKNOWN_ERROR):
        return ProviderTransientError(text, **common)
    return ProviderRejected(text, blame="message" if code in _MESSAGE_BLAME else "provider", **common)


def read_call_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of a mock call log (missing file -> empty list)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


class _CallIndex:
    """The call log folded into per-message counts and acceptances, read incrementally.

    Status queries, lookups and scripted sends all ask "what happened to these ids?"; re-reading the
    whole log for each of them made a 100,000-message run quadratic. Only the bytes (or in-memory
    records) appended since the last look are read. A torn last line (another process is mid-write;
    writes are single ``O_APPEND`` calls, but a reader can still see part of one) is left for the next
    look.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.position = 0
        #: Calls per message id.
        self.counts: dict[str, int] = {}
        #: The latest accepted record per message id.
        self.accepted: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        self.offset = self.position = 0
        self.counts.clear()
        self.accepted.clear()

    def add(self, record: dict[str, Any]) -> None:
        message_id = record["message_id"]
        self.counts[message_id] = self.counts.get(message_id, 0) + 1
        if record.get("accepted"):
            self.accepted[message_id] = record

    def read_list(self, calls: Sequence[dict[str, Any]]) -> None:
        if len(calls) < self.position:  # the list was cleared
            self.reset()
        for record in calls[self.position :]:
            self.add(record)
        self.position = len(calls)

    def read_file(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:  # truncated or replaced
                    self.reset()
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self.add(json.loads(line))
        self.offset += end


class MockProvider(Provider):
    """A provider that never leaves the process; for the demo, tests and benchmarks.

    Options: ``call_log`` (path of the JSON-lines log), ``latency_ms`` (added to every call),
    ``bulk_limit`` (default 10,000).
    """

    name: ClassVar[str] = "mock"
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset(MessageType),
        bulk_limit=10_000,
        status_query=True,
        bulk_status=True,
        alimtalk_fallback="none",
        balance=True,
        lookup_by_reference=True,
    )

    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__(config or ProviderConfig(name="mock"))
        log = self.config.option("call_log")
        self._log_path = Path(log) if log else None
        self._latency = float(self.config.option("latency_ms", 0)) / 1000.0
        self._lock = threading.Lock()
        self._index = _CallIndex()
        #: Every call in this process, in order (also written to the log file when configured).
        self.calls: list[dict[str, Any]] = []
        #: Send requests made by this process (one per ``send_batch``).
        self.requests = 0

    # -- call log ---------------------------------------------------------------------------------

    def _refresh(self) -> _CallIndex:
        """The call index, brought up to date with what was logged since the last look."""
        with self._lock:
            if self._log_path is not None:
                self._index.read_file(self._log_path)
            else:
                self._index.read_list(self.calls)
            return self._index

    def _record(self, rows: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self.calls.extend(rows)
            if self._log_path is not None:
                payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
                # One O_APPEND write per batch: concurrent processes never interleave lines.
                fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, payload.encode("utf-8"))
                finally:
                    os.close(fd)

    def calls_for(self, message_id: str) -> int:
        """How many times ``message_id`` reached this provider (all processes, when logging to a file)."""
        return self._refresh().counts.get(message_id, 0)

    # -- hooks ------------------------------------------------------------------------------------

    def _script_step(self, message: Message, call_no: int) -> Mapping[str, Any]:
        spec = message.provider_options.get("mock") or {}
        if not isinstance(spec, Mapping):
            return {"outcome": "success"}
        script = list(spec.get("script") or [])
        fail_times = int(spec.get("fail_times") or 0)
        script.extend({"outcome": "failure", "code": "PROVIDER_ERROR"} for _ in range(fail_times))
        return script[call_no] if call_no < len(script) else {"outcome": "success"}

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        self.requests += 1
        count_request()
        if self._latency:
            time.sleep(self._latency)
        scripted = any(m.provider_options.get("mock") for m in messages)
        counts = self._refresh().counts if scripted else {}
        outcomes: list[SendOutcome] = []
        records: list[dict[str, Any]] = []
        lost: ProviderTimeout | None = None
        now = time.time()
        for message in messages:
            call_no = counts.get(message.id, 0)
            step = self._script_step(message, call_no) if scripted else {"outcome": "success"}
            while step.get("outcome") == "delay":
                time.sleep(float(step.get("duration_ms", 0)) / 1000.0)
                call_no += 1
                step = self._script_step(message, call_no)
            outcome = step.get("outcome", "success")
            if outcome == "timeout":
                time.sleep(float(step.get("duration_ms", 0)) / 1000.0)
                step = {**step, "code": "NETWORK_TIMEOUT"}
                outcome = "failure"
            if outcome in ("success", "lost_response"):
                pmid = f"mock-{uuid.uuid4().hex[:20]}"
                spec = message.provider_options.get("mock")
                deliver = spec.get("deliver") if isinstance(spec, Mapping) else None
                records.append(
                    {
                        "message_id": message.id,
                        "accepted": True,
                        "pmid": pmid,
                        "type": message.type.value,
                        "ts": now,
                        "deliver": deliver or "DELIVERED",
                    }
                )
                warnings = []
                if message.type is MessageType.ALIMTALK and message.failover and message.failover.enabled:
                    warnings.append(SendWarning("FAILOVER_UNSUPPORTED_PROVIDER", "mock has no native SMS fallback"))
                outcomes.append(
                    SendOutcome(message.id, True, pmid, DeliveryState.SENT, warnings=warnings, raw={"id": pmid})
                )
                if outcome == "lost_response":
                    lost = ProviderTimeout(
                        "mock: response lost after acceptance",
                        provider=self.name,
                        code=ErrorCode.NETWORK_TIMEOUT,
                    )
            else:
                error = build_error(self.name, step)
                records.append({"message_id": message.id, "accepted": False, "code": error.code.value, "ts": now})
                outcomes.append(SendOutcome(message.id, False, error=error, state=DeliveryState.FAILED))
        self._record(records)
        if lost is not None:
            raise lost
        return outcomes

    def _lookup(self, message_ids: Sequence[str], hints: Mapping[str, LookupHint]) -> dict[str, SendOutcome]:
        # The mock keeps every record by our id: hints would not narrow anything.
        accepted = self._refresh().accepted
        found: dict[str, SendOutcome] = {}
        for message_id in message_ids:
            record = accepted.get(message_id)
            if record is not None:
                found[message_id] = SendOutcome(message_id, True, record["pmid"], DeliveryState.SENT, raw=record)
        return found

    def _query_status(self, queries: Sequence[StatusQuery]) -> list[StatusReport]:
        accepted = self._refresh().accepted
        reports = []
        for query in queries:
            record = accepted.get(query.message_id)
            if record is not None:
                reports.append(self._report(query.message_id, str(record.get("deliver") or "DELIVERED")))
        return reports

    def _balance(self) -> Balance:
        return Balance(amount=1_000_000.0)

    @staticmethod
    def _report(message_id: str, deliver: str) -> StatusReport:
        if deliver.startswith("FAILED"):
            code = deliver.partition(":")[2] or "FAILED"
            return StatusReport(
                message_id,
                DeliveryState.FAILED,
                code=code,
                description="scripted failure",
                not_kakao_user=code in {"3104", "3107", "3018", "3019", "3020"},
                opted_out=code in {"1061", "2061", "AD_OPTED_OUT"},
            )
        if deliver == "PENDING":
            return StatusReport(message_id, DeliveryState.SENT, code="SENT")
        return StatusReport(message_id, DeliveryState.DELIVERED, code="DELIVERED")
