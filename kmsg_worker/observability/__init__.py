"""Prometheus metrics: counters fed by the structured log events, gauges computed at scrape time.

The full event -> metric table is in ``docs/EVENTS.md``. Four modules, along the flow:

* :mod:`~kmsg_worker.observability.events`: the counters and histograms, folded from the log
  events by a structlog processor the app's configuration installs (prometheus-client only).
* :mod:`~kmsg_worker.observability.multiprocess`: prefork safety, one folder of memory-mapped files
  per worker, folded when a child exits and merged at exposition.
* :mod:`~kmsg_worker.observability.backlog`: the scrape-time gauges (broker queue lengths, database
  backlogs, beat heartbeats), read through :mod:`kmsg_worker.storage.queries`.
* :mod:`~kmsg_worker.observability.server`: the registry to expose and the ``/metrics`` endpoint
  (``kmsg metrics-server``, or one per worker with ``KMSG_METRICS_PORT``).

This package imports none of them, so a process that only counts events never loads the server,
the database queries or the broker client.
"""
