"""Provider delivery reports received over HTTP: ``POST /v1/providers/{provider}/reports``.

Solapi's message-report webhook carries no signature of its own that could be checked here (its
webhook settings take a URL only), so a report is authenticated with a secret this deployment
shares with the sender, ``KMSG_REPORT_SECRET``, in one of two ways:

* Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) signed
  with the secret: the body is authenticated and a report older than
  ``KMSG_REPORT_MAX_AGE_SECONDS`` (default 300) is refused, so a captured request cannot be
  replayed later. A relay in front of the provider, and the fake Solapi, sign this way;
* the secret in the URL registered with the provider (``?token=<secret>``) or in an
  ``X-Kmsg-Report-Token`` header: this is all a provider that only takes a URL can send. It
  proves the sender knows the URL, not the body's integrity; use https only.

A request with signature headers must verify; a wrong or stale signature is refused even when a
token is present. Nothing is applied before the check. A verified report goes through the same
transition function as polling (:func:`kmsg_worker.tracking.apply_reports`).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from typing import Any

from kmsg_worker.api.intake import parse_json
from kmsg_worker.api.problems import Problem
from kmsg_worker.errors import ProviderError
from kmsg_worker.logging import get_logger
from kmsg_worker.runtime import Runtime
from kmsg_worker.tracking import apply_reports
from kmsg_worker.webhooks.signing import SignatureError, verify

__all__ = ["receive_reports"]

log = get_logger("kmsg.api")

#: The header that may carry the shared secret instead of the query.
TOKEN_HEADER = "x-kmsg-report-token"


def _authenticate(rt: Runtime, provider: str, headers: Mapping[str, str], token: str | None, body: bytes) -> None:
    policy = rt.settings.webhooks
    secret = policy.report_secret
    if not secret:
        raise Problem("report-unauthorized", "delivery reports are not accepted: KMSG_REPORT_SECRET is not set")
    lower = {k.lower(): v for k, v in headers.items()}
    if "webhook-signature" in lower or "webhook-timestamp" in lower:
        try:
            verify(secret, lower, body, now=time.time(), tolerance=policy.report_max_age)
        except SignatureError as exc:
            log.warning("reports.refused", provider=provider, reason=str(exc))
            raise Problem("report-unauthorized", f"the report's signature is refused: {exc}") from None
        return
    given = token or lower.get(TOKEN_HEADER)
    if not given or not hmac.compare_digest(given.encode(), secret.encode()):
        log.warning("reports.refused", provider=provider, reason="missing or wrong token")
        raise Problem("report-unauthorized", "the report carries no valid signature or token")


def receive_reports(
    rt: Runtime, provider: str, headers: Mapping[str, str], token: str | None, body: bytes
) -> dict[str, Any]:
    """Authenticate a provider's delivery report, then apply it; returns what it changed.

    Raises:
        Problem: ``report-unauthorized`` (401), ``not-found`` (a provider not configured here),
            ``bad-request`` (a body that is not the provider's report), ``report-early`` (503: some
            reports overtook our record of the send; the rest is applied, the sender should retry).
    """
    _authenticate(rt, provider, headers, token, body)
    if provider not in rt.settings.providers:
        raise Problem("not-found", f"provider {provider!r} is not configured here")
    try:
        reports = rt.provider(provider).delivery_reports(parse_json(body))
    except ProviderError as exc:
        raise Problem("bad-request", str(exc)) from None
    result = apply_reports(rt, provider, reports)
    if result.early:
        # What matched is applied; asking again re-applies nothing (every change is conditional)
        # and settles the reports that came before our record of the send.
        raise Problem(
            "report-early",
            f"{result.early} report(s) concern messages whose send is not recorded yet: send again",
            headers={"Retry-After": "1"},
        )
    return {
        "received": len(reports),
        "matched": result.claimed,
        "delivered": result.delivered,
        "failed": result.failed,
        "fallbacks": len(result.fallbacks),
    }
