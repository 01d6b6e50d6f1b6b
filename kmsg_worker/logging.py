"""Structured logging: JSON events with bound context and masked phone numbers.

Events are snake_case or dotted verbs (``message.sent``), never f-strings with data baked in. The
:func:`mask_phone_numbers` processor masks anything that looks like a phone number in every value,
so a number can only reach the logs masked (``010****5678``), even by mistake. Every event name,
its fields and the metric it feeds are listed in ``docs/EVENTS.md``; the metrics count the events
through a processor the app's configuration adds (:func:`add_event_counter`).

One correlation id follows a message from the producer into every task that handles it: the producer
binds it (:func:`bind_correlation_id`, e.g. a web request id), the Celery publish hook copies it into
the ``kmsg_correlation_id`` message header (:func:`correlation_for_publish`), and ``task_prerun``
binds it again in the worker, so every event of the task carries ``correlation_id``.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog

# Re-exported: the masking lives in the leaf module kmsg_worker.pii; these names stay importable here.
from kmsg_worker.pii import mask_phone, mask_phone_numbers

__all__ = [
    "CORRELATION_HEADER",
    "add_event_counter",
    "bind_correlation_id",
    "configure_logging",
    "correlation_for_publish",
    "current_correlation_id",
    "get_logger",
    "mask_phone",
    "mask_phone_numbers",
    "stdlib_formatter",
]

#: Celery message header that carries the correlation id from a producer to the tasks.
CORRELATION_HEADER = "kmsg_correlation_id"
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40, "critical": 50}

#: A structlog processor: ``(logger, method name, event dict) -> event dict``.
Processor = Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]
#: What :func:`add_event_counter` installed, in order.
_counters: tuple[Processor, ...] = ()
#: The arguments of the last :func:`configure_logging` (``None``: not configured yet).
_configured_as: tuple[str, bool, bool] | None = None


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured.

    A process that swaps its stderr after configuring (a test capturing output, a CLI command run in
    tests, a daemon redirecting it) would otherwise keep writing to the old, possibly closed, stream.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _drop_below(level: int) -> Any:
    def drop(_: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if _LEVELS.get(str(event_dict.get("level") or method_name).lower(), 20) < level:
            raise structlog.DropEvent
        return event_dict

    return drop


def add_event_counter(counter: Processor) -> None:
    """Run ``counter`` on every event of this process, before the level filter.

    The app's configuration installs the Prometheus counters this way (``config/celery.py``),
    so this module never imports the metrics. Adding the same counter twice keeps one; a process
    whose logging is already configured is configured again with the same level and output.

    Args:
        counter: A structlog processor that counts the event and returns it unchanged.
    """
    global _counters
    if counter in _counters:
        return
    _counters = (*_counters, counter)
    if _configured_as is not None:
        level, json_output, counting = _configured_as
        configure_logging(level, json_output=json_output, counters=counting)


def configure_logging(level: str = "INFO", *, json_output: bool = True, counters: bool = True) -> None:
    """Configure structlog once per process.

    Args:
        level: The lowest level written.
        json_output: One JSON object per line (production), or the console renderer (a terminal).
        counters: Run the event counters added with :func:`add_event_counter` (the Prometheus
            metrics, where the app installed them). Counting happens before the level filter, so
            ``level="WARNING"`` quiets the logs but never a counter.
    """
    global _configured_as
    output_level = getattr(logging, level.upper(), logging.INFO)
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        # Tracebacks become text first, so the masking below sees them.
        structlog.processors.format_exc_info,
        mask_phone_numbers,
    ]
    counting = counters and bool(_counters)
    if counting:
        processors.extend(_counters)
        if output_level > logging.INFO:
            processors.append(_drop_below(output_level))
    processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    # Counted events are INFO: let them reach the processors even when fewer are written.
    min_level = min(output_level, logging.INFO) if counting else output_level
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    _configured_as = (level, json_output, counters)


def stdlib_formatter(*, json_output: bool = True) -> logging.Formatter:
    """A ``logging`` formatter that gives other libraries' records our masking and our format.

    Celery, kombu, SQLAlchemy and httpx log through the standard library, not through structlog, so
    :func:`mask_phone_numbers` never saw them: a number in an exception Celery logs ("Task ...
    raised unexpected: ...") or in a URL httpx logs would have been written as it is. Workers put
    this formatter on the handlers Celery sets up (``tasks/signals.py``).
    """
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_phone_numbers,
            renderer,
        ],
    )


def get_logger(name: str | None = None) -> Any:
    """Return a structlog logger (configured with defaults on first use)."""
    if _configured_as is None:
        configure_logging()
    return structlog.get_logger(name)


def bind_correlation_id(value: str | None = None) -> str:
    """Bind a correlation id to the current context and return it.

    Call it where a unit of work starts in the producer (a web request, a CLI command); every message
    sent from this context carries the id into its tasks. Without one, a message's own id serves.

    Args:
        value: The id to use (e.g. the web request id); a new random one when omitted.
    """
    correlation_id = value or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
    return correlation_id


def current_correlation_id() -> str | None:
    """The correlation id bound to the current context, if any."""
    value = structlog.contextvars.get_contextvars().get("correlation_id")
    return value if isinstance(value, str) and value else None


def correlation_for_publish(kwargs: Mapping[str, Any] | None) -> str | None:
    """The correlation id a task about to be published should carry.

    The id bound to the publishing context wins: a producer's request id, or, inside a task, the id
    that task arrived with (so retries and failovers keep it). Otherwise the message's own id (or
    the batch id of a chunk task). Beat's sweep and poll tasks have neither and carry none, so a
    message they re-dispatch is correlated by its own id, not by the sweep that found it.
    """
    bound = current_correlation_id()
    if bound is not None:
        return bound
    if kwargs:
        for key in ("message_id", "batch_id"):
            value = kwargs.get(key)
            if isinstance(value, str) and value:
                return value
    return None
