"""Counters and histograms folded from the structured log events.

:func:`metrics_processor` is a structlog processor that maps an event name and its fields
(``provider``, ``type``, ``tenant``, ``error_code``, ``latency_ms`` ...) onto the metrics of
:class:`Metrics`; :data:`HANDLERS` is the event -> metric table (documented in ``docs/EVENTS.md``).
The pipeline makes no metric calls, and a counter can never disagree with the log line it was
derived from. A field an event does not carry becomes the label value ``unknown``.

The app's configuration (``config/celery.py``) installs the processor as an event counter
of :mod:`kmsg_worker.logging`; logging itself knows nothing of metrics. This module depends on
prometheus-client only.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "CIRCUIT_STATES",
    "DELIVERY_BUCKETS",
    "HANDLERS",
    "LATENCY_BUCKETS",
    "UNKNOWN",
    "Metrics",
    "default_metrics",
    "metrics_processor",
    "reset_default_metrics",
    "use_metrics",
]

#: Label value for a field the event did not carry.
UNKNOWN = "unknown"
#: Provider calls: a mock answers in microseconds, a real API in 20-500 ms, a timeout at 10 s.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Accepted -> delivered: seconds for SMS, minutes for a busy carrier, hours for a scheduled send.
DELIVERY_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
#: Circuit states as gauge values.
CIRCUIT_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_CIRCUIT_ALIASES = {"opened": "open", "half-open": "half_open", "halfopen": "half_open"}


def _label(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    if value is None or value == "":
        return UNKNOWN
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Metrics:
    """Every counter and histogram fed by log events, registered in one registry.

    Args:
        registry: Where to register (a private one by default, so a second instance — tests, or a
            reset after multiprocess mode was switched on — never collides with the first).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # ``test`` is "true" for a test key's messages (they only reach the simulator), else "false".
        msg = ["provider", "type", "tenant", "test"]
        self.accepted = Counter("kmsg_messages_accepted", "Messages stored and queued by a producer.", msg, registry=r)
        self.sent = Counter("kmsg_messages_sent", "Messages a provider accepted.", msg, registry=r)
        self.delivered = Counter("kmsg_messages_delivered", "Messages with a delivery report.", msg, registry=r)
        self.failed = Counter(
            "kmsg_messages_failed", "Messages that ended failed.", [*msg, "error_code", "stage"], registry=r
        )
        self.unknown = Counter("kmsg_messages_unknown", "Messages whose outcome is unknown.", msg, registry=r)
        self.dead = Counter("kmsg_messages_dead", "Poison messages (claimed too often).", registry=r)
        self.cancelled = Counter("kmsg_messages_cancelled", "Messages cancelled before dispatch.", registry=r)
        self.batches = Counter("kmsg_batches_accepted", "Bulk batches accepted.", registry=r)
        self.provider_seconds = Histogram(
            "kmsg_provider_request_seconds",
            "Provider call latency.",
            ["provider", "operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "kmsg_delivery_seconds",
            "Time from acceptance to the delivery report.",
            ["provider", "type"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.provider_errors = Counter(
            "kmsg_provider_errors", "Failed provider calls.", ["provider", "error_code", "operation"], registry=r
        )
        self.retries = Counter("kmsg_retries", "Retries scheduled after a retryable error.", ["provider"], registry=r)
        self.failovers = Counter(
            "kmsg_failovers",
            "Failovers: kind=provider (next provider of the route) or alimtalk_to_sms (fallback child).",
            ["kind", "from_provider", "to_provider"],
            registry=r,
        )
        self.failovers_skipped = Counter(
            "kmsg_failovers_skipped", "AlimTalk fallbacks not created.", ["reason"], registry=r
        )
        self.circuit_state = Gauge(
            "kmsg_circuit_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
            # The state is set by whichever process saw the transition last.
            multiprocess_mode="mostrecent",
        )
        self.circuit_transitions = Counter(
            "kmsg_circuit_transitions", "Circuit breaker state changes.", ["provider", "state"], registry=r
        )
        self.throttled = Counter(
            "kmsg_rate_limit_throttled",
            "Throttles: source=local (our token bucket made a send wait) or provider (HTTP 429).",
            ["provider", "source"],
            registry=r,
        )
        self.tracking_results = Counter(
            "kmsg_tracking_results", "Status-poll results by outcome.", ["result"], registry=r
        )
        self.requeued = Counter(
            "kmsg_sweep_requeued", "Messages the maintenance sweep dispatched again, by reason.", ["reason"], registry=r
        )
        self.lease_requeued = Counter(
            "kmsg_lease_requeued", "Messages re-queued after a worker died mid-send.", ["provider"], registry=r
        )
        self.dead_letters = Counter("kmsg_dead_letters", "Malformed task payloads.", ["task"], registry=r)
        self.enqueue_failures = Counter(
            "kmsg_enqueue_failures", "Messages stored but not published (the sweep re-enqueues them).", registry=r
        )
        self.events = Counter(
            "kmsg_log_events", "Structured log events by name and level.", ["event", "level"], registry=r
        )


# -- event -> metric handlers ---------------------------------------------------------------------

Handler = Callable[["Metrics", Mapping[str, Any]], None]
#: Event names become a label: anything that does not look like a constant name is counted as "other".
_EVENT_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")


def _test_label(ev: Mapping[str, Any]) -> str:
    # Only a test message's events carry the field (kmsg_worker.sandbox.event_mark): absent is live.
    return "true" if ev.get("test") is True else "false"


def _msg_labels(ev: Mapping[str, Any]) -> dict[str, str]:
    return {
        "provider": _label(ev, "provider"),
        "type": _label(ev, "type"),
        "tenant": _label(ev, "tenant"),
        "test": _test_label(ev),
    }


def _observe_latency(m: Metrics, ev: Mapping[str, Any], operation: str, outcome: str) -> None:
    latency = _number(ev.get("latency_ms"))
    if latency is not None:
        m.provider_seconds.labels(provider=_label(ev, "provider"), operation=operation, outcome=outcome).observe(
            latency / 1000.0
        )


def _on_accepted(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.accepted.labels(**_msg_labels(ev)).inc(_number(ev.get("count")) or 1)


def _on_batch_accepted(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.batches.inc()
    by_type = ev.get("by_type")
    if isinstance(by_type, Mapping):
        for mtype, count in by_type.items():
            labels = {**_msg_labels(ev), "type": str(mtype)}
            m.accepted.labels(**labels).inc(_number(count) or 0)
        return
    total = _number(ev.get("total")) or 0
    tests = min(total, _number(ev.get("tests")) or 0)  # a test key's rows, counted apart
    if tests:
        m.accepted.labels(**{**_msg_labels(ev), "test": "true"}).inc(tests)
    if total - tests:
        m.accepted.labels(**{**_msg_labels(ev), "test": "false"}).inc(total - tests)


def _on_sent(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.sent.labels(**_msg_labels(ev)).inc()
    _observe_latency(m, ev, "send", "accepted")


def _on_attempt_failed(m: Metrics, ev: Mapping[str, Any]) -> None:
    code = _label(ev, "error_code")
    m.provider_errors.labels(provider=_label(ev, "provider"), error_code=code, operation="send").inc()
    _observe_latency(m, ev, "send", "error")
    if code == "RATE_LIMIT_EXCEEDED":
        m.throttled.labels(provider=_label(ev, "provider"), source="provider").inc()


def _on_retry(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.retries.labels(provider=_label(ev, "provider")).inc()


def _on_failover(m: Metrics, ev: Mapping[str, Any]) -> None:
    kind = str(ev.get("kind") or "provider")
    source = ev.get("from_provider") or ev.get("provider")
    target = ev.get("to_provider") or ("sms" if kind == "alimtalk_to_sms" else None)
    m.failovers.labels(
        kind=kind,
        from_provider=str(source) if source else UNKNOWN,
        to_provider=str(target) if target else UNKNOWN,
    ).inc()


def _on_failed(m: Metrics, ev: Mapping[str, Any]) -> None:
    stage = str(ev.get("stage") or "send")
    m.failed.labels(**_msg_labels(ev), error_code=_label(ev, "error_code"), stage=stage).inc()


def _on_delivery_failed(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.failed.labels(**_msg_labels(ev), error_code=_label(ev, "error_code"), stage="delivery").inc()


def _on_delivered(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.delivered.labels(**_msg_labels(ev)).inc()
    seconds = _number(ev.get("delivery_seconds"))
    if seconds is not None:
        m.delivery_seconds.labels(provider=_label(ev, "provider"), type=_label(ev, "type")).observe(max(0.0, seconds))


def _on_unknown(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.unknown.labels(**_msg_labels(ev)).inc()


def _on_dead(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.dead.inc()


def _on_cancelled(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.cancelled.inc(_number(ev.get("cancelled")) or 1)


def _on_chunk_sent(m: Metrics, ev: Mapping[str, Any]) -> None:
    # One bulk provider request reports counts, not one event per message.
    labels = _msg_labels(ev)
    sent = _number(ev.get("sent")) or 0
    if sent:
        m.sent.labels(**labels).inc(sent)
    failed = _number(ev.get("failed")) or 0
    if failed:
        m.failed.labels(**labels, error_code=_label(ev, "error_code"), stage="send").inc(failed)
    retrying = _number(ev.get("retrying")) or 0
    if retrying:
        m.retries.labels(provider=labels["provider"]).inc(retrying)
    _observe_latency(m, ev, "send_batch", "accepted" if sent else "error")


def _on_tracking_swept(m: Metrics, ev: Mapping[str, Any]) -> None:
    for result in ("delivered", "failed", "unknown", "pending"):
        count = _number(ev.get(result)) or 0
        if count:
            m.tracking_results.labels(result=result).inc(count)


def _on_tracking_query_failed(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.provider_errors.labels(
        provider=_label(ev, "provider"), error_code=_label(ev, "error_code"), operation="status"
    ).inc()
    _observe_latency(m, ev, "status", "error")


def _on_maintenance_swept(m: Metrics, ev: Mapping[str, Any]) -> None:
    for reason in ("scheduled", "retries", "stale_queued", "leases"):
        count = _number(ev.get(reason)) or 0
        if count:
            m.requeued.labels(reason=reason).inc(count)


def _on_lease_requeued(m: Metrics, ev: Mapping[str, Any]) -> None:
    # One message per event in the single-send path; bulk lease sweeps report a count.
    m.lease_requeued.labels(provider=_label(ev, "provider")).inc(_number(ev.get("requeued")) or 1)


def _on_leases_reconciled(m: Metrics, ev: Mapping[str, Any]) -> None:
    if _number(ev.get("requeued")):
        _on_lease_requeued(m, ev)


def _on_dead_letter(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.dead_letters.labels(task=_label(ev, "task")).inc()


def _on_enqueue_failed(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.enqueue_failures.inc(_number(ev.get("count")) or 1)


def _on_failover_skipped(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.failovers_skipped.labels(reason=_label(ev, "reason")).inc()


def _on_circuit(m: Metrics, ev: Mapping[str, Any]) -> None:
    state = str(ev.get("state") or str(ev.get("event", "")).rpartition(".")[2]).lower()
    state = _CIRCUIT_ALIASES.get(state, state)
    if state not in CIRCUIT_STATES:
        return
    provider = _label(ev, "provider")
    m.circuit_state.labels(provider=provider).set(CIRCUIT_STATES[state])
    m.circuit_transitions.labels(provider=provider, state=state).inc()


def _on_throttled(m: Metrics, ev: Mapping[str, Any]) -> None:
    m.throttled.labels(provider=_label(ev, "provider"), source=str(ev.get("source") or "local")).inc()


def _on_circuit_failover(m: Metrics, ev: Mapping[str, Any]) -> None:
    skipped = ev.get("skipped")
    names = [str(s) for s in skipped] if isinstance(skipped, (list, tuple)) and skipped else [UNKNOWN]
    for name in names:
        m.failovers.labels(kind="circuit_open", from_provider=name, to_provider=_label(ev, "to_provider")).inc()


#: Event name -> what it feeds. ``docs/EVENTS.md`` documents this table; keep the two in step.
HANDLERS: dict[str, Handler] = {
    "message.accepted": _on_accepted,
    "batch.accepted": _on_batch_accepted,
    "message.sent": _on_sent,
    "message.attempt_failed": _on_attempt_failed,
    "message.retry_scheduled": _on_retry,
    "failover.triggered": _on_failover,
    "failover.skipped": _on_failover_skipped,
    "failover.circuit_open": _on_circuit_failover,
    "message.failed": _on_failed,
    "message.delivered": _on_delivered,
    "message.delivery_failed": _on_delivery_failed,
    "message.unknown": _on_unknown,
    "message.dead": _on_dead,
    "message.cancelled": _on_cancelled,
    "batch.cancelled": _on_cancelled,
    "batch.chunk_sent": _on_chunk_sent,
    "message.enqueue_failed": _on_enqueue_failed,
    "tracking.swept": _on_tracking_swept,
    "tracking.query_failed": _on_tracking_query_failed,
    "maintenance.swept": _on_maintenance_swept,
    "lease.requeued": _on_lease_requeued,
    "lease.reconciled": _on_leases_reconciled,
    "task.dead_lettered": _on_dead_letter,
    "circuit.state_changed": _on_circuit,
    "circuit.opened": _on_circuit,
    "circuit.half_open": _on_circuit,
    "circuit.closed": _on_circuit,
    "ratelimit.throttled": _on_throttled,
    "message.throttled": _on_throttled,
}

_lock = threading.Lock()
_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process's metrics (created on first use, after multiprocess mode was decided)."""
    global _default
    with _lock:
        if _default is None:
            _default = Metrics()
        return _default


@contextmanager
def use_metrics(metrics: Metrics) -> Iterator[Metrics]:
    """Route events to ``metrics`` inside the block (tests read a fresh registry)."""
    global _default
    with _lock:
        previous, _default = _default, metrics
    try:
        yield metrics
    finally:
        with _lock:
            _default = previous


def reset_default_metrics() -> None:
    """Forget the process's metrics: the next event creates them anew (after a switch to multiprocess mode)."""
    global _default
    with _lock:
        _default = None


def metrics_processor(_: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: count the event into the metrics, return it unchanged.

    Installed as an event counter (:func:`kmsg_worker.logging.add_event_counter`) where the app is
    configured, it runs before the level filter, so ``KMSG_LOG_LEVEL=WARNING`` quiets the logs
    without stopping the counters.
    """
    name = event_dict.get("event")
    if not isinstance(name, str):
        return event_dict
    try:
        metrics = default_metrics()
        level = str(event_dict.get("level") or method_name)
        metrics.events.labels(event=name if _EVENT_NAME.match(name) else "other", level=level).inc()
        handler = HANDLERS.get(name)
        if handler is not None:
            handler(metrics, event_dict)
    except Exception:  # noqa: BLE001 - a metric must never fail the send that logged the event
        pass
    return event_dict
