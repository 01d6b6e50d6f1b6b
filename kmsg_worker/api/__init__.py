"""The HTTP API (FastAPI on uvicorn): tenants, keys, messages and batches over the one engine.

Serve it with ``python -m uvicorn --factory kmsg_worker.api:create_app`` (or :func:`run_server`).
"""

from __future__ import annotations

from kmsg_worker.api.app import API_VERSION, create_app

__all__ = ["API_VERSION", "create_app"]
