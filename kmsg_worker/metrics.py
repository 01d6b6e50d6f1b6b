"""Prometheus metrics: counters fed by the structured log events, gauges computed at scrape time.

Design (the full event -> metric table is in ``docs/EVENTS.md``):

* **Counters and histograms come from the events the code already logs.** :func:`metrics_processor`
  is a structlog processor, installed by :func:`kmsg_worker.logging.configure_logging`, that maps an
  event name and its fields (``provider``, ``type``, ``tenant``, ``error_code``, ``latency_ms`` ...)
  onto metrics. The pipeline makes no metric calls, and a counter can never disagree with the log
  line it was derived from. A field an event does not carry becomes the label value ``unknown``.
* **Gauges are read when Prometheus scrapes.** :class:`BacklogCollector` asks the broker for queue
  lengths (Redis ``LLEN``) and the database for the age of the oldest queued message, the tracking
  and scheduled backlogs and the beat heartbeats. Liveness is consumption: a worker process can be
  alive and consume nothing (``celery-production.md`` B13); the oldest-queued age shows it.
* **Prefork-safe.** Each Celery prefork child counts in its own memory-mapped files under
  ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode). The worker's main process
  points that variable at ``<var>/metrics/<node name>`` and empties it at start
  (:func:`prepare_multiprocess_dir`), a child's live gauges are dropped and its counters folded into
  one archive file when it exits (:func:`mark_process_dead`), and an exposition merges every file
  (:class:`MultiProcessDirCollector`).
  Either each worker serves its own folder (``KMSG_METRICS_PORT``: the main process spawns a
  ``kmsg metrics-server`` child for it, :func:`spawn_metrics_server`), or one ``kmsg metrics-server``
  serves every worker of the host (all node folders) — scrape one or the other, not both, or the
  counters are counted twice.

The backlog gauges describe the whole system (database and broker), not one worker: aggregate them
with ``max()``, never ``sum()``, when several endpoints expose them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from sqlalchemy import Engine

    from kmsg_worker.settings import Settings

__all__ = [
    "BacklogCollector",
    "BacklogSnapshot",
    "HANDLERS",
    "Metrics",
    "MetricsServer",
    "MultiProcessDirCollector",
    "add_subcommand",
    "build_registry",
    "default_metrics",
    "fold_process_files",
    "mark_process_dead",
    "metrics_dir",
    "metrics_processor",
    "multiprocess_dir",
    "node_dir",
    "prepare_multiprocess_dir",
    "read_backlog",
    "spawn_metrics_server",
    "start_metrics_server",
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
_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
        msg = ["provider", "type", "tenant"]
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


def _msg_labels(ev: Mapping[str, Any]) -> dict[str, str]:
    return {"provider": _label(ev, "provider"), "type": _label(ev, "type"), "tenant": _label(ev, "tenant")}


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
    if total:
        m.accepted.labels(**_msg_labels(ev)).inc(total)


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


def metrics_processor(_: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: count the event into the metrics, return it unchanged.

    It runs before the level filter (see :func:`kmsg_worker.logging.configure_logging`), so
    ``KMSG_LOG_LEVEL=WARNING`` quiets the logs without stopping the counters.
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


# -- multiprocess mode ----------------------------------------------------------------------------


def metrics_dir(settings: Settings) -> Path:
    """Folder of every worker's metric files on this host: ``<var>/metrics``."""
    return settings.var_dir / "metrics"


def multiprocess_dir() -> Path | None:
    """This process's ``PROMETHEUS_MULTIPROC_DIR``, if multiprocess mode is on."""
    value = os.environ.get(_ENV)
    return Path(value) if value else None


