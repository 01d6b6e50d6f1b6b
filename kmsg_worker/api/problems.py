"""RFC 9457 problem details: every error of the API, with a stable ``type`` per kind of error.

The ``type`` URIs are URNs (``urn:kmsg:problem:<slug>``): stable identifiers a client can switch
on, listed in ``docs/API.md``. Validation problems carry ``errors``: ``{field, rule, message}``
for a message, ``{row, field, rule, message}`` for the rows of a batch, taken from the domain's
:class:`~kmsg_worker.errors.ValidationError` (the same rules as :class:`~kmsg_worker.KMsg`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.responses import Response

from kmsg_worker.errors import (
    AcceptanceUnknownError,
    BatchPartiallyStoredError,
    BatchValidationError,
    IdempotencyConflictError,
    InvalidStateError,
    MessageNotFoundError,
    StorageUnavailableError,
    ValidationError,
)

__all__ = ["MAX_LISTED_ERRORS", "PROBLEM_TYPES", "Problem", "problem_from_domain", "problem_response"]

MEDIA_TYPE = "application/problem+json"
#: Invalid rows listed in one answer at most (the total is in ``errors_total``).
MAX_LISTED_ERRORS = 1000

#: slug -> (HTTP status, title). The slug is the stable part of ``type``.
PROBLEM_TYPES: Mapping[str, tuple[int, str]] = {
    "malformed-json": (400, "The body is not valid JSON"),
    "malformed-csv": (400, "The body is not UTF-8 CSV"),
    "bad-request": (400, "The request is malformed"),
    "unauthorized": (401, "Missing, malformed, unknown or revoked API key"),
    "forbidden": (403, "This key may not do this"),
    "report-unauthorized": (401, "The delivery report carries no valid signature or token"),
    "not-found": (404, "No such resource"),
    "method-not-allowed": (405, "Method not allowed"),
    "idempotency-conflict": (409, "The idempotency key was used for a different request"),
    "invalid-state": (409, "Not allowed in the resource's current state"),
    "payload-too-large": (413, "The body is too large"),
    "unsupported-media-type": (415, "Unsupported Content-Type"),
    "validation": (422, "The request is invalid"),
    "batch-validation": (422, "Some rows of the batch are invalid"),
    "rate-limited": (429, "Too many requests for this key"),
    "internal": (500, "Internal error"),
    "storage-unavailable": (503, "The system of record is unavailable; nothing was accepted"),
    "acceptance-unknown": (503, "The connection was lost while storing; look the request up before retrying"),
    "report-early": (503, "A delivery report came before the send was recorded; send it again"),
    "batch-partially-stored": (503, "The database went away during the batch; the first rows were stored"),
}


def type_uri(slug: str) -> str:
    """The ``type`` member of problem ``slug``."""
    return f"urn:kmsg:problem:{slug}"


class Problem(Exception):
    """An error answered as ``application/problem+json``.

    Args:
        slug: Key of :data:`PROBLEM_TYPES`.
        detail: Human-readable explanation of this occurrence (never a key or a phone number).
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
        extra: Extension members (``errors``, ``batch_id`` ...).
    """

    def __init__(
        self,
        slug: str,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        status, title = PROBLEM_TYPES[slug]
        super().__init__(detail or title)
        self.slug = slug
        self.status = status
        self.title = title
        self.detail = detail or title
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        """The JSON members."""
        out: dict[str, Any] = {"type": type_uri(self.slug), "title": self.title, "status": self.status}
        out["detail"] = self.detail
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    """The HTTP response of ``problem``."""
    return Response(
        orjson.dumps(problem.body(instance)),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers,
    )


def validation_problem(errors: Sequence[Mapping[str, Any]], detail: str) -> Problem:
    """A ``validation`` problem listing ``errors`` (``{field, rule, message}``)."""
    return Problem("validation", detail, errors=list(errors))


def problem_from_domain(exc: Exception) -> Problem | None:
    """The problem a domain error is answered with (``None``: not a domain error the API maps)."""
    if isinstance(exc, BatchValidationError):
        rows = [{"row": e.row, "field": e.field, "rule": e.rule, "message": e.message} for e in exc.errors]
        return Problem(
            "batch-validation",
            f"{len(rows)} invalid row(s); nothing was stored",
            errors=rows[:MAX_LISTED_ERRORS],
            errors_total=len(rows),
        )
    if isinstance(exc, ValidationError):
        return validation_problem([exc.as_dict()], f"{exc.field}: {exc.detail}")
    if isinstance(exc, IdempotencyConflictError):
        return Problem("idempotency-conflict", "the idempotency key was already used with a different request")
    if isinstance(exc, MessageNotFoundError):
        return Problem("not-found")
    if isinstance(exc, InvalidStateError):
        return Problem("invalid-state", str(exc))
    if isinstance(exc, BatchPartiallyStoredError):
        return Problem("batch-partially-stored", str(exc), batch_id=exc.batch_id, stored=exc.stored)
    if isinstance(exc, AcceptanceUnknownError):
        return Problem(
            "acceptance-unknown",
            str(exc),
            message_id=exc.message_id,
            batch_id=exc.batch_id,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, StorageUnavailableError):
        return Problem("storage-unavailable", headers={"Retry-After": "5"})
    return None
