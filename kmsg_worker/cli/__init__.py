"""The ``kmsg`` command line, on click (rich draws tables and progress on a terminal).

Exit codes: 0 ok; 1 a check failed (``doctor``, ``messages pending --older-than``); 2 invalid
command line, input or configuration; 3 other errors (provider, database, broker, timeout).
Data goes to stdout, progress and notes to stderr; ``--json`` prints JSON instead of tables.

Commands import what they run inside their own body (the doctor's broker and provider probes, the
report, the metrics server, the API server's FastAPI and uvicorn, ~0.5 s alone): ``kmsg --help``
and every other command then load none of it. That cost is the reason for those local imports.
"""

from __future__ import annotations

from kmsg_worker.cli import advertising, api, batches, demo, messages, operations, templates, webhooks  # noqa: F401 - each registers its commands
from kmsg_worker.cli.app import cli, main

__all__ = ["cli", "main"]