def _safe_name(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", node) or "worker"


def prepare_multiprocess_dir(folder: Path) -> Path:
    """Empty ``folder``, make it this process's ``PROMETHEUS_MULTIPROC_DIR`` and switch multiprocess mode on.

    Called in the worker's main process before the pool forks, so every child inherits the variable.
    Files left by a previous run would be summed into the new one: they are deleted.
    """
    global _default
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[_ENV] = str(folder)
    # prometheus-client picks its value class when it is first imported, which in a worker happens
    # before this runs (this module imports it). Re-pick it now; metrics made from here on use mmap files.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    with _lock:
        _default = None
    return folder


def node_dir(settings: Settings, node: str) -> Path:
    """The metric folder of worker ``node`` (``<var>/metrics/<node>``)."""
    return metrics_dir(settings) / _safe_name(node)


#: Metric kinds whose values add up across processes: an exited process's are folded into one file.
_SUMMED_KINDS = ("counter", "histogram", "summary")
#: The "pid" part of the folded files' names (``counter_archive.db``): read like any process's file.
_ARCHIVE = "archive"
#: Taken exclusively while a process's files are folded, shared while an exposition reads them.
_LOCK_FILE = ".fold.lock"


@contextmanager
def _folder_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    try:
        fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # A folder this process cannot write to (a read-only scrape): nothing is folded by this
        # process, and a scrape without the lock is what prometheus-client itself does.
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def mark_process_dead(pid: int, folder: Path | None = None) -> None:
    """Tidy up after an exited prefork child: drop its live gauges, fold its counters into the archive.

    Celery replaces a pool child every ``worker_max_tasks_per_child`` tasks, and prometheus-client
    keeps each dead child's counter and histogram files (their counts must stay in the totals). An
    OTP worker replacing a child every few minutes would leave thousands of files a week, and every
    scrape reads every file. Instead the child's values are added into ``counter_archive.db`` (and
    ``histogram_``/``summary_``) under an exclusive lock that expositions share, and its own files are
    deleted: a scrape sees the totals before or after, never a counter that went down.
    """
    from prometheus_client import multiprocess

    target = folder or multiprocess_dir()
    if target is None or not target.is_dir():
        return
    multiprocess.mark_process_dead(pid, str(target))  # type: ignore[no-untyped-call]
    fold_process_files(pid, target)


def fold_process_files(pid: int, folder: Path) -> int:
    """Add process ``pid``'s counter, histogram and summary values to ``folder``'s archive files.

    Returns:
        How many of the process's files were folded (and deleted).
    """
    from prometheus_client.mmap_dict import MmapedDict

    folded = 0
    with _folder_lock(folder, exclusive=True):
        for kind in _SUMMED_KINDS:
            dead = folder / f"{kind}_{pid}.db"
            if not dead.is_file():
                continue
            values = MmapedDict.read_all_values_from_file(str(dead))  # type: ignore[no-untyped-call]
            archive = MmapedDict(str(folder / f"{kind}_{_ARCHIVE}.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _pos in values:
                    current, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                    archive.write_value(key, current + value, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            dead.unlink()
            folded += 1
    return folded


def _has_header(path: Path) -> bool:
    try:
        return path.stat().st_size >= 8
    except FileNotFoundError:
        return False


class MultiProcessDirCollector(Collector):
    """Merge the metric files of every process under ``folder`` (recursively: one sub-folder per worker).

    Args:
        folder: A ``PROMETHEUS_MULTIPROC_DIR`` or a parent of several.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Metric]:
        """Merged counters, histograms and gauges of every process."""
        from prometheus_client.multiprocess import MultiProcessCollector

        with ExitStack() as stack:
            # Each worker folder's lock, shared: no exited child is folded while its files are read.
            folders = sorted({p.parent for p in self.folder.rglob("*.db")})
            for sub in folders:
                stack.enter_context(_folder_lock(sub, exclusive=False))
            # Listed again under the locks (a fold since the first listing removed files), and only
            # in the locked folders (a worker started meanwhile is read at the next scrape).
            # A process creates its file empty and sizes it a moment later: an empty file holds no
            # values yet and would fail the whole read (prometheus-client unpacks its header). Files
            # only grow, so one seen non-empty here is readable below.
            files = sorted(str(p) for sub in folders for p in sub.glob("*.db") if _has_header(p))
            merged: list[Metric] = list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        return merged

    def describe(self) -> Iterable[Metric]:
        """Nothing: the names depend on the files present at scrape time."""
        return []


# -- scrape-time gauges ---------------------------------------------------------------------------


def _broker_lengths(settings: Settings, queues: Iterable[str]) -> dict[str, int]:
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        prefix = settings.broker_key_prefix  # kombu's global_keyprefix
        try:
            pipe = client.pipeline(transaction=False)
            names = list(queues)
            # kombu keeps a priority-stepped message in "<queue>\x06\x16<step>"; count every step.
            keys = [[f"{prefix}{q}", *(f"{prefix}{q}\x06\x16{step}" for step in (3, 6, 9))] for q in names]
            for group in keys:
                for key in group:
                    pipe.llen(key)
            values = iter(pipe.execute())
            return {q: sum(int(next(values)) for _ in group) for q, group in zip(names, keys, strict=True)}
        finally:
            client.close()
    if url.startswith("filesystem"):
        folder = settings.var_dir / "broker" / "queue"
        counts = dict.fromkeys(queues, 0)
        suffixes = {f"{q}.msg": q for q in counts}
        if folder.is_dir():
            for name in os.listdir(folder):
                queue = suffixes.get(name.partition(".")[2])
                if queue is not None:
                    counts[queue] += 1
        return counts
    return {}


@dataclass(frozen=True)
class BacklogSnapshot:
    """What :class:`BacklogCollector` read (also used by ``kmsg doctor``).

    Attributes:
        queue_length: Tasks waiting in the broker, by queue (empty when the broker is unreadable).
        queued: Messages ``queued`` in the database, by queue.
        oldest_queued_age: Age in seconds of the oldest ``queued`` message, by queue.
        states: Messages in each non-final state.
        tracking_due: ``sent`` messages whose status check is due.
        tracking_oldest_due_age: How late the most overdue check is, seconds.
        scheduled_overdue: ``scheduled`` messages whose time has passed.
        scheduled_oldest_overdue_age: How late the most overdue one is, seconds.
        retries_due: ``retrying`` messages whose next attempt is due.
        heartbeat_age: Seconds since each periodic job last ran.
        errors: What could not be read (``database``, ``broker``) and why.
    """

    queue_length: dict[str, int]
    queued: dict[str, int]
    oldest_queued_age: dict[str, float]
    states: dict[str, int]
    tracking_due: int
    tracking_oldest_due_age: float
    scheduled_overdue: int
    scheduled_oldest_overdue_age: float
    retries_due: int
    heartbeat_age: dict[str, float]
    errors: dict[str, str]


WAITING_STATES = ("scheduled", "queued", "sending", "retrying", "sent")


def read_backlog(settings: Settings, engine: Engine, *, now: datetime | None = None) -> BacklogSnapshot:
    """Read queue lengths and database backlogs once (bounded: every query uses a status index)."""
    from sqlalchemy.exc import SQLAlchemyError

    from kmsg_worker.dispatch import QUEUES, queue_for
    from kmsg_worker.heartbeat import read_heartbeats
    from kmsg_worker.storage import queries

    now = now or datetime.now(UTC)
    errors: dict[str, str] = {}
    try:
        lengths = _broker_lengths(settings, QUEUES.values())
    except Exception as exc:  # noqa: BLE001 - any broker failure is reported as a gauge, not raised
        lengths, errors["broker"] = {}, f"{type(exc).__name__}: {exc}"[:300]

    def age(ts: datetime | None) -> float:
        return max(0.0, (now - ts).total_seconds()) if ts is not None else 0.0

    queued: dict[str, int] = {}
    oldest: dict[str, float] = {}
    states: dict[str, int] = {}
    tracking = (0, 0.0)
    scheduled = (0, 0.0)
    retries = 0
    heartbeats: dict[str, float] = {}
    try:
        with engine.connect() as conn:
            states = {s: n for s, n in queries.waiting_state_counts(conn, WAITING_STATES).items() if n}
            for priority, first, count in queries.queued_by_priority(conn):
                queue = queue_for(priority) if priority in ("high", "normal", "bulk") else QUEUES["send"]
                queued[queue] = queued.get(queue, 0) + count
                oldest[queue] = max(oldest.get(queue, 0.0), age(first))
            count, first = queries.tracking_due(conn, now)
            tracking = (count, age(first))
            count, first = queries.scheduled_overdue(conn, now)
            scheduled = (count, age(first))
            retries = queries.retries_due(conn, now)
        heartbeats = {name: age(info.beat_at) for name, info in read_heartbeats(engine).items()}
    except SQLAlchemyError as exc:
        errors["database"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:300]
    for queue in (QUEUES["priority"], QUEUES["send"], QUEUES["bulk"]):
        queued.setdefault(queue, 0)
        oldest.setdefault(queue, 0.0)
    return BacklogSnapshot(
        queue_length=lengths,
        queued=queued,
        oldest_queued_age=oldest,
        states={s: states.get(s, 0) for s in WAITING_STATES},
        tracking_due=tracking[0],
        tracking_oldest_due_age=tracking[1],
        scheduled_overdue=scheduled[0],
        scheduled_oldest_overdue_age=scheduled[1],
        retries_due=retries,
        heartbeat_age=heartbeats,
        errors=errors,
    )


class BacklogCollector(Collector):
    """Gauges read from the broker and the database at scrape time.

    Args:
        settings: Broker and database URLs.
        engine: The database engine (default: one built from the settings, kept for later scrapes).
        clock: Time source (tests).
    """

    def __init__(
        self, settings: Settings, engine: Engine | None = None, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def engine(self) -> Engine:
        """The engine, created on the first scrape."""
        if self._engine is None:
            from kmsg_worker.storage.db import make_engine

            self._engine = make_engine(self.settings.database_url, pool_size=1)
        return self._engine

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not query the database."""
        return []

    def collect(self) -> Iterable[Metric]:
        """One read of the broker and the database, as gauge families."""
        snap = read_backlog(self.settings, self.engine, now=self._clock())

        def family(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]) -> Metric:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in values.items():
                fam.add_metric(list(key), value)
            return fam

        def single(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(name, doc, value=value)

        out = [
            family(
                "kmsg_backlog_source_up",
                "1 when the source could be read at this scrape.",
                ["source"],
                {
                    ("database",): 0.0 if "database" in snap.errors else 1.0,
                    ("broker",): 0.0 if "broker" in snap.errors else 1.0,
                },
            ),
            family(
                "kmsg_queue_length",
                "Tasks waiting in the broker queue.",
                ["queue"],
                {(q,): n for q, n in snap.queue_length.items()},
            ),
        ]
        if "database" in snap.errors:
            return out
        out += [
            family(
                "kmsg_queue_oldest_age_seconds",
                "Age of the oldest queued message (database): grows when no worker consumes.",
                ["queue"],
                {(q,): a for q, a in snap.oldest_queued_age.items()},
            ),
            family(
                "kmsg_queued_messages",
                "Messages queued in the database.",
                ["queue"],
                {(q,): n for q, n in snap.queued.items()},
            ),
            family(
                "kmsg_messages_in_state",
                "Messages in each non-final state.",
                ["status"],
                {(s,): n for s, n in snap.states.items()},
            ),
            single("kmsg_tracking_backlog_messages", "Sent messages whose status check is due.", snap.tracking_due),
            single(
                "kmsg_tracking_oldest_due_age_seconds",
                "How late the most overdue status check is.",
                snap.tracking_oldest_due_age,
            ),
            single("kmsg_scheduled_backlog_messages", "Scheduled messages (all).", snap.states["scheduled"]),
            single(
                "kmsg_scheduled_overdue_messages",
                "Scheduled messages past their time, not dispatched.",
                snap.scheduled_overdue,
            ),
            single(
                "kmsg_scheduled_oldest_overdue_age_seconds",
                "How late the most overdue scheduled message is.",
                snap.scheduled_oldest_overdue_age,
            ),
            single("kmsg_retry_backlog_messages", "Retrying messages whose next attempt is due.", snap.retries_due),
            family(
                "kmsg_beat_heartbeat_age_seconds",
                "Seconds since each periodic job last ran in a worker.",
                ["job"],
                {(j,): a for j, a in snap.heartbeat_age.items()},
            ),
        ]
        return out


# -- exposition -----------------------------------------------------------------------------------


def build_registry(settings: Settings, *, folder: Path | None = None, backlog: bool = True) -> CollectorRegistry:
    """A registry to expose: merged multiprocess files (or this process's metrics) plus the backlog gauges.

    Args:
        settings: The settings.
        folder: Metric files to merge; default: this process's ``PROMETHEUS_MULTIPROC_DIR`` if set,
            else the in-process metrics.
        backlog: Add :class:`BacklogCollector`.
    """
    registry = CollectorRegistry()
    source = folder or multiprocess_dir()
    if source is not None:
        registry.register(MultiProcessDirCollector(source))
    else:
        registry.register(_Forward(default_metrics))
    if backlog:
        registry.register(BacklogCollector(settings))
    return registry


class _Forward(Collector):
    """Expose the current in-process :class:`Metrics` (which :func:`use_metrics` may swap)."""

    def __init__(self, get: Callable[[], Metrics]) -> None:
        self._get = get

    def collect(self) -> Iterable[Metric]:
        return list(self._get().registry.collect())

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread).

    Attributes:
        port: The bound port (useful when 0 was asked).
        url: ``http://addr:port/metrics``.
    """

    def __init__(self, server: Any, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_address[1])
        self.url = f"http://{addr}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_server(port: int, addr: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr)


# -- command line ---------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    # The worker that spawned us may be SIGKILLed and never stop us: leave with it, freeing the port.
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def cmd_metrics_server(ns: argparse.Namespace) -> int:
    """``kmsg metrics-server``: serve every worker's metrics on this host plus the backlog gauges."""
    from kmsg_worker.logging import get_logger
    from kmsg_worker.settings import Settings

    settings = Settings.from_env()
    folder = Path(ns.dir) if ns.dir else metrics_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    log = get_logger("kmsg.metrics")
    # Blocked before any thread starts, so SIGTERM waits for sigwait() and the port is released cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        server = start_metrics_server(ns.port, ns.addr, build_registry(settings, folder=folder))
    except OSError as exc:
        log.error("metrics.server_failed", port=ns.port, error=str(exc))
        print(f"error: cannot serve on {ns.addr}:{ns.port}: {exc}", file=sys.stderr)
        return 3
    if ns.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(ns.parent_pid,), daemon=True).start()
    log.info("metrics.server_started", url=server.url, folder=str(folder))
    print(f"serving {server.url} (worker files under {folder})", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.close()
    return 0


def spawn_metrics_server(port: int, addr: str, folder: Path) -> subprocess.Popen[bytes]:
    """Start ``kmsg metrics-server`` for ``folder`` as a child process of this one (the worker's main process).

    A separate process, not a thread: the worker's main process forks pool children for its whole
    life (``worker_max_tasks_per_child``), and a fork while a scrape thread holds an import or
    connection lock leaves the child deadlocked on it (observed: children stuck in an import lock).
    """
    command = [sys.executable, "-m", "kmsg_worker.cli", "metrics-server", "--port", str(port), "--addr", addr]
    command += ["--dir", str(folder), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(command, env=dict(os.environ), stdin=subprocess.DEVNULL)


def add_subcommand(sub: Any) -> None:
    """Register ``kmsg metrics-server`` on the CLI's subparsers."""
    parser = sub.add_parser("metrics-server", help="serve Prometheus metrics of this host's workers and the backlogs")
    parser.add_argument("--port", type=int, default=9808)
    parser.add_argument("--addr", default="127.0.0.1", help="bind address (keep loopback unless scraped remotely)")
    parser.add_argument("--dir", help="worker metric files (default: $KMSG_VAR_DIR/metrics)")
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_metrics_server)
